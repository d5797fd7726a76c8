"""io/naming: BIDS-Derivatives names of every file m2m writes, sidecars and BIDS URIs."""

from __future__ import annotations

from pathlib import Path

import pytest

from m2m_app.io.naming import (
    TDI_PARAMS,
    TENSOR_PARAMS,
    UNCERTAINTY_MAPS,
    Subject,
    bids_uri,
    derivative_path,
    derivative_paths,
    sidecar_path,
)


def test_subject_entities_label_and_folder():
    assert Subject("01").entities == {"sub": "01"} and Subject("01").label == "sub-01"
    unit = Subject("01", "a")
    assert unit.entities == {"sub": "01", "ses": "a"} and unit.label == "sub-01_ses-a"
    assert unit.folder(Path("/out"), "dwi") == Path("/out/sub-01/ses-a/dwi")
    assert Subject("01").folder(Path("/out"), "anat") == Path("/out/sub-01/anat")


def test_entities_are_written_in_bids_order_whatever_the_call_order():
    path = derivative_path(
        Path("/out"), Subject("01", "a"), "dwi", "dwimap", param="fa", model="tensor", space="T1w", desc=""
    )  # an empty entity is left out
    assert path == Path("/out/sub-01/ses-a/dwi/sub-01_ses-a_space-T1w_model-tensor_param-fa_dwimap.nii.gz")
    xfm = derivative_path(Path("o"), Subject("02"), "dwi", "xfm", ".txt", mode="image", to="dwi", **{"from": "T1w"})
    assert xfm.name == "sub-02_from-T1w_to-dwi_mode-image_xfm.txt"
    with pytest.raises(ValueError, match="unknown BIDS entities"):
        derivative_path(Path("o"), Subject("02"), "dwi", "dwimap", colour="red")


@pytest.mark.parametrize(
    "name, sidecar",
    [
        ("sub-01_dwimap.nii.gz", "sub-01_dwimap.json"),
        ("sub-01_T1w.nii", "sub-01_T1w.json"),
        ("sub-01_tractogram.trx", "sub-01_tractogram.json"),
        ("sub-01_xfm.txt", "sub-01_xfm.json"),
        ("sub-01_model.safetensors", "sub-01_model.json"),
    ],
)
def test_sidecar_sits_beside_its_file(name, sidecar):
    assert sidecar_path(Path("/d") / name) == Path("/d") / sidecar


def test_derivative_paths_name_every_output_once():
    paths = derivative_paths(Path("/out"), Subject("01", "a"), "nerf", "tck")
    assert set(TENSOR_PARAMS) | set(TDI_PARAMS) | set(UNCERTAINTY_MAPS) | {"mask", "wm", "tractogram", "xfm"} == set(
        paths
    )
    assert len(set(paths.values())) == len(paths)  # no two outputs share a name
    prefix = "sub-01_ses-a_space-T1w"
    assert paths["fa"].name == f"{prefix}_model-tensor_param-fa_dwimap.nii.gz"
    assert paths["tdi"].name == f"{prefix}_tract-wholebrain_param-tdi_dwimap.nii.gz"
    assert paths["fa_sd"].name == f"{prefix}_model-tensor_param-fa_desc-sd_dwimap.nii.gz"
    assert paths["mask"] == Path(f"/out/sub-01/ses-a/anat/{prefix}_desc-brain_mask.nii.gz")
    assert paths["wm"].name == f"{prefix}_label-WM_mask.nii.gz"
    assert paths["tractogram"].name == f"{prefix}_tract-wholebrain_track-nerf_tractogram.tck"
    assert paths["xfm"].name == "sub-01_ses-a_from-T1w_to-dwi_mode-image_xfm.txt"
    assert (
        derivative_paths(Path("/p"), Subject("01"), "tensordet")["tractogram"].name
        == "sub-01_space-T1w_tract-wholebrain_track-tensordet_tractogram.trx"
    )


def test_bids_uri_names_the_dataset():
    assert bids_uri("/data/bids/sub-01/anat/sub-01_T1w.nii.gz", "deriv") == "bids:deriv:sub-01/anat/sub-01_T1w.nii.gz"
    assert bids_uri(Path("/x/sub-01/sub-01_sessions.tsv")) == "bids:raw:sub-01/sub-01_sessions.tsv"
