"""The teacher's parts on small synthetic data: registration, field of view, shells, runs, QC flags."""

from __future__ import annotations

import json
import tempfile

import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import binary_erosion

from conftest import synthetic_head
from m2m_app.errors import UsageError
from m2m_app.io.files import save_json
from m2m_app.io.manifest import qc_path, select_rows, write_manifest
from m2m_app.io.naming import Subject
from m2m_app.maths.tensor import log_euclidean_mean
from m2m_app.teacher.dwi import tensor_volumes
from m2m_app.teacher.prepare import SeriesResult, field_of_view, group_dwi_runs, qc_flags
from m2m_app.teacher.register import (
    MAX_VS_ANTS_MM,
    RigidResult,
    ants_rigid_t1w_to_dwi,
    itk_transform_to_ras,
    mask_points,
    mean_displacement_mm,
    register_b0_to_t1w,
)
from m2m_app.teacher.tissue import tissue_classes, tissue_flags


def rigid(angles_deg: tuple[float, float, float], translation_mm: tuple[float, float, float]) -> np.ndarray:
    """A 4×4 rotation about x, then y, then z (degrees) followed by a translation (mm)."""
    out = np.eye(4)
    for axis, angle in enumerate(np.radians(angles_deg)):
        c, s = np.cos(angle), np.sin(angle)
        i, j = [a for a in range(3) if a != axis]
        turn = np.eye(4)
        turn[i, i], turn[i, j], turn[j, i], turn[j, j] = c, -s, s, c
        out = turn @ out
    out[:3, 3] = translation_mm
    return out


@pytest.fixture(scope="module")
def displaced_pair():
    """A synthetic T1w and a b0 of the same head whose header is off by a known rigid transform.

    The b0 has the DWI's contrast (CSF-like bright background inside the brain, dark white
    matter); voxel v of the b0 shows the anatomy at T1w-world ``A v`` but its header says
    ``true @ A v``: so the T1w → DWI world transform to recover is ``true``.
    """
    head = synthetic_head("ras", shape=(56, 64, 56), zooms=(3.0, 3.0, 3.0))
    brain, wm = head["mask"] > 0, head["wm"] > 0
    # off-centre "ventricles" and "nuclei" break the ellipsoids' symmetries, as anatomy does
    xyz = nib.affines.apply_affine(head["affine"], np.indices(brain.shape).transpose(1, 2, 3, 0))
    blobs = np.zeros(brain.shape, bool)
    for centre in ((12.0, 10.0, 18.0), (-10.0, -20.0, 12.0), (-5.0, 18.0, 4.0)):
        blobs |= np.linalg.norm(xyz - np.array(centre), axis=-1) < 7.0
    head = {**head, "t1w": np.where(blobs, 150.0, head["t1w"]).astype(np.float32)}
    b0 = np.where(brain, 900.0 - 500.0 * wm, 60.0 * (head["t1w"] > 100)).astype(np.float32)
    b0[blobs] = 1500.0
    b0 += 5.0 * np.random.default_rng(1).standard_normal(b0.shape).astype(np.float32)
    true = rigid((3.0, -2.0, 6.0), (4.0, -3.0, 2.5))
    return head, b0, true @ head["affine"], true


@pytest.mark.slow
def test_registration_recovers_a_known_rigid_displacement(displaced_pair):
    head, b0, b0_affine, true = displaced_pair
    result = register_b0_to_t1w(b0, b0_affine, head["t1w"], head["affine"], head["mask"] > 0)
    points = mask_points(head["mask"] > 0, head["affine"])
    assert mean_displacement_mm(result.t1w_to_dwi, true, points) < 1.0
    assert set(result.candidates) == {"header", "centre_of_mass"}
    # the header prior is off by the known transform, and the QC measures that distance
    assert 4.0 < mean_displacement_mm(result.t1w_to_dwi, np.eye(4), points) < 12.0


@pytest.mark.slow
def test_ants_check_recovers_the_same_transform_in_ras(displaced_pair):
    """The independent ANTs estimate comes back in the same (RAS, T1w → DWI) convention.

    ANTs' default rigid schedule under-rotates on these smooth synthetic ellipsoids (on the
    real units it lands within 1.4 mm of dipy's), so the bar here is the convention: a
    wrong LPS/RAS flip or an inverted transform would land farther than the header does.
    """
    head, b0, b0_affine, true = displaced_pair
    points = mask_points(head["mask"] > 0, head["affine"])
    ants = ants_rigid_t1w_to_dwi(b0, b0_affine, head["t1w"], head["affine"], points)
    assert mean_displacement_mm(ants.t1w_to_dwi, true, points) < 0.35 * mean_displacement_mm(np.eye(4), true, points)
    assert 0 <= ants.spread_mm < mean_displacement_mm(np.eye(4), true, points)


