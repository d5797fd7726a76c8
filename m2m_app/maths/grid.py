"""Conforming a T1w to the translators' model grid, and resampling between the two grids.

The model grid is axis-aligned RAS+ (so world and voxel axes coincide), isotropic
:data:`MODEL_VOXEL_MM` mm, :data:`MODEL_SHAPE` voxels (192 × 224 × 192 mm, a whole adult
head), centred on the T1w's centre of intensity mass. Any source grid (oblique, LAS,
PSR, anisotropic) maps onto it by one affine resampling, and every prediction maps
back onto the source's own shape and affine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from scipy import ndimage

from m2m_app.maths.tensor import (
    components_to_matrix,
    compose_tensors,
    eigen_decomposition,
    log_tensors,
    matrix_to_components,
    rescale_anisotropy,
)

#: Isotropic voxel size of the model grid, mm.
MODEL_VOXEL_MM = 2.0
#: Shape of the model grid (R, A, S), voxels; each axis is a multiple of 16 (4 poolings).
MODEL_SHAPE: tuple[int, int, int] = (96, 112, 96)
#: Percentiles (inside the foreground) mapped to 0 and 1 by the intensity normalisation.
NORM_PERCENTILES = (0.5, 99.5)
#: Margin (mm) kept between the top of the head and the top of the model grid.
VERTEX_MARGIN_MM = 6.0
#: Margin (mm) around the brain of a typical brain extraction, for simulated skull-stripped volumes.
STRIPPED_MARGIN_MM = 3.0
#: A resampled tensor is kept where at least this fraction of its neighbourhood had tensors.
TENSOR_SUPPORT = 0.5


def foreground(data: np.ndarray) -> np.ndarray:
    """Head foreground ``(X, Y, Z)`` bool: above 10 % of the robust (2–98 %) intensity range."""
    low, high = np.percentile(data, (2.0, 98.0))
    return data > low + 0.1 * (high - low)


def intensity_range(data: np.ndarray) -> tuple[float, float]:
    """The intensities :func:`normalise_intensity` maps to 0 and 1: the foreground's
    :data:`NORM_PERCENTILES` of ``data (X, Y, Z)``."""
    low, high = np.percentile(data[foreground(data)], NORM_PERCENTILES)
    return float(low), float(high)


def scale_intensity(data: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map ``low`` / ``high`` to 0 / 1 and clip, float32 (same shape as ``data``)."""
    return np.clip((data - low) / max(high - low, 1e-6), 0.0, 1.0).astype(np.float32)


def normalise_intensity(data: np.ndarray) -> np.ndarray:
    """Map the 0.5 / 99.5 percentiles of the foreground to 0 / 1 and clip, float32 ``(X, Y, Z)``."""
    return scale_intensity(data, *intensity_range(data))


def brain_extraction_mask(brain: np.ndarray, margin_mm: float, spacing_mm: tuple[float, ...]) -> np.ndarray:
    """What a brain-extraction tool keeps around a brain mask: ``brain`` (bool, any number of
    axes) grown by ``margin_mm`` (Euclidean distance with voxel sizes ``spacing_mm``, one per
    axis), with its holes filled. Used to simulate skull-stripped T1w images."""
    brain = np.asarray(brain, dtype=bool)
    if margin_mm <= 0 or not brain.any():  # (a distance transform without any brain voxel is undefined)
        return ndimage.binary_fill_holes(brain)
    return ndimage.binary_fill_holes(ndimage.distance_transform_edt(~brain, sampling=spacing_mm) <= margin_mm)


