"""The training losses (models/losses.py): shape vs orientation, the FA distribution term."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from m2m_app.models.encoding import tensor_to_log
from m2m_app.models.losses import log_tensor_parts, wasserstein_1d
from m2m_app.models.phases import PHASE1

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_phase1_loss_separates_shape_from_orientation():
    """A rotated tensor costs orientation only; an isotropic guess costs anisotropy and FA; gradients stay finite."""

    def loss_of(predicted: np.ndarray, truth: np.ndarray) -> dict:
        raw = torch.from_numpy(np.append(tensor_to_log(predicted[None])[0], 0.0)).float().view(1, 7, 1, 1)
        raw.requires_grad_()
        target = torch.from_numpy(np.append(tensor_to_log(truth[None])[0], 1.0)).float().view(1, 7, 1, 1)
        terms = PHASE1.loss(raw, target, torch.ones(1, 1, 1, 1))
        terms["total"].backward()
        assert torch.isfinite(raw.grad).all()
        return {k: v.item() for k, v in terms.items()}

    fibre_x = np.array([1.7e-3, 0, 0, 0.3e-3, 0, 0.3e-3], np.float32)
    fibre_y = np.array([0.3e-3, 0, 0, 1.7e-3, 0, 0.3e-3], np.float32)
    isotropic = np.array([0.77e-3, 0, 0, 0.77e-3, 0, 0.77e-3], np.float32)
    same, rotated, round_guess = loss_of(fibre_x, fibre_x), loss_of(fibre_y, fibre_x), loss_of(isotropic, fibre_x)
    assert [same[k] for k in ("size_l1", "anisotropy_l1", "orientation")] == pytest.approx([0.0] * 3, abs=1e-5)
    assert rotated["size_l1"] == pytest.approx(0.0, abs=1e-5)
    assert rotated["anisotropy_l1"] == pytest.approx(0.0, abs=1e-5)
    assert rotated["fa_l1"] == pytest.approx(0.0, abs=1e-4) and rotated["orientation"] > 1.0
    assert round_guess["anisotropy_l1"] > 1.0 and round_guess["fa_l1"] > 0.7
    # An isotropic prediction for an isotropic truth: no anisotropy, no orientation cost.
    assert loss_of(isotropic, isotropic)["orientation"] == pytest.approx(0.0, abs=1e-5)
    size, anisotropy, _ = log_tensor_parts(torch.from_numpy(tensor_to_log(np.stack([fibre_x, isotropic]))))
    assert anisotropy[0] > 1.0 and anisotropy[1] < 1e-2
    assert size[1].item() == pytest.approx(np.log(0.77), abs=1e-4)


def test_fa_distribution_term_penalises_a_compressed_fa_range():
    """Shuffled voxels cost FA L1 but no distribution term; FA pulled towards its mean costs both."""
    rng = np.random.default_rng(0)
    eigen = np.sort(rng.uniform(0.2e-3, 2.0e-3, (64, 3)), axis=1)[:, ::-1]
    truth = np.zeros((64, 6), np.float32)
    truth[:, [0, 3, 5]] = eigen
    mean = eigen.mean(axis=1, keepdims=True)
    compressed = truth.copy()
    compressed[:, [0, 3, 5]] = mean + 0.3 * (eigen - mean)

    def terms(predicted: np.ndarray) -> dict:
        def as_raw(comps: np.ndarray, mask: float) -> torch.Tensor:
            return (
                torch.from_numpy(np.concatenate([tensor_to_log(comps), np.full((64, 1), mask, np.float32)], 1).T.copy())
                .float()
                .view(1, 7, 1, 64)
            )

        losses = PHASE1.loss(as_raw(predicted, 0.0), as_raw(truth, 1.0), torch.ones(1, 1, 1, 64))
        return {k: v.item() for k, v in losses.items()}

    shuffled, squeezed = terms(truth[rng.permutation(64)]), terms(compressed)
    assert shuffled["fa_distribution"] == pytest.approx(0.0, abs=1e-6) and shuffled["fa_l1"] > 0.05
    assert squeezed["fa_distribution"] > 0.05
    assert squeezed["fa_distribution"] == pytest.approx(squeezed["fa_l1"], rel=1e-4)  # a monotone squeeze: both agree
    sample = torch.tensor([0.1, 0.5, 0.9])
    assert wasserstein_1d(sample, sample.flip(0)).item() == 0.0
    assert wasserstein_1d(sample + 0.2, sample).item() == pytest.approx(0.2)
