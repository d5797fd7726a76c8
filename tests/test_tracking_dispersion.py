"""Stopping streamlines where the predicted V1 dispersion is high (``--stop-dispersion``), and
``m2m-train evaluate-tractogram``, which scores the app's tractogram against the teacher's.

The synthetic field is a straight bundle along world +x (Gaussian cross-section) on a 1 mm grid
whose voxels from i = 25 on have a V1 dispersion of 60 degrees, 5 degrees elsewhere.
"""

from __future__ import annotations

import shutil

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_prep_dir

from m2m_app.maths.grid import model_grid

from m2m_app.tractography.streamlines import TrackingSettings, bep046_sidecar, track_field, tracking_mask

SHAPE, HIGH_FROM = (40, 9, 9), 25  # grid, first voxel index along i of the high-dispersion region
AFFINE = np.array([[1.0, 0, 0, -5.0], [0, 1.0, 0, -4.0], [0, 0, 1.0, -4.0], [0, 0, 0, 1]])
BOUNDARY_X = AFFINE[0, 3] + HIGH_FROM - 0.5  # world x (mm) where the nearest voxel turns high
SETTINGS = TrackingSettings(seed_density_threshold=0.9, density_threshold=0.3, min_length_mm=5.0)


def bundle(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Density (1 on the world x axis, sigma 1.5 mm) and the orientation +x at world points ``(N, 3)``."""
    density = np.exp(-(points[:, 1] ** 2 + points[:, 2] ** 2) / (2 * 1.5**2))
    return density, np.broadcast_to([1.0, 0.0, 0.0], points.shape)


def dispersion_map() -> np.ndarray:
    dispersion = np.full(SHAPE, 5.0)
    dispersion[HIGH_FROM:] = 60.0
    return dispersion


def test_streamlines_do_not_enter_high_dispersion_voxels_when_the_rule_is_on():
    mask, dispersion = np.ones(SHAPE, bool), dispersion_map()
    off = track_field(bundle, mask, AFFINE, SETTINGS, dispersion=dispersion, seed=0)
    on = track_field(
        bundle, mask, AFFINE, TrackingSettings(**{**vars(SETTINGS), "max_dispersion_deg": 30.0}), dispersion=dispersion
    )
    assert off and on
    reach_off, reach_on = (max(float(line[:, 0].max()) for line in lines) for lines in (off, on))
    assert reach_off > BOUNDARY_X + 10, f"without the rule the streamlines stop at x = {reach_off:.1f} mm"
    assert BOUNDARY_X - 1 < reach_on < BOUNDARY_X, f"with the rule they reach x = {reach_on:.1f} mm"
    assert len(on) < len(off)  # no seeds in the high-dispersion voxels either
    # a threshold above every voxel's dispersion changes nothing
    same = TrackingSettings(**{**vars(SETTINGS), "max_dispersion_deg": 75.0})
    assert all(
        np.array_equal(a, b) for a, b in zip(off, track_field(bundle, mask, AFFINE, same, dispersion=dispersion))
    )


def test_the_sidecar_says_which_rule_was_used():
    off, on = bep046_sidecar(SETTINGS), bep046_sidecar(TrackingSettings(max_dispersion_deg=30.0))
    assert off["UncertaintyUse"].startswith("none: ") and "dispersion >" not in off["Description"]
    assert on["UncertaintyUse"].startswith("stopping: ") and "V1 dispersion" in on["UncertaintyUse"]
    assert "exceeds 30.0 degrees" in on["UncertaintyUse"] and "V1 dispersion > 30.0 degrees" in on["Description"]
    json.dumps(on)


def test_tracking_mask_needs_a_dispersion_map_on_the_mask_grid():
    mask = np.ones(SHAPE, bool)
    assert tracking_mask(mask).sum() == mask.sum()  # off: the dispersion map is not read
    assert tracking_mask(mask, dispersion_map(), 30.0)[:HIGH_FROM].all()
    assert not tracking_mask(mask, dispersion_map(), 30.0)[HIGH_FROM:].any()
    with pytest.raises(ValueError, match="no V1 dispersion map"):
        tracking_mask(mask, None, 30.0)
    with pytest.raises(ValueError, match="not on the mask's grid"):
        tracking_mask(mask, dispersion_map()[1:], 30.0)


def test_track_field_interface_passes_the_threshold_and_the_map(tmp_path, monkeypatch):
    """TrackField (the workflow's node) reads the dispersion map only with a threshold and reports it."""
    from m2m_app.interfaces.nerf import TrackField
    from m2m_app.models import nerf

    # the analytic bundle stands in for the fitted field (track_field takes either)
    monkeypatch.setattr(nerf.FittedField, "load", staticmethod(lambda path: bundle))
    paths = {}
    for name, data in (("mask", np.ones(SHAPE, np.uint8)), ("dispersion", dispersion_map())):
        paths[name] = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(data.astype(np.float32), AFFINE), paths[name])
    (tmp_path / "field.safetensors").touch()
    grid = model_grid(SHAPE, AFFINE, np.zeros(3)).to_dict()  # the "T1w" is the mask's grid
    common = {"field": str(tmp_path / "field.safetensors"), "mask": str(paths["mask"]), "grid": grid}
    reach = {}
    for threshold in (None, 30.0):
        run_dir = tmp_path / str(threshold)
        run_dir.mkdir()
        monkeypatch.chdir(run_dir)
        node = TrackField(**common, v1_dispersion=str(paths["dispersion"]), tractogram_format="tck")
        if threshold is not None:
            node.inputs.max_dispersion_deg = threshold
        outputs = node.run().outputs
        lines = list(nib.streamlines.load(outputs.tractogram).streamlines)
        reach[threshold] = max(float(line[:, 0].max()) for line in lines)
        use = outputs.sidecar["UncertaintyUse"]
        assert use.startswith("none: ") if threshold is None else "exceeds 30.0 degrees" in use
    assert reach[None] > BOUNDARY_X + 10 and reach[30.0] < BOUNDARY_X
    with pytest.raises(ValueError, match="v1_dispersion"):  # a threshold without the map is refused
        TrackField(**common, max_dispersion_deg=30.0).run()


@pytest.mark.parametrize("resolution", [None, 2.0])
def test_tractogram_reference_is_the_grid_of_the_written_maps(tmp_path, monkeypatch, resolution):
    """Under ``--output-resolution`` the .trk header describes the output grid, so that the maps
    written beside it are accepted by dipy as its reference; by default the T1w's own grid."""
    from dipy.io.streamline import load_tractogram

    from m2m_app.interfaces.nerf import TrackField
    from m2m_app.models import nerf

    monkeypatch.setattr(nerf.FittedField, "load", staticmethod(lambda path: bundle))
    monkeypatch.chdir(tmp_path)
    nib.save(nib.Nifti1Image(np.ones(SHAPE, np.float32), AFFINE), "mask.nii.gz")
    (tmp_path / "field.safetensors").touch()
    grid = model_grid(SHAPE, AFFINE, np.zeros(3))
    node = TrackField(
        field="field.safetensors",
        mask="mask.nii.gz",
        grid=grid.to_dict(),
        output_resolution=resolution,
        tractogram_format="trk",
    )
    tractogram = node.run().outputs.tractogram
    shape, affine = grid.output_grid(resolution)
    header = nib.streamlines.load(tractogram, lazy_load=True).header
    assert tuple(header["dimensions"]) == shape
    np.testing.assert_allclose(header["voxel_sizes"], nib.affines.voxel_sizes(affine))
    written_map = tmp_path / "fa.nii.gz"  # a map on the output grid, as WriteMaps writes it
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), affine), written_map)
    assert len(load_tractogram(tractogram, str(written_map)).streamlines) > 0  # dipy's header check passes