def intensity_centre(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World coordinates (mm, RAS+) of the centre of the model grid for a head image, ``(3,)``.

    The centre of intensity mass of the foreground, lowered if needed so that the top of
    the head stays :data:`VERTEX_MARGIN_MM` inside the grid (a long neck pulls the centre
    of mass down; the brain, not the neck, must be covered).
    """
    mask = foreground(data)
    voxel = np.array(ndimage.center_of_mass(np.where(mask, np.clip(data, 0.0, None), 0.0)))
    centre = nib.affines.apply_affine(affine, voxel)
    superior = np.argwhere(mask[::2, ::2, ::2]) * 2 @ affine[2, :3] + affine[2, 3]
    half_height = MODEL_VOXEL_MM * (MODEL_SHAPE[2] - 1) / 2.0
    centre[2] = max(centre[2], np.percentile(superior, 99.9) + VERTEX_MARGIN_MM - half_height)
    return centre


def in_threads(work: Callable[[slice], None], total: int, threads: int, size: int | None = None) -> None:
    """Run ``work`` on consecutive slices of ``range(total)`` in ``threads`` threads.

    The slices hold at most ``size`` items (default: ``total`` split evenly over the threads).
    For work whose loops release the GIL (SciPy's interpolation, NumPy's element-wise and
    linear-algebra loops) on disjoint parts of an output, so the values do not depend on
    ``threads``. A worker's error is raised here.
    """
    threads = max(1, int(threads))
    size = max(1, size if size is not None else -(-total // threads))
    parts = [slice(first, min(first + size, total)) for first in range(0, total, size)]
    if threads == 1 or len(parts) <= 1:
        for part in parts:
            work(part)
        return
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for done in [pool.submit(work, part) for part in parts]:
            done.result()


#: Rows of the output's first axis that :func:`resample_scalar` interpolates in one piece.
SLAB_ROWS = 16


def _antialias_sigma(step: np.ndarray) -> np.ndarray:
    """Gaussian sigma (input voxels) per input axis for output voxels spanning ``step`` input voxels."""
    return np.clip((step - 1.0) / 2.0, 0.0, None)


def resample_scalar(
    volume: np.ndarray,
    in_affine: np.ndarray,
    out_affine: np.ndarray,
    out_shape: tuple[int, int, int],
    order: int = 1,
    threads: int = 1,
) -> np.ndarray:
    """Resample one 3D volume from ``in_affine`` onto (``out_affine``, ``out_shape``), zero outside.

    ``order`` 1 is trilinear (with a Gaussian anti-aliasing pre-filter when the output
    voxels are larger than the input ones), 0 is nearest neighbour. Returns float32. The
    interpolation runs over slabs of :data:`SLAB_ROWS` rows of the output's first axis, in
    ``threads`` threads: the values do not depend on ``threads`` (an output voxel that maps onto
    the input's outer boundary may differ from an unsliced call's by rounding, as the slabs'
    offsets are added in floating point).
    """
    mapping = np.linalg.inv(in_affine) @ out_affine
    volume = np.asarray(volume, dtype=np.float32)
    if order > 0:
        sigma = _antialias_sigma(np.abs(mapping[:3, :3]).sum(axis=1))
        if np.any(sigma > 0.1):
            volume = ndimage.gaussian_filter(volume, sigma, mode="nearest")
    out = np.empty(tuple(out_shape), dtype=np.float32)

    def interpolate(rows: slice) -> None:
        ndimage.affine_transform(
            volume,
            mapping[:3, :3],
            mapping[:3, 3] + mapping[:3, 0] * rows.start,  # the slab's first voxel
            output_shape=out[rows].shape,
            output=out[rows],
            order=order,
            mode="constant",
            cval=0.0,
            prefilter=False,
        )

    in_threads(interpolate, out.shape[0], threads, SLAB_ROWS)
    return out


def resample_volume(
    volume: np.ndarray, in_affine: np.ndarray, out_affine: np.ndarray, out_shape: tuple[int, int, int], order: int
) -> np.ndarray:
    """:func:`resample_scalar` on ``(X, Y, Z)`` or channel by channel on ``(X, Y, Z, C)``."""
    if volume.ndim == 3:
        return resample_scalar(volume, in_affine, out_affine, out_shape, order)
    return np.stack(
        [resample_scalar(volume[..., c], in_affine, out_affine, out_shape, order) for c in range(volume.shape[-1])],
        axis=-1,
    )


def isotropic_grid(
    shape: tuple[int, ...], affine: np.ndarray, resolution_mm: float
) -> tuple[tuple[int, int, int], np.ndarray]:
    """An isotropic grid of ``resolution_mm`` mm with the axes of the grid (``shape``, ``affine``),
    centred on the centre of its field of view and covering all of it (``ceil(extent /
    resolution_mm)`` voxels per axis): ``(shape, affine)``.

    (:func:`nibabel.affines.rescale_affine` would round that centre to a voxel, shifting the
    grid by up to half a voxel.)
    """
    zooms = nib.affines.voxel_sizes(affine)
    x, y, z = (int(n) for n in np.ceil(np.array(shape[:3]) * zooms / resolution_mm - 1e-6))
    axes = np.asarray(affine)[:3, :3] / zooms * resolution_mm
    centre = nib.affines.apply_affine(affine, (np.array(shape[:3]) - 1) / 2.0)
    return (x, y, z), nib.affines.from_matvec(axes, centre - axes @ ((np.array([x, y, z]) - 1) / 2.0))


@dataclass(frozen=True)
class ConformedGrid:
    """The model grid of one T1w and the way back to the T1w's own grid.

    ``shape``/``affine`` describe the model grid; ``source_shape``/``source_affine`` the
    original T1w grid, kept exactly so that predictions are written on it.
    """

    shape: tuple[int, int, int]
    affine: np.ndarray
    source_shape: tuple[int, int, int]
    source_affine: np.ndarray

    def to_model(self, volume: np.ndarray, order: int = 1) -> np.ndarray:
        """Resample a source-grid volume ``(X, Y, Z[, C])`` onto the model grid (same trailing channels)."""
        return resample_volume(volume, self.source_affine, self.affine, self.shape, order)

    def to_source(self, volume: np.ndarray, order: int = 1) -> np.ndarray:
        """Resample a model-grid volume ``(x, y, z[, C])`` back onto the original T1w grid."""
        return resample_volume(volume, self.affine, self.source_affine, self.source_shape, order)

    def output_grid(self, resolution_mm: float | None = None) -> tuple[tuple[int, int, int], np.ndarray]:
        """The grid outputs are written on: ``(shape, affine)``.

        ``None``: the T1w's own grid, exactly. Otherwise :func:`isotropic_grid` of ``resolution_mm``
        over the T1w's grid (same orientation and field of view).
        """
        if resolution_mm is None:
            return self.source_shape, self.source_affine
        return isotropic_grid(self.source_shape, self.source_affine, resolution_mm)

    def output_resampler(
        self, support: np.ndarray, resolution_mm: float | None = None, threads: int = 1
    ) -> GridResampler:
        """A :class:`GridResampler` from this model grid (maps defined on ``support``, ``(x, y, z)``
        bool) onto :meth:`output_grid` of ``resolution_mm``, working in ``threads`` threads."""
        shape, affine = self.output_grid(resolution_mm)
        return GridResampler(self.affine, support, shape, affine, threads)

    def to_dict(self) -> dict[str, list]:
        """The grid as plain lists (exact: float64 values as Python floats), e.g. to pass between workflow nodes."""
        return {
            "shape": list(self.shape),
            "affine": self.affine.tolist(),
            "source_shape": list(self.source_shape),
            "source_affine": self.source_affine.tolist(),
        }

    @classmethod
    def from_dict(cls, values: dict[str, list]) -> ConformedGrid:
        """The grid :meth:`to_dict` described."""
        return cls(
            shape=tuple(values["shape"]),
            affine=np.array(values["affine"], dtype=float),
            source_shape=tuple(values["source_shape"]),
            source_affine=np.array(values["source_affine"], dtype=float),
        )


def model_grid(source_shape: tuple[int, ...], source_affine: np.ndarray, centre: np.ndarray) -> ConformedGrid:
    """The axis-aligned RAS+ model grid centred on ``centre`` (world mm) for a given source grid."""
    affine = np.diag([MODEL_VOXEL_MM] * 3 + [1.0])
    affine[:3, 3] = centre - MODEL_VOXEL_MM * (np.array(MODEL_SHAPE) - 1) / 2.0
    x, y, z = source_shape[:3]
    return ConformedGrid(
        shape=MODEL_SHAPE, affine=affine, source_shape=(x, y, z), source_affine=np.asarray(source_affine, dtype=float)
    )


def conform_t1w(img: nib.Nifti1Image, data: np.ndarray) -> tuple[np.ndarray, ConformedGrid]:
    """Conform a T1w: RAS+, 2 mm isotropic, centred on its intensity mass, intensities in [0, 1].

    Parameters
    ----------
    img : the loaded T1w (only its affine is used).
    data : its voxels ``(X, Y, Z)``.

    Returns the normalised T1w on the model grid ``MODEL_SHAPE`` (float32) and the grid.
    """
    grid = model_grid(data.shape, img.affine, intensity_centre(data, img.affine))
    return normalise_intensity(grid.to_model(data)), grid


class GridResampler:
    """Normalised linear resampling of maps defined on ``support`` from one grid onto another.

    The output voxels kept are those whose interpolated ``support`` weight (a Gaussian
    anti-aliasing pre-filter first when the output voxels are larger) is at least
    :data:`TENSOR_SUPPORT`; a map is sampled there only (trilinear, by
    :func:`scipy.ndimage.map_coordinates`) and divided by that weight, so voxels outside
    ``support`` (zero) do not darken its edges. Zero elsewhere.

    Parameters
    ----------
    in_affine : voxel-to-world affine of the input grid; ``support`` its ``(x, y, z)`` bool mask.
    out_shape, out_affine : the output grid.
    threads : the interpolation and the eigendecompositions run over the kept voxels in this
        many threads (SciPy's and NumPy's loops release the GIL); the values do not depend on it.
    """

    def __init__(
        self,
        in_affine: np.ndarray,
        support: np.ndarray,
        out_shape: tuple[int, int, int],
        out_affine: np.ndarray,
        threads: int = 1,
    ) -> None:
        self.threads = max(1, int(threads))
        mapping = np.linalg.inv(in_affine) @ out_affine
        self.support = np.asarray(support, dtype=bool)
        self.out_shape, self.out_affine = out_shape, out_affine
        self._sigma = _antialias_sigma(np.abs(mapping[:3, :3]).sum(axis=1))
        weight = resample_scalar(
            self.support.astype(np.float32), in_affine, out_affine, self.out_shape, 1, self.threads
        )
        #: The output voxels that receive values, ``out_shape`` bool.
        self.kept = weight >= TENSOR_SUPPORT
        # Kept voxels are enumerated in Fortran order, the order a NIfTI file stores them: the
        # volumes :meth:`fill` returns are then Fortran-ordered and written without a reordering
        # copy (4.5 s for a 6-channel 0.5 mm volume), and filling by flat index stays sequential.
        self._flat = np.flatnonzero(self.kept.ravel(order="F"))
        voxels = np.unravel_index(self._flat, self.out_shape, order="F")
        self._points = mapping[:3, :3] @ np.stack(voxels) + mapping[:3, 3:]
        self._weight = weight.ravel(order="F")[self._flat]

    def at_kept(self, volume: np.ndarray) -> np.ndarray:
        """An output-grid ``volume`` ``out_shape`` at the kept voxels, ``(N,)`` in kept order (Fortran order)."""
        return np.asarray(volume).ravel(order="F")[self._flat]

    def values(self, volume: np.ndarray) -> np.ndarray:
        """``volume`` ``(x, y, z[, C])`` at the kept output voxels: ``(N[, C])`` float32, in kept order
        (the Fortran order of :attr:`kept`: ``volume[kept.T].T``, not ``volume[kept]``)."""
        volume = np.where(self.support.reshape(self.support.shape + (1,) * (volume.ndim - 3)), volume, 0.0)
        channels: np.ndarray = volume.reshape(self.support.shape + (-1,)).astype(np.float32)
        count = int(channels.shape[3])
        out = np.empty((self._weight.size, count), dtype=np.float32)
        for c in range(count):
            channel = channels[..., c]
            if np.any(self._sigma > 0.1):
                channel = ndimage.gaussian_filter(channel, self._sigma, mode="nearest")

            def interpolate(part: slice, channel: np.ndarray = channel, c: int = c) -> None:
                out[part, c] = ndimage.map_coordinates(
                    channel, self._points[:, part], order=1, mode="constant", cval=0.0, prefilter=False
                )

            in_threads(interpolate, self._weight.size, self.threads)
        out /= self._weight[:, None]
        return out if volume.ndim == 4 else out[:, 0]

    def fill(self, values: np.ndarray, dtype=np.float32) -> np.ndarray:
        """Kept-voxel ``values`` ``(N[, C])`` as an output volume ``out_shape[ + (C,)]``, zero elsewhere
        (Fortran-ordered, as NIfTI stores it: each channel is one contiguous block)."""
        values = np.asarray(values)
        out = np.zeros(self.out_shape + values.shape[1:], dtype=dtype, order="F")
        flat = out.reshape((-1,) + values.shape[1:], order="F")  # a view of out
        for c in np.ndindex(values.shape[1:]):
            flat[(slice(None),) + c][self._flat] = values[(slice(None),) + c]
        return out

    def tensor_values(
        self, components: np.ndarray, fa_shift: np.ndarray | None = None, chunk: int = 1 << 20
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Log-Euclidean resampling of a tensor field ``(x, y, z, 6)`` (mm²/s) onto the kept voxels.

        The six log-tensor components are resampled like any map; an eigendecomposition of
        the mean log-tensors, ``chunk`` voxels at a time (its float64 matrices stay that small
        however large the output grid), gives the tensors ``(N, 6)`` (mm²/s) and their principal
        eigenvectors ``(N, 3)``, float32 both. With ``fa_shift`` ``(N,)`` (FA units, at the kept
        voxels), each tensor's FA is changed by it (:func:`~m2m_app.maths.tensor.rescale_anisotropy`:
        same MD and eigenvectors) and the third value is the anisotropy scale ``(N,)`` applied
        (None without a shift).
        """
        logs = np.zeros(components.shape, dtype=np.float32)
        logs[self.support] = matrix_to_components(
            log_tensors(components_to_matrix(components[self.support].astype(float)))
        )
        mean_logs = self.values(logs)
        tensors = np.empty(mean_logs.shape, dtype=np.float32)
        v1 = np.empty(mean_logs.shape[:1] + (3,), dtype=np.float32)
        scale = None if fa_shift is None else np.empty(len(mean_logs), dtype=np.float32)

        def decompose(part: slice) -> None:
            evals, evecs = eigen_decomposition(components_to_matrix(mean_logs[part].astype(float)))
            evals = np.exp(evals)
            if fa_shift is not None and scale is not None:
                evals, scale[part] = rescale_anisotropy(evals, fa_shift[part])
            tensors[part] = matrix_to_components(compose_tensors(evals, evecs))
            v1[part] = evecs[..., :, 0]

        in_threads(decompose, len(mean_logs), self.threads, min(chunk, -(-len(mean_logs) // self.threads)))
        return tensors, v1, scale


def resample_tensor(components: np.ndarray, grid: ConformedGrid, to_model: bool = True) -> np.ndarray:
    """Resample a tensor field ``(X, Y, Z, 6)`` (mm², world frame) between the source and model grids.

    Interpolation happens in the log-Euclidean domain, so tensors stay positive-definite
    and determinants do not swell. Voxels without tensors (all six components zero, e.g.
    outside the brain) are excluded by normalised interpolation; output voxels whose
    neighbourhood was less than :data:`TENSOR_SUPPORT` covered are zero (see
    :class:`GridResampler`). No rotation is applied: both grids share the RAS+ world frame
    the tensors are expressed in.
    """
    ends = [(grid.source_affine, grid.source_shape), (grid.affine, grid.shape)]
    (in_affine, _), (out_affine, out_shape) = ends if to_model else ends[::-1]
    resampler = GridResampler(in_affine, np.any(components != 0, axis=-1), out_shape, out_affine)
    return resampler.fill(resampler.tensor_values(components)[0])


#: How :func:`resample_outputs` brings each map onto the output grid (see its docstring).
OUTPUT_RULES: dict[str, str] = {
    "mask": "threshold",
    "tensor": "tensor",
    "diffusivity": "tensor",
    "v1": "v1",
    "colfa": "colfa",
    "fa": "unit",
    "dectdi": "unit",
    "ad": "eigenvalue",
    "rd": "eigenvalue",
}


def resample_outputs(
    maps: Mapping[str, np.ndarray], resampler: GridResampler, fa_shift: np.ndarray | None = None
) -> Iterator[tuple[str, np.ndarray]]:
    """Bring model-grid maps onto the output grid, one pass per map; yields ``(key, volume)`` one at a time.

    ``maps`` holds model-grid volumes by output key; ``resampler`` goes from the model grid to
    the output grid (its support: the brain mask, or the whole grid). Every map is zero
    outside :attr:`GridResampler.kept`. Per key (:data:`OUTPUT_RULES`):

    * ``mask``: linear, then ``>= 0.5`` (bool).
    * ``tensor`` / ``diffusivity``: log-Euclidean (:meth:`GridResampler.tensor_values`), as
      :func:`resample_tensor` does; ``(X, Y, Z, 6)`` mm²/s.
    * ``v1``: the principal eigenvector of that resampled tensor (the same eigendecomposition),
      so there is no sign to average; needs the tensor in ``maps``.
    * ``colfa``: colour FA (dipy's ``FA · |V1|``) of the resampled FA and V1; needs ``fa``.
    * ``fa``, ``dectdi``: linear, clipped to [0, 1].
    * ``ad``, ``rd``: linear; with ``fa_shift``, moved about MD by the tensor's anisotropy scale.
    * any other (MD, the uncertainty maps, TDI): linear, clipped at 0.

    ``fa_shift`` ``(X, Y, Z)`` on the output grid (FA units; the T1w detail transfer of
    :mod:`m2m_app.maths.detail`) is added to FA, and the tensors' eigenvalues are rescaled
    about their mean to match (:func:`~m2m_app.maths.tensor.rescale_anisotropy`), which AD and
    RD follow; MD and V1 do not change. It needs the tensor and, for AD/RD, ``md`` in ``maps``.

    "Linear" is :class:`GridResampler`'s normalised trilinear interpolation. Maps come out
    in ``maps``' order except that the tensor comes first and colour FA, AD and RD last.
    """
    tensor_key = next((key for key in maps if OUTPUT_RULES.get(key) == "tensor"), None)
    rank = {"tensor": 0, "eigenvalue": 2, "colfa": 2}
    order = sorted(maps, key=lambda key: rank.get(OUTPUT_RULES.get(key, ""), 1))
    shift = None if fa_shift is None else resampler.at_kept(fa_shift).astype(np.float32)
    v1: np.ndarray | None = None
    fa: np.ndarray | None = None
    scale: np.ndarray | None = None
    md: np.ndarray | None = None
    for key in order:
        rule = OUTPUT_RULES.get(key, "positive")
        if rule == "threshold":
            yield key, resampler.fill(resampler.values(maps[key].astype(np.float32)) >= 0.5, dtype=bool)
        elif rule == "tensor":
            tensors, v1, scale = resampler.tensor_values(maps[key], shift)
            yield key, resampler.fill(tensors)
            del tensors
        elif rule == "v1":
            if v1 is None:
                if tensor_key is None:
                    raise KeyError("v1 is taken from the resampled tensor, and maps holds none")
                v1 = resampler.tensor_values(maps[tensor_key])[1]
            yield key, resampler.fill(v1)
        elif rule == "colfa":
            if fa is None or v1 is None:
                raise KeyError("colour FA is taken from the resampled FA and V1; maps needs fa and the tensor")
            # dipy's color_fa formula, |V1| · FA; dipy's function takes all three eigenvectors (3× the memory)
            yield key, resampler.fill(np.abs(v1) * np.clip(fa, 0.0, 1.0)[:, None])
        else:
            values = resampler.values(maps[key])
            if key == "md" and shift is not None:
                md = values  # kept for AD and RD, ordered after it
            if shift is not None and key == "fa":
                values = values + shift
            elif shift is not None and rule == "eigenvalue":
                if scale is None or md is None:
                    raise KeyError("with an FA shift, AD and RD follow the rescaled tensor; maps needs it and md")
                values = md + scale * (values - md)
            values = np.clip(values, 0.0, 1.0 if rule == "unit" else None)
            fa = values if key == "fa" else fa
            yield key, resampler.fill(values)
