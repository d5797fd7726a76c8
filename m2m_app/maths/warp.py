"""Moving maps, tensors and points through a nonlinear warp given as a coordinate field.

A warp is held as a *coordinate field*: for every voxel of a fixed grid, the world point (RAS
mm) of the moving space that lands there, ``(X, Y, Z, 3)``. Resampling a moving-space map onto
the fixed grid is sampling it at those points; moving a point of the moving space into the fixed
space is sampling the inverse field at that point. Tensors are reoriented with the
*finite-strain* rotation of the warp's local Jacobian (Alexander et al. 2001, IEEE TMI 20:1131;
as DTI-TK does): the rotation of the polar decomposition ``F = R U``, so that a tensor turns with
the anatomy but keeps its eigenvalues (its FA and MD).
"""

from __future__ import annotations

import numpy as np
from nibabel.affines import apply_affine
from scipy import ndimage

from m2m_app.maths.grid import in_threads


def grid_points(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """World coordinates ``(X*Y*Z, 3)`` (mm) of every voxel of the grid (``shape``, voxel → mm ``affine``), C order."""
    return apply_affine(affine, np.indices(tuple(shape[:3])).reshape(3, -1).T)


def sample(volume: np.ndarray, affine: np.ndarray, points: np.ndarray, order: int = 1, threads: int = 1) -> np.ndarray:
    """``volume`` ``(X, Y, Z[, C])`` at world points ``(N, 3)`` mm: ``(N[, C])`` float32, zero outside.

    ``order`` 1 is trilinear, 0 nearest neighbour; the points are split over ``threads`` threads.
    """
    coords = apply_affine(np.linalg.inv(affine), points).T
    channels: np.ndarray = np.asarray(volume, dtype=np.float32).reshape(volume.shape[:3] + (-1,))
    planes = [np.ascontiguousarray(channels[..., c]) for c in range(channels.shape[3])]
    out: np.ndarray = np.empty((coords.shape[1], len(planes)), dtype=np.float32)

    def interpolate(part: slice) -> None:
        for c, plane in enumerate(planes):
            out[part, c] = ndimage.map_coordinates(
                plane, coords[:, part], order=order, mode="constant", cval=0.0, prefilter=False
            )

    in_threads(interpolate, coords.shape[1], threads)
    return out if volume.ndim == 4 else out[:, 0]


def field_jacobian(field: np.ndarray, affine: np.ndarray, voxels: np.ndarray) -> np.ndarray:
    """The Jacobian ``∂φ/∂y`` ``(N, 3, 3)`` (mm/mm) of the coordinate field ``φ`` ``(X, Y, Z, 3)`` at
    the integer ``voxels`` ``(N, 3)`` of its grid (voxel → mm ``affine``): central differences,
    one-sided at the grid's edges; row ``i`` is the gradient of ``φ_i``."""
    shape = np.array(field.shape[:3])
    per_voxel = np.empty((len(voxels), 3, 3), dtype=np.float64)  # [..., component, voxel axis]
    for axis in range(3):
        step = np.zeros(3, dtype=int)
        step[axis] = 1
        ahead = np.minimum(voxels + step, shape - 1)
        behind = np.maximum(voxels - step, 0)
        span = (ahead[:, axis] - behind[:, axis]).astype(np.float64)
        span[span == 0] = 1.0
        difference = field[tuple(ahead.T)] - field[tuple(behind.T)]
        per_voxel[:, :, axis] = difference / span[:, None]
    return per_voxel @ np.linalg.inv(np.asarray(affine, dtype=np.float64)[:3, :3])


def finite_strain_rotation(jacobian: np.ndarray) -> np.ndarray:
    """The rotation ``R`` ``(..., 3, 3)`` of the polar decomposition ``F = R U`` of each ``F`` ``(..., 3, 3)``.

    From the SVD ``F = W S Vᵀ``: ``R = W Vᵀ``, made proper (determinant +1) where ``F`` reflects.
    """
    w, _, vt = np.linalg.svd(jacobian)
    flip = np.linalg.det(w @ vt) < 0
    w[flip, :, 2] *= -1.0
    return w @ vt


def moving_to_fixed_rotation(fixed_to_moving_jacobian: np.ndarray) -> np.ndarray:
    """The rotation ``(N, 3, 3)`` that turns moving-space vectors and tensors into the fixed space
    (``v' = R v``, ``D' = R D Rᵀ``: :func:`~m2m_app.maths.tensor.rotate_tensors`), from the Jacobian
    ``∂φ/∂y`` ``(N, 3, 3)`` of the fixed → moving coordinate field.

    The moving → fixed map's Jacobian is the inverse of ``∂φ/∂y``, and its finite-strain rotation
    is the transpose of :func:`finite_strain_rotation` of ``∂φ/∂y``.
    """
    return np.swapaxes(finite_strain_rotation(fixed_to_moving_jacobian), -1, -2)
