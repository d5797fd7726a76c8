"""Where the output, prep and work folders may lie: outside the dataset, or below its
``derivatives/`` folder (the BIDS layout, ``BIDS_DIR/derivatives/m2m``), never elsewhere inside
it; and the dataset's inputs are the same whatever ``derivatives/`` holds."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import make_bids
from m2m_app.cli.run import participant_main, run_config
from m2m_app.cli.train import cli as train_cli
from m2m_app.io import bids as bids_io


def _nifti(path, value=None):
    data = np.random.default_rng(0).uniform(1, 100, (12, 12, 12)) if value is None else np.full((12, 12, 12), value)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4)), path)
    return path


def _dataset(root):
    """sub-01: an all-zero T1w (the app stops on it with 65, once past the folder checks) and a 3D
    DWI (prepare stops on it with 65)."""
    src = root.parent / "src"
    return make_bids(
        root,
        {
            "sub-01/anat/sub-01_T1w.nii.gz": _nifti(src / "zero.nii.gz", 0.0),
            "sub-01/dwi/sub-01_dwi.nii.gz": _nifti(src / "dwi.nii.gz"),
            "sub-01/dwi/sub-01_dwi.bval": b"0 1000\n",
            "sub-01/dwi/sub-01_dwi.bvec": b"0 1\n0 0\n0 0\n",
        },
    )


def _app(*args):
    return CliRunner().invoke(participant_main, [str(a) for a in args])


@pytest.mark.parametrize(
    "output, accepted",
    [
        ("derivatives/m2m", True),
        ("derivatives/pipelines/m2m-v1", True),  # any depth below derivatives/
        ("../out", True),
        (".", False),  # the dataset itself
        ("derivatives", False),  # derivatives/ itself would receive sub-* folders
        ("sub-01/m2m", False),
        ("code/m2m", False),
    ],
)
def test_output_folder_layouts(tmp_path, output, accepted):
    bids = _dataset(tmp_path / "study")
    result = _app(bids, bids / output, "participant", "--skip-bids-validation")
    if accepted:  # past the folder checks: stopped by the all-zero T1w
        assert result.exit_code == 65 and "all zeros" in result.output, result.output
        return
    assert result.exit_code == 64, result.output
    assert "must not be the input dataset or inside it" in result.output
    assert f"use {bids.resolve() / 'derivatives' / 'm2m'} (the BIDS layout)" in result.output
    assert not (bids / output / "dataset_description.json").exists() or output == "."


def test_a_link_to_the_dataset_is_the_dataset(tmp_path):
    bids = _dataset(tmp_path / "study")
    (tmp_path / "link").symlink_to(bids)
    assert _app(tmp_path / "link", bids / "derivatives/m2m", "participant", "--skip-bids-validation").exit_code == 65
    assert _app(bids, tmp_path / "link", "participant", "--skip-bids-validation").exit_code == 64
    assert _app(bids, tmp_path / "link" / "derivatives", "group").exit_code == 64


def test_default_work_folder_stays_outside_the_dataset(tmp_path):
    bids = _dataset(tmp_path / "study")
    config = run_config(bids, bids / "derivatives" / "m2m", None, 1, None, None)
    assert config.work_dir == tmp_path / "m2m_work" / "study"
    assert run_config(bids, tmp_path / "out", None, 1, None, None).work_dir == tmp_path / "m2m_work"
    assert _app(bids, bids / "derivatives/m2m", "participant", "--skip-bids-validation").exit_code == 65
    assert (tmp_path / "m2m_work" / "study").is_dir()
    assert not [p for p in bids.rglob("*") if "work" in p.name]
    result = _app(bids, bids / "derivatives/m2m", "participant", "-w", bids / "derivatives/work")
    assert result.exit_code == 64 and "the work folder" in result.output and "outside it" in result.output


def test_group_level_takes_the_same_layouts(tmp_path):
    bids = _dataset(tmp_path / "study")
    result = _app(bids, bids, "group")
    assert result.exit_code == 64 and "derivatives/m2m (the BIDS layout)" in result.output
    (bids / "derivatives/m2m").mkdir(parents=True)
    result = _app(bids, bids / "derivatives/m2m", "group")  # accepted, but nothing to gather yet
    assert result.exit_code == 66 and "run the participant level first" in result.output


def test_prepare_takes_a_prep_folder_below_derivatives(tmp_path):
    bids = _dataset(tmp_path / "study")
    runner = CliRunner()
    result = runner.invoke(train_cli, ["prepare", str(bids), str(bids / "sub-01" / "prep")])
    assert result.exit_code == 64 and "derivatives/m2m-prep (the BIDS layout)" in result.output
    result = runner.invoke(
        train_cli, ["prepare", str(bids), str(bids / "derivatives/m2m-prep"), "--participant-label", "01"]
    )
    assert result.exit_code == 65 and "all zeros" in result.output, result.output  # past the checks
    assert (tmp_path / "m2m_work" / "study").is_dir() and not (bids / "derivatives/m2m-prep/.m2m_work").exists()
    result = runner.invoke(train_cli, ["prepare", str(bids), str(tmp_path / "prep"), "-w", str(bids / "derivatives/w")])
    assert result.exit_code == 64 and "the work folder" in result.output


def _inputs(bids):
    layout = bids_io.load_layout(bids, validate=True)
    units = bids_io.collect_subjects(layout)
    return units, [bids_io.find_t1w(layout, unit) for unit in units], sorted(layout.get(return_type="file"))


def test_inputs_are_the_same_whatever_derivatives_holds(tmp_path):
    """Derivatives named like raw data (m2m's own, another pipeline's, a stray subject) are never inputs."""
    bids = _dataset(tmp_path / "study")
    before = _inputs(bids)
    for rel in (
        "derivatives/m2m/sub-01/anat/sub-01_space-T1w_desc-brain_mask.nii.gz",
        "derivatives/m2m/sub-01/anat/sub-01_T1w.nii.gz",
        "derivatives/m2m/sub-09/anat/sub-09_T1w.nii.gz",
        "derivatives/fmriprep/sub-01/anat/sub-01_desc-preproc_T1w.nii.gz",
        "derivatives/sub-08/anat/sub-08_T1w.nii.gz",
    ):
        _nifti(bids / rel)
    (bids / "derivatives/m2m/dataset_description.json").write_text('{"Name": "m2m", "DatasetType": "derivative"}')
    after = _inputs(bids)
    assert after == before
    assert [unit.label for unit in after[0]] == ["sub-01"]
    assert not [f for f in after[2] if "/derivatives/" in f]
