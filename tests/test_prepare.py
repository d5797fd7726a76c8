"""The teacher (``m2m-train prepare``) on real data, and its handling of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import DS_EXTRA, DS_REAL, ds_real_unit, make_bids, requires_ds_extra, requires_ds_real, run_cli
from m2m_app.errors import BadDataError, MissingInputError
from m2m_app.io.nifti import load_dwi
from m2m_app.teacher.prepare import load_dwi_runs

UNITS = ["sub-01", "sub-02_ses-hfdl", "sub-02_ses-hfdr", "sub-02_ses-hfp", "sub-02_ses-hfs"]
#: Units whose head lies square in the scanner, so the corpus callosum runs along world x.
UPRIGHT = ["sub-01", "sub-02_ses-hfs", "sub-02_ses-hfp"]


def manifest_rows(prep):
    return {row["subject"]: row for row in json.loads((prep / "manifest.json").read_text())["pairs"]}


def load(prep, row, key):
    return nib.load(prep / row[key])


@pytest.mark.slow
@requires_ds_real
def test_prepare_completes_on_every_unit(prepared_ds_real):
    prep, result = prepared_ds_real
    assert result.returncode == 0, result.stderr[-3000:]
    rows = manifest_rows(prep)
    assert sorted(rows) == UNITS
    assert all(row["status"] == "ok" for row in rows.values())
    assert json.loads((prep / "dataset_description.json").read_text())["DatasetType"] == "derivative"
    header = (prep / "manifest.tsv").read_text().splitlines()[0].split("\t")
    assert {
        "t1w",
        "fa",
        "diffusivity",
        "tdi",
        "dectdi",
        "mean_fa_wm",
        "registration_cost",
        "fov",
        "dseg",
        "flagged",
        "registration_vs_ants_mm",
        "registration_from_header_mm",
        "wm_fraction",
    } <= set(header)
    assert "FLAGGED" not in result.stderr
    methods = (prep / "logs" / "CITATION.md").read_text()
    assert "deepbet" in methods and "Atropos" in methods and "ANTs" in methods and "Desikan-Killiany" in methods


@pytest.mark.slow
@requires_ds_real
def test_prepare_writes_the_teachers_regions_and_connectome(prepared_ds_real, tmp_path):
    """The teacher's parcellation, region table and connectome of every unit (its own registration,
    brain mask, FA and tractogram)."""
    from m2m_app.io.files import read_tsv
    from m2m_app.io.naming import Subject
    from m2m_app.registration.parcellation import TEACHER_TRACK, region_paths

    prep, _ = prepared_ds_real
    for unit in UNITS:
        paths = region_paths(prep, Subject.from_label(unit), "DesikanKilliany", TEACHER_TRACK)
        table = read_tsv(paths["regions"])
        fa = [float(row["fa_mean"]) for row in table if row["fa_mean"] != "n/a"]
        assert len(table) == 83 and len(fa) >= 60 and 0.1 < np.median(fa) < 0.6, unit
        counts = read_tsv(paths["count"])
        assert sum(float(v) for row in counts for key, v in row.items() if key != "Node") > 100, unit
        sidecar = json.loads(paths["count"].with_name(paths["count"].name.replace(".tsv", ".json")).read_text())
        assert sidecar["StreamlinesAssigned"] > 0 and sidecar["Sources"][0].startswith("bids::sub-")


@pytest.mark.slow
@requires_ds_real
@pytest.mark.parametrize("unit", UNITS)
def test_prepared_maps_are_physically_plausible_and_on_the_t1w_grid(prepared_ds_real, unit):
    prep, _ = prepared_ds_real
    row = manifest_rows(prep)[unit]
    t1w = nib.load(row["t1w"])
    fa_img = load(prep, row, "fa")
    assert fa_img.shape == t1w.shape and np.allclose(fa_img.affine, t1w.affine, atol=1e-4)
    fa, md = fa_img.get_fdata(), load(prep, row, "md").get_fdata()
    brain = (load(prep, row, "mask").get_fdata() > 0) & (load(prep, row, "fov").get_fdata() > 0)
    wm = load(prep, row, "wm").get_fdata() > 0
    assert 5e-4 < np.median(md[brain]) < 1.2e-3
    assert 0.15 < fa[brain].mean() < 0.45
    # the DWI-derived FA must land on the T1w's own white matter (registration + orientation)
    assert wm[fa > 0.3].mean() > 0.7
    tensor = load(prep, row, "diffusivity")
    assert tensor.shape == t1w.shape + (6,)
    assert load(prep, row, "tdi").get_fdata()[brain].mean() > 1
    assert row["n_streamlines"] > 5000
    # registration: within 2 mm of the independent ANTs estimate, a few mm from the headers
    assert row["registration_vs_ants_mm"] < 2.0 and row["registration_from_header_mm"] < 6.0
    assert not row["flagged"], row["flags"]
    assert 0.25 < row["wm_fraction"] < 0.55 and 1000 < row["brain_ml"] < 2000
    assert (prep / row["qc_figure"]).stat().st_size > 10_000


@pytest.mark.slow
@requires_ds_real
def test_white_matter_of_a_whole_head_t1w_stays_off_the_scalp(prepared_ds_real):
    """sub-01's MPRAGE shows the whole head, bright scalp fat included: the white matter lies deep inside."""
    from scipy.ndimage import binary_closing, binary_fill_holes, distance_transform_edt

    prep, _ = prepared_ds_real
    row = manifest_rows(prep)["sub-01"]
    t1w_img = nib.load(row["t1w"])
    t1w = t1w_img.get_fdata()
    # the whole head: everything above the background noise, closed and filled
    head = binary_fill_holes(binary_closing(t1w > 0.05 * np.percentile(t1w, 99), iterations=3))
    depth = distance_transform_edt(head, sampling=t1w_img.header.get_zooms()[:3])
    wm = load(prep, row, "wm").get_fdata() > 0
    brain = load(prep, row, "mask").get_fdata() > 0
    assert wm.sum() > 100_000 and not np.any(wm & ~brain)
    assert np.mean(depth[wm] > 10.0) > 0.995  # scalp and skull: the outer ~10 mm


