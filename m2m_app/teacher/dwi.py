"""Diffusion-tensor fitting of a DWI series with dipy."""

from __future__ import annotations

import numpy as np
from dipy.core.gradients import gradient_table, unique_bvals_tolerance
from dipy.reconst.dti import TensorFit, TensorModel
from dipy.segment.mask import median_otsu

from m2m_app.maths.tensor import clip_eigenvalues, frame_rotation, matrix_to_components, rotate_tensors

#: b-values at or below this (s/mm²) count as b=0.
B0_THRESHOLD = 50.0
#: Largest b-value (s/mm²) used for the tensor fit: above about 1500 the signal is no longer
#: mono-exponential (kurtosis) and the tensor's diffusivities shrink.
TENSOR_MAX_BVAL = 1500.0
#: b-values within this many s/mm² of each other form one shell.
SHELL_TOLERANCE = 100.0
#: Physical range of tensor eigenvalues, mm²/s: free water at 37 °C diffuses at about
#: 3.0e-3, so larger fitted values (noise, partial volume at the brain's edge) are clipped.
EIGENVALUE_RANGE = (0.0, 4e-3)


def fsl_bvecs_to_voxel(bvecs: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Turn FSL/BIDS b-vectors ``(N, 3)`` into vectors along the image's voxel axes.

    BIDS b-vectors follow FSL: they are given along the voxel axes, except that the
    first axis is flipped when the voxel-to-world affine has a positive determinant
    (a "neurological" voxel order such as RAS). Undoing that flip gives vectors that
    dipy can use directly with the voxel array.
    """
    bvecs = np.array(bvecs, dtype=float)
    if np.linalg.det(affine[:3, :3]) > 0:
        bvecs[:, 0] *= -1
    return bvecs


def tensor_volumes(bvals: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Which volumes ``(N,)`` the tensor fit uses, and the shells (s/mm², rounded) they hold.

    The b=0 volumes and every shell up to :data:`TENSOR_MAX_BVAL`; a DWI whose lowest
    diffusion-weighted shell lies above it (e.g. a single b=2500 shell) gives that shell
    alone, the best a tensor can do with it.
    """
    shells = unique_bvals_tolerance(bvals[bvals > B0_THRESHOLD], tol=SHELL_TOLERANCE)
    kept = shells[shells <= TENSOR_MAX_BVAL + SHELL_TOLERANCE]
    kept = kept if kept.size else shells[:1]
    members = [np.abs(bvals - b) <= SHELL_TOLERANCE for b in kept]
    used = (bvals <= B0_THRESHOLD) | np.any(members, axis=0)
    return used, [0] + [int(round(float(np.median(bvals[m])), -1)) for m in members]


def mean_b0(data: np.ndarray, bvals: np.ndarray) -> np.ndarray:
    """Average of the b=0 volumes, shape ``data.shape[:3]``."""
    return data[..., bvals <= B0_THRESHOLD].mean(axis=-1)


def dwi_brain_mask(data: np.ndarray, bvals: np.ndarray) -> np.ndarray:
    """Brain mask of a DWI series from its mean b0 (dipy's median_otsu), boolean ``(X, Y, Z)``."""
    _, mask = median_otsu(mean_b0(data, bvals), median_radius=2, numpass=2)
    return mask.astype(bool)


def fit_tensor(data: np.ndarray, bvals: np.ndarray, bvecs_voxel: np.ndarray, mask: np.ndarray) -> TensorFit:
    """Weighted-least-squares tensor fit (dipy) inside ``mask``, in the voxel frame.

    ``bvecs_voxel`` are ``(N, 3)`` unit vectors along the voxel axes (see
    :func:`fsl_bvecs_to_voxel`); the fitted tensors are therefore in that frame too.
    """
    gtab = gradient_table(bvals, bvecs=bvecs_voxel, b0_threshold=B0_THRESHOLD)
    return TensorModel(gtab, fit_method="WLS").fit(data, mask=mask)


def world_tensor_components(fit: TensorFit, affine: np.ndarray) -> np.ndarray:
    """The fitted tensors rotated from the voxel frame to the RAS+ world frame, ``(X, Y, Z, 6)`` mm²/s.

    Eigenvalues are clipped to :data:`EIGENVALUE_RANGE` first, so that a few diverging
    voxels cannot dominate the targets or the evaluation.
    """
    world = rotate_tensors(clip_eigenvalues(fit.quadratic_form, *EIGENVALUE_RANGE), frame_rotation(affine))
    return matrix_to_components(world).astype(np.float32)
