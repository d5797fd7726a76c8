"""Finding the inputs of a BIDS dataset whatever the folders above it are called (pybids parses
absolute paths), and the error that names what was found for a participant without a T1w."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import make_bids
from m2m_app.cli.run import participant_main
from m2m_app.cli.train import cli as train_cli
from m2m_app.errors import MissingInputError
from m2m_app.io import bids as bids_io
from m2m_app.io.naming import Subject, bids_uri

#: Folder names above the dataset that pybids 0.22 reads as the datatype, subject or session
#: of every file: each BIDS datatype, and entity-like names.
ANCESTORS = (
    "anat",
    "dwi",
    "func",
    "fmap",
    "perf",
    "meg",
    "eeg",
    "ieeg",
    "beh",
    "pet",
    "micr",
    "nirs",
    "motion",
    "sub-pilot",
    "ses-2019",
    "acq-old",
)


def _nifti(path, shape, value=None):
    data = np.random.default_rng(0).uniform(1, 100, size=shape) if value is None else np.full(shape, value)
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4)), path)
    return path


def _dataset(root, t1w_value=None):
    """sub-01: T1w + DWI (3D, so that m2m-train rejects it only after finding it); sub-02 ses-a: a BOLD run."""
    src = root.parent / "src"
    src.mkdir(parents=True, exist_ok=True)
    t1w = _nifti(src / "t1w.nii.gz", (20, 20, 20), t1w_value)
    dwi = _nifti(src / "dwi.nii.gz", (20, 20, 20))
    return make_bids(
        root,
        {
            "sub-01/anat/sub-01_acq-mprage_T1w.nii.gz": t1w,
            "sub-01/dwi/sub-01_dwi.nii.gz": dwi,
            "sub-01/dwi/sub-01_dwi.bval": b"0 1000\n",
            "sub-01/dwi/sub-01_dwi.bvec": b"0 1\n0 0\n0 0\n",
            "sub-02/ses-a/func/sub-02_ses-a_task-rest_bold.nii.gz": dwi,
        },
    )


@pytest.mark.parametrize("ancestor", ANCESTORS)
def test_inputs_are_found_under_any_ancestor_folder(tmp_path, ancestor):
    bids = _dataset(tmp_path / ancestor / "study" / "bids")
    layout = bids_io.load_layout(bids)
    units = bids_io.collect_subjects(layout)
    assert units == [Subject("01"), Subject("02", "a")]
    t1w = bids_io.find_t1w(layout, Subject("01"), {"t1w": {"acquisition": "mprage"}})
    assert t1w == bids / "sub-01/anat/sub-01_acq-mprage_T1w.nii.gz"
    assert bids_io.find_dwi(layout, Subject("01")) == [bids / "sub-01/dwi/sub-01_dwi.nii.gz"]
    with pytest.raises(MissingInputError, match="found 1 func file, no T1w"):
        bids_io.find_t1w(layout, Subject("02", "a"))


@pytest.mark.parametrize("ancestor", ANCESTORS)
def test_both_commands_find_the_inputs_under_any_ancestor_folder(tmp_path, ancestor):
    """m2m and m2m-train prepare get past the search and fail on the data itself (65), not on a missing
    input (66): an all-zero T1w for the app, a 3D DWI for prepare."""
    runner = CliRunner()
    bids = _dataset(tmp_path / ancestor / "bids", t1w_value=0.0)
    result = runner.invoke(
        participant_main,
        [str(bids), str(tmp_path / "out"), "participant", "--participant-label", "01", "--skip-bids-validation"],
    )
    assert result.exit_code == 65, result.output
    assert "all zeros" in result.output and "sub-01_acq-mprage_T1w.nii.gz" in result.output
    bids = _dataset(tmp_path / ancestor / "bids2")
    result = runner.invoke(train_cli, ["prepare", str(bids), str(tmp_path / "prep"), "--participant-label", "01"])
    assert result.exit_code == 65, result.output
    assert "must be 4D" in result.output and "sub-01_dwi.nii.gz" in result.output


def test_missing_t1w_names_what_was_found(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    image = _nifti(src / "x.nii.gz", (20, 20, 20))
    bids = make_bids(
        tmp_path / "bids",
        {
            "sub-01/anat/sub-01_T1W.nii.gz": image,  # wrong case: not a T1w
            "sub-01/func/sub-01_task-a_bold.nii.gz": image,
            "sub-01/func/sub-01_task-b_bold.nii.gz": image,
            "sub-01/sub-01_T1w.nii.gz": image,  # outside anat/
            "sub-02/anat/sub-02_acq-fast_T1w.nii.gz": image,
            "sub-03/anat/sub-03_T1w.json": b"{}",
        },
    )
    layout = bids_io.load_layout(bids)
    with pytest.raises(MissingInputError) as err:
        bids_io.find_t1w(layout, Subject("01"))
    message = str(err.value)
    assert "1 anat file (sub-01_T1W.nii.gz)" in message and "2 func files" in message
    assert "1 outside-a-datatype-folder file (sub-01_T1w.nii.gz)" in message
    assert "expected sub-01/anat/sub-01[_<entities>]_T1w.nii[.gz]" in message
    with pytest.raises(MissingInputError, match="the BIDS filter file excludes 1 T1w"):
        bids_io.find_t1w(layout, Subject("02"), {"t1w": {"acquisition": "mprage"}})
    with pytest.raises(MissingInputError, match="found no NIfTI image, no T1w"):
        bids_io.find_t1w(layout, Subject("03"))
    with pytest.raises(MissingInputError, match=r"found 1 anat file, no DWI \(expected sub-02/dwi/"):
        bids_io.find_dwi(layout, Subject("02"))


def test_app_summary_names_what_was_found(tmp_path):
    """The end-of-run line of a participant without a T1w says what the participant has."""
    bids = _dataset(tmp_path / "func" / "bids")
    result = CliRunner().invoke(
        participant_main,
        [str(bids), str(tmp_path / "out"), "participant", "--participant-label", "02", "--skip-bids-validation"],
    )
    assert result.exit_code == 66, result.output
    assert "sub-02_ses-a FAILED: sub-02_ses-a: no T1w image found: found 1 func file, no T1w" in result.output


@pytest.mark.parametrize(
    "path, uri",
    [
        (
            "/data/sub-pilot/bids/sub-01/ses-a/anat/sub-01_ses-a_T1w.nii.gz",
            "bids:raw:sub-01/ses-a/anat/sub-01_ses-a_T1w.nii.gz",
        ),
        ("/data/sub-01/bids/sub-01/dwi/sub-01_dwi.nii.gz", "bids:raw:sub-01/dwi/sub-01_dwi.nii.gz"),
        ("/data/anat/ses-x/bids/sub-02/anat/sub-02_T1w.nii.gz", "bids:raw:sub-02/anat/sub-02_T1w.nii.gz"),
        ("bids/sub-01/sub-01_sessions.tsv", "bids:raw:sub-01/sub-01_sessions.tsv"),
        ("/data/sub-01/template.nii.gz", "bids:raw:template.nii.gz"),
    ],
)
def test_bids_uri_is_relative_to_the_dataset_root(path, uri):
    assert bids_uri(path) == uri
