"""io/derivatives: the dataset description, README, map sidecars and QC row of one unit, on tiny files."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from m2m_app import __version__
from m2m_app.io.derivatives import (
    NOT_BIDS,
    PREDICTED,
    QC_WM_FA,
    dataset_description,
    source_link_name,
    qc_path,
    subject_qc,
    weights_provenance,
    write_maps,
    write_readme,
)
from m2m_app.io.naming import TENSOR_PARAMS, Subject, derivative_paths, sidecar_path
from m2m_app.maths.grid import ConformedGrid

UNIT = Subject("01", "a")


@pytest.fixture
def weights_dir(tmp_path):
    """Phase-1 weights metadata only (no phase 2): SHA-256, training subjects, version, a stored scale."""
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "phase1.json").write_text(
        json.dumps(
            {
                "sha256": "ab" * 32,
                "m2m_version": "9.9.9",
                "recipe": {"subjects": ["sub-07", "sub-08"]},
                "uncertainty_scale": {"fa_sd": 2.5},
            }
        )
    )
    return folder


def test_weights_provenance_reads_each_phase_present(weights_dir, tmp_path):
    assert weights_provenance(str(weights_dir)) == {
        "phase1": {
            "file": "phase1.safetensors",
            "sha256": "ab" * 32,
            "trained_on": ["sub-07", "sub-08"],
            "m2m_version": "9.9.9",
        }
    }
    old = tmp_path / "old"
    old.mkdir()
    (old / "phase2.json").write_text(json.dumps({"sha256": "cd", "version": "0.0.1"}))  # before m2m_version
    assert weights_provenance(str(old))["phase2"]["m2m_version"] == "0.0.1"
    assert weights_provenance(str(old))["phase2"]["trained_on"] is None


def test_dataset_description_credits_m2m_its_weights_and_the_source(tmp_path, weights_dir):
    source = tmp_path / "raw"
    source.mkdir()
    (source / "dataset_description.json").write_text(json.dumps({"Name": "raw", "Authors": ["A. Person"]}))
    (tmp_path / "link").symlink_to(source)
    path = dataset_description(
        tmp_path / "out", tmp_path / "link" / ".." / "link", weights_dir=str(weights_dir), phases=("phase1", "phase2")
    )
    description = json.loads(path.read_text())
    assert description["DatasetType"] == "derivative" and description["Authors"] == ["A. Person"]
    assert description["SourceDatasets"] == [{"URL": source.resolve().as_uri()}]  # symlink and .. resolved
    assert description["DatasetLinks"] == {"raw": source.resolve().as_uri()}
    m2m, weights = description["GeneratedBy"]  # no phase-2 weights: no entry for them
    assert m2m["Name"] == "m2m" and m2m["Version"] == __version__
    assert weights["Version"] == "9.9.9" and "ab" * 32 in weights["Description"]
    assert "sub-07, sub-08" in weights["Description"]
    assert "Authors" not in json.loads(dataset_description(tmp_path / "o2", tmp_path / "none").read_text())


def test_a_prep_dir_filled_from_two_datasets_names_both(tmp_path):
    """Preparing a second dataset into the same folder keeps the first one's source, link and
    authors, links the second under its own key, and the recipe of weights trained there lists both."""
    from m2m_app.training.loop import training_datasets

    prep, first, second = tmp_path / "prep", tmp_path / "ds-real", tmp_path / "ds extra"
    for folder, author in ((first, "A. Person"), (second, "B. Person")):
        folder.mkdir()
        (folder / "dataset_description.json").write_text(json.dumps({"Name": folder.name, "Authors": [author]}))
    keys = []
    for source in (first, second, first):  # the third: the first dataset prepared again
        keys.append(source_link_name(prep, source))
        dataset_description(prep, source, link=keys[-1])
    assert keys == ["raw", "ds-extra", "raw"]
    description = json.loads((prep / "dataset_description.json").read_text())
    assert description["DatasetLinks"] == {"raw": first.resolve().as_uri(), "ds-extra": second.resolve().as_uri()}
    assert sorted(s["URL"] for s in description["SourceDatasets"]) == sorted(
        p.resolve().as_uri() for p in (first, second)
    )
    assert description["Authors"] == ["A. Person", "B. Person"]
    assert training_datasets([prep]) == ["ds extra", "ds-real"]


def test_readme_and_bidsignore(tmp_path, weights_dir):
    readme = write_readme(tmp_path, str(weights_dir)).read_text()
    assert f"m2m {__version__}" in readme and PREDICTED in readme
    assert f"none found (no README.md in {weights_dir.as_posix()})" in readme
    assert (tmp_path / ".bidsignore").read_text().splitlines() == list(NOT_BIDS)
    (weights_dir / "README.md").write_text("# card")
    assert (weights_dir / "README.md").as_posix() in write_readme(tmp_path, str(weights_dir)).read_text()


def _nifti(path, data):
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), np.diag([2.0, 2.0, 2.0, 1.0])), path)
    return str(path)


def test_maps_get_their_bids_names_and_sidecars(tmp_path, weights_dir):
    shape = (4, 4, 4)
    work = {
        key: _nifti(tmp_path / f"{key}.nii.gz", np.full(shape, i + 1.0))
        for i, key in enumerate(("fa", "md", "mask", "fa_sd", "v1_dispersion", "tdi"))
    }
    t1w = "/data/bids/sub-01/ses-a/anat/sub-01_ses-a_T1w.nii.gz"
    same = {"shape": shape, "affine": np.diag([2.0, 2.0, 2.0, 1.0])}  # maps already on the output grid
    grid = ConformedGrid(**same, source_shape=shape, source_affine=same["affine"])
    written = write_maps(tmp_path / "out", UNIT, t1w, work, str(weights_dir), {"phase1": 12.5}, grid=grid)
    expected = derivative_paths(tmp_path / "out", UNIT, "nerf")
    assert written == {key: expected[key] for key in work}
    assert np.asarray(nib.load(written["md"]).dataobj).max() == 2.0  # the work file's data, on the same grid
    sidecars = {key: json.loads(sidecar_path(path).read_text()) for key, path in written.items()}
    for sidecar in sidecars.values():
        assert sidecar["Description"].endswith(PREDICTED)
        assert sidecar["Sources"] == ["bids:raw:sub-01/ses-a/anat/sub-01_ses-a_T1w.nii.gz"]
        assert sidecar["GeneratedBy"] == [{"Name": "m2m", "Version": __version__}]
        assert sidecar["StageWallTimeSeconds"] == {"phase1": 12.5}
        assert sidecar["Weights"]["phase1"]["sha256"] == "ab" * 32
    assert sidecars["md"]["Units"] == TENSOR_PARAMS["md"][1] and sidecars["md"]["Model"] == "tensor"
    assert sidecars["mask"]["Type"] == "Brain"
    assert sidecars["fa_sd"]["UncertaintyScale"] == 2.5 and "fitted by" in sidecars["fa_sd"]["UncertaintyScaleSource"]
    assert sidecars["v1_dispersion"]["UncertaintyScale"] == 1.0 and sidecars["v1_dispersion"]["Units"] == "deg"
    assert "uncalibrated" in sidecars["v1_dispersion"]["UncertaintyScaleSource"]
    assert "relative" in sidecars["tdi"]["Description"] and "Units" not in sidecars["tdi"]


def test_qc_row_measures_the_written_maps(tmp_path):
    mask = np.zeros((10, 10, 10))
    mask[:5] = 1  # 500 voxels of 8 mm³: 4 ml
    fa = np.where(mask > 0, 0.1, 0.0)
    fa[:2] = 0.5  # 200 white-matter voxels (FA > QC_WM_FA)
    assert QC_WM_FA < 0.5
    written = {}
    for key, data in (("mask", mask), ("fa", fa), ("md", mask * 7e-4)):
        written[key] = tmp_path / f"{key}.nii.gz"
        _nifti(written[key], data)
    row = subject_qc(UNIT, written, {"psnr_density_db": 30.0})
    assert row["subject"] == "sub-01_ses-a" and row["brain_volume_ml"] == 4.0
    assert row["mean_fa"] == pytest.approx(0.26) and row["median_md"] == pytest.approx(7e-4)
    assert np.isnan(row["median_fa_sd_wm"]) and row["n_streamlines"] is None  # no FA SD map, no tractogram
    assert row["nerf_psnr_density_db"] == 30.0 and row["m2m_version"] == __version__
    written["fa_sd"] = tmp_path / "sd.nii.gz"
    _nifti(written["fa_sd"], np.where(fa > QC_WM_FA, 0.03, 0.9))
    assert subject_qc(UNIT, written, {})["median_fa_sd_wm"] == pytest.approx(0.03)
    assert qc_path(tmp_path, UNIT) == tmp_path / "sub-01/ses-a/sub-01_ses-a_desc-m2m_qc.json"