@pytest.mark.slow
@requires_ds_real
@pytest.mark.parametrize("unit", UPRIGHT)
def test_corpus_callosum_is_left_right(prepared_ds_real, unit):
    """Voxels of the corpus-callosum body (midline, above the brain centre) have V1 along x."""
    prep, _ = prepared_ds_real
    row = manifest_rows(prep)[unit]
    fa_img = load(prep, row, "fa")
    fa, v1 = fa_img.get_fdata(), load(prep, row, "v1").get_fdata()
    brain = load(prep, row, "mask").get_fdata() > 0
    ijk = np.indices(fa.shape).reshape(3, -1).T
    xyz = (ijk @ fa_img.affine[:3, :3].T + fa_img.affine[:3, 3]).reshape(fa.shape + (3,))
    centre = np.median(xyz[brain], axis=0)
    offset = xyz - centre
    body = (
        (np.abs(offset[..., 0]) < 3)
        & (offset[..., 2] > 0)
        & (offset[..., 2] < 30)
        & (np.abs(offset[..., 1]) < 30)
        & (fa > 0.3)
        & brain
    )
    assert body.sum() > 100
    mean_abs = np.abs(v1[body]).mean(axis=0)
    assert mean_abs[0] > mean_abs[1] and mean_abs[0] > mean_abs[2], mean_abs


@pytest.mark.slow
@requires_ds_real
def test_rerun_skips_finished_units(prepared_ds_real):
    prep, _ = prepared_ds_real
    fa_file = prep / manifest_rows(prep)["sub-01"]["fa"]
    before = fa_file.stat().st_mtime_ns
    result = run_cli("train", "prepare", DS_REAL, prep, "--participant-label", "sub-01")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "already prepared" in result.stderr
    assert fa_file.stat().st_mtime_ns == before


