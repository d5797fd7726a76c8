"""The evaluation protocol: masked 3D SSIM, FOV restriction, leave-one-person-out folds, atlas baseline."""

from __future__ import annotations

import importlib.util

import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from m2m_app.errors import UsageError
from m2m_app.io.files import save_tsv
from m2m_app.io.manifest import COLUMNS
from m2m_app.maths.metrics import masked_ssim, pearson
from m2m_app.training.evaluate import evaluation_masks, fa_metrics
from m2m_app.training.folds import held_out_rows, leave_one_person_out


def test_ssim_of_identical_volumes_is_one_and_matches_the_closed_form_for_constants():
    rng = np.random.default_rng(0)
    volume = gaussian_filter(rng.uniform(0, 1, (20, 22, 18)), 1.0)
    mask = np.zeros(volume.shape, bool)
    mask[3:17, 4:18, 2:15] = True
    assert masked_ssim(volume, volume, mask) == pytest.approx(1.0)
    # constant maps, mask = whole volume: no variance, SSIM = (2xy + C1) / (x² + y² + C1), C1 = (0.01·1)²
    full = np.ones((12, 12, 12), bool)
    x, y, c1 = 0.5, 0.3, 1e-4
    expected = (2 * x * y + c1) / (x * x + y * y + c1)
    assert masked_ssim(np.full(full.shape, x), np.full(full.shape, y), full) == pytest.approx(expected, rel=1e-6)
    # noise lowers it
    noisy = np.clip(volume + rng.normal(0, 0.2, volume.shape), 0, 1)
    assert masked_ssim(noisy, volume, mask) < 0.9


def _save(data: np.ndarray, path) -> str:
    nib.save(nib.Nifti1Image(data.astype(np.uint8), np.diag([2.0, 2.0, 2.0, 1.0])), path)
    return path.name


def test_metrics_ignore_everything_outside_the_measured_fov(tmp_path):
    rng = np.random.default_rng(1)
    shape = (24, 24, 24)
    brain = np.zeros(shape, bool)
    brain[2:22, 2:22, 2:22] = True
    fov = np.zeros(shape, bool)
    fov[:, :, 10:] = True  # a partial slab
    wm = brain & (rng.uniform(size=shape) > 0.5)
    row = {
        "mask": _save(brain, tmp_path / "brain.nii.gz"),
        "wm": _save(wm, tmp_path / "wm.nii.gz"),
        "fov": _save(fov, tmp_path / "fov.nii.gz"),
    }
    mask, wm_in, fov_read = evaluation_masks(tmp_path, row)
    assert np.array_equal(mask, brain & fov) and np.array_equal(wm_in, wm & fov) and np.array_equal(fov_read, fov)
    assert np.array_equal(evaluation_masks(tmp_path, {**row, "fov": ""})[0], brain)  # older prep dirs
    truth = gaussian_filter(rng.uniform(0, 1, shape), 1.0)
    pred = np.clip(truth + rng.normal(0, 0.05, shape), 0, 1)
    spoilt = np.where(fov, pred, rng.uniform(0, 1, shape))  # garbage where no DWI was measured
    inside = fa_metrics(pred, truth, mask, wm_in)
    assert fa_metrics(spoilt, truth, mask, wm_in) == inside
    assert fa_metrics(spoilt, truth, brain, wm)["fa_mae_brain"] > inside["fa_mae_brain"]  # without the FOV it counts


def test_leave_one_person_out_never_splits_a_person():
    rng = np.random.default_rng(2)
    sessions = {"01": [""], "02": ["hfs", "hfp", "hfdl", "hfdr"], "03": ["1", "2"]}
    rows = [
        {"participant": p, "session": s, "subject": f"sub-{p}" + (f"_ses-{s}" if s else "")}
        for p, ss in sessions.items()
        for s in ss
    ]
    rows = [rows[i] for i in rng.permutation(len(rows))]
    folds = leave_one_person_out(rows)
    assert [f.test for f in folds] == ["sub-01", "sub-02", "sub-03"]
    person = {row["subject"]: f"sub-{row['participant']}" for row in rows}
    for fold in folds:
        assert {person[u] for u in fold.test_units} == {fold.test}
        assert fold.test not in {person[u] for u in fold.train_units}
        assert set(fold.test_units) | set(fold.train_units) == set(person)
        assert set(fold.train) == {f"sub-{p}" for p in sessions} - {fold.test}
    assert len(folds[1].test_units) == 4 and len(folds[1].train_units) == 3
    with pytest.raises(UsageError):
        leave_one_person_out([r for r in rows if r["participant"] == "02"])


def test_held_out_rows_leave_out_every_session_of_a_trained_person(tmp_path):
    sessions = {"01": [""], "02": ["hfs", "hfp", "hfdl", "hfdr"], "03": ["1", "2"]}
    rows = [
        {"participant": p, "session": s, "subject": f"sub-{p}" + (f"_ses-{s}" if s else ""), "status": "ok"}
        for p, ss in sessions.items()
        for s in ss
    ]
    save_tsv(rows, tmp_path / "manifest.tsv", list(COLUMNS), missing="")
    # one session of sub-02 trained on is enough to hold none of its sessions out
    held_out = held_out_rows(tmp_path, ["sub-01", "sub-02_ses-hfp"])
    assert [row["subject"] for row, _ in held_out] == ["sub-03_ses-1", "sub-03_ses-2"]
    assert {prep for _, prep in held_out} == {tmp_path}
    assert len(held_out_rows(tmp_path, [])) == len(rows)