def test_itk_transform_file_reads_as_the_ras_mapping_ants_applies(tmp_path):
    """An ANTs rigid ``.mat`` (LPS, with a centre) becomes the RAS matrix moving points as ANTs does."""
    import ants

    turn = rigid((10.0, -5.0, 20.0), (0.0, 0.0, 0.0))[:3, :3]
    transform = ants.create_ants_transform(
        transform_type="AffineTransform",
        dimension=3,
        matrix=turn,
        translation=(3.0, -4.0, 7.5),
        center=(10.0, 20.0, -5.0),
    )
    path = tmp_path / "rigid_0GenericAffine.mat"
    ants.write_transform(transform, str(path))
    ras = itk_transform_to_ras(path)
    flip = np.array([-1.0, -1.0, 1.0])
    for point_ras in ([0.0, 0.0, 0.0], [30.0, -12.0, 45.0], [-60.0, 80.0, -20.0]):
        moved_lps = ants.apply_ants_transform_to_point(transform, tuple(flip * point_ras))
        np.testing.assert_allclose(ras[:3, :3] @ point_ras + ras[:3, 3], flip * np.asarray(moved_lps), atol=1e-4)


def test_partial_slab_field_of_view_excludes_the_unmeasured_slices():
    """A DWI measured only in an axial slab marks only that slab of the T1w grid as measured."""
    dwi_affine = np.diag([2.0, 2.0, 4.0, 1.0])
    dwi_affine[:3, 3] = [-32.0, -32.0, -40.0]
    measured = np.zeros((32, 32, 20), bool)
    measured[:, :, 12:18] = True  # world z from 8 to 28 mm (voxel centres)
    t1w_affine = np.diag([1.0, 1.0, 1.0, 1.0])
    t1w_affine[:3, 3] = [-30.0, -30.0, -40.0]
    shape = (60, 60, 80)
    fov = field_of_view(measured, dwi_affine, RigidResult(np.eye(4), 0.0), shape, t1w_affine)
    z = np.arange(shape[2]) - 40.0  # world z of each T1w slice
    per_slice = fov.mean(axis=(0, 1))
    assert np.all(per_slice[(z > 8) & (z < 28)] > 0.9)
    assert np.all(per_slice[(z < 4) | (z > 32)] == 0)


def test_tensor_uses_shells_up_to_1500_or_the_lowest_one():
    used, shells = tensor_volumes(np.array([0, 1000, 995, 2000, 3000, 5, 1500]))
    assert used.tolist() == [True, True, True, False, False, True, True] and shells == [0, 1000, 1500]
    used, shells = tensor_volumes(np.array([0, 2500, 2490, 2510, 0]))
    assert used.all() and shells == [0, 2500]


def _write_run(folder, name, affine, direction):
    path = folder / f"{name}_dwi.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4, 7), np.float32), affine), path)
    (folder / f"{name}_dwi.json").write_text(json.dumps({"PhaseEncodingDirection": direction}))
    return path


def test_runs_with_opposite_phase_encoding_or_other_grids_are_fitted_apart(tmp_path):
    grid = np.diag([2.0, 2.0, 2.0, 1.0])
    ap1, ap2 = _write_run(tmp_path, "run-1", grid, "j-"), _write_run(tmp_path, "run-2", grid, "j-")
    pa = _write_run(tmp_path, "run-3", grid, "j")
    other = _write_run(tmp_path, "run-4", np.diag([3.0, 3.0, 3.0, 1.0]), "j-")
    groups = group_dwi_runs([ap1, ap2, pa, other])
    assert sorted(len(g) for g in groups) == [1, 1, 2] and [ap1, ap2] in groups