@pytest.mark.slow
@requires_ds_real
def test_one_bad_unit_leaves_the_others_intact(tmp_path):
    """A truncated DWI in sub-03 fails with exit 65 naming the file; sub-02 is still prepared."""
    good = ds_real_unit("02", "hfs")
    raw = (DS_REAL / "sub-02/ses-hfs/dwi/sub-02_ses-hfs_dwi.nii.gz").read_bytes()
    bad = {
        "sub-03/anat/sub-03_T1w.nii.gz": DS_REAL / "sub-01/anat/sub-01_T1w.nii.gz",
        "sub-03/dwi/sub-03_dwi.nii.gz": raw[: len(raw) // 3],
        "sub-03/dwi/sub-03_dwi.bval": DS_REAL / "sub-02/ses-hfs/dwi/sub-02_ses-hfs_dwi.bval",
        "sub-03/dwi/sub-03_dwi.bvec": DS_REAL / "sub-02/ses-hfs/dwi/sub-02_ses-hfs_dwi.bvec",
    }
    bids = make_bids(tmp_path / "bids", {**good, **bad})
    prep = tmp_path / "prep"
    result = run_cli("train", "prepare", bids, prep, "--nprocs", "1")
    assert result.returncode == 65, result.stderr[-2000:]
    assert "sub-03" in result.stderr and "sub-03_dwi.nii.gz" in result.stderr
    assert "Traceback" not in result.stderr
    rows = manifest_rows(prep)
    assert rows["sub-02_ses-hfs"]["status"] == "ok" and rows["sub-03"]["status"] == "failed"
    assert (prep / rows["sub-02_ses-hfs"]["fa"]).exists()


@pytest.mark.slow
def test_unknown_participant_and_missing_dataset_give_documented_codes(tmp_path):
    bids = make_bids(tmp_path / "bids", {"sub-01/anat/sub-01_T1w.nii.gz": b"x"})
    result = run_cli("train", "prepare", bids, tmp_path / "prep", "--participant-label", "99")
    assert result.returncode == 66 and "99" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("train", "prepare", tmp_path / "nothing", tmp_path / "prep2")
    assert result.returncode == 66 and "not a BIDS dataset" in result.stderr
    result = run_cli("train", "prepare", bids, bids / "sub-01" / "m2m")
    assert result.returncode == 64 and "derivatives/m2m-prep" in result.stderr


def _write_dwi(folder, data, bvals, bvecs, name="dwi", affine=None):
    path = folder / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine), path)
    if bvals is not None:
        np.savetxt(folder / f"{name}.bval", np.atleast_2d(bvals), fmt="%g")
    if bvecs is not None:
        np.savetxt(folder / f"{name}.bvec", bvecs, fmt="%.6f")
    return path


def _gradients(n):
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(3, n))
    vecs /= np.linalg.norm(vecs, axis=0)
    vecs[:, 0] = 0
    return np.r_[0, np.full(n - 1, 1000.0)], vecs


@pytest.mark.parametrize(
    "case, error, words",
    [
        ("missing_bval", MissingInputError, ".bval"),
        ("mismatched_bvec", BadDataError, "must match"),
        ("three_d", BadDataError, "4D"),
        ("no_b0", BadDataError, "no b=0"),
        ("nan", BadDataError, "NaN"),
        ("truncated", BadDataError, "truncated"),
    ],
)
def test_bad_dwi_inputs_fail_clearly(tmp_path, case, error, words):
    data = np.random.default_rng(1).uniform(100, 200, size=(10, 10, 10, 8)).astype(np.float32)
    bvals, bvecs = _gradients(8)
    if case == "missing_bval":
        path = _write_dwi(tmp_path, data, None, bvecs)
    elif case == "mismatched_bvec":
        path = _write_dwi(tmp_path, data, bvals, bvecs[:, :7])
    elif case == "three_d":
        path = _write_dwi(tmp_path, data[..., 0], bvals[:1], bvecs[:, :1])
    elif case == "no_b0":
        path = _write_dwi(tmp_path, data, np.full(8, 1000.0), bvecs)
    elif case == "nan":
        data[2, 2, 2, 3] = np.nan
        path = _write_dwi(tmp_path, data, bvals, bvecs)
    else:
        path = _write_dwi(tmp_path, data, bvals, bvecs)
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(error, match=words) as info:
        load_dwi(path)
    assert str(path.name) in str(info.value) or str(path.parent) in str(info.value)


def test_dwi_runs_are_concatenated_and_checked(tmp_path):
    """dir-AP and dir-PA style runs on one grid become one series; another grid is refused."""
    data = np.random.default_rng(2).uniform(100, 200, size=(10, 10, 10, 8)).astype(np.float32)
    bvals, bvecs = _gradients(8)
    first = _write_dwi(tmp_path, data, bvals, bvecs, name="run1")
    second = _write_dwi(tmp_path, data[..., :7], bvals[:7], bvecs[:, :7], name="run2")
    _, joined, joined_bvals, joined_bvecs = load_dwi_runs([first, second])
    assert joined.shape == (10, 10, 10, 15) and joined_bvals.shape == (15,) and joined_bvecs.shape == (15, 3)
    other = _write_dwi(tmp_path, data, bvals, bvecs, name="run3", affine=np.diag([3.0, 3.0, 3.0, 1.0]))
    with pytest.raises(BadDataError, match="share one grid"):
        load_dwi_runs([first, other])


