"""Held-out evaluation of the translators against the teacher, with baselines.

The evaluation protocol (docs/training.md, "Evaluation protocol"): every map is compared as a
3D volume on the T1w's own grid, inside the teacher's brain mask intersected with the DWI's
measured field of view (manifest column ``fov`` when present and non-empty; the brain mask
alone for older prep dirs), and in the white matter inside that mask.

* phase 1: FA (clipped to [0, 1]) MAE, Pearson r, bias and spread ratio, PSNR and SSIM (3D,
  data range 1, window 7, the SSIM map averaged inside the mask), MD MAE and r, V1 sign-free
  angular error where the teacher's FA > 0.3; each in the brain and in white matter. The
  mask head is scored apart (Dice inside the FOV). Baselines (``baselines``):
  ``intensity``, FA from T1w intensity alone (mean FA per normalised-intensity bin, fitted on
  the training subjects); ``atlas``, a population FA template warped to the T1w
  (:mod:`m2m_app.training.atlas`), always registered to the brain-extracted T1w; and a
  reference, ``grid``: the teacher's FA through the model grid and back (linear). Brain
  extraction zeroes the T1w outside the teacher's brain mask grown by
  :data:`~m2m_app.maths.grid.STRIPPED_MARGIN_MM`. With ``skull_strip`` every method scores a
  brain-extracted T1w instead, as brain-extracted inputs are common.
* phase 2: Pearson r and Dice (relative density above a threshold) of the track density,
  DEC-TDI angular error where the teacher's density is high. Baseline: TDI = f(FA) (mean
  relative density per FA bin, fitted on the training subjects) with colour FA as direction.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from m2m_app.data.atlases import ATLASES
from m2m_app.errors import MissingInputError, UsageError
from m2m_app.inference.predict import load_fa_detail, load_translator, predict_phase1, predict_phase2
from m2m_app.io.files import read_tsv, save_tsv
from m2m_app.io.manifest import select_rows
from m2m_app.io.naming import Subject
from m2m_app.io.nifti import load_image, load_t1w, save_nifti
from m2m_app.maths.detail import BinnedRegression, FaDetail
from m2m_app.maths.grid import STRIPPED_MARGIN_MM, brain_extraction_mask, normalise_intensity
from m2m_app.maths.metrics import angular_error_deg, dice, masked_ssim, pearson, psnr
from m2m_app.maths.regions import region_means
from m2m_app.maths.streamlines import fraction_near, track_density
from m2m_app.maths.tensor import tensor_derivatives
from m2m_app.maths.warp import grid_points, sample
from m2m_app.models.phases import get_phase, phase1_inputs, relative_tdi
from m2m_app.registration.parcellation import TEACHER_TRACK, region_paths, tractogram_connectome

log = logging.getLogger(__name__)

#: V1 angular errors are measured where the teacher's FA exceeds this.
FA_ANGLE_THRESHOLD = 0.3
#: Relative track density (1 = the 99th percentile) above which a voxel counts as "tracked" for Dice.
DICE_DENSITY = 0.1
#: Relative track density above which DEC-TDI directions are compared.
HIGH_DENSITY = 0.5
#: Phase-1 baselines (``--baseline``) and the ``method`` their rows carry.
#: ``grid`` is a reference, not a baseline: the teacher's own FA resampled onto m2m's model grid
#: and back, the best any prediction on that grid could score (what the grid alone costs).
BASELINES = {"intensity": "baseline_fa_from_t1w", "atlas": "baseline_fa_atlas", "grid": "reference_teacher_via_grid"}


def _mae_and_r(pred: np.ndarray, true: np.ndarray) -> tuple[float, float]:
    """Mean absolute error and Pearson r of two flat arrays (NaN, NaN when empty)."""
    if not true.size:
        return float("nan"), float("nan")
    return float(np.abs(pred - true).mean()), pearson(pred, true)


def fa_metrics(pred_fa: np.ndarray, true_fa: np.ndarray, brain: np.ndarray, wm: np.ndarray) -> dict[str, float]:
    """FA agreement of two volumes ``(X, Y, Z)`` in ``brain`` and in ``wm & brain`` (bool masks).

    Both FA maps are clipped to [0, 1]. Per region (suffix ``_brain``/``_wm``): MAE, Pearson
    r, bias (mean predicted minus teacher FA), spread (standard deviation of predicted over
    teacher FA: below 1 the prediction compresses the FA range), PSNR (dB, peak 1, over the
    region's voxels) and SSIM (3D, window 7, data range 1, both maps zeroed outside
    ``brain``, the SSIM map averaged over the region).
    """
    pred_fa, true_fa = np.clip(pred_fa, 0.0, 1.0), np.clip(true_fa, 0.0, 1.0)
    out: dict[str, float] = {}
    for name, region in (("brain", brain), ("wm", wm & brain)):
        pred, true = pred_fa[region], true_fa[region]
        nan = float("nan")
        out[f"fa_mae_{name}"], out[f"fa_r_{name}"] = _mae_and_r(pred, true)
        out[f"fa_bias_{name}"] = float((pred - true).mean()) if true.size else nan
        out[f"fa_spread_{name}"] = float(pred.std() / true.std()) if true.size and true.std() > 0 else nan
        out[f"fa_psnr_{name}"] = psnr(pred, true) if true.size else nan
        out[f"fa_ssim_{name}"] = masked_ssim(pred_fa, true_fa, brain, within=region)
    return out


def phase1_metrics(
    pred_maps: dict[str, np.ndarray], true_tensor: np.ndarray, brain: np.ndarray, wm: np.ndarray
) -> dict[str, float]:
    """Phase-1 metrics of predicted maps vs the teacher's tensors ``(X, Y, Z, 6)`` (mm²/s) within ``brain``/``wm``.

    ``pred_maps`` holds the predicted ``fa``, ``md`` ``(X, Y, Z)`` and ``v1`` ``(X, Y, Z, 3)`` as
    m2m writes them (:func:`~m2m_app.inference.predict.predict_phase1`); ``brain``, ``wm`` bool.
    :func:`fa_metrics`, then MD MAE (mm²/s) and r, and the mean V1 angular error (degrees)
    where the teacher's FA > :data:`FA_ANGLE_THRESHOLD`, each in the brain and in WM.
    """
    pred, true = {key: pred_maps[key][brain] for key in ("fa", "md", "v1")}, tensor_derivatives(true_tensor[brain])
    pred_fa, true_fa = np.zeros(brain.shape), np.zeros(brain.shape)
    pred_fa[brain], true_fa[brain] = pred["fa"], true["fa"]
    in_wm = (wm & brain)[brain]
    fibres = true["fa"] > FA_ANGLE_THRESHOLD
    angles = angular_error_deg(pred["v1"], true["v1"])
    out = fa_metrics(pred_fa, true_fa, brain, wm)
    for name, region in (("brain", np.ones_like(in_wm)), ("wm", in_wm)):
        out[f"md_mae_{name}"], out[f"md_r_{name}"] = _mae_and_r(pred["md"][region], true["md"][region])
        chosen = angles[region & fibres]
        out[f"v1_angle_deg_{name}"] = float(np.nanmean(chosen)) if np.isfinite(chosen).any() else float("nan")
    return out


def phase2_metrics(
    pred_tdi: np.ndarray, pred_dec: np.ndarray, true_tdi: np.ndarray, true_dec: np.ndarray, brain: np.ndarray
) -> dict[str, float]:
    """Phase-2 metrics; ``*_tdi`` are relative densities ``(X, Y, Z)``, ``*_dec`` ``(X, Y, Z, 3)``.

    Dice compares voxels above :data:`DICE_DENSITY`; the DEC angular error (degrees) is
    averaged where the teacher's density exceeds :data:`HIGH_DENSITY`.
    """
    pred_on, true_on = (pred_tdi > DICE_DENSITY) & brain, (true_tdi > DICE_DENSITY) & brain
    dense = (true_tdi > HIGH_DENSITY) & brain
    angles = angular_error_deg(pred_dec[dense], true_dec[dense])
    return {
        "tdi_r_brain": pearson(pred_tdi[brain], true_tdi[brain]),
        "tdi_dice": dice(pred_on, true_on),
        "dec_angle_deg": float(np.nanmean(angles)) if np.isfinite(angles).any() else float("nan"),
    }


def _mask(prep: Path, row: dict, column: str) -> np.ndarray:
    return load_image(prep / row[column])[1] > 0


def evaluation_masks(prep: Path, row: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mask, wm, fov)`` of a manifest row: the teacher's brain mask ∩ the measured DWI field of
    view, white matter inside it, and the FOV itself (all true when the row has no ``fov``)."""
    brain = _mask(prep, row, "mask")
    fov = _mask(prep, row, "fov") if row.get("fov") else np.ones(brain.shape, bool)
    mask = brain & fov
    return mask, _mask(prep, row, "wm") & mask, fov


