"""Moving maps, tensors and points through a warp held as a coordinate field (m2m_app.maths.warp)."""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation

from m2m_app.maths.tensor import components_to_matrix, eigen_decomposition, rotate_tensors
from m2m_app.maths.warp import field_jacobian, finite_strain_rotation, moving_to_fixed_rotation, sample


def _field(shape, affine, mapping):
    """The coordinate field of ``mapping`` (world mm → world mm) on a grid: ``(X, Y, Z, 3)``."""
    ijk = np.indices(shape).reshape(3, -1).T
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    return mapping(world).reshape(shape + (3,))


def test_sample_is_trilinear_and_zero_outside():
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-10, 4, 0]
    volume = np.fromfunction(lambda i, j, k: 3 * i - 2 * j + k, (8, 9, 10)).astype(np.float32)
    points = np.array([[-10 + 2 * 3.25, 4 + 2 * 1.5, 2 * 7.0], [500.0, 0, 0]])
    values = sample(volume, affine, points, threads=2)
    np.testing.assert_allclose(values, [3 * 3.25 - 2 * 1.5 + 7.0, 0.0], rtol=1e-6)
    rgb = sample(np.stack([volume, -volume], -1), affine, points)
    assert rgb.shape == (2, 2) and rgb[0, 1] == -rgb[0, 0]


def test_field_jacobian_of_an_affine_map_is_its_matrix():
    matrix = np.array([[1.1, 0.2, 0.0], [-0.1, 0.9, 0.05], [0.0, 0.1, 1.2]])
    affine = np.array([[0.0, -1.5, 0, 10], [1.5, 0, 0, -3], [0, 0, 2.0, 5], [0, 0, 0, 1]])  # rotated, anisotropic
    field = _field((6, 7, 8), affine, lambda p: p @ matrix.T + [1.0, 2.0, 3.0])
    voxels = np.array([[0, 0, 0], [3, 4, 5], [5, 6, 7]])
    np.testing.assert_allclose(field_jacobian(field, affine, voxels), np.broadcast_to(matrix, (3, 3, 3)), atol=1e-9)


def test_finite_strain_rotation_recovers_the_rotation_of_a_stretched_rotation():
    rng = np.random.default_rng(0)
    rotations = Rotation.random(50, random_state=1).as_matrix()
    stretch = rng.normal(size=(50, 3, 3)) * 0.2
    stretch = np.eye(3) + (stretch + np.swapaxes(stretch, 1, 2)) / 2  # symmetric positive definite
    np.testing.assert_allclose(finite_strain_rotation(rotations @ stretch), rotations, atol=1e-9)
    reflected = np.diag([-1.0, 1, 1]) @ rotations[0]
    assert np.linalg.det(finite_strain_rotation(reflected[None]))[0] > 0


def test_tensors_turn_with_a_rotating_warp():
    """A warp that rotates the anatomy by 30° about z (and stretches it): a left-right fibre
    of the moving space points along the rotated direction in the fixed space, its shape kept."""
    turn = Rotation.from_euler("z", 30, degrees=True).as_matrix()
    stretch = np.diag([1.2, 0.9, 1.0])
    forward = turn @ stretch  # moving (T1w) → fixed (template) Jacobian
    inverse = np.linalg.inv(forward)
    affine = np.eye(4)
    field = _field((5, 5, 5), affine, lambda p: p @ inverse.T)  # fixed voxel → moving point
    jacobian = field_jacobian(field, affine, np.array([[2, 2, 2]]))
    tensor = components_to_matrix(np.array([[1.7e-3, 0, 0, 0.3e-3, 0, 0.3e-3]]))
    turned = rotate_tensors(tensor, moving_to_fixed_rotation(jacobian))
    evals, evecs = eigen_decomposition(turned)
    expected = turn @ [1.0, 0, 0]
    assert abs(abs(evecs[0, :, 0] @ expected) - 1) < 1e-9
    np.testing.assert_allclose(evals[0], [1.7e-3, 0.3e-3, 0.3e-3], rtol=1e-9)  # finite strain keeps the eigenvalues
