"""Training slices and their augmentations (training/slices.py): flips, rotations and elastic warps turn the
tensors, skull stripping, contrast curves."""

from __future__ import annotations

import csv
import dataclasses

import numpy as np
import pytest
import torch
from scipy import ndimage

from conftest import make_prep_dir
from m2m_app.maths import grid as conform
from m2m_app.maths.metrics import angular_error_deg
from m2m_app.maths.tensor import tensor_derivatives
from m2m_app.models.encoding import tensor_to_log
from m2m_app.models.phases import PHASE1
from m2m_app.training import slices

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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


@pytest.mark.parametrize("seed", range(4))
def test_geometric_augmentation_rotates_tensors_with_the_image(seed):
    """The bar randomly rotated/scaled in the axial plane: its direction and V1 of the warped tensors agree."""
    slab, target = _stick_bar()
    spec = dataclasses.replace(PHASE1, max_rotation_deg=60.0)
    warped, rotated, weight = slices.augment_geometry(
        slab, target, np.ones((1, 64, 64)), 2, spec, np.random.default_rng(seed)
    )
    bar_axis, v1 = _bar_axis_and_v1(warped, rotated)
    assert abs(v1[2]) < 1e-6 and weight[0, 32, 32] == 1
    assert angular_error_deg(v1[:2], bar_axis) < 4.0


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
    assert np.sqrt((field**2).sum(0)).max() == pytest.approx(3.0)
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
        warped, rotated, _ = slices.augment_geometry(
            slab, target, np.ones((1, 64, 64)), 2, spec, np.random.default_rng(0), elastic_px=elastic_px
        )
        bar_axis, v1 = _bar_axis_and_v1(warped, rotated)
        assert angular_error_deg(bar_axis, x_axis) == pytest.approx(turn, abs=3.0)
        assert angular_error_deg(v1[:2], bar_axis) < 4.0 and abs(v1[2]) < 1e-6


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


def test_random_contrast_curve_keeps_the_intensity_order():
    rng = np.random.default_rng(5)
    slab = rng.random((1, 5, 16, 16)).astype(np.float32)
    curved = slices.random_monotonic_curve(slab, rng)
    order = np.argsort(slab.ravel(), kind="stable")
    assert np.all(np.diff(curved.ravel()[order]) >= 0) and curved.dtype == slab.dtype
    assert curved.min() >= 0 and curved.max() <= 1 and not np.allclose(curved, slab, atol=0.02)
    # near the identity: a normalised intensity still roughly means the same tissue
    assert np.abs(curved - slab).max() < 5 * slices.REMAP_SD