def fa_by_intensity(rows: list[tuple[dict, Path]]) -> BinnedRegression:
    """Mean teacher FA per normalised-T1w-intensity bin (64 bins on [0, 1]) over the evaluation masks
    of ``rows`` (``(manifest row, prep dir)``): the intensity baseline, and the T1w detail transfer's lookup."""
    lookup = BinnedRegression(0.0, 1.0)
    for row, prep in rows:
        mask = evaluation_masks(prep, row)[0]
        lookup.fit(normalise_intensity(load_t1w(row["t1w"])[1])[mask], load_image(prep / row["fa"])[1][mask])
    return lookup


def _evaluate_phase1(
    rows: list,
    train_rows: list,
    model,
    device: str,
    skull_strip: bool,
    baselines: tuple[str, ...],
    fa_detail: FaDetail | None = None,
) -> list[dict]:
    intensity = fa_by_intensity(train_rows if "intensity" in baselines else [])
    results = []
    for row, prep in rows:
        img, data = load_t1w(row["t1w"])
        mask, wm, fov = evaluation_masks(prep, row)
        brain_t1w = data  # brain-extracted below where a method needs it
        if skull_strip or "atlas" in baselines:
            extracted = brain_extraction_mask(_mask(prep, row, "mask"), STRIPPED_MARGIN_MM, img.header.get_zooms()[:3])
            brain_t1w = np.where(extracted, data, 0)
        if skull_strip:
            data = brain_t1w
        true_tensor = load_image(prep / row["diffusivity"])[1]
        pred = predict_phase1(img, data, model=model, device=device, mask_tensor=False, fa_detail=fa_detail)
        results.append(
            {
                "subject": row["subject"],
                "method": "m2m",
                **phase1_metrics(pred, true_tensor, mask, wm),
                "mask_dice": dice(pred["mask"] & fov, mask),
            }
        )
        true_fa = load_image(prep / row["fa"])[1]
        for name in baselines:
            if name == "intensity":
                fa = intensity.predict(normalise_intensity(data))
            elif name == "grid":
                fa = np.clip(pred["grid"].to_source(pred["grid"].to_model(true_fa)), 0.0, 1.0)
            else:
                from m2m_app.training.atlas import warp_atlas_fa

                # registered brain to brain: the template T1 is skull-stripped, and with the
                # scalp kept the registration slid along the head (inferior-superior)
                fa = warp_atlas_fa(nib.Nifti1Image(brain_t1w.astype(np.float32), img.affine))
            results.append({"subject": row["subject"], "method": BASELINES[name], **fa_metrics(fa, true_fa, mask, wm)})
    return results


