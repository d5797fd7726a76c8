"""Inference (inference/predict.py): the model grid and back, view fusion, mirrored passes, checked weights —
tiny and synthetic."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from conftest import DS_REAL, TINY, requires_ds_real
from conftest import synthetic_head as _head
from m2m_app.errors import BadDataError
from m2m_app.inference.predict import (
    load_translator,
    predict_phase1,
    predict_phase2,
    predict_views,
    predict_volume,
)
from m2m_app.maths import grid as conform
from m2m_app.maths.tensor import components_to_matrix, tensor_derivatives
from m2m_app.models.phases import PHASE1, PHASE2
from m2m_app.models.translator import Translator
from m2m_app.training.loop import export_generator

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["oblique", "las"])
def test_round_trip_to_original_grid(kind):
    maps = _head(kind, shape=(40, 46, 34), zooms=(4.0, 4.0, 4.8))
    img = nib.Nifti1Image(maps["t1w"], maps["affine"])
    conformed, grid = conform.conform_t1w(img, maps["t1w"])
    assert conformed.shape == conform.MODEL_SHAPE and 0 <= conformed.min() and conformed.max() <= 1
    assert np.allclose(grid.affine[:3, :3], np.diag([conform.MODEL_VOXEL_MM] * 3))
    back = grid.to_source(grid.to_model(maps["mask"].astype(np.float32), order=0), order=0)
    assert back.shape == maps["t1w"].shape and (back == maps["mask"]).mean() > 0.97
    # A constant oblique tensor across the brain survives the round trip unrotated, edges included.
    constant = np.where(maps["mask"][..., None] > 0, [1.2e-3, 3e-4, -2e-4, 6e-4, 1e-4, 4e-4], 0).astype(np.float32)
    tensor = conform.resample_tensor(conform.resample_tensor(constant, grid), grid, to_model=False)
    kept = np.any(tensor != 0, axis=-1)
    assert kept[ndimage.binary_erosion(maps["mask"])].all()
    assert np.allclose(tensor[kept], constant[ndimage.binary_erosion(maps["mask"])][0], rtol=1e-3, atol=1e-8)

    model = Translator(PHASE1.in_channels, PHASE1.out_channels, **TINY)
    with torch.no_grad():
        model.generator.head.bias[6] = 5.0  # everything "brain"
    pred = predict_phase1(img, maps["t1w"], model=model, device="cpu", batch_size=32)
    assert pred["tensor"].shape == maps["t1w"].shape + (6,) and pred["mask"].shape == maps["t1w"].shape
    assert pred["mask"].any()
    evals = np.linalg.eigvalsh(components_to_matrix(pred["tensor"][pred["mask"]].astype(float)))
    assert np.all(evals > 0)
    derived = tensor_derivatives(pred["tensor"])
    out = predict_phase2(
        derived["fa"],
        derived["md"],
        derived["colfa"],
        pred["grid"],
        mask=pred["mask"],
        model=Translator(PHASE2.in_channels, PHASE2.out_channels, **TINY),
        device="cpu",
    )
    assert out["tdi"].shape == maps["t1w"].shape and out["dectdi"].shape == maps["t1w"].shape + (3,)
    assert not out["tdi"][~pred["mask"]].any()


def test_predict_volume_fuses_three_views():
    class Identity(torch.nn.Module):  # returns the centre slice of the 2.5D stack
        def forward(self, x):
            return x[:, PHASE1.context : PHASE1.context + 1].repeat(1, PHASE1.out_channels, 1, 1)

    volume = np.random.default_rng(0).random((1, 6, 7, 8)).astype(np.float32)
    out = predict_volume(Identity(), PHASE1, volume, device="cpu", batch_size=4, mirror=False)
    assert out.shape == (7, 6, 7, 8) and np.allclose(out[3], volume[0], atol=1e-6)


def test_passes_along_chosen_axes_are_those_of_the_full_run():
    """``axes`` picks passes (what benchmarks/bench_passes.py times one by one): the same arrays as
    in the six-pass run, in the order axis by axis, then their mirrored twins."""
    model = Translator(PHASE1.in_channels, PHASE1.out_channels, **TINY)
    volume = np.random.default_rng(4).random((1, 8, 6, 5)).astype(np.float32)
    every = predict_views(model, PHASE1, volume, device="cpu")
    chosen = predict_views(model, PHASE1, volume, device="cpu", axes=(2,))
    assert len(every) == 6 and len(chosen) == 2
    np.testing.assert_allclose(chosen[0], every[2], atol=1e-6)
    np.testing.assert_allclose(chosen[1], every[5], atol=1e-6)


@pytest.mark.parametrize("spec", [PHASE1, PHASE2], ids=lambda spec: spec.name)
def test_mirrored_passes_make_the_prediction_mirror_equivariant(spec):
    """With the mirrored passes, a left-right mirrored input gives the mirrored output (tensor signs
    fixed), whatever the weights; without them, an untrained network is far from it."""
    model = Translator(spec.in_channels, spec.out_channels, **TINY)
    volume = np.random.default_rng(2).random((len(spec.inputs), 8, 6, 5)).astype(np.float32)
    signs = np.asarray(spec.x_flip_signs, np.float32).reshape(-1, 1, 1, 1)

    def mirrored_prediction(mirror: bool) -> tuple[np.ndarray, np.ndarray]:
        out = predict_volume(model, spec, volume, device="cpu", mirror=mirror)
        out_of_mirrored = predict_volume(
            model, spec, np.ascontiguousarray(volume[:, ::-1]), device="cpu", mirror=mirror
        )
        return out, out_of_mirrored[:, ::-1] * signs

    np.testing.assert_allclose(*mirrored_prediction(True), atol=1e-5)
    assert not np.allclose(*mirrored_prediction(False), atol=1e-3)


def test_corrupted_weights_fail_with_a_clear_error(tmp_path):
    model = Translator(PHASE2.in_channels, PHASE2.out_channels, **TINY)
    weights = export_generator(model, PHASE2, tmp_path, {"epochs": 0})
    loaded, spec = load_translator("phase2", tmp_path)
    assert spec is PHASE2 and loaded.config == model.config
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BadDataError, match="checksum does not match") as error:
        load_translator("phase2", tmp_path)
    assert "phase2.safetensors" in str(error.value)


@pytest.mark.slow
@requires_ds_real
def test_fusion_inside_the_mask_equals_the_whole_grid_route_on_a_real_volume(one_torch_thread):
    """The packaged phase 1 on sub-01's T1w: the passes decomposed once, inside the mask only
    (``phase1_from_views``), give the whole-grid route's mask, tensor and uncertainty (fuse,
    decode and spread over every voxel) within float32 rounding."""
    from m2m_app.inference.predict import load_translator, phase1_from_views, predict_views, spread_maps
    from m2m_app.io.nifti import load_t1w
    from m2m_app.models.phases import phase1_inputs

    img, data = load_t1w(DS_REAL / "sub-01/anat/sub-01_T1w.nii.gz")
    inputs, grid = phase1_inputs(img, data)
    views = predict_views(load_translator("phase1")[0], PHASE1, inputs)
    fast = phase1_from_views(views, grid, mask_tensor=True, uncertainty=True)
    fused = PHASE1.fuse(views)
    decoded = PHASE1.decode(fused)
    mask = decoded["mask"] >= 0.5
    np.testing.assert_array_equal(fast["mask"], mask)
    assert mask.sum() > 50_000 and not fast["tensor"][~mask].any()
    scale = np.abs(decoded["tensor"][mask]).max()
    np.testing.assert_allclose(fast["tensor"][mask], decoded["tensor"][mask], rtol=0, atol=1e-5 * scale)
    spreads = spread_maps(views, fused, PHASE1, mask)
    np.testing.assert_allclose(fast["fa_sd"], spreads["fa_sd"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(fast["v1_dispersion"], spreads["v1_dispersion"], rtol=0, atol=1e-2)  # degrees
