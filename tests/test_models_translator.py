"""The translator networks (models/translator.py): shapes, and a tiny one learns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TINY
from m2m_app.models.phases import PHASE1
from m2m_app.models.translator import Encoder, GlobalDiscriminator, PatchDiscriminator, Translator

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_network_shapes():
    x = torch.randn(2, PHASE1.in_channels, 37, 50)
    features = Encoder(PHASE1.in_channels, **TINY)(x)
    assert [f.shape[-1] for f in features] == [50, 25, 12]
    model = Translator(PHASE1.in_channels, PHASE1.out_channels, **TINY)
    y = torch.randn(2, PHASE1.out_channels, 37, 50)
    assert model(x).shape == (2, 7, 37, 50)
    assert GlobalDiscriminator(12, base=8)(x, y).shape == (2, 1)
    patch = PatchDiscriminator(12, base=8)(x, y)
    assert patch.shape[:2] == (2, 1) and patch.shape[2] > 1 and patch.shape[3] > 1


@pytest.mark.slow
def test_tiny_model_overfits_two_slices():
    rng = np.random.default_rng(0)
    size = 32
    yy, xx = np.mgrid[:size, :size] / size
    inputs = torch.from_numpy(
        np.stack([np.stack([np.sin(6 * xx + k) * yy] * PHASE1.in_channels) for k in range(2)]).astype(np.float32)
    )
    mask = ((xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.12).astype(np.float32)
    logs = np.zeros((2, size, size, 6), np.float32)
    logs[..., [0, 3, 5]] = rng.normal(0, 0.1, 3) + np.array([0.5, -1.0, -1.2])
    logs[..., 1] = 0.3 * inputs[:, 0].numpy()
    target = torch.from_numpy(np.concatenate([np.moveaxis(logs, -1, 1) * mask, np.stack([mask[None]] * 2)], 1))
    weight = torch.from_numpy(np.stack([mask[None]] * 2))
    model = Translator(PHASE1.in_channels, PHASE1.out_channels, base=8, depth=2)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(300):
        loss = PHASE1.loss(model(inputs), target, weight)["total"]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert min(losses[-10:]) * 10 <= losses[0]
