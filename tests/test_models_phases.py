"""The phase specs (models/phases.py): decoding any network output, fusing the views."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from m2m_app.maths.tensor import components_to_matrix, tensor_derivatives
from m2m_app.models.encoding import tensor_to_log
from m2m_app.models.losses import fa_from_log
from m2m_app.models.phases import PHASE1

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_any_network_output_gives_positive_definite_tensors():
    raw = np.random.default_rng(1).normal(0, 30, (7, 4, 5, 6)).astype(np.float32)
    decoded = PHASE1.decode(raw)
    evals = np.linalg.eigvalsh(components_to_matrix(decoded["tensor"].astype(float)))
    assert np.all(evals > 0) and decoded["tensor"].shape == (4, 5, 6, 6)
    assert np.all((decoded["mask"] >= 0) & (decoded["mask"] <= 1))
    fa = fa_from_log(torch.from_numpy(raw[:6].reshape(6, -1).T))
    assert torch.all(torch.isfinite(fa)) and torch.all((fa >= 0) & (fa <= 1 + 1e-5))
    # The log-Euclidean target round-trips to the tensor it came from.
    tensor = np.array([[1.7e-3, 1e-4, 0, 0.3e-3, 0, 0.4e-3]], np.float32)
    assert np.allclose(
        PHASE1.decode(np.concatenate([tensor_to_log(tensor).T[:, :, None, None], np.zeros((1, 1, 1, 1))]))["tensor"][
            0, 0, 0
        ],
        tensor[0],
        rtol=1e-4,
        atol=1e-9,
    )


def test_view_fusion_keeps_the_anisotropy_of_disagreeing_views():
    """Three views see the same stick turned by -25°, 0° and +25° about z: the log-Euclidean mean
    is less anisotropic than any of them; the phase-1 fusion keeps their FA and the mean direction."""
    from scipy.spatial.transform import Rotation

    from m2m_app.maths.tensor import rotate_tensors
    from m2m_app.models.phases import mean_of_views

    stick = np.diag([1.7, 0.3, 0.3])
    views = []
    for angle in (-25.0, 0.0, 25.0):
        log = rotate_tensors(np.diag(np.log(np.diag(stick))), Rotation.from_euler("z", angle, degrees=True).as_matrix())
        raw = np.zeros((7, 1, 1, 1), np.float32)
        raw[:6, 0, 0, 0] = [log[0, 0], log[0, 1], log[0, 2], log[1, 1], log[1, 2], log[2, 2]]
        views.append(raw)
    fa = {
        name: tensor_derivatives(PHASE1.decode(raw)["tensor"][0, 0, 0])
        for name, raw in (("one", views[1]), ("mean", mean_of_views(views)), ("fused", PHASE1.fuse(views)))
    }
    assert fa["mean"]["fa"] < fa["one"]["fa"] - 0.02
    assert fa["fused"]["fa"] == pytest.approx(fa["one"]["fa"], rel=1e-5)
    np.testing.assert_allclose(np.abs(fa["fused"]["v1"]), [1.0, 0.0, 0.0], atol=1e-5)


def test_batch_slabs_gather_what_slab_along_stacks():
    """One gather per batch gives each slice's neighbours exactly as slice-by-slice slabs do (edges clamped)."""
    from m2m_app.models.phases import batch_slabs, neighbours, slab_along

    volume = np.random.default_rng(0).normal(size=(3, 9, 10, 11)).astype(np.float32)
    for axis in range(3):
        size = volume.shape[1 + axis]
        for first, count in ((0, 4), (3, 4), (size - 2, 2)):
            stacked = np.stack([slab_along(volume, axis, neighbours(k, size, 2)) for k in range(first, first + count)])
            expected = stacked.reshape((count, -1) + stacked.shape[-2:])
            np.testing.assert_array_equal(batch_slabs(volume, axis, first, count, 2), expected)
