"""Translators (phases 1 and 2): networks, conforming, inference, training loop — tiny and synthetic."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from conftest import synthetic_head as _head
from m2m_app.errors import BadDataError
from m2m_app.inference.predict import load_translator, predict_phase1, predict_phase2, predict_volume
from m2m_app.maths import grid as conform
from m2m_app.maths.tensor import components_to_matrix, tensor_derivatives
from m2m_app.models.encoding import tensor_to_log
from m2m_app.models.losses import fa_from_log, log_tensor_parts, wasserstein_1d
from m2m_app.models.phases import PHASE1, PHASE2
from m2m_app.models.translator import Encoder, GlobalDiscriminator, PatchDiscriminator, Translator
from m2m_app.training import slices
from m2m_app.training.evaluate import evaluate_phase
from m2m_app.training.loop import export_generator, train_phase
from m2m_app.training.samples import build_sample

TINY = {"base": 4, "depth": 2}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    torch.manual_seed(0)


def make_prep_dir(root: Path, kinds: tuple[str, ...] = ("ras", "oblique")) -> Path:
    """A fake ``m2m-train prepare`` output with one synthetic subject per ``kinds`` entry."""
    prep, columns = root / "prep", ("mask", "wm", "fa", "md", "ad", "rd", "diffusivity", "v1", "colfa", "tdi", "dectdi")
    rows = []
    for number, kind in enumerate(kinds, start=1):
        subject = f"sub-{number:02d}"
        maps = _head(kind)
        t1w_path = root / "bids" / subject / "anat" / f"{subject}_T1w.nii.gz"
        t1w_path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(maps["t1w"], maps["affine"]), t1w_path)
        row = {"subject": subject, "participant": f"{number:02d}", "session": "", "t1w": str(t1w_path), "status": "ok"}
        for column in columns:
            relative = Path(subject) / "dwi" / f"{subject}_{column}.nii.gz"
            (prep / relative).parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(np.asarray(maps[column], np.float32), maps["affine"]), prep / relative)
            row[column] = str(relative)
        rows.append(row)
    with (prep / "manifest.tsv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]) + ["mean_fa_wm"], delimiter="\t", restval="0.5")
        writer.writeheader()
        writer.writerows(rows)
    return prep


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
    assert np.allclose(PHASE1.decode(np.concatenate([tensor_to_log(tensor).T[:, :, None, None],
                                                     np.zeros((1, 1, 1, 1))]))["tensor"][0, 0, 0], tensor[0],
                       rtol=1e-4, atol=1e-9)


def test_tiny_model_overfits_two_slices():
    rng = np.random.default_rng(0)
    size = 32
    yy, xx = np.mgrid[:size, :size] / size
    inputs = torch.from_numpy(np.stack([np.stack([np.sin(6 * xx + k) * yy] * PHASE1.in_channels)
                                        for k in range(2)]).astype(np.float32))
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
            return torch.from_numpy(np.concatenate(
                [tensor_to_log(comps), np.full((64, 1), mask, np.float32)], 1).T.copy()).float().view(1, 7, 1, 64)

        losses = PHASE1.loss(as_raw(predicted, 0.0), as_raw(truth, 1.0), torch.ones(1, 1, 1, 64))
        return {k: v.item() for k, v in losses.items()}

    shuffled, squeezed = terms(truth[rng.permutation(64)]), terms(compressed)
    assert shuffled["fa_distribution"] == pytest.approx(0.0, abs=1e-6) and shuffled["fa_l1"] > 0.05
    assert squeezed["fa_distribution"] > 0.05
    assert squeezed["fa_distribution"] == pytest.approx(squeezed["fa_l1"], rel=1e-4)  # a monotone squeeze: both agree
    sample = torch.tensor([0.1, 0.5, 0.9])
    assert wasserstein_1d(sample, sample.flip(0)).item() == 0.0
    assert wasserstein_1d(sample + 0.2, sample).item() == pytest.approx(0.2)


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
    out = predict_phase2(derived["fa"], derived["md"], derived["colfa"], pred["grid"], mask=pred["mask"],
                         model=Translator(PHASE2.in_channels, PHASE2.out_channels, **TINY), device="cpu")
    assert out["tdi"].shape == maps["t1w"].shape and out["dectdi"].shape == maps["t1w"].shape + (3,)
    assert not out["tdi"][~pred["mask"]].any()


def test_predict_volume_fuses_three_views():
    class Identity(torch.nn.Module):  # returns the centre slice of the 2.5D stack
        def forward(self, x):
            return x[:, PHASE1.context:PHASE1.context + 1].repeat(1, PHASE1.out_channels, 1, 1)

    volume = np.random.default_rng(0).random((1, 6, 7, 8)).astype(np.float32)
    out = predict_volume(Identity(), PHASE1, volume, device="cpu", batch_size=4, mirror=False)
    assert out.shape == (7, 6, 7, 8) and np.allclose(out[3], volume[0], atol=1e-6)


@pytest.mark.parametrize("spec", [PHASE1, PHASE2], ids=lambda spec: spec.name)
def test_mirrored_passes_make_the_prediction_mirror_equivariant(spec):
    """With the mirrored passes, a left-right mirrored input gives the mirrored output (tensor signs
    fixed), whatever the weights; without them, an untrained network is far from it."""
    model = Translator(spec.in_channels, spec.out_channels, **TINY)
    volume = np.random.default_rng(2).random((len(spec.inputs), 8, 6, 5)).astype(np.float32)
    signs = np.asarray(spec.x_flip_signs, np.float32).reshape(-1, 1, 1, 1)

    def mirrored_prediction(mirror: bool) -> tuple[np.ndarray, np.ndarray]:
        out = predict_volume(model, spec, volume, device="cpu", mirror=mirror)
        out_of_mirrored = predict_volume(model, spec, np.ascontiguousarray(volume[:, ::-1]), device="cpu",
                                         mirror=mirror)
        return out, out_of_mirrored[:, ::-1] * signs

    np.testing.assert_allclose(*mirrored_prediction(True), atol=1e-5)
    assert not np.allclose(*mirrored_prediction(False), atol=1e-3)


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
    fa = {name: tensor_derivatives(PHASE1.decode(raw)["tensor"][0, 0, 0])
          for name, raw in (("one", views[1]), ("mean", mean_of_views(views)), ("fused", PHASE1.fuse(views)))}
    assert fa["mean"]["fa"] < fa["one"]["fa"] - 0.02
    assert fa["fused"]["fa"] == pytest.approx(fa["one"]["fa"], rel=1e-5)
    np.testing.assert_allclose(np.abs(fa["fused"]["v1"]), [1.0, 0.0, 0.0], atol=1e-5)


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


def test_flip_augmentation_negates_off_diagonals(tmp_path, monkeypatch):
    prep = make_prep_dir(tmp_path, kinds=("oblique",))
    row = next(csv.DictReader((prep / "manifest.tsv").open(), delimiter="\t"))
    cache = slices.cache_sample(PHASE1, slices.Source(row, prep), tmp_path / "cache")
    plain = slices.SliceDataset(PHASE1, [cache], augment=False)
    monkeypatch.setattr(slices, "P_FLIP", 1.0)
    monkeypatch.setattr(slices, "P_THICK", 0.0)
    monkeypatch.setattr(slices, "P_AFFINE", 0.0)
    flipped = slices.SliceDataset(PHASE1, [cache], augment=True)
    item = next(i for i, (_, axis, _) in enumerate(plain.index) if axis == 2)  # axial: x is the first in-plane axis
    a, b = plain[item]["target"], flipped[item]["target"]
    height = conform.MODEL_SHAPE[0]
    signs = torch.tensor(PHASE1.x_flip_signs).view(-1, 1, 1)
    assert torch.allclose(b[:, :height], a[:, :height].flip(1) * signs)


STICK_X = np.array([1.7e-3, 0, 0, 0.3e-3, 0, 0.3e-3])


def _stick_bar(size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A bar along x (axial slice: h = x, w = y) of x-oriented sticks: slab (1, 5, S, S), target (7, S, S)."""
    centre = (size - 1) / 2
    hh, ww = np.mgrid[:size, :size]
    bar = (np.abs(ww - centre) < 2.5) & (np.abs(hh - centre) < 24)
    slab = np.broadcast_to(bar.astype(np.float32), (1, 5, size, size)).copy()
    logs = tensor_to_log(np.array([STICK_X], np.float32))[0]
    target = np.concatenate([np.broadcast_to(logs[:, None, None], (6, size, size)), np.ones((1, size, size))])
    return slab, target.astype(np.float32)


