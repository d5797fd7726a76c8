"""T1w detail transfer: the fine FA structure that the 2 mm model grid cannot carry, taken from the T1w.

The translators work on a 2 mm grid and their FA is smoother than the teacher's even there.
Written on a finer T1w grid, the predicted FA gains the band-pass of a much simpler FA
estimate that does see every T1w voxel: FA looked up from the normalised T1w intensity
(the mean teacher FA per intensity bin, :class:`BinnedRegression`, fitted on the training
subjects), minus its Gaussian low-pass (``sigma_mm``). Only that high-pass part, times a
weight, is added: the network keeps the low frequencies (where it is much better than the
intensity lookup) and the lookup adds what it carries below the model grid's resolution,
mostly the white/grey-matter boundaries (an image-fusion form of the "learned upsampling" of
issue #16; the weight and ``sigma_mm`` are chosen on the leave-one-person-out folds,
``benchmarks/ablate_fa_detail.py``).

The tensor is changed consistently: its eigenvalues are moved away from (or towards) their
mean so that its FA changes by the same amount
(:func:`~m2m_app.maths.tensor.rescale_anisotropy`), which keeps MD
and the eigenvectors (V1) as they were. All functions are pure (no I/O).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from m2m_app.maths.grid import normalise_intensity, resample_scalar

#: Voxel size (mm) of the grid the low-pass of :meth:`FaDetail.fa_shift` is computed on.
LOWPASS_VOXEL_MM = 2.0


@dataclass
class BinnedRegression:
    """``y ≈ mean of y in the bin of x``: ``bins`` equal bins on ``[low, high]`` (values clipped)."""

    low: float
    high: float
    bins: int = 64
    sums: np.ndarray = field(init=False, repr=False)
    counts: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.sums, self.counts = np.zeros(self.bins), np.zeros(self.bins)

    def _bin(self, x: np.ndarray) -> np.ndarray:
        scaled = (np.clip(x, self.low, self.high) - self.low) / (self.high - self.low)
        return np.minimum((scaled * self.bins).astype(int), self.bins - 1)

    def fit(self, x: np.ndarray, y: np.ndarray) -> BinnedRegression:
        """Accumulate the pairs ``(x, y)`` (flat arrays); call once per training subject."""
        index = self._bin(x)
        self.sums += np.bincount(index, weights=y, minlength=self.bins)
        self.counts += np.bincount(index, minlength=self.bins)
        return self

    @property
    def means(self) -> np.ndarray:
        """The mean ``y`` of each bin ``(bins,)``; an empty bin gets the overall mean."""
        overall = self.sums.sum() / max(self.counts.sum(), 1)
        return np.where(self.counts > 0, self.sums / np.maximum(self.counts, 1), overall)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Bin means at ``x``."""
        return self.means[self._bin(x)]


@dataclass(frozen=True)
class FaDetail:
    """What the T1w detail transfer adds to the predicted FA (stored with the phase-1 weights).

    fa_by_intensity : the mean teacher FA in each of ``len`` equal bins of normalised T1w
        intensity over [0, 1] (:func:`~m2m_app.maths.grid.normalise_intensity`).
    sigma_mm : Gaussian sigma (mm) of the low-pass removed from the looked-up FA.
    weight : factor of the high-pass added to the predicted FA (FA units per FA unit).
    """

    fa_by_intensity: tuple[float, ...]
    sigma_mm: float
    weight: float

    def fa_shift(self, t1w_data: np.ndarray, zooms_mm: Sequence[float], where: np.ndarray | None = None) -> np.ndarray:
        """The FA change ``(X, Y, Z)`` float32 on the T1w's own grid (voxel sizes ``zooms_mm``).

        ``where`` ``(X, Y, Z)`` bool: compute it there only (zero elsewhere; None: everywhere).
        The low-pass is taken on a grid of about :data:`LOWPASS_VOXEL_MM` (block means) and
        brought back linearly: a Gaussian of several mm on a 0.5 mm grid would cost seconds.
        """
        lookup = np.asarray(self.fa_by_intensity, dtype=np.float32)
        bins = len(lookup)
        looked_up = lookup[np.minimum((normalise_intensity(t1w_data) * bins).astype(int), bins - 1)]
        zooms = np.asarray(zooms_mm, dtype=float)
        factors = np.maximum(1, np.round(LOWPASS_VOXEL_MM / zooms)).astype(int)
        coarse = _block_mean(looked_up, factors)
        coarse = ndimage.gaussian_filter(coarse, self.sigma_mm / (zooms * factors), mode="nearest")
        shift = self.weight * (looked_up - _upsample_linear(coarse, factors, looked_up.shape))
        if where is not None:
            shift[~np.asarray(where, bool)] = 0.0
        return shift.astype(np.float32, copy=False)

    def fa_shift_on(
        self,
        t1w_data: np.ndarray,
        t1w_affine: np.ndarray,
        out_shape: tuple[int, int, int],
        out_affine: np.ndarray,
        where: np.ndarray | None = None,
    ) -> np.ndarray:
        """:meth:`fa_shift` on another grid (``where`` is on that grid): as is on the T1w's own
        grid, else computed everywhere and resampled trilinearly."""
        zooms = np.sqrt((np.asarray(t1w_affine)[:3, :3] ** 2).sum(axis=0))
        if tuple(out_shape) == t1w_data.shape[:3] and np.allclose(out_affine, t1w_affine):
            return self.fa_shift(t1w_data, zooms, where)
        return resample_scalar(self.fa_shift(t1w_data, zooms), t1w_affine, out_affine, out_shape)

    def to_dict(self) -> dict:
        """Plain values for the weights' JSON."""
        return {
            "fa_by_intensity": [float(v) for v in self.fa_by_intensity],
            "sigma_mm": self.sigma_mm,
            "weight": self.weight,
        }

    @classmethod
    def from_dict(cls, values: dict) -> FaDetail:
        """The inverse of :meth:`to_dict`."""
        return cls(
            tuple(float(v) for v in values["fa_by_intensity"]), float(values["sigma_mm"]), float(values["weight"])
        )


def fa_detail_from(values: dict | None) -> FaDetail | None:
    """:class:`FaDetail` of the values stored with the weights (None: no detail transfer)."""
    return None if values is None else FaDetail.from_dict(values)


def _block_mean(volume: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """Means of ``factors``-sized blocks of ``volume`` ``(X, Y, Z)`` (edges padded by repetition)."""
    pad = [(0, (-n) % f) for n, f in zip(volume.shape, factors)]
    padded = np.pad(volume, pad, mode="edge")
    (x, y, z), (fx, fy, fz) = padded.shape, factors
    return padded.reshape(x // fx, fx, y // fy, fy, z // fz, fz).mean(axis=(1, 3, 5), dtype=np.float32)


def _upsample_linear(coarse: np.ndarray, factors: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Block-mean grid ``coarse`` back onto the fine grid ``shape`` (linear along each axis, edges held)."""
    out = coarse
    for axis, (factor, size) in enumerate(zip(factors, shape)):
        position = (np.arange(size, dtype=np.float32) + 0.5) / factor - 0.5
        low = np.clip(np.floor(position).astype(int), 0, out.shape[axis] - 1)
        high = np.minimum(low + 1, out.shape[axis] - 1)
        weight = np.clip(position - low, 0.0, 1.0).reshape([-1 if a == axis else 1 for a in range(out.ndim)])
        out = np.take(out, low, axis=axis) * (1.0 - weight) + np.take(out, high, axis=axis) * weight
    return out