def _evaluate_phase2(rows: list, train_rows: list, model, device: str, predicted_inputs: Path | None) -> list[dict]:
    baseline = BinnedRegression(0.0, 1.0)
    for row, prep in train_rows:
        mask = evaluation_masks(prep, row)[0]
        density = relative_tdi(load_image(prep / row["tdi"])[1], mask)
        baseline.fit(load_image(prep / row["fa"])[1][mask], density[mask])
    results = []
    for row, prep in rows:
        source = predicted_inputs or prep
        fa, md, colfa = (load_image(source / row[c])[1] for c in ("fa", "md", "colfa"))
        _, grid = phase1_inputs(*load_t1w(row["t1w"]))
        mask = evaluation_masks(prep, row)[0]
        true_tdi = relative_tdi(load_image(prep / row["tdi"])[1], mask)
        true_dec = load_image(prep / row["dectdi"])[1]
        pred = predict_phase2(fa, md, colfa, grid, mask=mask, model=model, device=device)
        results.append(
            {
                "subject": row["subject"],
                "method": "m2m",
                **phase2_metrics(pred["tdi"], pred["dectdi"], true_tdi, true_dec, mask),
            }
        )
        results.append(
            {
                "subject": row["subject"],
                "method": "baseline_tdi_from_fa",
                **phase2_metrics(np.where(mask, baseline.predict(fa), 0.0), colfa, true_tdi, true_dec, mask),
            }
        )
    return results


