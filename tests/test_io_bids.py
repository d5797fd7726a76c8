"""io/bids: labels, BIDS filter files and the participant/session units of a dataset (pybids)."""

from __future__ import annotations

import logging

import pytest

from conftest import make_bids
from m2m_app.errors import MissingInputError, UsageError
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
