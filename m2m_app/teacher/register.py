"""Rigid registration of the mean b0 to the T1w (dipy, mutual information)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from dipy.align.imaffine import (AffineMap, AffineRegistration, MutualInformationMetric,
                                 transform_centers_of_mass)
from dipy.align.transforms import RigidTransform3D, TranslationTransform3D

from m2m_app.maths.tensor import (components_to_matrix, exp_tensors, frame_rotation, log_tensors,
                                  matrix_to_components, rotate_tensors)


@dataclass
class RigidResult:
    """A rigid transform between the T1w (static) and DWI (moving) world spaces.

    ``t1w_to_dwi`` maps a point in T1w world mm to the matching point in DWI world mm
    (the ITK "image" convention: it resamples the DWI onto the T1w grid).
    ``cost`` is dipy's final negative mutual information (lower is better).
    """

    t1w_to_dwi: np.ndarray
    cost: float

    @property
    def dwi_to_t1w(self) -> np.ndarray:
        """Inverse transform: DWI world mm → T1w world mm (moves streamlines onto the T1w)."""
        return np.linalg.inv(self.t1w_to_dwi)


def _coarsen(volume: np.ndarray, affine: np.ndarray, target_voxel_mm3: float
             ) -> tuple[np.ndarray, np.ndarray]:
    """Block-average a volume whose voxels are much smaller than ``target_voxel_mm3``.

    Registering a 1 mm T1w to a 2 mm b0 at the T1w's full resolution costs several
    times more and gains nothing: the b0 carries no finer detail.
    """
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    factors = np.maximum(1, np.floor(target_voxel_mm3 ** (1 / 3) / zooms + 1e-6)).astype(int)
    if np.all(factors == 1):
        return volume, affine
    shape = np.array(volume.shape[:3]) // factors
    trimmed = volume[: shape[0] * factors[0], : shape[1] * factors[1], : shape[2] * factors[2]]
    blocks = trimmed.reshape(shape[0], factors[0], shape[1], factors[1], shape[2], factors[2])
    scaled = affine.copy()
    scaled[:3, :3] = affine[:3, :3] * factors
    scaled[:3, 3] = affine[:3, :3] @ ((factors - 1) / 2) + affine[:3, 3]
    return blocks.mean(axis=(1, 3, 5)), scaled


def register_b0_to_t1w(b0: np.ndarray, b0_affine: np.ndarray, t1w: np.ndarray,
                       t1w_affine: np.ndarray, level_iters: tuple[int, ...] = (200, 50, 10)
                       ) -> RigidResult:
    """Estimate the rigid transform aligning the b0 ``(X, Y, Z)`` to the T1w ``(X', Y', Z')``.

    Centre of mass → translation → rigid, each by Mattes mutual information (32 bins)
    over a 3-level pyramid; dipy's documented recipe.
    """
    t1w, t1w_affine = _coarsen(t1w, t1w_affine, float(np.abs(np.linalg.det(b0_affine[:3, :3]))))
    metric = MutualInformationMetric(nbins=32, sampling_proportion=0.3)
    reg = AffineRegistration(metric=metric, level_iters=list(level_iters),
                             sigmas=[3.0, 1.0, 0.0], factors=[4, 2, 1], verbosity=0)
    start = transform_centers_of_mass(t1w, t1w_affine, b0, b0_affine).affine
    translation = reg.optimize(t1w, b0, TranslationTransform3D(), None, static_grid2world=t1w_affine,
                               moving_grid2world=b0_affine,
                               starting_affine=start)
    rigid = reg.optimize(t1w, b0, RigidTransform3D(), None, static_grid2world=t1w_affine,
                         moving_grid2world=b0_affine,
                         starting_affine=translation.affine)
    cost = float(metric.metric_val) if metric.metric_val is not None else float("nan")
    return RigidResult(t1w_to_dwi=rigid.affine, cost=cost)


def resample_to_t1w(volume: np.ndarray, dwi_affine: np.ndarray, result: RigidResult,
                    t1w_shape: tuple[int, ...], t1w_affine: np.ndarray,
                    interpolation: str = "linear") -> np.ndarray:
    """Resample a DWI-grid scalar volume onto the T1w grid with the rigid transform."""
    mapping = AffineMap(result.t1w_to_dwi, domain_grid_shape=t1w_shape[:3], domain_grid2world=t1w_affine,
                        codomain_grid_shape=volume.shape[:3], codomain_grid2world=dwi_affine)
    return mapping.transform(volume, interpolation=interpolation)


def save_itk_transform(result: RigidResult, path: Path) -> None:
    """Write the T1w→DWI point transform as an ITK text transform (nitransforms)."""
    from nitransforms.linear import Affine

    Affine(result.t1w_to_dwi).to_filename(str(path), fmt="itk")


def tensor_to_t1w(components: np.ndarray, dwi_affine: np.ndarray, result: RigidResult,
                  t1w_shape: tuple[int, ...], t1w_affine: np.ndarray) -> np.ndarray:
    """Bring a world-frame tensor field ``(X, Y, Z, 6)`` from the DWI grid onto the T1w grid.

    The tensors are interpolated in the log-Euclidean domain (linear interpolation of
    ``log D``, so the result stays positive-definite and does not swell) and rotated
    by the rotation of the DWI→T1w transform (``D' = R D Rᵀ``): resampling the six
    components alone would leave the fibre directions pointing the old way.
    Returns ``(X', Y', Z', 6)`` float32 in mm²/s, world frame of the T1w; zero where
    the DWI had no tensor.
    """
    support = np.any(components != 0, axis=-1)
    logs = np.zeros_like(components, dtype=np.float64)
    logs[support] = matrix_to_components(log_tensors(components_to_matrix(components[support])))
    # normalised interpolation: voxels without a tensor get no say (a zero log would mean D = I mm²/s)
    weight = resample_to_t1w(support.astype(np.float64), dwi_affine, result, t1w_shape, t1w_affine)
    inside = weight > 0.5
    resampled = np.stack([resample_to_t1w(logs[..., k], dwi_affine, result, t1w_shape, t1w_affine)[inside]
                          for k in range(6)], axis=-1) / weight[inside][:, None]
    rotation = frame_rotation(result.dwi_to_t1w)
    out = np.zeros(tuple(t1w_shape[:3]) + (6,), dtype=np.float32)
    rotated = rotate_tensors(components_to_matrix(resampled), rotation)
    out[inside] = matrix_to_components(exp_tensors(rotated))
    return out
