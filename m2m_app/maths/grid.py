"""Conforming a T1w to the translators' model grid, and resampling between the two grids.

The model grid is axis-aligned RAS+ (so world and voxel axes coincide), isotropic
:data:`MODEL_VOXEL_MM` mm, :data:`MODEL_SHAPE` voxels (192 × 224 × 192 mm, a whole adult
head), centred on the T1w's centre of intensity mass. Any source grid (oblique, LAS,
PSR, anisotropic) maps onto it by one affine resampling, and every prediction maps
back onto the source's own shape and affine.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
from scipy import ndimage

from m2m_app.maths.tensor import components_to_matrix, exp_tensors, log_tensors, matrix_to_components

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


def normalise_intensity(data: np.ndarray) -> np.ndarray:
    """Map the 0.5 / 99.5 percentiles of the foreground to 0 / 1 and clip, float32 ``(X, Y, Z)``."""
    low, high = intensity_range(data)
    return np.clip((data - low) / max(high - low, 1e-6), 0.0, 1.0).astype(np.float32)


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


def _antialias_sigma(step: np.ndarray) -> np.ndarray:
    """Gaussian sigma (input voxels) per input axis for output voxels spanning ``step`` input voxels."""
    return np.clip((step - 1.0) / 2.0, 0.0, None)


def resample_scalar(
    volume: np.ndarray, in_affine: np.ndarray, out_affine: np.ndarray, out_shape: tuple[int, int, int], order: int = 1
) -> np.ndarray:
    """Resample one 3D volume from ``in_affine`` onto (``out_affine``, ``out_shape``), zero outside.

    ``order`` 1 is trilinear (with a Gaussian anti-aliasing pre-filter when the output
    voxels are larger than the input ones), 0 is nearest neighbour. Returns float32.
    """
    mapping = np.linalg.inv(in_affine) @ out_affine
    volume = np.asarray(volume, dtype=np.float32)
    if order > 0:
        sigma = _antialias_sigma(np.abs(mapping[:3, :3]).sum(axis=1))
        if np.any(sigma > 0.1):
            volume = ndimage.gaussian_filter(volume, sigma, mode="nearest")
    return ndimage.affine_transform(
        volume,
        mapping[:3, :3],
        mapping[:3, 3],
        output_shape=out_shape,
        order=order,
        mode="constant",
        cval=0.0,
        prefilter=False,
    )


def _resample_any(
    volume: np.ndarray, in_affine: np.ndarray, out_affine: np.ndarray, out_shape: tuple[int, int, int], order: int
) -> np.ndarray:
    """:func:`resample_scalar` on ``(X, Y, Z)`` or channel by channel on ``(X, Y, Z, C)``."""
    if volume.ndim == 3:
        return resample_scalar(volume, in_affine, out_affine, out_shape, order)
    return np.stack(
        [resample_scalar(volume[..., c], in_affine, out_affine, out_shape, order) for c in range(volume.shape[-1])],
        axis=-1,
    )


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
        return _resample_any(volume, self.source_affine, self.affine, self.shape, order)

    def to_source(self, volume: np.ndarray, order: int = 1) -> np.ndarray:
        """Resample a model-grid volume ``(x, y, z[, C])`` back onto the original T1w grid."""
        return _resample_any(volume, self.affine, self.source_affine, self.source_shape, order)

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


def resample_tensor(components: np.ndarray, grid: ConformedGrid, to_model: bool = True) -> np.ndarray:
    """Resample a tensor field ``(X, Y, Z, 6)`` (mm², world frame) between the source and model grids.

    Interpolation happens in the log-Euclidean domain, so tensors stay positive-definite
    and determinants do not swell. Voxels without tensors (all six components zero, e.g.
    outside the brain) are excluded by normalised interpolation; output voxels whose
    neighbourhood was less than :data:`TENSOR_SUPPORT` covered are zero. No rotation is
    applied: both grids share the RAS+ world frame the tensors are expressed in.
    """
    support = np.any(components != 0, axis=-1)
    logs = np.zeros(components.shape, dtype=np.float32)
    logs[support] = matrix_to_components(log_tensors(components_to_matrix(components[support].astype(float))))
    resample = grid.to_model if to_model else grid.to_source
    weight = resample(support.astype(np.float32))
    logs = resample(logs)
    keep = weight >= TENSOR_SUPPORT
    out = np.zeros(weight.shape + (6,), dtype=np.float32)
    mean_logs = logs[keep] / weight[keep, None]
    out[keep] = matrix_to_components(exp_tensors(components_to_matrix(mean_logs.astype(float))))
    return out