def evaluate_phase(
    spec_name: str,
    prep_dir: str | os.PathLike,
    weights_dir: str | os.PathLike | None,
    test_subjects: list[str],
    train_subjects: list[str] | None = None,
    out_tsv: str | os.PathLike | None = None,
    device: str = "auto",
    predicted_inputs: str | os.PathLike | None = None,
    skull_strip: bool = False,
    baselines: tuple[str, ...] = ("intensity",),
) -> list[dict]:
    """Per-subject metrics of the trained translator and of its baselines on held-out subjects.

    Parameters
    ----------
    spec_name : ``phase1`` or ``phase2``.
    prep_dir : the prep dir holding the teacher maps of every subject.
    weights_dir : folder with ``<phase>.safetensors``/``.json`` (None: the packaged weights).
    test_subjects : held-out subjects (``sub-01``, ``01`` or ``sub-01_ses-a``).
    train_subjects : subjects the intensity baselines are fitted on (default: every ``ok``
        unit of another participant; a tested participant's other sessions never count).
    out_tsv : where to write the table (tab-separated, one row per subject and method).
    predicted_inputs : phase 2 only: take FA/MD/colour FA from this folder of phase-1
        predictions (prep-dir layout) instead of the teacher's.
    skull_strip : phase 1 only: score every method on the skull-stripped T1w.
    baselines : phase 1: any of :data:`BASELINES` (``intensity``, ``atlas``, ``grid``); phase 2 always
        scores its TDI-from-FA baseline and takes only the default.

    Returns the rows: ``subject``, ``method`` (``m2m`` or ``baseline_*``) and the metrics.
    """
    spec = get_phase(spec_name)
    if skull_strip and spec.name != "phase1":
        raise UsageError("skull_strip only applies to phase1 (its input is the T1w)")
    unknown = sorted(set(baselines) - set(BASELINES))
    if unknown:
        raise UsageError(f"unknown baseline(s) {', '.join(unknown)}; choose from {', '.join(BASELINES)}")
    if spec.name != "phase1" and tuple(baselines) != ("intensity",):
        raise UsageError("the intensity, atlas and grid baselines are phase-1 (FA) baselines")
    if "atlas" in baselines:
        from m2m_app.training.atlas import load_atlas

        load_atlas()  # fails now, with its message, if the template is missing
    rows = select_rows([Path(prep_dir)], test_subjects)
    tested = {row["participant"] for row, _ in rows}
    train_rows = [
        (row, prep) for row, prep in select_rows([Path(prep_dir)], train_subjects) if row["participant"] not in tested
    ]
    model, _ = load_translator(spec.name, weights_dir)
    if spec.name == "phase1":
        results = _evaluate_phase1(
            rows, train_rows, model, device, skull_strip, tuple(dict.fromkeys(baselines)), load_fa_detail(weights_dir)
        )
    else:
        predicted = Path(predicted_inputs) if predicted_inputs else None
        results = _evaluate_phase2(rows, train_rows, model, device, predicted)
    for method in sorted({r["method"] for r in results}):
        chosen = [r for r in results if r["method"] == method]
        log.info(
            "%s %s: %s",
            spec.name,
            method,
            ", ".join(
                f"{k} {np.nanmean([r[k] for r in chosen]):.4g}" for k in chosen[0] if k not in ("subject", "method")
            ),
        )
    if out_tsv is not None:
        save_tsv(results, Path(out_tsv), missing="")
    return results


def write_phase1_predictions(
    prep_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    weights_dir: str | os.PathLike | None,
    subjects: list[str] | None,
    device: str = "auto",
) -> list[Path]:
    """Predict FA, MD and colour FA from each subject's T1w into ``out_dir`` (prep-dir layout).

    The maps are the ones m2m writes (:func:`~m2m_app.inference.predict.predict_phase1`). The
    files take the manifest's relative paths, so ``out_dir`` can be passed as
    ``predicted_inputs`` to phase-2 training and evaluation.
    """
    model, _ = load_translator("phase1", weights_dir)
    written = []
    for row, _prep in select_rows([Path(prep_dir)], subjects):
        img, data = load_t1w(row["t1w"])
        maps = predict_phase1(img, data, model=model, device=device)
        for key in ("fa", "md", "colfa"):
            written.append(save_nifti(maps[key], img.affine, Path(out_dir) / row[key]))
        log.info("%s: phase-1 predictions written", row["subject"])
    return written


def tractogram_metrics(
    predicted: list[np.ndarray],
    teacher: list[np.ndarray],
    shape: tuple[int, int, int],
    affine: np.ndarray,
    brain: np.ndarray,
) -> dict[str, float]:
    """Agreement of a predicted tractogram with the teacher's, both in world mm on one grid.

    TDI Pearson r in the brain, Dice of the voxels visited by any streamline, and the
    fraction of predicted streamlines within 2 mm (mean closest-point distance) of the
    teacher's points and vice versa.
    """
    pred_tdi, true_tdi = track_density(predicted, shape, affine), track_density(teacher, shape, affine)
    return {
        "tdi_r_brain": pearson(pred_tdi[brain], true_tdi[brain]),
        "visited_dice": dice((pred_tdi > 0) & brain, (true_tdi > 0) & brain),
        "predicted_near_teacher": fraction_near(predicted, teacher),
        "teacher_near_predicted": fraction_near(teacher, predicted),
        "n_predicted": len(predicted),
        "n_teacher": len(teacher),
    }


