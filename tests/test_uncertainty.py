"""Per-voxel uncertainty from the passes' disagreement, its derivatives and its calibration (synthetic, tiny)."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from conftest import TINY, make_prep_dir
from m2m_app.data.weights import uncertainty_scales
from m2m_app.inference.predict import predict_phase1, predict_phase2, spread_maps
from m2m_app.io.derivatives import QC_WM_FA, subject_qc, write_maps
from m2m_app.io.naming import Subject, sidecar_path
from m2m_app.maths import grid as conform
from m2m_app.maths.tensor import scalar_maps
from m2m_app.models.phases import PHASE1, PHASE2, axis_dispersion_deg, spread_sd
from m2m_app.training import calibration

#: The synthetic T1w: 3 mm voxels, a head sphere with one bright cube (the region the passes disagree in).
SHAPE, ZOOM = (40, 40, 40), 3.0
CUBE = (slice(24, 32),) * 3
STICK, OTHER = (1.7, 0.3, 0.3), (0.3, 1.0, 0.3)  # eigenvalues (×1e-3 mm²/s) along x, y, z


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _head_with_cube() -> nib.Nifti1Image:
    affine = np.diag([ZOOM] * 3 + [1.0])
    affine[:3, 3] = -ZOOM * (np.array(SHAPE) - 1) / 2
    ijk = np.stack(np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij"), -1)
    head = (((ijk - (np.array(SHAPE) - 1) / 2) * ZOOM) ** 2).sum(-1) < 55.0**2
    data = np.where(head, 400.0, 0.0)
    data[CUBE] = 1000.0
    return nib.Nifti1Image(data.astype(np.float32), affine)


def _regions() -> tuple[np.ndarray, np.ndarray]:
    """The cube's interior and the head farther than 12 mm from it, on the T1w grid."""
    cube = np.zeros(SHAPE, bool)
    cube[CUBE] = True
    head = np.asarray(_head_with_cube().dataobj) > 0
    far = head & (ndimage.distance_transform_edt(~cube, sampling=ZOOM) > 12.0)
    return ndimage.binary_erosion(cube, iterations=2), far


class SagittalDisagrees(torch.nn.Module):
    """Predicts ``agree`` everywhere, except on sagittal slices (in-plane size Y × Z of the model
    grid) where the centre input channel exceeds 0.5: there it predicts ``disagree``."""

    def __init__(self, centre: int, agree: list[float], disagree: list[float]):
        super().__init__()
        self.centre, self.agree, self.disagree = centre, torch.tensor(agree), torch.tensor(disagree)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.agree.view(1, -1, 1, 1).expand(x.shape[0], -1, *x.shape[-2:]).clone()
        if x.shape[-2:] == conform.MODEL_SHAPE[1:]:
            region = (x[:, self.centre : self.centre + 1] > 0.5).float()
            out = out * (1 - region) + self.disagree.view(1, -1, 1, 1) * region
        return out


def _log_stick(evals: tuple[float, float, float]) -> list[float]:
    return [float(np.log(evals[0])), 0.0, 0.0, float(np.log(evals[1])), 0.0, float(np.log(evals[2]))]


def test_spread_measures_of_known_passes():
    np.testing.assert_allclose(spread_sd(np.array([[0.2], [0.4]])), [0.1])
    x, y = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    assert axis_dispersion_deg(np.stack([x, -x]), x) == pytest.approx(0.0, abs=1e-6)  # sign-free
    assert axis_dispersion_deg(np.stack([x, y]), x) == pytest.approx(np.sqrt(0.5) * 90.0)
    tilted = np.array([np.cos(np.radians(30)), np.sin(np.radians(30)), 0.0])
    assert axis_dispersion_deg(np.stack([tilted, tilted]), x) == pytest.approx(30.0)


@pytest.mark.slow
def test_phase1_uncertainty_is_high_where_the_views_disagree():
    """The sagittal passes (2 of 6) predict another tensor inside the bright cube: there the FA SD
    and the V1 dispersion take the values of that disagreement; elsewhere they are zero."""
    img = _head_with_cube()
    model = SagittalDisagrees(PHASE1.context, _log_stick(STICK) + [10.0], _log_stick(OTHER) + [10.0])
    out = predict_phase1(img, np.asarray(img.dataobj), model=model, device="cpu", uncertainty=True)
    assert out["fa_sd"].shape == out["v1_dispersion"].shape == SHAPE
    inside, far = _regions()
    fa_one, fa_other = (float(scalar_maps(np.array([sorted(e, reverse=True)]))["fa"][0]) for e in (STICK, OTHER))
    expected_sd = abs(fa_one - fa_other) * np.sqrt(4 * 2) / 6  # population SD of 4 × one, 2 × other
    np.testing.assert_allclose(out["fa_sd"][inside], expected_sd, rtol=1e-3)
    np.testing.assert_allclose(out["v1_dispersion"][inside], np.sqrt(2 / 6) * 90.0, rtol=1e-3)
    assert out["fa_sd"][far].max() < 1e-4 and out["v1_dispersion"][far].max() < 0.5