@pytest.mark.parametrize("threshold", [None, 30.0])
def test_stop_dispersion_option_reaches_the_tracking_node(tmp_path, threshold):
    from m2m_app.cli.run import participant_main, run_config
    from m2m_app.io.naming import Subject
    from m2m_app.workflows.base import init_m2m_wf

    args = [str(tmp_path / "bids"), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "work")]
    params = participant_main.make_context(
        "m2m", args + ([] if threshold is None else ["--stop-dispersion", "30"])
    ).params
    config = run_config(**{k: v for k, v in params.items() if k not in ("analysis_level", "verbose", "quiet")})
    assert config.stop_dispersion_deg == threshold
    t1w = tmp_path / "sub-01_T1w.nii.gz"
    t1w.touch()
    unit = init_m2m_wf({Subject("01"): t1w}, config).get_node("sub_01_wf")
    edges = {
        (u.fullname.split(".", 1)[1], v.fullname.split(".", 1)[1]): set(data["connect"])
        for u, v, data in unit._create_flat_graph().edges(data=True)
    }
    assert ("v1_dispersion", "v1_dispersion") in edges[("phase1_wf.outputnode", "nerf_wf.inputnode")]
    to_track = edges[("nerf_wf.inputnode", "nerf_wf.nerf_track")]
    assert (("v1_dispersion", "v1_dispersion") in to_track) == (threshold is not None)
    track = unit.get_node("nerf_wf.nerf_track").inputs
    assert (track.max_dispersion_deg == threshold) if threshold else not isinstance(track.max_dispersion_deg, float)
    report = unit.get_node("ds_wf.inputnode").inputs.boilerplate
    assert ("exceeded 30 degrees" in report) == (threshold is not None)


def test_stop_dispersion_option_is_an_angle():
    from m2m_app.cli.run import participant_main

    for bad in ("0", "95", "x"):
        result = CliRunner().invoke(participant_main, ["bids", "out", "participant", "--stop-dispersion", bad])
        assert result.exit_code == 2 and "--stop-dispersion" in result.output