def _bar_axis_and_v1(warped: np.ndarray, rotated: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The warped bar's direction in the (x, y) plane and V1 (3,) of the warped tensor at its centre."""
    image = warped[0, 2]
    points = np.argwhere(image > 0.5) - np.argwhere(image > 0.5).mean(0)
    bar_axis = np.linalg.eigh(points.T @ points)[1][:, -1]
    tensor = PHASE1.decode(rotated[:, 32:33, 32:33, None])["tensor"][0, 0, 0]
    v1 = tensor_derivatives(tensor)["v1"]
    assert tensor_derivatives(tensor)["fa"] == pytest.approx(tensor_derivatives(STICK_X)["fa"], rel=1e-3)
    return bar_axis, v1


def _angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    """Angle in degrees between two axes (sign-free)."""
    return float(np.degrees(np.arccos(min(1.0, abs(a @ b) / np.linalg.norm(a) / np.linalg.norm(b)))))


@pytest.mark.parametrize("seed", range(4))
def test_geometric_augmentation_rotates_tensors_with_the_image(seed):
    """The bar randomly rotated/scaled in the axial plane: its direction and V1 of the warped tensors agree."""
    slab, target = _stick_bar()
    spec = dataclasses.replace(PHASE1, max_rotation_deg=60.0)
    warped, rotated, weight = slices.augment_geometry(slab, target, np.ones((1, 64, 64)), 2, spec,
                                                      np.random.default_rng(seed))
    bar_axis, v1 = _bar_axis_and_v1(warped, rotated)
    assert abs(v1[2]) < 1e-6 and weight[0, 32, 32] == 1
    assert _angle_deg(v1[:2], bar_axis) < 4.0


def _turn_displacement(shape: tuple[int, int], degrees: float, scale: float = 1.0) -> np.ndarray:
    """Displacement ``(2, H, W)`` under which output pixel p reads (R(-θ)/s)(p - c) + c, c the
    centre: the content turns by θ = ``degrees`` about the centre and grows by ``scale``."""
    theta = np.radians(degrees)
    inverse = np.array([[np.cos(theta), np.sin(theta)], [-np.sin(theta), np.cos(theta)]]) / scale
    pixels = np.indices(shape, dtype=np.float64) - ((np.array(shape) - 1) / 2)[:, None, None]
    return np.einsum("ij,j...->i...", inverse, pixels) - pixels


def test_content_rotation_angles_of_a_linear_warp_are_exact():
    """A linear warp turning the content by θ: the angle is θ everywhere, whatever the scale."""
    displacement = _turn_displacement((40, 50), 25.0, scale=1.2)
    np.testing.assert_allclose(slices.content_rotation_angles(displacement), np.radians(25.0), atol=1e-9)
    assert np.abs(slices.content_rotation_angles(np.ones((2, 40, 50)))).max() == 0.0  # a shift turns nothing


def test_elastic_displacement_is_smooth_bounded_and_seeded():
    field = slices.elastic_displacement((96, 112), 3.0, np.random.default_rng(1))
    assert field.shape == (2, 96, 112)
    assert np.sqrt((field ** 2).sum(0)).max() == pytest.approx(3.0)
    jacobian = [np.gradient(component) for component in field]
    determinant = (1 + jacobian[0][0]) * (1 + jacobian[1][1]) - jacobian[0][1] * jacobian[1][0]
    assert determinant.min() > 0.5  # no folding
    np.testing.assert_array_equal(field, slices.elastic_displacement((96, 112), 3.0, np.random.default_rng(1)))


def test_elastic_augmentation_turns_tensors_with_the_tissue(monkeypatch):
    """An elastic field that happens to be a 30° rotation about the centre (the affine draw
    neither rotates nor shifts): the bar turns by 30° and V1 turns with it; with
    elastic_px=0 the same draw leaves the bar along x."""
    monkeypatch.setattr(slices, "elastic_displacement", lambda shape, amplitude, rng: _turn_displacement(shape, 30.0))
    monkeypatch.setattr(slices, "P_ELASTIC", 1.0)
    monkeypatch.setattr(slices, "MAX_SHIFT", 0.0)
    slab, target = _stick_bar()
    spec = dataclasses.replace(PHASE1, max_rotation_deg=0.0)
    x_axis = np.array([1.0, 0.0])
    for elastic_px, turn in ((3.0, 30.0), (0.0, 0.0)):
        warped, rotated, _ = slices.augment_geometry(slab, target, np.ones((1, 64, 64)), 2, spec,
                                                     np.random.default_rng(0), elastic_px=elastic_px)
        bar_axis, v1 = _bar_axis_and_v1(warped, rotated)
        assert _angle_deg(bar_axis, x_axis) == pytest.approx(turn, abs=3.0)
        assert _angle_deg(v1[:2], bar_axis) < 4.0 and abs(v1[2]) < 1e-6


def test_brain_extraction_mask_grows_in_millimetres_and_fills_holes():
    brain = np.zeros((21, 21, 9), bool)
    brain[10, 10, 4] = True
    grown = conform.brain_extraction_mask(brain, 3.0, (1.0, 1.0, 4.0))
    assert grown[10, 7:14, 4].all() and not grown[10, 6, 4] and not grown[10, 14, 4]  # 3 voxels of 1 mm
    assert not grown[10, 10, 3]  # 4 mm away along z
    shell = np.zeros((15, 15, 15), bool)
    shell[3:12, 3:12, 3:12], shell[5:10, 5:10, 5:10] = True, False
    assert conform.brain_extraction_mask(shell, 0.0, (1.0,) * 3)[7, 7, 7]
    assert not conform.brain_extraction_mask(np.zeros((5, 5), bool), 3.0, (1.0, 1.0)).any()


def test_skull_strip_augmentation_gives_what_inference_sees_of_a_stripped_volume():
    """Stripping slices with the brain grown in-plane and re-mapping their intensities equals,
    inside the kept region, normalising the skull-stripped volume as conform does; outside it is 0."""
    rng = np.random.default_rng(0)
    xx, yy, _ = np.indices((40, 40, 12))
    brain = np.hypot(xx - 20, yy - 20) < 9  # a cylinder along z: in-plane and 3D growth agree
    head = np.hypot(xx - 20, yy - 20) < 15
    volume = np.where(brain, 0.4 + 0.2 * rng.random(brain.shape), np.where(head, 0.9, 0.0)).astype(np.float32)
    ranges = slices.stripped_intensity_ranges(volume[None], brain)
    keep3d = conform.brain_extraction_mask(brain, conform.STRIPPED_MARGIN_MM, (conform.MODEL_VOXEL_MM,) * 3)
    expected = conform.normalise_intensity(np.where(keep3d, volume, 0.0))
    slab = np.moveaxis(volume, 2, 0)[None, 4:9]  # (1, 5, 40, 40): five axial planes
    stripped = slices.skull_strip(slab, np.moveaxis(brain, 2, 0)[4:9], conform.STRIPPED_MARGIN_MM, ranges)
    np.testing.assert_allclose(stripped[0], np.moveaxis(expected, 2, 0)[4:9], atol=1e-6)
    assert stripped[0][:, 20, 20].min() > 0 and (stripped[0][:, 20, 36] == 0).all()  # scalp gone


def test_skull_strip_probability_strips_slices_and_zero_changes_nothing(tmp_path, monkeypatch):
    """With probability 1 every slice loses its scalp (geometry and degradations off, so the
    voxels far from the brain are exactly 0) and keeps the teacher's targets; with 0 the
    samples are exactly those of a dataset without the option."""
    for name in ("P_FLIP", "P_AFFINE", "P_NOISE", "P_THICK", "P_LOWRES"):
        monkeypatch.setattr(slices, name, 0.0)
    prep = make_prep_dir(tmp_path)
    row = next(csv.DictReader((prep / "manifest.tsv").open(), delimiter="\t"))
    cache = slices.cache_sample(PHASE1, slices.Source(row, prep), tmp_path / "cache")
    always = slices.SliceDataset(PHASE1, [cache], seed=1, skull_strip_prob=1.0)
    never = slices.SliceDataset(PHASE1, [cache], seed=1, skull_strip_prob=0.0)
    default = slices.SliceDataset(PHASE1, [cache], seed=1)
    brain = np.load(cache)[-1] > 0
    far = ndimage.distance_transform_edt(~brain) * conform.MODEL_VOXEL_MM > slices.STRIP_MAX_MARGIN_MM + 2
    scalp_seen = 0
    for item in range(0, len(always), max(1, len(always) // 20)):
        _, axis, k = always.index[item]
        stripped, plain = always[item], default[item]
        assert torch.equal(never[item]["input"], plain["input"])
        assert torch.equal(stripped["target"], plain["target"]) and torch.equal(stripped["weight"], plain["weight"])
        outside = torch.from_numpy(slices._pad(slices.slab_along(far[None], axis, np.array([k]))[0, 0]))
        centre = PHASE1.context  # the slice itself among its neighbours
        assert (stripped["input"][centre][outside] == 0).all()
        scalp_seen += int((plain["input"][centre][outside] > 0).any())
    assert scalp_seen > 0
    assert len(always.stripped_ranges) == 1 and not never.stripped_ranges


def test_fa_metrics_measure_bias_and_compression():
    """A prediction squeezed towards its mean keeps r = 1 but shows its spread (< 1) and bias."""
    from m2m_app.training.evaluate import fa_metrics

    rng = np.random.default_rng(0)
    truth = rng.uniform(0.1, 0.8, (12, 12, 12))
    brain = np.ones(truth.shape, bool)
    wm = truth > 0.3
    exact = fa_metrics(truth, truth, brain, wm)
    assert exact["fa_bias_wm"] == 0.0 and exact["fa_spread_wm"] == pytest.approx(1.0)
    squeezed = fa_metrics(0.25 + 0.5 * (truth - 0.25), truth, brain, wm)
    assert squeezed["fa_r_wm"] == pytest.approx(1.0) and squeezed["fa_spread_wm"] == pytest.approx(0.5)
    assert squeezed["fa_bias_wm"] < -0.1 and squeezed["fa_mae_wm"] == pytest.approx(-squeezed["fa_bias_wm"])


def test_training_resumes_and_exports(tmp_path, caplog):
    prep = make_prep_dir(tmp_path)
    out = tmp_path / "model"
    options = {"batch_size": 16, "device": "cpu", "seed": 3, "lr": 1e-3, "disc_base": 4, "subjects": ["01"],
               "elastic_px": 2.0, **TINY}
    train_phase("phase1", prep, out, epochs=1, **options)
    first = list(csv.DictReader((out / "phase1_losses.csv").open()))
    assert [r["epoch"] for r in first] == ["1"]
    caplog.set_level("INFO")
    train_phase("phase1", prep, out, epochs=2, **options)
    assert "resuming" in caplog.text
    rows = list(csv.DictReader((out / "phase1_losses.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"] and rows[0] == first[0]
    meta = json.loads((out / "phase1.json").read_text())
    assert meta["recipe"]["epochs"] == 2 and meta["recipe"]["subjects"] == ["sub-01"]
    assert meta["recipe"]["elastic_px"] == 2.0
    assert meta["recipe"]["training_datasets"] == ["prep"] and str(tmp_path) not in json.dumps(meta)
    assert meta["architecture"] == {"in_channels": 5, "out_channels": 7, **TINY}
    results = evaluate_phase("phase1", prep, out, test_subjects=["sub-02"], out_tsv=out / "eval.tsv", device="cpu")
    assert {r["method"] for r in results} == {"m2m", "baseline_fa_from_t1w"}
    assert np.isfinite(results[0]["fa_mae_brain"]) and (out / "eval.tsv").exists()
    stripped = evaluate_phase("phase1", prep, out, test_subjects=["sub-02"], device="cpu", skull_strip=True)
    assert [r["method"] for r in stripped] == [r["method"] for r in results]
    assert np.isfinite(stripped[0]["fa_mae_brain"]) and stripped[0]["fa_mae_brain"] != results[0]["fa_mae_brain"]


def test_training_exports_the_moving_average_of_the_generator(tmp_path):
    """With --ema-decay the exported weights are the checkpoint's averaged generator (not its last
    weights), the average resumes with the run, and a run without it cannot resume from it."""
    from safetensors.torch import load_file

    from m2m_app.errors import UsageError

    prep, out = make_prep_dir(tmp_path), tmp_path / "model"
    options = {"batch_size": 16, "device": "cpu", "seed": 3, "lr": 1e-3, "disc_base": 4, **TINY}
    train_phase("phase1", prep, out, epochs=1, ema_decay=0.9, **options)
    train_phase("phase1", prep, out, epochs=2, ema_decay=0.9, **options)
    state = torch.load(out / "checkpoints" / "phase1_last.pt", weights_only=True)["networks"]
    exported = load_file(out / "phase1.safetensors")
    batches = sum(int(row["batches"]) for row in csv.DictReader((out / "phase1_losses.csv").open()))
    assert int(state["ema_updates"]) == batches > 1
    for name, value in exported.items():
        torch.testing.assert_close(value, state[f"ema_generator.{name}"])
    assert any(not torch.allclose(value, state[f"generator.{name}"]) for name, value in exported.items())
    metadata = json.loads((out / "phase1.json").read_text())
    assert metadata["recipe"]["ema_decay"] == 0.9
    assert metadata["parameters"] == sum(value.numel() for value in exported.values())
    with pytest.raises(UsageError, match="different architecture"):
        train_phase("phase1", prep, out, epochs=3, ema_decay=0.0, **options)


@pytest.mark.parametrize("phase", ["phase1", "phase2"])
def test_training_defaults_are_the_shipped_recipe(phase):
    """Training without options (the CLI and the Python API) follows the recipe recorded in
    the shipped weights' JSON, the one the model card measured."""
    import inspect

    from m2m_app.cli.train import cli
    from m2m_app.inference.predict import verify_weights

    _, meta, _ = verify_weights(phase)
    recipe = meta["recipe"]
    shipped = {"base": meta["architecture"]["base"], "depth": meta["architecture"]["depth"],
               **{k: recipe[k] for k in ("batch_size", "lr", "ema_decay", "elastic_px", "disc_base",
                                         "adversarial_weight")}}
    on_the_command_line = ["base", "batch_size", "lr", "ema_decay", "elastic_px"]
    if phase == "phase1":  # phase 2 ignores skull stripping (its recipe records 0)
        shipped["skull_strip_prob"] = recipe["skull_strip_prob"]
        on_the_command_line.append("skull_strip_prob")
    assert recipe["world_size"] == 1  # so the recorded batch size is the per-process one
    api = {name: p.default for name, p in inspect.signature(train_phase).parameters.items() if name in shipped}
    assert api == shipped
    options = {p.name: p.default for p in cli.commands[phase].params}
    assert {k: options[k] for k in on_the_command_line} == {k: shipped[k] for k in on_the_command_line}


def test_phase2_sample_from_predicted_inputs(tmp_path):
    prep = make_prep_dir(tmp_path, kinds=("las",))
    row = next(csv.DictReader((prep / "manifest.tsv").open(), delimiter="\t"))
    predicted = tmp_path / "predicted"
    for column in ("fa", "md", "colfa"):
        img = nib.load(prep / row[column])
        (predicted / row[column]).parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj) * 0.5, img.affine), predicted / row[column])
    sources = slices.training_sources([(row, prep)], predicted)
    assert [s.inputs_dir for s in sources] == [None, predicted]
    teacher, from_phase1 = (build_sample(PHASE2, s.row, s.prep_dir, s.inputs_dir) for s in sources)
    assert teacher.inputs.shape == (5,) + conform.MODEL_SHAPE and teacher.targets.shape == (4,) + conform.MODEL_SHAPE
    assert np.allclose(from_phase1.inputs, teacher.inputs * 0.5, atol=1e-5)
    assert np.array_equal(from_phase1.targets, teacher.targets)
    brain = teacher.weight > 0
    assert np.percentile(np.expm1(teacher.targets[0][brain]), 99) == pytest.approx(1.0, abs=0.3)


def test_distributed_training_with_torchrun_on_cpu(tmp_path):
    """Two DDP processes (gloo on CPU) train one epoch; only rank 0 writes the loss table and the weights."""
    prep = make_prep_dir(tmp_path)
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "m2m_app.cli.train", "phase1", str(prep), str(out), "--epochs", "1", "--width", "4",
               "--batch-size", "4", "--device", "cpu", "--elastic-px", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    meta = json.loads((out / "phase1.json").read_text())
    assert meta["recipe"]["world_size"] == 2 and meta["recipe"]["batch_size"] == 8
    assert meta["recipe"]["elastic_px"] == 2.0
    assert [row["epoch"] for row in csv.DictReader((out / "phase1_losses.csv").open())] == ["1"]
    load_translator("phase1", out)


def test_random_contrast_curve_keeps_the_intensity_order():
    rng = np.random.default_rng(5)
    slab = rng.random((1, 5, 16, 16)).astype(np.float32)
    curved = slices.random_monotonic_curve(slab, rng)
    order = np.argsort(slab.ravel(), kind="stable")
    assert np.all(np.diff(curved.ravel()[order]) >= 0) and curved.dtype == slab.dtype
    assert curved.min() >= 0 and curved.max() <= 1 and not np.allclose(curved, slab, atol=0.02)
    # near the identity: a normalised intensity still roughly means the same tissue
    assert np.abs(curved - slab).max() < 5 * slices.REMAP_SD


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on a machine with one)")
def test_cuda_training_and_inference_agree_with_cpu(tmp_path):
    """A tiny model trains on CUDA; its weights predict the same volume on CUDA as on the CPU."""
    prep, out = make_prep_dir(tmp_path), tmp_path / "model"
    train_phase("phase1", prep, out, epochs=1, batch_size=16, device="cuda", seed=3, lr=1e-3, disc_base=4,
                ema_decay=0.9, **TINY)
    model, spec = load_translator("phase1", out)
    volume = np.random.default_rng(4).random((1, 24, 28, 24)).astype(np.float32)
    on_gpu = predict_volume(model, spec, volume, device="cuda")
    on_cpu = predict_volume(model, spec, volume, device="cpu")
    assert np.isfinite(on_gpu).all()
    np.testing.assert_allclose(on_gpu, on_cpu, atol=1e-3)
