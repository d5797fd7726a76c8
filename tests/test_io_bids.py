"""io/bids: labels, BIDS filter files and the participant/session units of a dataset (pybids)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from conftest import make_bids
from m2m_app.errors import BadDataError, MissingInputError, UsageError
from m2m_app.io import bids as bids_io
from m2m_app.io.naming import Subject


@pytest.fixture
def dataset(tmp_path):
    """sub-01 (two T1w, one DWI), sub-02 with sessions a and b (a T1w each); names only, no image data."""
    return make_bids(
        tmp_path / "bids",
        {
            "sub-01/anat/sub-01_acq-b_T1w.nii.gz": b"",
            "sub-01/anat/sub-01_acq-a_T1w.nii.gz": b"",
            "sub-01/dwi/sub-01_run-2_dwi.nii.gz": b"",
            "sub-01/dwi/sub-01_run-1_dwi.nii.gz": b"",
            "sub-02/ses-a/anat/sub-02_ses-a_T1w.nii": b"",
            "sub-02/ses-b/anat/sub-02_ses-b_T1w.nii": b"",
        },
    )


def test_labels_are_taken_with_or_without_their_prefix():
    assert bids_io.strip_prefix("sub-01", "sub") == "01" and bids_io.strip_prefix("01", "sub") == "01"
    assert bids_io.strip_prefix("ses-a", "ses") == "a" and bids_io.strip_prefix("subject", "sub") == "subject"


def test_filter_files_must_hold_a_json_object(tmp_path):
    assert bids_io.read_filters(None) == {}
    (tmp_path / "ok.json").write_text('{"t1w": {"acquisition": "mprage"}}')
    assert bids_io.read_filters(tmp_path / "ok.json") == {"t1w": {"acquisition": "mprage"}}
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(UsageError, match="must hold a JSON object"):
        bids_io.read_filters(tmp_path / "list.json")
    (tmp_path / "bad.json").write_text("{t1w:")
    with pytest.raises(UsageError, match="unreadable BIDS filter file"):
        bids_io.read_filters(tmp_path / "bad.json")
    with pytest.raises(UsageError, match="unreadable"):
        bids_io.read_filters(tmp_path / "absent.json")


def test_a_folder_without_dataset_description_is_not_a_dataset(tmp_path):
    with pytest.raises(MissingInputError, match="not a BIDS dataset"):
        bids_io.load_layout(tmp_path)


def test_units_follow_the_participant_and_session_labels(dataset):
    layout = bids_io.load_layout(dataset)
    assert bids_io.collect_subjects(layout) == [Subject("01"), Subject("02", "a"), Subject("02", "b")]
    assert bids_io.collect_subjects(layout, ["sub-02"], ["ses-b"]) == [Subject("02", "b")]
    assert bids_io.collect_subjects(layout, ["02", "01"]) == [Subject("02", "a"), Subject("02", "b"), Subject("01")]
    with pytest.raises(MissingInputError, match=r"not found in .*: 03 \(available: 01, 02\)"):
        bids_io.collect_subjects(layout, ["01", "03"])
    with pytest.raises(MissingInputError, match="no participant/session matches"):
        bids_io.collect_subjects(layout, ["01"], ["a"])


def test_several_t1w_give_the_first_sorted_with_a_warning(dataset, caplog):
    layout = bids_io.load_layout(dataset)
    with caplog.at_level(logging.WARNING, logger="m2m_app.io.bids"):
        t1w = bids_io.find_t1w(layout, Subject("01"))
    assert t1w == dataset / "sub-01/anat/sub-01_acq-a_T1w.nii.gz" and "2 T1w images" in caplog.text
    assert bids_io.find_t1w(layout, Subject("01"), {"t1w": {"acquisition": "b"}}).name == "sub-01_acq-b_T1w.nii.gz"
    assert bids_io.find_t1w(layout, Subject("02", "b")) == dataset / "sub-02/ses-b/anat/sub-02_ses-b_T1w.nii"
    assert [p.name for p in bids_io.find_dwi(layout, Subject("01"))] == [
        "sub-01_run-1_dwi.nii.gz",
        "sub-01_run-2_dwi.nii.gz",
    ]
    run_2 = dataset / "sub-01/dwi/sub-01_run-2_dwi.nii.gz"
    assert bids_io.find_dwi(layout, Subject("01"), {"dwi": {"run": 2}}) == [run_2]


@pytest.fixture
def qsiprep(tmp_path):
    """A QSIPrep output (names only): sub-01 from a release before 1.0 (space-T1w DWI, T1w without space),
    sub-02 from 1.x (space-ACPC, a res entity, one anatomical reference for its sessions a and b; session b
    resampled at two resolutions), sub-03 with a T1w but no preprocessed DWI."""
    root = make_bids(
        tmp_path / "qsiprep",
        {
            "sub-01/anat/sub-01_desc-preproc_T1w.nii.gz": b"",
            "sub-01/anat/sub-01_space-MNI152NLin2009cAsym_desc-preproc_T1w.nii.gz": b"",
            "sub-01/dwi/sub-01_space-T1w_desc-preproc_dwi.nii.gz": b"",
            "sub-01/dwi/sub-01_space-T1w_desc-brain_mask.nii.gz": b"",
            "sub-02/anat/sub-02_space-ACPC_desc-preproc_T1w.nii.gz": b"",
            "sub-02/ses-a/dwi/sub-02_ses-a_space-ACPC_res-2mm_desc-preproc_dwi.nii.gz": b"",
            "sub-02/ses-b/dwi/sub-02_ses-b_space-ACPC_res-2mm_desc-preproc_dwi.nii.gz": b"",
            "sub-02/ses-b/dwi/sub-02_ses-b_space-ACPC_res-1p5mm_desc-preproc_dwi.nii.gz": b"",
            "sub-03/anat/sub-03_space-ACPC_desc-preproc_T1w.nii.gz": b"",
        },
    )
    return bids_io.load_layout(root, derivative=True)


def test_qsiprep_outputs_of_both_naming_generations_are_found(qsiprep):
    """The DWI and the T1w in the same space: space-T1w with the T1w without space (before QSIPrep 1.0),
    space-ACPC for both (1.x, with the participant's T1w for every session); a filter picks a resolution."""
    root = Path(qsiprep.root)
    t1w, dwi = bids_io.find_preprocessed_dwi(qsiprep, Subject("01"))
    assert t1w.name == "sub-01_desc-preproc_T1w.nii.gz" and [p.name for p in dwi] == [
        "sub-01_space-T1w_desc-preproc_dwi.nii.gz"
    ]
    t1w, dwi = bids_io.find_preprocessed_dwi(qsiprep, Subject("02", "a"))
    assert t1w == root / "sub-02/anat/sub-02_space-ACPC_desc-preproc_T1w.nii.gz"
    assert dwi == [root / "sub-02/ses-a/dwi/sub-02_ses-a_space-ACPC_res-2mm_desc-preproc_dwi.nii.gz"]
    _, dwi = bids_io.find_preprocessed_dwi(qsiprep, Subject("02", "b"), {"dwi": {"res": "1p5mm"}})
    assert [p.name for p in dwi] == ["sub-02_ses-b_space-ACPC_res-1p5mm_desc-preproc_dwi.nii.gz"]


@pytest.mark.parametrize(
    "subject, error, words",
    [
        (Subject("04"), MissingInputError, r"sub-04: not in the DWI derivatives .*participants there: 01, 02, 03"),
        (Subject("03"), MissingInputError, r"sub-03: no preprocessed DWI .*found 1 anat file"),
        (Subject("02", "b"), BadDataError, r"2 spaces or resolutions \(space-ACPC_res-1p5mm, space-ACPC_res-2mm\)"),
    ],
)
def test_a_unit_that_qsiprep_did_not_give_fails_with_its_own_message(qsiprep, subject, error, words):
    with pytest.raises(error, match=words):
        bids_io.find_preprocessed_dwi(qsiprep, subject)


def test_derivatives_without_dataset_description_are_refused(tmp_path):
    with pytest.raises(MissingInputError, match="not a BIDS-Derivatives dataset"):
        bids_io.load_layout(tmp_path, derivative=True)