@pytest.mark.slow
def test_phase2_uncertainty_is_high_where_the_views_disagree():
    img = _head_with_cube()
    _, grid = conform.conform_t1w(img, np.asarray(img.dataobj))
    head = np.asarray(img.dataobj) > 0
    fa = np.where(head, 0.1, 0.0).astype(np.float32)
    fa[CUBE] = 0.8
    model = SagittalDisagrees(PHASE2.context, [np.log1p(1.0), 0.0, 0.0, 0.0], [np.log1p(3.0), 0.0, 0.0, 0.0])
    out = predict_phase2(
        fa,
        np.full(SHAPE, 8e-4, np.float32),
        np.zeros(SHAPE + (3,), np.float32),
        grid,
        mask=head,
        model=model,
        device="cpu",
        uncertainty=True,
    )
    inside, far = _regions()
    np.testing.assert_allclose(out["tdi_sd"][inside], np.std([1.0] * 4 + [3.0] * 2), rtol=1e-3)
    assert out["tdi_sd"][far].max() < 1e-5 and not out["tdi_sd"][~head].any()


def test_calibration_scales_multiply_their_own_map_only():
    views = list(np.random.default_rng(1).normal(size=(6, 7, 4, 5, 6)).astype(np.float32))
    fused = PHASE1.fuse(views)
    mask = np.zeros((4, 5, 6), bool)
    mask[1:3, 1:4, 1:5] = True
    raw = spread_maps(views, fused, PHASE1, mask)
    scaled = spread_maps(views, fused, PHASE1, mask, {"fa_sd": 2.0})
    assert raw["fa_sd"][mask].min() > 0 and not raw["fa_sd"][~mask].any()
    np.testing.assert_allclose(scaled["fa_sd"], 2.0 * raw["fa_sd"], rtol=1e-6)
    np.testing.assert_array_equal(scaled["v1_dispersion"], raw["v1_dispersion"])
    # a scaled V1 dispersion is an expected sign-free angle error: capped at 90 degrees
    wide = spread_maps(views, fused, PHASE1, mask, {"v1_dispersion": 10.0})["v1_dispersion"]
    assert raw["v1_dispersion"][mask].max() > 9.0 and wide.max() == pytest.approx(90.0)
    np.testing.assert_allclose(wide, np.minimum(10.0 * raw["v1_dispersion"], 90.0), rtol=1e-6)


def test_calibration_measures_on_known_errors():
    """Errors drawn as N(0, (2u)²): uncertainty and error rank together, the reliability table rises,
    the raw ±1 coverage is low, and the fitted scale 2 brings it to 68 % and ±2 to 95 %."""
    rng = np.random.default_rng(0)
    uncertainty = rng.uniform(0.01, 0.1, 200_000)
    error = rng.standard_normal(uncertainty.size) * 2.0 * uncertainty
    assert calibration.spearman(uncertainty, np.abs(error)) > 0.3
    assert calibration.spearman(uncertainty, rng.permutation(np.abs(error))) == pytest.approx(0.0, abs=0.01)
    # errors drawn from the uncertainty itself reach its ideal Spearman; a constant SD ranks nothing
    assert calibration.spearman(uncertainty, np.abs(error)) == pytest.approx(
        calibration.ideal_spearman(uncertainty), abs=0.01
    )
    assert np.isnan(calibration.ideal_spearman(np.full(1000, 0.05)))
    table = calibration.reliability_table(uncertainty, np.abs(error))
    assert [row["bin"] for row in table] == list(range(1, 11)) and sum(r["n_voxels"] for r in table) == error.size
    assert np.all(np.diff([row["error_mean"] for row in table]) > 0)
    assert calibration.coverage(error, uncertainty, 1.0) == pytest.approx(0.383, abs=0.01)
    scale = calibration.fit_scale(np.abs(error), uncertainty)
    assert scale == pytest.approx(2.0, rel=0.02)
    assert calibration.coverage(error, scale * uncertainty, 1.0) == pytest.approx(
        calibration.ONE_SD_COVERAGE, abs=0.005
    )
    assert calibration.coverage(error, scale * uncertainty, 2.0) == pytest.approx(0.954, abs=0.01)
    assert calibration.pooled_scale([1.0, float("nan"), 3.0, 2.5]) == 2.5 and calibration.pooled_scale([]) == 1.0