def _add_teacher_tractogram(prep, streamlines, reference) -> None:
    """Write the teacher's tractogram of sub-01 and add the ``tractogram`` column to the manifest."""
    from m2m_app.io.tractogram import save_tractogram

    relative = "sub-01/dwi/sub-01_tractogram.tck"
    save_tractogram(streamlines, reference, prep / relative)
    with (prep / "manifest.tsv").open(newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    with (prep / "manifest.tsv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, [*rows[0], "tractogram"], delimiter="\t")
        writer.writeheader()
        writer.writerows({**row, "tractogram": relative} for row in rows)


def test_evaluate_tractogram_command(tmp_path):
    """``m2m-train evaluate-tractogram`` on a synthetic prep dir: the teacher's own streamlines score
    TDI r 1 and Dice 1, and with the teacher's FA the same connectome (edge r 1) and region FA
    (relative difference 0, also by evaluate-regions) on the teacher's parcellation; half of them
    score 1 on nearness one way; without the teacher's parcellation the region scores are n/a; a missing tractogram is a
    clear error."""
    from m2m_app.cli.train import cli
    from m2m_app.io.naming import Subject, derivative_paths
    from m2m_app.io.tractogram import save_tractogram
    from m2m_app.registration.parcellation import write_teacher_regions
    from m2m_app.registration.template_space import transform_paths
    from tests.test_template_space import _write_transform

    prep = make_prep_dir(tmp_path, ("ras",))
    reference = nib.load(tmp_path / "bids" / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    # 16 left-right lines through the synthetic brain (an ellipsoid of radii 30, 40, 30 mm about (3, -5, 10))
    x = np.arange(-20.0, 26.0, 1.0)
    teacher = [
        np.stack([x, np.full_like(x, -5.0 + dy), np.full_like(x, 10.0 + dz)], -1)
        for dy in (-15.0, -5.0, 5.0, 15.0)
        for dz in (-12.0, -4.0, 4.0, 12.0)
    ]
    _add_teacher_tractogram(prep, teacher, reference)
    metrics = {}
    for name, ours in (("none", teacher), ("same", teacher), ("half", teacher[::2])):
        out = tmp_path / name
        paths = derivative_paths(out, Subject("01"), "nerf", "trx")
        save_tractogram(ours, reference, paths["tractogram"])
        shutil.copyfile(prep / "sub-01/dwi/sub-01_fa.nii.gz", paths["fa"])
        result = CliRunner().invoke(cli, ["evaluate-tractogram", str(prep), str(out), "--subject", "sub-01"])
        assert result.exit_code == 0, result.output
        header, row = (line.split("\t") for line in result.output.strip().splitlines() if "\t" in line)
        assert header[0] == "subject" and row[0] == "sub-01"
        metrics[name] = dict(zip(header[1:], (float("nan") if v == "n/a" else float(v) for v in row[1:])))
        if name == "none":  # the teacher's parcellation, through identity transforms (no registration)
            assert (
                np.isnan(metrics[name]["edge_r"])
                and "no teacher" in result.output
                and "run m2m-train prepare" in result.output
            )
            teacher_files = derivative_paths(prep, Subject("01"), "tensordet")  # prepare's names
            for key in ("mask", "fa", "md", "ad", "rd"):
                teacher_files[key].parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(prep / f"sub-01/dwi/sub-01_{key}.nii.gz", teacher_files[key])
            save_tractogram(teacher, reference, teacher_files["tractogram"])
            for path in transform_paths(prep, Subject("01"), "MNI152NLin2009aSym").values():
                _write_transform(path)
            write_teacher_regions(prep, Subject("01"), tmp_path / "bids" / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    same, half = metrics["same"], metrics["half"]
    assert same["edge_r"] == pytest.approx(1.0) and same["region_fa_rel_diff"] == pytest.approx(0.0, abs=1e-6)
    assert same["regions_compared"] >= 5 and half["edge_r"] < 1.0 and same["region_fa_r"] == pytest.approx(1.0)
    result = CliRunner().invoke(cli, ["evaluate-regions", str(prep), str(tmp_path / "same"), "--subject", "sub-01"])
    header, row = (line.split("\t") for line in result.output.strip().splitlines() if "\t" in line)
    regions = dict(zip(header[1:], map(float, row[1:])))
    assert result.exit_code == 0 and regions["region_fa_rel_diff"] == pytest.approx(0.0, abs=1e-6)
    assert regions["regions_compared"] == same["regions_compared"]
    assert same["tdi_r_brain"] == pytest.approx(1.0, abs=1e-3) and same["visited_dice"] == 1.0
    assert same["predicted_near_teacher"] == same["teacher_near_predicted"] == 1.0
    assert same["n_predicted"] == same["n_teacher"] == len(teacher)
    assert half["n_predicted"] == len(teacher) // 2 and half["predicted_near_teacher"] == 1.0
    assert half["visited_dice"] < 1.0 and half["teacher_near_predicted"] < 1.0

    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(cli, ["evaluate-tractogram", str(prep), str(empty), "--subject", "sub-01"])
    assert result.exit_code == 66 and f"sub-01: no m2m tractogram in {empty}" in result.output