@requires_ds_real
@pytest.mark.slow
def test_a_unit_whose_registration_is_forced_wrong_is_flagged_and_left_out(tmp_path, monkeypatch):
    """dipy's registration shifted by 8 mm: the ANTs check disagrees, the unit is flagged, training skips it."""
    from m2m_app.errors import UsageError
    from m2m_app.io.manifest import select_rows, write_manifest
    from m2m_app.io.naming import Subject
    from m2m_app.teacher import prepare as teacher
    from m2m_app.teacher.register import RigidResult

    register = teacher.register_b0_to_t1w

    def shifted(*args, **kwargs):
        result = register(*args, **kwargs)
        wrong = result.t1w_to_dwi.copy()
        wrong[:3, 3] += [0.0, 8.0, 0.0]
        return RigidResult(wrong, result.cost, result.start, result.candidates)

    monkeypatch.setattr(teacher, "register_b0_to_t1w", shifted)
    folder = DS_REAL / "sub-02" / "ses-hfs"
    qc = teacher.prepare_subject(
        Subject("02", "hfs"), next(folder.glob("anat/*_T1w.nii.gz")), sorted(folder.glob("dwi/*_dwi.nii.gz")), tmp_path
    )
    assert qc["flagged"] and "from ANTs" in qc["flags"] and qc["registration_vs_ants_mm"] > 5
    write_manifest(tmp_path)
    with pytest.raises(UsageError, match="flagged"):
        select_rows([tmp_path], None)
    assert [row["subject"] for row, _ in select_rows([tmp_path], None, include_flagged=True)] == ["sub-02_ses-hfs"]


@pytest.mark.slow
@requires_ds_extra
def test_partial_slab_dwi_of_another_vendor_is_registered_from_the_headers(tmp_path):
    """ds-extra ses-1 (United Imaging, 84 mm axial slab rotated 25° in-plane, T1w with the neck):
    the centre-of-mass start lands ~20 mm off, the header start wins; the FOV mask is the slab."""
    prep = tmp_path / "prep"
    result = run_cli("train", "prepare", DS_EXTRA, prep, "--session-label", "1", "--omp-nthreads", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    row = manifest_rows(prep)["sub-03_ses-1"]
    assert not row["flagged"], row["flags"]
    assert row["registration_start"] == "header"
    assert row["registration_from_header_mm"] < 6.0 and row["registration_vs_ants_mm"] < 2.0
    fov_img = load(prep, row, "fov")
    fov, brain = fov_img.get_fdata() > 0, load(prep, row, "mask").get_fdata() > 0
    z = nib.affines.apply_affine(fov_img.affine, np.argwhere(brain))[:, 2]
    z_fov = nib.affines.apply_affine(fov_img.affine, np.argwhere(brain & fov))[:, 2]
    assert 0.5 < row["fov_fraction"] < 0.85
    assert z_fov.min() > z.min() + 30  # the cerebellum and brainstem lie below the slab
    fa = load(prep, row, "fa").get_fdata()
    assert np.all(fa[brain & ~fov] == 0) and fa[brain & fov].mean() > 0.15


@requires_ds_real
@pytest.mark.slow
def test_runs_with_opposite_phase_encoding_are_fitted_apart_and_averaged(prepared_ds_real, tmp_path):
    """sub-02 ses-hfs's DWI given twice, as dir-AP (j-) and dir-PA (j) runs: two series, each
    fitted and registered; their log-Euclidean mean equals the single run's tensor, and their
    streamlines are pooled."""
    single_prep, _ = prepared_ds_real
    single = manifest_rows(single_prep)["sub-02_ses-hfs"]
    source = DS_REAL / "sub-02/ses-hfs/dwi/sub-02_ses-hfs_dwi"
    files = dict(ds_real_unit("02", "hfs", modalities=("anat",)))
    for direction, code in (("AP", "j-"), ("PA", "j")):
        stem = f"sub-02/ses-hfs/dwi/sub-02_ses-hfs_dir-{direction}_dwi"
        files |= {
            f"{stem}.nii.gz": Path(f"{source}.nii.gz"),
            f"{stem}.bval": Path(f"{source}.bval"),
            f"{stem}.bvec": Path(f"{source}.bvec"),
            f"{stem}.json": json.dumps({"PhaseEncodingDirection": code}).encode(),
        }
    prep = tmp_path / "prep"
    result = run_cli("train", "prepare", make_bids(tmp_path / "bids", files), prep)
    assert result.returncode == 0, result.stderr[-3000:]
    row = manifest_rows(prep)["sub-02_ses-hfs"]
    assert row["dwi_series"] == 2 and not row["flagged"], row["flags"]
    fa, fa_single = (load(p, r, "fa").get_fdata() for p, r in ((prep, row), (single_prep, single)))
    brain = load(prep, row, "mask").get_fdata() > 0
    assert np.corrcoef(fa[brain], fa_single[brain])[0, 1] > 0.98
    assert 1.8 < row["n_streamlines"] / single["n_streamlines"] < 2.2
