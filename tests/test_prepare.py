"""The teacher (``m2m-train prepare``) on real data, and its handling of bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import (
    DS_EXTRA,
    DS_REAL,
    ds_real_unit,
    make_bids,
    requires_ds_extra,
    requires_ds_real,
    run_cli,
    synthetic_affine,
)
from m2m_app.errors import BadDataError, MissingInputError
from m2m_app.io.naming import sidecar_path
from m2m_app.maths.metrics import angular_error_deg
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
    assert "deepbet" in methods and "Atropos" in methods and "ANTs" in methods


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
def test_rerun_skips_finished_units_and_adds_the_teachers_regions(prepared_ds_real):
    """Prepared with --atlases none, sub-01 is not prepared again by a re-run with the default atlases;
    only its parcellation, region table and connectome are added (its own registration, the teacher's
    brain mask, FA and tractogram), and made again when one is deleted."""
    from m2m_app.io.files import read_tsv
    from m2m_app.io.naming import Subject
    from m2m_app.registration.parcellation import TEACHER_TRACK, region_paths

    prep, _ = prepared_ds_real
    fa_file = prep / manifest_rows(prep)["sub-01"]["fa"]
    paths = region_paths(prep, Subject.from_label("sub-01"), "DesikanKilliany", TEACHER_TRACK)
    before = fa_file.stat().st_mtime_ns
    assert not paths["regions"].exists()
    result = run_cli("train", "prepare", DS_REAL, prep, "--participant-label", "sub-01")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "already prepared; its regions: DesikanKilliany" in result.stderr
    assert fa_file.stat().st_mtime_ns == before
    table = read_tsv(paths["regions"])
    fa = [float(row["fa_mean"]) for row in table if row["fa_mean"] != "n/a"]
    assert len(table) == 83 and len(fa) >= 60 and 0.1 < np.median(fa) < 0.6
    counts = read_tsv(paths["count"])
    assert sum(float(v) for row in counts for key, v in row.items() if key != "Node") > 100
    sidecar = json.loads(paths["count"].with_name(paths["count"].name.replace(".tsv", ".json")).read_text())
    assert sidecar["StreamlinesAssigned"] > 0 and sidecar["Sources"][0].startswith("bids::sub-")
    assert "Desikan-Killiany" in (prep / "logs" / "CITATION.md").read_text()
    result = run_cli("train", "prepare", DS_REAL, prep, "--participant-label", "sub-01")
    assert result.returncode == 0 and "already prepared, skipping" in result.stderr
    paths["regions"].unlink()  # a table lost from the prep dir is made again (not taken from the work cache)
    result = run_cli("train", "prepare", DS_REAL, prep, "--participant-label", "sub-01")
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(read_tsv(paths["regions"])) == 83 and fa_file.stat().st_mtime_ns == before


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
    result = run_cli(
        "train", "prepare", DS_EXTRA, prep, "--session-label", "1", "--omp-nthreads", "2", "--atlases", "none"
    )
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
def test_opposite_phase_encoding_runs_are_averaged_and_a_bad_unit_beside_them_fails_alone(prepared_ds_real, tmp_path):
    """sub-02 ses-hfs's DWI given twice, as dir-AP (j-) and dir-PA (j) runs: two series, each
    fitted and registered; their log-Euclidean mean equals the single run's tensor, and their
    streamlines are pooled. Beside it, sub-03's truncated DWI fails with exit 65 naming the file,
    and sub-02 is still prepared (one prepare run for both: CI's time)."""
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
    raw = Path(f"{source}.nii.gz").read_bytes()
    files |= {
        "sub-03/anat/sub-03_T1w.nii.gz": DS_REAL / "sub-01/anat/sub-01_T1w.nii.gz",
        "sub-03/dwi/sub-03_dwi.nii.gz": raw[: len(raw) // 3],
        "sub-03/dwi/sub-03_dwi.bval": Path(f"{source}.bval"),
        "sub-03/dwi/sub-03_dwi.bvec": Path(f"{source}.bvec"),
    }
    prep = tmp_path / "prep"
    result = run_cli("train", "prepare", make_bids(tmp_path / "bids", files), prep, "--atlases", "none")
    assert result.returncode == 65, result.stderr[-3000:]
    assert "sub-03" in result.stderr and "sub-03_dwi.nii.gz" in result.stderr
    assert "Traceback" not in result.stderr
    rows = manifest_rows(prep)
    assert rows["sub-03"]["status"] == "failed"
    row = rows["sub-02_ses-hfs"]
    assert row["status"] == "ok" and row["dwi_series"] == 2 and not row["flagged"], row["flags"]
    fa, fa_single = (load(p, r, "fa").get_fdata() for p, r in ((prep, row), (single_prep, single)))
    brain = load(prep, row, "mask").get_fdata() > 0
    assert np.corrcoef(fa[brain], fa_single[brain])[0, 1] > 0.98
    assert 1.8 < row["n_streamlines"] / single["n_streamlines"] < 2.2


# --- QSIPrep's preprocessed DWI (m2m-train prepare --dwi-derivatives) -----------------------------------------

#: The voxel-to-world rotation of QSIPrep's grids: LPS+ (voxel axes running to the left, to the back and up).
LPS = np.diag([-1.0, -1.0, 1.0])


def fsl_bvecs(world: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """FSL's b-vectors ``(3, N)`` of the world (RAS) directions ``(N, 3)`` for an image with ``affine``,
    written out from FSL's rule: along the voxel axes, the first one negated when the affine's
    determinant is positive (as for LPS+, a rotation of RAS+ by 180 degrees about z)."""
    linear = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    voxel = np.linalg.solve(linear, world.T)
    return voxel * [[-1.0], [1.0], [1.0]] if np.linalg.det(linear) > 0 else voxel


@pytest.mark.skipif(shutil.which("mrconvert") is None, reason="needs MRtrix3's mrconvert")
@pytest.mark.parametrize("orientation", ["LPS", "RAS", "LAS", "oblique"])
def test_fsl_bvecs_mean_the_same_world_directions_to_mrtrix_and_to_the_teacher(tmp_path, orientation):
    """World directions written as FSL b-vectors for an image of each orientation (the rule that builds the
    QSIPrep-shaped test data below) come back as the same directions from MRtrix3 (an independent reader)
    and from the teacher's reader (sign-free)."""
    from m2m_app.maths.tensor import frame_rotation

    affine = {"LPS": np.diag([-2.0, -2.0, 2.0, 1.0]), "RAS": np.diag([2.0, 2.0, 2.0, 1.0])}.get(orientation)
    if affine is None:
        affine = synthetic_affine("las" if orientation == "LAS" else "oblique", (2.0, 2.0, 2.0))
    bvals, world = _gradients(8)
    world = world.T
    data = np.random.default_rng(3).uniform(100, 200, size=(8, 8, 8, 8)).astype(np.float32)
    path = _write_dwi(tmp_path, data, bvals, fsl_bvecs(world, affine), affine=affine)
    exported = tmp_path / "scheme.b"
    subprocess.run(
        [
            "mrconvert",
            "-quiet",
            "-fslgrad",
            tmp_path / "dwi.bvec",
            tmp_path / "dwi.bval",
            path,
            "-export_grad_mrtrix",
            exported,
            tmp_path / "out.mif",
        ],
        check=True,
    )
    by_mrtrix = np.loadtxt(exported)[:, :3]
    _, _, _, voxel = load_dwi_runs([path])
    by_teacher = voxel @ frame_rotation(affine).T
    for found in (by_mrtrix, by_teacher):
        np.testing.assert_array_less(angular_error_deg(found[1:], world[1:]), 0.1)


def qsiprep_like(root: Path, t1w_path: Path, dwi_path: Path, t1w_to_dwi: np.ndarray) -> Path:
    """A folder shaped like QSIPrep's output (its names before 1.0) made from one raw unit of ds-real.

    The T1w reoriented to LPS+ (voxels only permuted: exact), the DWI resampled (linear) onto a 2 mm
    LPS+ grid covering the T1w through ``t1w_to_dwi`` (4x4, T1w world mm -> DWI world mm), its b-vectors
    turned by that transform's rotation and written in FSL's convention for the new image.
    """
    from dipy.align.imaffine import AffineMap
    from dipy.segment.mask import median_otsu

    subject = "sub-01"
    anat, dwi_dir = root / subject / "anat", root / subject / "dwi"
    anat.mkdir(parents=True)
    dwi_dir.mkdir()
    (root / "dataset_description.json").write_text(
        json.dumps(
            {
                "Name": "QSIPrep-shaped test data",
                "BIDSVersion": "1.9.0",
                "DatasetType": "derivative",
                "GeneratedBy": [{"Name": "qsiprep", "Version": "0.22.0", "Description": "m2m's tests imitate it"}],
            }
        )
    )
    t1w = nib.load(t1w_path)
    to_lps = nib.orientations.ornt_transform(nib.io_orientation(t1w.affine), nib.orientations.axcodes2ornt("LPS"))
    nib.save(t1w.as_reoriented(to_lps), anat / f"{subject}_desc-preproc_T1w.nii.gz")

    corners = nib.affines.apply_affine(
        t1w.affine, np.array(np.meshgrid(*[[0, n - 1] for n in t1w.shape])).reshape(3, -1).T
    )
    low, high = corners.min(axis=0), corners.max(axis=0)
    affine = np.eye(4)
    affine[:3, :3] = 2.0 * LPS
    affine[:3, 3] = [high[0], high[1], low[2]]  # voxel (0, 0, 0): right, front, bottom
    shape = tuple(int(n) for n in np.ceil((high - low) / 2.0) + 1)
    raw = nib.load(dwi_path)
    mapping = AffineMap(
        t1w_to_dwi,
        domain_grid_shape=shape,
        domain_grid2world=affine,
        codomain_grid_shape=raw.shape[:3],
        codomain_grid2world=raw.affine,
    )
    data = np.stack([mapping.transform(volume) for volume in np.moveaxis(raw.get_fdata(), -1, 0)], axis=-1)
    stem = dwi_dir / f"{subject}_space-T1w_desc-preproc_dwi"
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), f"{stem}.nii.gz")
    bvals = np.loadtxt(Path(str(dwi_path).replace(".nii.gz", ".bval")))
    raw_bvecs = np.loadtxt(Path(str(dwi_path).replace(".nii.gz", ".bvec")))
    assert np.linalg.det(raw.affine[:3, :3]) < 0  # LAS: FSL's b-vectors lie along its voxel axes as written
    raw_linear = raw.affine[:3, :3] / np.linalg.norm(raw.affine[:3, :3], axis=0)
    in_t1w_world = t1w_to_dwi[:3, :3].T @ raw_linear @ raw_bvecs  # DWI world -> T1w world: the inverse rotation
    np.savetxt(f"{stem}.bval", bvals[None], fmt="%g")
    np.savetxt(f"{stem}.bvec", fsl_bvecs(in_t1w_world.T, affine), fmt="%.6f")
    Path(f"{stem}.json").write_text(json.dumps({"Description": "DWI resampled into the T1w's space"}))
    _, brain = median_otsu(data[..., bvals < 50].mean(axis=-1), median_radius=2, numpass=2)
    nib.save(nib.Nifti1Image(brain.astype(np.uint8), affine), dwi_dir / f"{subject}_space-T1w_desc-brain_mask.nii.gz")
    return root


@pytest.fixture(scope="module")
def prepared_from_qsiprep(prepared_ds_real, tmp_path_factory):
    """sub-01 prepared from a QSIPrep-shaped folder built from ds-real (the DWI aligned by the raw path's own
    registration), beside sub-02 which QSIPrep lacks; the raw dataset holds their T1w only, no DWI."""
    from m2m_app.teacher.register import itk_transform_to_ras

    raw_prep, _ = prepared_ds_real
    row = manifest_rows(raw_prep)["sub-01"]
    root = tmp_path_factory.mktemp("from_qsiprep")
    qsiprep = qsiprep_like(
        root / "qsiprep",
        DS_REAL / "sub-01/anat/sub-01_T1w.nii.gz",
        DS_REAL / "sub-01/dwi/sub-01_dwi.nii.gz",
        itk_transform_to_ras(raw_prep / row["xfm"]),
    )
    bids = make_bids(root / "bids", ds_real_unit("01", None, ("anat",)) | ds_real_unit("02", "hfs", ("anat",)))
    prep = root / "prep"
    result = run_cli("train", "prepare", bids, prep, "--dwi-derivatives", qsiprep, "--nprocs", "1", "--atlases", "none")
    return prep, result, qsiprep, (raw_prep, row)


def _canonical(prep: Path, row: dict, key: str) -> np.ndarray:
    """A map of a unit prepared on the LPS+ T1w, back in the raw T1w's voxel order (an exact permutation)."""
    return nib.as_closest_canonical(nib.load(prep / row[key])).get_fdata()


@pytest.mark.slow
@requires_ds_real
def test_prepare_from_qsiprep_gives_the_raw_paths_tensor(prepared_from_qsiprep):
    """FA from QSIPrep's DWI (LPS+, b-vectors rewritten for it) follows the raw path's (r >= 0.9 in the brain)
    and V1 lies within 10 degrees of it (mean over FA > 0.3), with no registration."""
    prep, result, _, (raw_prep, raw) = prepared_from_qsiprep
    row = manifest_rows(prep)["sub-01"]
    assert row["status"] == "ok", result.stderr[-3000:]
    assert np.allclose(
        nib.as_closest_canonical(nib.load(prep / row["fa"])).affine, nib.load(raw_prep / raw["fa"]).affine
    )
    fa, fa_raw = _canonical(prep, row, "fa"), load(raw_prep, raw, "fa").get_fdata()
    brain = (_canonical(prep, row, "mask") > 0) & (_canonical(prep, row, "fov") > 0)
    brain &= (load(raw_prep, raw, "mask").get_fdata() > 0) & (load(raw_prep, raw, "fov").get_fdata() > 0)
    brain &= (fa > 0) & (fa_raw > 0)
    r = np.corrcoef(fa[brain], fa_raw[brain])[0, 1]
    white = brain & (fa_raw > 0.3)
    angles = angular_error_deg(_canonical(prep, row, "v1")[white], load(raw_prep, raw, "v1").get_fdata()[white])
    print(
        f"FA r {r:.3f} over {brain.sum()} voxels; V1 angle mean {angles.mean():.1f}, median {np.median(angles):.1f} deg"
    )
    assert r >= 0.9 and angles.mean() < 10.0
    assert row["dwi_source"] == "qsiprep" and row["registration_start"] == "identity"
    assert row["registration_vs_ants_mm"] is None and not row["flagged"], row["flags"]


@pytest.mark.slow
@requires_ds_real
def test_qsiprep_bvecs_read_in_the_wrong_frame_turn_v1_away(prepared_from_qsiprep):
    """The same comparison with the b-vectors of the LPS+ image read without FSL's x flip (the frame error
    that FSL's convention invites): a tensor refitted on QSIPrep's DWI, at its voxels in the raw path's
    white matter (FA > 0.3), points about 45 degrees away, so the check above can fail; the same cheap
    refit with the b-vectors read as the teacher reads them agrees within 10 degrees."""
    from m2m_app.maths.tensor import frame_rotation
    from m2m_app.teacher.dwi import fit_tensor, fsl_bvecs_to_voxel

    _, _, qsiprep, (raw_prep, raw) = prepared_from_qsiprep
    img, data, bvals, fsl = load_dwi(next(qsiprep.glob("sub-01/dwi/*_desc-preproc_dwi.nii.gz")))
    assert np.linalg.det(img.affine[:3, :3]) > 0  # LPS+: FSL's x flip applies
    fa_img = load(raw_prep, raw, "fa")
    white = (fa_img.get_fdata() > 0.3) & (load(raw_prep, raw, "fov").get_fdata() > 0)
    voxels = np.argwhere(np.ones(img.shape[:3], bool))  # the DWI grid's voxels, and the T1w voxel at each centre
    nearest = np.rint(nib.affines.apply_affine(np.linalg.inv(fa_img.affine) @ img.affine, voxels)).astype(int)
    inside = np.all((nearest >= 0) & (nearest < white.shape), axis=1)
    voxels, nearest = voxels[inside], nearest[inside]
    voxels, nearest = voxels[white[tuple(nearest.T)]], nearest[white[tuple(nearest.T)]]
    mask = np.zeros(img.shape[:3], bool)
    mask[tuple(voxels.T)] = True
    teacher_v1 = load(raw_prep, raw, "v1").get_fdata()[tuple(nearest.T)]
    mean_angle = {}
    for frame, voxel_bvecs in (("right", fsl_bvecs_to_voxel(fsl, img.affine)), ("wrong", fsl)):
        v1 = fit_tensor(data, bvals, voxel_bvecs, mask).evecs[..., :, 0] @ frame_rotation(img.affine).T
        mean_angle[frame] = angular_error_deg(v1[tuple(voxels.T)], teacher_v1).mean()
    print(f"V1 angle to the raw path's over {mask.sum()} voxels, mean (degrees): {mean_angle}")
    assert mean_angle["right"] < 10.0 and mean_angle["wrong"] > 30.0


@pytest.mark.slow
@requires_ds_real
def test_a_participant_missing_from_qsiprep_fails_alone_and_the_raw_dataset_needs_no_dwi(prepared_from_qsiprep):
    """sub-02 is in the raw dataset but not in QSIPrep's output: it fails with a message naming it (exit 66),
    sub-01 is prepared although the raw dataset holds no DWI; the provenance names QSIPrep and no registration."""
    from m2m_app.teacher.register import itk_transform_to_ras

    prep, result, qsiprep, _ = prepared_from_qsiprep
    assert result.returncode == 66, result.stderr[-3000:]
    assert "sub-02_ses-hfs FAILED: sub-02_ses-hfs: not in the DWI derivatives" in result.stderr
    assert "Traceback" not in result.stderr
    rows = manifest_rows(prep)
    assert rows["sub-01"]["status"] == "ok" and rows["sub-02_ses-hfs"]["status"] == "failed"
    row = rows["sub-01"]
    assert Path(row["t1w"]).name == "sub-01_desc-preproc_T1w.nii.gz"
    for key in ("fa", "tdi", "fov", "tractogram", "xfm"):
        sidecar = json.loads(sidecar_path(prep / row[key]).read_text())
        assert "identity" in sidecar["Registration"] and "QSIPrep" in sidecar["Registration"], key
    assert json.loads(sidecar_path(prep / row["fa"]).read_text())["Sources"][-1].startswith("bids:qsiprep:sub-01/dwi/")
    np.testing.assert_allclose(itk_transform_to_ras(prep / row["xfm"]), np.eye(4), atol=1e-9)
    description = json.loads((prep / "dataset_description.json").read_text())
    assert description["DatasetLinks"]["qsiprep"] == qsiprep.resolve().as_uri() and "raw" in description["DatasetLinks"]
    methods = (prep / "logs" / "CITATION.md").read_text()
    assert "QSIPrep (Cieslak et al., 2021)" in methods and "no registration" in methods