def test_uncertainty_maps_are_written_with_sidecars_and_reach_the_qc_row(tmp_path):
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    mask = np.zeros((8, 8, 8), np.uint8)
    mask[2:6, 2:6, 2:6] = 1
    fa = np.where(mask, 0.1, 0.0)
    fa[2:6, 2:6, 2:4] = 0.5  # white matter by the app's definition (FA > QC_WM_FA)
    fa_sd = np.where(fa > QC_WM_FA, 0.04, 0.2) * mask
    sources = {}
    for key, volume in {"mask": mask, "fa": fa, "md": fa * 1e-3, "fa_sd": fa_sd, "v1_dispersion": fa_sd * 100}.items():
        sources[key] = str(tmp_path / f"{key}.nii.gz")
        nib.save(nib.Nifti1Image(volume.astype(np.float32), affine), sources[key])
    t1w = tmp_path / "bids" / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    t1w.parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(mask.astype(np.float32), affine), t1w)
    grid = conform.ConformedGrid(shape=mask.shape, affine=affine, source_shape=mask.shape, source_affine=affine)
    written = write_maps(tmp_path / "out", Subject("01"), str(t1w), sources, weights_dir=None, grid=grid)
    assert written["fa_sd"].name == "sub-01_space-T1w_model-tensor_param-fa_desc-sd_dwimap.nii.gz"
    assert written["v1_dispersion"].name == "sub-01_space-T1w_model-tensor_param-v1_desc-dispersion_dwimap.nii.gz"
    sidecar = json.loads(sidecar_path(written["v1_dispersion"]).read_text())
    assert sidecar["Units"] == "deg" and "predicted" in sidecar["Description"]
    assert sidecar["UncertaintyScale"] == uncertainty_scales("phase1").get("v1_dispersion", 1.0)
    assert "UncertaintyScaleSource" in sidecar
    qc = subject_qc(Subject("01"), written, {})
    assert qc["median_fa_sd_wm"] == pytest.approx(0.04)


@pytest.mark.slow
def test_calibrate_command_on_a_tiny_model(tmp_path):
    """``m2m-train calibrate`` on a tiny translator: summary and reliability tables; with another
    fold's table the pooled scale is applied, stored with the weights and used at inference."""
    from click.testing import CliRunner

    from m2m_app.cli.train import cli
    from m2m_app.training.loop import train_phase

    prep, models = make_prep_dir(tmp_path), tmp_path / "model"
    train_phase(
        "phase1",
        prep,
        models,
        epochs=1,
        batch_size=16,
        device="cpu",
        seed=3,
        lr=1e-3,
        disc_base=4,
        subjects=["01"],
        **TINY,
    )
    first = tmp_path / "fold.tsv"
    result = CliRunner().invoke(
        cli, ["calibrate", str(prep), str(models), "--test-subject", "sub-02", "--device", "cpu", "--out", str(first)]
    )
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(first.open(), delimiter="\t"))
    assert [row["map"] for row in rows] == ["fa_sd", "v1_dispersion"]
    assert all(float(row["scale_applied"]) == 1.0 and float(row["scale_fit"]) > 0 for row in rows)
    assert all(0.0 <= float(row["coverage_1sd"]) <= float(row["coverage_2sd"]) <= 1.0 for row in rows)
    reliability = list(csv.DictReader((tmp_path / "fold_reliability.tsv").open(), delimiter="\t"))
    assert {row["map"] for row in reliability} == {"fa_sd", "v1_dispersion"} and len(reliability) == 20
    assert sum(int(r["n_voxels"]) for r in reliability if r["map"] == "fa_sd") == int(rows[0]["n_voxels"])

    result = CliRunner().invoke(
        cli, ["calibrate", str(prep), str(models), "--test-subject", "sub-01", "--device", "cpu", "--store-scale"]
    )
    assert result.exit_code != 0 and "scale_from" in str(result.output) + str(result.exception)
    result = CliRunner().invoke(
        cli,
        [
            "calibrate",
            str(prep),
            str(models),
            "--test-subject",
            "sub-01",
            "--device",
            "cpu",
            "--scale-from",
            str(first),
            "--store-scale",
        ],
    )
    assert result.exit_code == 0, result.output
    stored = json.loads((models / "phase1.json").read_text())["uncertainty_scale"]
    assert stored == pytest.approx({row["map"]: float(row["scale_fit"]) for row in rows}, rel=1e-3)
    assert uncertainty_scales("phase1", models) == stored

    # weights trained on everyone have no held-out subject: the pooled scale is only stored
    result = CliRunner().invoke(cli, ["calibrate", str(prep), str(models)])
    assert result.exit_code != 0 and "--test-subject" in result.output
    (models / "phase1.json").write_text(
        json.dumps({**json.loads((models / "phase1.json").read_text()), "uncertainty_scale": {}})
    )
    result = CliRunner().invoke(cli, ["calibrate", str(prep), str(models), "--scale-from", str(first), "--store-scale"])
    assert result.exit_code == 0, result.output
    assert uncertainty_scales("phase1", models) == stored