def _phantom(shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A smooth head-like T1 (ellipsoid with texture) and an FA map that follows its bright parts."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    inside = (grid**2 / np.array([0.8, 0.85, 0.75])[:, None, None, None] ** 2).sum(0) < 1
    texture = gaussian_filter(rng.normal(size=shape), 2.0)
    t1 = np.where(inside, 0.5 + 2.0 * texture, 0.0).clip(0, None)
    fa = np.where(inside, np.clip(0.2 + 2.0 * texture, 0, 1), 0.0)
    return t1.astype(np.float32), fa.astype(np.float32)


@pytest.mark.slow
def test_atlas_baseline_recovers_a_known_shift():
    """The subject is the template moved by 6 mm: the warped FA must land on the subject's."""
    pytest.importorskip("ants")
    from nilearn.image import resample_to_img

    from m2m_app.training.atlas import Atlas, warp_atlas_fa

    t1, fa = _phantom((40, 44, 38), seed=3)
    template_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    template_affine[:3, 3] = -np.array(t1.shape) + 1.0
    subject_affine = template_affine.copy()
    subject_affine[:3, 3] += (6.0, -4.0, 4.0)
    atlas = Atlas(t1=nib.Nifti1Image(t1, template_affine), fa=nib.Nifti1Image(fa, template_affine))
    subject = nib.Nifti1Image(t1, subject_affine)
    warped = warp_atlas_fa(subject, atlas)
    assert warped.shape == t1.shape and warped.min() >= 0 and warped.max() <= 1
    unregistered = resample_to_img(
        atlas.fa, subject, interpolation="linear", force_resample=True, copy_header=True
    ).get_fdata()
    head = t1 > 0
    assert pearson(warped[head], fa[head]) > 0.9
    assert pearson(warped[head], fa[head]) > pearson(unregistered[head], fa[head]) + 0.2


def test_atlas_needs_tractseg_and_says_so(monkeypatch):
    from m2m_app.training import atlas

    def missing(name):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(atlas.resources, "files", missing)
    with pytest.raises(UsageError, match="tractseg"):
        atlas.tractseg_fa_template()


@pytest.mark.skipif(importlib.util.find_spec("tractseg") is None, reason="tractseg (extra [atlas]) not installed")
def test_tractseg_template_is_the_fsl_mni152_grid():
    """The shipped template is what the atlas module says it is: 1.25 mm on FSL's MNI152 (NLin6) grid."""
    from m2m_app.training.atlas import tractseg_fa_template

    img = tractseg_fa_template()
    assert img.shape == (145, 174, 145)
    assert np.allclose(img.header.get_zooms()[:3], 1.25)
    assert np.allclose(img.affine[:3, 3], (90, -126, -72))
    assert 0.0 <= float(np.min(img.dataobj)) and float(np.max(img.dataobj)) <= 1.0


def test_model_card_table_gives_each_fold_and_the_mean_of_the_folds(tmp_path):
    """Sessions are averaged within a fold, then the three folds weigh the same."""
    import importlib.util as util
    from pathlib import Path

    spec = util.spec_from_file_location("tables", Path(__file__).parents[1] / "scripts" / "model_card_tables.py")
    tables = util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    values = {"loso-test-sub-01": [0.6], "loso-test-sub-02": [0.2, 0.4, 0.6, 0.8], "loso-test-sub-03": [0.9, 0.7]}
    for folder, rs in values.items():
        (tmp_path / folder).mkdir()
        lines = ["subject\tmethod\tfa_r_brain"] + [f"s{i}\tm2m\t{r}" for i, r in enumerate(rs)]
        lines += [f"s{i}\tbaseline_fa_atlas\t{r / 2}" for i, r in enumerate(rs)]
        (tmp_path / folder / "phase1_heldout.tsv").write_text("\n".join(lines) + "\n")
    rows = tables.table(tmp_path, "phase1_heldout.tsv", ("fa_r_brain",))
    assert "| sub-02 (Siemens, 4 sessions) | m2m | 0.500 |" in rows
    assert "| **mean of 3 folds** | m2m | 0.633 |" in rows  # (0.6 + 0.5 + 0.8) / 3
    assert "| **mean of 3 folds** | baseline_fa_atlas | 0.317 |" in rows
    (tmp_path / "loso-test-sub-03" / "phase1_heldout.tsv").unlink()
    assert not any("mean of" in row for row in tables.table(tmp_path, "phase1_heldout.tsv", ("fa_r_brain",)))


def test_fa_metrics_measure_bias_and_compression():
    """A prediction squeezed towards its mean keeps r = 1 but shows its spread (< 1) and bias."""
    from m2m_app.training.evaluate import fa_metrics

    rng = np.random.default_rng(0)
    truth = rng.uniform(0.1, 0.8, (12, 12, 12))
    brain = np.ones(truth.shape, bool)
    wm = truth > 0.3
    exact = fa_metrics(truth, truth, brain, wm)
    assert exact["fa_bias_wm"] == 0.0 and exact["fa_spread_wm"] == pytest.approx(1.0)
    squeezed = fa_metrics(0.25 + 0.5 * (truth - 0.25), truth, brain, wm)
    assert squeezed["fa_r_wm"] == pytest.approx(1.0) and squeezed["fa_spread_wm"] == pytest.approx(0.5)
    assert squeezed["fa_bias_wm"] < -0.1 and squeezed["fa_mae_wm"] == pytest.approx(-squeezed["fa_bias_wm"])
