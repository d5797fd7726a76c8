"""The T1w detail transfer: FA sharpened below the model grid, the tensor rescaled consistently."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from dipy.reconst import dti
from scipy import ndimage

from conftest import make_prep_dir, run_cli
from m2m_app.inference.predict import load_fa_detail
from m2m_app.io.derivatives import write_maps
from m2m_app.io.naming import Subject
from m2m_app.maths.detail import BinnedRegression, FaDetail
from m2m_app.maths.grid import ConformedGrid, GridResampler, normalise_intensity, resample_outputs
from m2m_app.maths.tensor import (
    MAX_FA,
    components_to_matrix,
    compose_tensors,
    eigen_decomposition,
    matrix_to_components,
    rescale_anisotropy,
    tensor_derivatives,
)

LOOKUP = tuple(np.linspace(0.05, 0.6, 64))


def _fa(evals):
    return np.nan_to_num(dti.fractional_anisotropy(evals))


def test_rescaled_eigenvalues_reach_the_target_fa_and_keep_their_mean():
    rng = np.random.default_rng(0)
    evals = np.sort(rng.uniform(0.2e-3, 2.0e-3, (1000, 3)), axis=1)[:, ::-1]
    shift = rng.uniform(-0.2, 0.2, 1000)
    new, scale = rescale_anisotropy(evals, shift)
    assert np.allclose(new.mean(axis=1), evals.mean(axis=1))  # MD kept
    assert np.all(new > 0)  # positive-definite
    target = np.clip(_fa(evals) + shift, 0.0, MAX_FA)
    reached = scale < (1 - 0.01) * evals.mean(1) / (evals.mean(1) - evals.min(1)) - 1e-9  # not capped
    assert reached.mean() > 0.9
    assert np.allclose(_fa(new)[reached], target[reached], atol=1e-6)
    assert np.all(_fa(new)[~reached] < target[~reached] + 1e-9)  # capped ones stop short, stay positive
    assert np.allclose(rescale_anisotropy(evals, np.zeros(1000))[0], evals)
    iso = np.full((3, 3), 1e-3)
    assert np.allclose(rescale_anisotropy(iso, np.full(3, 0.3))[0], iso)  # nothing to stretch


def test_fa_shift_is_a_high_pass_of_the_intensity_lookup():
    detail = FaDetail(LOOKUP, sigma_mm=4.0, weight=0.5)
    t1w = np.zeros((60, 60, 60))
    t1w[4:56, 4:56, 4:56] = 100.0
    t1w[4:56, 4:56, 30:56] = 400.0  # a flat boundary between two tissues, in a head of background
    shift = detail.fa_shift(t1w, (1.0, 1.0, 1.0))
    assert shift[30, 30, 31] > 0.02 and shift[30, 30, 28] < -0.02  # sharper edge, both sides
    assert abs(shift[30, 30, 17]) < 0.005 and abs(shift[30, 30, 43]) < 0.005  # nothing far from it
    # what it approximates: the exact Gaussian high-pass of the lookup, times the weight
    lookup = np.asarray(LOOKUP)[np.minimum((normalise_intensity(t1w) * 64).astype(int), 63)]
    exact = 0.5 * (lookup - ndimage.gaussian_filter(lookup, 4.0, mode="nearest"))
    assert np.abs(shift - exact).max() < 0.15 * np.abs(exact).max()
    where = np.zeros(t1w.shape, bool)
    where[10:50, 10:50, 20:40] = True
    assert np.allclose(detail.fa_shift(t1w, (1, 1, 1), where)[~where], 0.0)
    assert np.allclose(detail.fa_shift(t1w, (1, 1, 1), where)[where], shift[where])
    assert FaDetail.from_dict(json.loads(json.dumps(detail.to_dict()))) == detail


def _tensor_field(shape):
    """A model-grid tensor field (mm²/s) with varied orientation and anisotropy, and its maps."""
    rng = np.random.default_rng(1)
    evals = np.sort(rng.uniform(0.3e-3, 1.8e-3, shape + (3,)), axis=-1)[..., ::-1]
    q, _ = np.linalg.qr(rng.normal(size=shape + (3, 3)))
    components = matrix_to_components(compose_tensors(evals, q)).astype(np.float32)
    return {"diffusivity": components, **tensor_derivatives(components), "mask": np.ones(shape, np.float32)}


def test_outputs_with_a_shift_sharpen_fa_ad_rd_and_the_tensor_but_not_md_or_v1():
    shape = (6, 6, 6)
    maps = _tensor_field(shape)
    resampler = GridResampler(np.eye(4), np.ones(shape, bool), shape, np.eye(4))
    plain = dict(resample_outputs(maps, resampler))
    zero = dict(resample_outputs(maps, resampler, np.zeros(shape, np.float32)))
    for key in plain:
        assert np.allclose(plain[key], zero[key], atol=1e-6), key
    shift = np.random.default_rng(2).uniform(-0.1, 0.1, shape).astype(np.float32)
    sharp = dict(resample_outputs(maps, resampler, shift))
    assert np.allclose(sharp["fa"], np.clip(plain["fa"] + shift, 0, 1), atol=1e-6)
    assert np.allclose(sharp["md"], plain["md"])
    assert np.allclose(np.abs((sharp["v1"] * plain["v1"]).sum(-1)), 1.0, atol=1e-4)
    assert np.allclose(sharp["ad"] + 2 * sharp["rd"], 3 * plain["md"], rtol=1e-4)  # AD, RD follow about MD
    evals, _ = eigen_decomposition(components_to_matrix(sharp["diffusivity"].astype(float)))
    assert np.allclose(
        _fa(evals),
        np.clip(
            _fa(eigen_decomposition(components_to_matrix(plain["diffusivity"].astype(float)))[0]) + shift, 0, MAX_FA
        ),
        atol=1e-4,
    )
    assert np.allclose(sharp["colfa"], np.abs(sharp["v1"]) * sharp["fa"][..., None], atol=1e-6)


def test_binned_regression_gives_bin_means_and_the_overall_mean_for_empty_bins():
    fitted = BinnedRegression(0.0, 1.0, bins=4).fit(np.array([0.1, 0.2, 0.9]), np.array([1.0, 3.0, 5.0]))
    assert np.allclose(fitted.means, [2.0, 3.0, 3.0, 5.0])
    assert np.allclose(fitted.predict(np.array([-1.0, 0.6, 2.0])), [2.0, 3.0, 5.0])


def test_fit_detail_stores_a_lookup_the_app_applies_when_writing(tmp_path):
    prep = make_prep_dir(tmp_path, ("ras",))
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "phase1.json").write_text(json.dumps({"recipe": {"subjects": ["sub-01"]}}))
    assert load_fa_detail(weights) is None
    without = tmp_path / "without"  # the same weights before fit-detail
    without.mkdir()
    (without / "phase1.json").write_text((weights / "phase1.json").read_text())
    done = run_cli("train", "fit-detail", str(prep), str(weights), "--sigma-mm", "4", "--weight", "0.5")
    assert done.returncode == 0, done.stderr
    stored = json.loads((weights / "phase1.json").read_text())["fa_detail"]
    assert stored["fitted_on"] == ["sub-01"] and stored["sigma_mm"] == 4.0 and len(stored["fa_by_intensity"]) == 64
    detail = load_fa_detail(weights)
    assert detail is not None and 0.0 <= min(detail.fa_by_intensity) <= max(detail.fa_by_intensity) <= 1.0
    # writing with those weights: FA sharpened by the shift computed from the T1w, MD as predicted
    t1w = str(tmp_path / "bids" / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    img = nib.load(t1w)
    maps = _tensor_field(img.shape)
    sources = {}
    for key in ("fa", "md", "ad", "rd", "diffusivity", "v1", "colfa", "mask"):
        sources[key] = str(tmp_path / f"{key}.nii.gz")
        nib.save(nib.Nifti1Image(np.asarray(maps[key], np.float32), img.affine), sources[key])
    grid = ConformedGrid(img.shape, img.affine, img.shape, img.affine)
    plain = write_maps(tmp_path / "a", Subject("01"), t1w, sources, weights_dir=str(without), grid=grid)
    sharp = write_maps(tmp_path / "b", Subject("01"), t1w, sources, weights_dir=str(weights), grid=grid)
    load = lambda path: np.asarray(nib.load(path).dataobj)  # noqa: E731
    shift = detail.fa_shift(np.asarray(img.dataobj), img.header.get_zooms()[:3])
    expected = np.clip(load(plain["fa"]) + shift, 0, 1)
    assert np.abs(load(sharp["fa"]) - load(plain["fa"])).max() > 0.01
    assert np.allclose(load(sharp["fa"]), expected, atol=1e-5)
    assert np.allclose(load(sharp["md"]), load(plain["md"]))
    sidecar = json.loads(sharp["fa"].with_name(sharp["fa"].name.replace(".nii.gz", ".json")).read_text())
    assert sidecar["T1wDetailTransfer"]["SigmaMm"] == 4.0
    assert "T1wDetailTransfer" not in json.loads(
        sharp["md"].with_name(sharp["md"].name.replace(".nii.gz", ".json")).read_text()
    )


def test_fit_detail_needs_training_subjects(tmp_path):
    prep = make_prep_dir(tmp_path, ("ras",))
    (tmp_path / "phase1.json").write_text(json.dumps({"recipe": {}}))
    done = run_cli("train", "fit-detail", str(prep), str(tmp_path))
    assert done.returncode != 0 and "no training subjects" in done.stderr


@pytest.mark.parametrize("zooms", [(1.0, 1.0, 1.0), (1.0, 0.5, 0.5)])
def test_fa_shift_costs_the_same_grid_work_at_any_resolution(zooms):
    """The low-pass runs on a ~2 mm grid: a 0.5 mm T1w gives the same shift as its 1 mm version."""
    coarse = np.zeros((40, 40, 40))
    coarse[2:38, 2:38, 2:38] = 100.0
    coarse[2:38, 2:38, 20:38] = 400.0
    factor = (np.array((1.0, 1.0, 1.0)) / np.array(zooms)).astype(int)
    fine = coarse.repeat(factor[0], 0).repeat(factor[1], 1).repeat(factor[2], 2)
    detail = FaDetail(LOOKUP, sigma_mm=4.0, weight=0.5)
    shift = detail.fa_shift(fine, zooms)
    assert shift.shape == fine.shape
    profile = shift[20 * factor[0], 20 * factor[1], :: factor[2]]
    assert np.allclose(profile, detail.fa_shift(coarse, (1, 1, 1))[20, 20], atol=0.02)


def test_methods_text_says_when_fa_was_sharpened(tmp_path):
    from m2m_app.workflows.outputs import detail_desc

    (tmp_path / "phase1.json").write_text(json.dumps({"recipe": {}}))
    assert detail_desc(str(tmp_path)) == ""
    detail = FaDetail(LOOKUP, sigma_mm=6.0, weight=0.5)
    (tmp_path / "phase1.json").write_text(json.dumps({"fa_detail": detail.to_dict()}))
    assert "sigma 6 mm" in detail_desc(str(tmp_path)) and "times 0.5" in detail_desc(str(tmp_path))
