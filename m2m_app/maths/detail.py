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

from m2m_app.maths.grid import in_threads, intensity_range, resample_scalar, scale_intensity

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

    def fa_shift(
        self,
        t1w_data: np.ndarray,
        zooms_mm: Sequence[float],
        where: np.ndarray | None = None,
        threads: int = 1,
    ) -> np.ndarray:
        """The FA change ``(X, Y, Z)`` float32 on the T1w's own grid (voxel sizes ``zooms_mm``).

        ``where`` ``(X, Y, Z)`` bool: compute it there only (zero elsewhere; None: everywhere).
        The low-pass is taken on a grid of about :data:`LOWPASS_VOXEL_MM` (block means) and
        brought back linearly: a Gaussian of several mm on a 0.5 mm grid would cost seconds.
        The per-voxel work runs over slabs of the first axis in ``threads`` threads (same values).
        """
        lookup = np.asarray(self.fa_by_intensity, dtype=np.float32)
        bins = len(lookup)
        inside = None if where is None else np.asarray(where, dtype=bool)
        low, high = intensity_range(t1w_data)
        looked_up: np.ndarray = np.empty(t1w_data.shape[:3], dtype=np.float32)

        def look_up(rows: slice) -> None:
            intensity = scale_intensity(t1w_data[rows], low, high)  # normalise_intensity, slab by slab
            looked_up[rows] = lookup[np.minimum((intensity * bins).astype(int), bins - 1)]

        in_threads(look_up, looked_up.shape[0], threads)
        zooms = np.asarray(zooms_mm, dtype=float)
        factors = np.maximum(1, np.round(LOWPASS_VOXEL_MM / zooms)).astype(int)
        coarse = _block_mean(looked_up, factors)
        coarse = ndimage.gaussian_filter(coarse, self.sigma_mm / (zooms * factors), mode="nearest")
        coarse = _upsample_axis(coarse, 0, factors[0], looked_up.shape[0])  # small: (X, y, z)
        shift: np.ndarray = np.empty_like(looked_up)

        def transfer(rows: slice) -> None:
            lowpass = _upsample_axis(
                _upsample_axis(coarse[rows], 1, factors[1], shift.shape[1]), 2, factors[2], shift.shape[2]
            )
            shift[rows] = self.weight * (looked_up[rows] - lowpass)
            if inside is not None:
                shift[rows][~inside[rows]] = 0.0

        in_threads(transfer, shift.shape[0], threads)
        return shift

    def fa_shift_on(
        self,
        t1w_data: np.ndarray,
        t1w_affine: np.ndarray,
        out_shape: tuple[int, int, int],
        out_affine: np.ndarray,
        where: np.ndarray | None = None,
        threads: int = 1,
    ) -> np.ndarray:
        """:meth:`fa_shift` on another grid (``where`` is on that grid): as is on the T1w's own
        grid, else computed everywhere and resampled trilinearly; in ``threads`` threads."""
        zooms = np.sqrt((np.asarray(t1w_affine)[:3, :3] ** 2).sum(axis=0))
        if tuple(out_shape) == t1w_data.shape[:3] and np.allclose(out_affine, t1w_affine):
            return self.fa_shift(t1w_data, zooms, where, threads)
        shift = self.fa_shift(t1w_data, zooms, threads=threads)
        return resample_scalar(shift, t1w_affine, out_affine, out_shape, threads=threads)

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


def _upsample_axis(coarse: np.ndarray, axis: int, factor: int, size: int) -> np.ndarray:
    """Block-mean grid ``coarse`` back onto ``size`` fine voxels along ``axis`` (linear, edges held), float32."""
    position = (np.arange(size, dtype=np.float32) + 0.5) / factor - 0.5
    low = np.clip(np.floor(position).astype(int), 0, coarse.shape[axis] - 1)
    high = np.minimum(low + 1, coarse.shape[axis] - 1)
    weight = np.clip(position - low, 0.0, 1.0).reshape([-1 if a == axis else 1 for a in range(coarse.ndim)])
    return np.take(coarse, low, axis=axis) * (1.0 - weight) + np.take(coarse, high, axis=axis) * weight