def _teacher_parcellation(prep_dir: Path, subject: Subject, atlas_name: str, needed: str) -> tuple:
    """The teacher's region files, labels ``(X, Y, Z)`` int16 and their image (``needed``: the key of
    :func:`region_paths` that must exist)."""
    paths = region_paths(prep_dir, subject, atlas_name, TEACHER_TRACK)
    if not paths[needed].exists():
        raise MissingInputError(f"{subject.label}: no teacher {paths[needed].name}; run m2m-train prepare")
    labels_img, labels = load_image(paths["dseg"])
    return paths, labels_img, np.rint(labels).astype(np.int16)


def _fa_on(labels_img: nib.Nifti1Image, shape: tuple[int, ...], predicted_fa: Path) -> np.ndarray:
    """m2m's FA map resampled trilinearly onto the parcellation's grid."""
    fa_img, fa = load_image(predicted_fa)
    return sample(fa, fa_img.affine, grid_points(shape, labels_img.affine)).reshape(shape)


def region_fa_metrics(predicted_fa: Path, prep_dir: Path, subject: Subject, atlas_name: str) -> dict[str, float]:
    """Agreement of m2m's region FA with the teacher's on the teacher's parcellation (``m2m-train
    prepare``'s ``seg-<atlas>`` files, limited to the DWI's field of view), so that only the
    prediction differs, not the registration: ``region_fa_rel_diff``, the mean over the regions
    both cover of |FA_m2m − FA_teacher| / FA_teacher (region means); ``region_fa_r``, Pearson r of
    the region means; ``regions_compared``."""
    paths, labels_img, labels = _teacher_parcellation(prep_dir, subject, atlas_name, "regions")
    return _region_fa_scores(paths, labels, _fa_on(labels_img, labels.shape, predicted_fa), atlas_name)


def _region_fa_scores(paths: dict[str, Path], labels: np.ndarray, fa: np.ndarray, atlas_name: str) -> dict[str, float]:
    """:func:`region_fa_metrics` from the teacher's files, its labels and m2m's FA on their grid."""
    teacher_fa = np.array(
        [float(row["fa_mean"]) if row["fa_mean"] != "n/a" else np.nan for row in read_tsv(paths["regions"])]
    )
    our_fa = region_means(fa, labels, np.array([r.index for r in ATLASES[atlas_name]().regions()]))
    both = np.isfinite(teacher_fa) & np.isfinite(our_fa) & (teacher_fa > 0)
    return {
        "region_fa_rel_diff": float(np.mean(np.abs(our_fa[both] - teacher_fa[both]) / teacher_fa[both])),
        "region_fa_r": pearson(our_fa[both], teacher_fa[both]),
        "regions_compared": int(both.sum()),
    }


def connectome_metrics(
    predicted: list[np.ndarray], predicted_fa: Path, prep_dir: Path, subject: Subject, atlas_name: str
) -> dict[str, float]:
    """Agreement of m2m's connectome with the teacher's on the teacher's parcellation (as
    :func:`region_fa_metrics`): m2m's streamlines (world mm) go through the same end-point rule.

    ``edge_r``: Pearson r of the two count matrices over the upper triangle; ``edge_r_log``: the
    same on log(1 + count); ``assigned_fraction``: m2m's streamlines with both ends assigned; and
    :func:`region_fa_metrics`.
    """
    paths, labels_img, labels = _teacher_parcellation(prep_dir, subject, atlas_name, "count")
    atlas = ATLASES[atlas_name]()
    fa = _fa_on(labels_img, labels.shape, predicted_fa)
    ours, _, assigned = tractogram_connectome(predicted, labels, labels_img.affine, fa, atlas)
    rows = read_tsv(paths["count"])
    theirs = np.array([[float(row[r["Node"]]) for r in rows] for row in rows])
    upper = np.triu_indices(len(theirs), 1)
    return {
        "edge_r": pearson(ours[upper], theirs[upper]),
        "edge_r_log": pearson(np.log1p(ours[upper]), np.log1p(theirs[upper])),
        "assigned_fraction": assigned / max(len(predicted), 1),
        **_region_fa_scores(paths, labels, fa, atlas_name),  # the FA resampled once for both
    }