def test_log_euclidean_mean_of_runs_ignores_runs_without_data():
    one = np.zeros((2, 1, 1, 6), np.float32)
    two = np.zeros_like(one)
    one[0] = [1e-3, 0, 0, 1e-3, 0, 1e-3]
    two[0] = [4e-3, 0, 0, 4e-3, 0, 4e-3]
    two[1] = [2e-3, 0, 0, 1e-3, 0, 1e-3]
    mean = log_euclidean_mean([one, two])
    assert np.allclose(mean[0, 0, 0], [2e-3, 0, 0, 2e-3, 0, 2e-3])  # geometric mean of 1 and 4
    assert np.allclose(mean[1], two[1])  # only the second run measured it


def _series(vs_ants: float, from_header: float) -> SeriesResult:
    empty = np.zeros((2, 2, 2), bool)
    return SeriesResult(
        name="run.nii.gz",
        tensor=np.zeros((2, 2, 2, 6)),
        fov=empty,
        b0=empty.astype(float),
        registration=RigidResult(np.eye(4), 0.0),
        from_header_mm=from_header,
        vs_ants_mm=vs_ants,
        ants_spread_mm=0.5,
        shells=[0, 1000],
        streamlines=[],
        tracking={},
    )


PLAUSIBLE = {"brain_ml": 1400.0, "csf_ml": 250.0, "gm_ml": 650.0, "wm_ml": 500.0, "wm_fraction": 0.36}


def test_qc_flags_name_what_is_implausible():
    assert qc_flags([_series(0.8, 3.0)], PLAUSIBLE, 0.9) == []
    flags = qc_flags([_series(MAX_VS_ANTS_MM + 4, 3.0)], PLAUSIBLE, 0.9)
    assert len(flags) == 1 and "ANTs" in flags[0]
    assert any("headers" in f for f in qc_flags([_series(0.5, 30.0)], PLAUSIBLE, 0.9))
    assert any("field of view" in f for f in qc_flags([_series(0.5, 3.0)], PLAUSIBLE, 0.1))
    scalp = {**PLAUSIBLE, "wm_ml": 20.0, "wm_fraction": 0.014}  # a "white matter" of a few scalp voxels
    assert any("white matter" in f for f in tissue_flags(scalp))


def test_flagged_units_are_left_out_of_training_unless_asked(tmp_path):
    for label, flags in (("01", ""), ("02", "run.nii.gz: registration is 7.0 mm from ANTs'")):
        subject = Subject(label)
        save_json(
            {
                "subject": subject.label,
                "participant": label,
                "session": "",
                "t1w": "t1w.nii.gz",
                "status": "ok",
                "flagged": bool(flags),
                "flags": flags,
            },
            qc_path(tmp_path, subject),
        )
    write_manifest(tmp_path)
    assert [row["subject"] for row, _ in select_rows([tmp_path], None)] == ["sub-01"]
    assert [row["subject"] for row, _ in select_rows([tmp_path], None, include_flagged=True)] == ["sub-01", "sub-02"]
    with pytest.raises(UsageError, match="flagged"):
        select_rows([tmp_path], ["sub-02"])


@pytest.mark.slow
def test_every_command_takes_a_space_separated_participant_list(tmp_path):
    """``m2m-train prepare --participant-label 01 02`` as BIDS-Apps write it (was: 'unexpected extra argument')."""
    from conftest import make_bids, run_cli

    bids = make_bids(tmp_path / "bids", {"sub-01/anat/sub-01_T1w.nii.gz": b"x"})
    result = run_cli("train", "prepare", bids, tmp_path / "prep", "--participant-label", "01", "98", "99")
    assert result.returncode == 66 and "98, 99" in result.stderr, result.stderr[-2000:]


def test_tissue_classes_follow_t1w_intensity_and_leave_no_temporary_files(tmp_path, monkeypatch):
    """Atropos on a synthetic head: its white matter is the T1w's, and nothing stays behind in
    the temp dir (antspyx writes three probability images per call there and keeps them)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    head = synthetic_head("ras", shape=(40, 48, 40), zooms=(3.0, 3.0, 3.0))
    brain, truth = head["mask"] > 0, head["wm"] > 0
    t1w = head["t1w"].copy()
    t1w[brain & ~binary_erosion(brain, iterations=2)] = 150.0  # a CSF shell: grey 600, white 850
    tissues = tissue_classes(nib.Nifti1Image(t1w, head["affine"]), brain)
    assert (tissues.wm & truth).sum() / (tissues.wm | truth).sum() > 0.8
    assert not (tissues.wm & tissues.csf).any()
    assert list(tmp_path.iterdir()) == []
