"""Tensor algebra, b-vector conventions and tensor reorientation against analytic answers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from m2m_app.maths.streamlines import directional_density, track_density
from m2m_app.maths.tensor import (
    components_to_matrix,
    exp_tensors,
    frame_rotation,
    log_tensors,
    matrix_to_components,
    rotate_tensors,
    tensor_derivatives,
)
from m2m_app.teacher.dwi import fsl_bvecs_to_voxel
from m2m_app.teacher.register import RigidResult, tensor_to_t1w

EVALS = np.array([1.7e-3, 0.3e-3, 0.2e-3])
#: FA of EVALS from its textbook definition, sqrt(1/2)·|λ - λ's differences| / |λ|.
FA = np.sqrt(
    0.5 * ((EVALS[0] - EVALS[1]) ** 2 + (EVALS[1] - EVALS[2]) ** 2 + (EVALS[2] - EVALS[0]) ** 2) / (EVALS**2).sum()
)


def stick(direction: np.ndarray) -> np.ndarray:
    """A prolate tensor with eigenvalues EVALS and principal axis ``direction`` (3x3)."""
    direction = direction / np.linalg.norm(direction)
    basis = np.linalg.qr(np.column_stack([direction, np.eye(3)[:, :2]]))[0]
    basis[:, 0] = direction
    return basis @ np.diag(EVALS) @ basis.T


def test_components_round_trip_and_order():
    matrix = stick(np.array([1.0, 2.0, 3.0]))
    comps = matrix_to_components(matrix)
    assert comps[1] == matrix[0, 1] and comps[2] == matrix[0, 2] and comps[4] == matrix[1, 2]
    np.testing.assert_allclose(components_to_matrix(comps), matrix)


def test_log_exp_round_trip_is_positive_definite():
    matrix = stick(np.array([0.2, -1.0, 0.5]))
    np.testing.assert_allclose(exp_tensors(log_tensors(matrix)), matrix, rtol=1e-8, atol=1e-12)
    assert np.all(
        np.linalg.eigvalsh(
            exp_tensors(np.random.default_rng(0).normal(size=(5, 3, 3)) * 0 + np.diag([-9.0, -7.0, -6.5]))
        )
        > 0
    )


def test_rotation_moves_v1_and_keeps_eigenvalues():
    rotation = Rotation.from_euler("z", 90, degrees=True).as_matrix()
    rotated = rotate_tensors(stick(np.array([1.0, 0, 0]))[None], rotation)[0]
    maps = tensor_derivatives(matrix_to_components(rotated))
    np.testing.assert_allclose(np.abs(maps["v1"]), [0, 1, 0], atol=1e-9)
    np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(rotated))[::-1], EVALS, rtol=1e-9)
    assert maps["fa"] == pytest.approx(FA, rel=1e-9)
    assert maps["md"] == pytest.approx(EVALS.mean())


def test_fsl_bvecs_flip_x_only_for_positive_determinant():
    bvecs = np.array([[0.6, 0.8, 0.0]])
    las = np.diag([-2.0, 2.0, 2.0, 1.0])
    ras = np.diag([2.0, 2.0, 2.0, 1.0])
    np.testing.assert_allclose(fsl_bvecs_to_voxel(bvecs, las), bvecs)
    np.testing.assert_allclose(fsl_bvecs_to_voxel(bvecs, ras), [[-0.6, 0.8, 0.0]])
    # voxel-frame vectors of a LAS image point the other way in world x
    np.testing.assert_allclose(frame_rotation(las) @ bvecs[0], [-0.6, 0.8, 0.0])


@pytest.mark.parametrize("angle", [30.0, 90.0])
def test_tensor_to_t1w_rotates_fibres_with_the_rigid_transform(angle):
    """A field of x-oriented sticks, moved by a rigid rotation about z, must point along R·x."""
    shape, affine = (12, 12, 12), np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = -11.0  # grid centred on the origin
    field = np.broadcast_to(matrix_to_components(stick(np.array([1.0, 0, 0]))), shape + (6,)).copy()
    rotation = Rotation.from_euler("z", angle, degrees=True).as_matrix()
    dwi_to_t1w = np.eye(4)
    dwi_to_t1w[:3, :3] = rotation
    result = RigidResult(t1w_to_dwi=np.linalg.inv(dwi_to_t1w), cost=0.0)
    moved = tensor_to_t1w(field, affine, result, shape, affine)
    centre = moved[4:8, 4:8, 4:8].reshape(-1, 6)
    maps = tensor_derivatives(centre)
    expected = np.abs(rotation @ [1.0, 0, 0])
    np.testing.assert_allclose(np.abs(maps["v1"]), np.broadcast_to(expected, maps["v1"].shape), atol=1e-6)
    np.testing.assert_allclose(maps["fa"], FA, rtol=1e-6)


def test_track_density_and_direction_of_a_straight_bundle():
    shape, affine = (10, 10, 10), np.eye(4)
    line = np.column_stack([np.linspace(0, 9, 50), np.full(50, 5.0), np.full(50, 5.0)])
    tdi = track_density([line, line + [0, 0, 0.1], line + [0, 0, 40]], shape, affine)
    assert tdi[:, 5, 5].tolist() == [2.0] * 10 and tdi.sum() == 20  # the third is outside
    dec = directional_density([line], shape, affine)
    np.testing.assert_allclose(dec[1:9, 5, 5], np.tile([1.0, 0, 0], (8, 1)), atol=1e-6)


def test_clip_eigenvalues_keeps_directions():
    from m2m_app.maths.tensor import clip_eigenvalues

    wild = stick(np.array([0.0, 1.0, 1.0])) * 5.0  # largest eigenvalue 8.5e-3 mm²/s
    clipped = clip_eigenvalues(wild, 0.0, 4e-3)
    assert np.linalg.eigvalsh(clipped).max() == pytest.approx(4e-3)
    np.testing.assert_allclose(
        np.abs(tensor_derivatives(matrix_to_components(clipped))["v1"]), np.array([0, 1, 1]) / np.sqrt(2), atol=1e-9
    )


def test_tensor_to_t1w_does_not_swell_at_the_edge_of_the_data():
    """Interpolating next to voxels without a tensor must not mix in log(D) = 0 (D = 1 mm²/s)."""
    shape, affine = (10, 10, 10), np.eye(4)
    field = np.zeros(shape + (6,))
    field[:5] = matrix_to_components(stick(np.array([0.0, 0.0, 1.0])))
    shift = np.eye(4)
    shift[0, 3] = 0.5  # half a voxel: every output voxel interpolates between two input voxels
    moved = tensor_to_t1w(field, affine, RigidResult(t1w_to_dwi=shift, cost=0.0), shape, affine)
    eigen = np.linalg.eigvalsh(components_to_matrix(moved[np.any(moved != 0, axis=-1)]))
    assert eigen.max() <= EVALS.max() * (1 + 1e-6)
