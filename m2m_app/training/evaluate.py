"""Held-out evaluation of the translators against the teacher, with simple baselines.

* phase 1: FA MAE and Pearson r (brain, white matter), MD MAE, V1 angular error where the
  teacher's FA > 0.3, FA PSNR and SSIM, all from the tensor head inside the teacher's brain
  mask; the mask head is scored apart (Dice). Baseline: FA from T1w intensity alone (mean
  FA per normalised-intensity bin, fitted on the training subjects). With ``skull_strip``
  both score a skull-stripped T1w instead (zeroed outside the teacher's brain mask grown by
  :data:`~m2m_app.inference.conform.STRIPPED_MARGIN_MM`), as brain-extracted inputs are common.
* phase 2: Pearson r and Dice (relative density above a threshold) of the track density,
  DEC-TDI angular error where the teacher's density is high. Baseline: TDI = f(FA) (mean
  relative density per FA bin, fitted on the training subjects) with colour FA as direction.

All maps are compared on the T1w's own grid.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from m2m_app.errors import UsageError
from m2m_app.inference.conform import STRIPPED_MARGIN_MM, brain_extraction_mask, normalise_intensity
from m2m_app.inference.predict import load_translator, predict_phase1, predict_phase2
from m2m_app.io.nifti import load_image, load_t1w, save_nifti, save_tsv
from m2m_app.maths.streamlines import dice, fraction_near, track_density
from m2m_app.maths.tensor import tensor_derivatives
from m2m_app.models.phases import get_phase, phase1_inputs, relative_tdi
from m2m_app.training.loop import select_rows

log = logging.getLogger(__name__)

#: V1 angular errors are measured where the teacher's FA exceeds this.
FA_ANGLE_THRESHOLD = 0.3
#: Relative track density (1 = the 99th percentile) above which a voxel counts as "tracked" for Dice.
DICE_DENSITY = 0.1
#: Relative track density above which DEC-TDI directions are compared.
HIGH_DENSITY = 0.5


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two flat arrays (NaN when either is constant)."""
    a, b = a.astype(float) - a.mean(), b.astype(float) - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else float("nan")


def angular_error_deg(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Sign-free angle (degrees) between vectors ``(..., 3)``; NaN where either is zero."""
    norms = np.linalg.norm(u, axis=-1) * np.linalg.norm(v, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = np.abs((u * v).sum(-1)) / norms
    return np.degrees(np.arccos(np.clip(cosine, 0.0, 1.0)))


def psnr(prediction: np.ndarray, truth: np.ndarray, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio (dB)."""
    mse = float(np.mean((prediction.astype(float) - truth) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(data_range ** 2 / mse)


def ssim(prediction: np.ndarray, truth: np.ndarray, data_range: float = 1.0) -> float:
    """Structural similarity of two volumes (scikit-image when installed, else a Gaussian-window SSIM)."""
    try:
        from skimage.metrics import structural_similarity
    except ImportError:
        from scipy.ndimage import gaussian_filter

        c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
        x, y = prediction.astype(float), truth.astype(float)
        mx, my = gaussian_filter(x, 1.5), gaussian_filter(y, 1.5)
        vx, vy = gaussian_filter(x * x, 1.5) - mx ** 2, gaussian_filter(y * y, 1.5) - my ** 2
        cov = gaussian_filter(x * y, 1.5) - mx * my
        return float(np.mean((2 * mx * my + c1) * (2 * cov + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))))
    return float(structural_similarity(prediction.astype(float), truth.astype(float), data_range=data_range))


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """Smallest box holding ``mask``."""
    where = np.argwhere(mask)
    return tuple(slice(lo, hi + 1) for lo, hi in zip(where.min(0), where.max(0)))


def fa_metrics(pred_fa: np.ndarray, true_fa: np.ndarray, brain: np.ndarray, wm: np.ndarray) -> dict[str, float]:
    """FA MAE / Pearson r in the brain and in WM, and FA PSNR / SSIM in the brain's bounding box.

    Two more describe the WM FA distribution: ``fa_bias_wm`` (mean predicted minus teacher
    FA) and ``fa_spread_wm`` (standard deviation of predicted over teacher FA: below 1 the
    prediction compresses the FA range).
    """
    box = _bounding_box(brain)
    inside_pred, inside_true = np.where(brain, pred_fa, 0)[box], np.where(brain, true_fa, 0)[box]
    error, nan = pred_fa - true_fa, float("nan")
    in_wm = {"fa_mae_wm": nan, "fa_r_wm": nan, "fa_bias_wm": nan, "fa_spread_wm": nan}
    if wm.any():
        pred_wm, true_wm = pred_fa[wm], true_fa[wm]
        in_wm = {"fa_mae_wm": float(np.abs(error[wm]).mean()), "fa_r_wm": pearson(pred_wm, true_wm),
                 "fa_bias_wm": float(error[wm].mean()),
                 "fa_spread_wm": float(pred_wm.std() / true_wm.std()) if true_wm.std() > 0 else nan}
    return {"fa_mae_brain": float(np.abs(error[brain]).mean()), "fa_r_brain": pearson(pred_fa[brain], true_fa[brain]),
            **in_wm, "fa_psnr": psnr(inside_pred, inside_true), "fa_ssim": ssim(inside_pred, inside_true)}


def phase1_metrics(pred_tensor: np.ndarray, true_tensor: np.ndarray, brain: np.ndarray,
                   wm: np.ndarray) -> dict[str, float]:
    """Phase-1 metrics of predicted vs teacher tensors ``(X, Y, Z, 6)`` (mm²/s) within ``brain``/``wm`` (bool).

    MD MAE is in mm²/s, the V1 angular error in degrees (mean where teacher FA > 0.3).
    """
    pred, true = tensor_derivatives(pred_tensor[brain]), tensor_derivatives(true_tensor[brain])
    pred_fa, true_fa = np.zeros(brain.shape), np.zeros(brain.shape)
    pred_fa[brain], true_fa[brain] = pred["fa"], true["fa"]
    fibres = true["fa"] > FA_ANGLE_THRESHOLD
    angles = angular_error_deg(pred["v1"][fibres], true["v1"][fibres])
    return {**fa_metrics(pred_fa, true_fa, brain, wm & brain),
            "md_mae_brain": float(np.abs(pred["md"] - true["md"]).mean()),
            "v1_angle_deg": float(np.nanmean(angles)) if angles.size else float("nan")}


def phase2_metrics(pred_tdi: np.ndarray, pred_dec: np.ndarray, true_tdi: np.ndarray, true_dec: np.ndarray,
                   brain: np.ndarray) -> dict[str, float]:
    """Phase-2 metrics; ``*_tdi`` are relative densities ``(X, Y, Z)``, ``*_dec`` ``(X, Y, Z, 3)``.

    Dice compares voxels above :data:`DICE_DENSITY`; the DEC angular error (degrees) is
    averaged where the teacher's density exceeds :data:`HIGH_DENSITY`.
    """
    pred_on, true_on = (pred_tdi > DICE_DENSITY) & brain, (true_tdi > DICE_DENSITY) & brain
    dense = (true_tdi > HIGH_DENSITY) & brain
    angles = angular_error_deg(pred_dec[dense], true_dec[dense])
    return {"tdi_r_brain": pearson(pred_tdi[brain], true_tdi[brain]),
            "tdi_dice": dice(pred_on, true_on),
            "dec_angle_deg": float(np.nanmean(angles)) if np.isfinite(angles).any() else float("nan")}


@dataclass
class BinnedRegression:
    """``y ≈ mean of y in the bin of x``: ``bins`` equal bins on ``[low, high]`` (values clipped)."""

    low: float
    high: float
    bins: int = 64

    def __post_init__(self) -> None:
        self.sums, self.counts = np.zeros(self.bins), np.zeros(self.bins)

    def _bin(self, x: np.ndarray) -> np.ndarray:
        scaled = (np.clip(x, self.low, self.high) - self.low) / (self.high - self.low)
        return np.minimum((scaled * self.bins).astype(int), self.bins - 1)

    def fit(self, x: np.ndarray, y: np.ndarray) -> BinnedRegression:
        """Accumulate the pairs ``(x, y)`` (flat arrays); call once per training subject."""
        index = self._bin(x)
        self.sums += np.bincount(index, weights=y, minlength=self.bins)
        self.counts += np.bincount(index, minlength=self.bins)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Bin means at ``x`` (empty bins give the overall mean)."""
        overall = self.sums.sum() / max(self.counts.sum(), 1)
        means = np.where(self.counts > 0, self.sums / np.maximum(self.counts, 1), overall)
        return means[self._bin(x)]


def _mask(prep: Path, row: dict, column: str) -> np.ndarray:
    return load_image(prep / row[column])[1] > 0


def _evaluate_phase1(rows: list, train_rows: list, model, device: str, skull_strip: bool) -> list[dict]:
    baseline = BinnedRegression(0.0, 1.0)
    for row, prep in train_rows:
        brain = _mask(prep, row, "mask")
        baseline.fit(normalise_intensity(load_t1w(row["t1w"])[1])[brain], load_image(prep / row["fa"])[1][brain])
    results = []
    for row, prep in rows:
        img, data = load_t1w(row["t1w"])
        brain, wm = _mask(prep, row, "mask"), _mask(prep, row, "wm")
        if skull_strip:
            data = np.where(brain_extraction_mask(brain, STRIPPED_MARGIN_MM, img.header.get_zooms()[:3]), data, 0)
        true_tensor = load_image(prep / row["diffusivity"])[1]
        pred = predict_phase1(img, data, model=model, device=device, mask_tensor=False)
        results.append({"subject": row["subject"], "method": "m2m",
                        **phase1_metrics(pred["tensor"], true_tensor, brain, wm),
                        "mask_dice": dice(pred["mask"], brain)})
        true_fa = load_image(prep / row["fa"])[1]
        results.append({"subject": row["subject"], "method": "baseline_fa_from_t1w",
                        **fa_metrics(baseline.predict(normalise_intensity(data)), true_fa, brain, wm & brain)})
    return results


def _evaluate_phase2(rows: list, train_rows: list, model, device: str, predicted_inputs: Path | None) -> list[dict]:
    baseline = BinnedRegression(0.0, 1.0)
    for row, prep in train_rows:
        brain = _mask(prep, row, "mask")
        density = relative_tdi(load_image(prep / row["tdi"])[1], brain)
        baseline.fit(load_image(prep / row["fa"])[1][brain], density[brain])
    results = []
    for row, prep in rows:
        source = predicted_inputs or prep
        fa, md, colfa = (load_image(source / row[c])[1] for c in ("fa", "md", "colfa"))
        _, grid = phase1_inputs(*load_t1w(row["t1w"]))
        brain = _mask(prep, row, "mask")
        true_tdi = relative_tdi(load_image(prep / row["tdi"])[1], brain)
        true_dec = load_image(prep / row["dectdi"])[1]
        pred = predict_phase2(fa, md, colfa, grid, mask=brain, model=model, device=device)
        results.append({"subject": row["subject"], "method": "m2m",
                        **phase2_metrics(pred["tdi"], pred["dectdi"], true_tdi, true_dec, brain)})
        results.append({"subject": row["subject"], "method": "baseline_tdi_from_fa",
                        **phase2_metrics(np.where(brain, baseline.predict(fa), 0.0), colfa, true_tdi, true_dec, brain)})
    return results


def evaluate_phase(spec_name: str, prep_dir: str | os.PathLike, weights_dir: str | os.PathLike | None,
                   test_subjects: list[str], train_subjects: list[str] | None = None,
                   out_tsv: str | os.PathLike | None = None, device: str = "auto",
                   predicted_inputs: str | os.PathLike | None = None, skull_strip: bool = False) -> list[dict]:
    """Per-subject metrics of the trained translator and of its baseline on held-out subjects.

    Parameters
    ----------
    spec_name : ``phase1`` or ``phase2``.
    prep_dir : the prep dir holding the teacher maps of every subject.
    weights_dir : folder with ``<phase>.safetensors``/``.json`` (None: the packaged weights).
    test_subjects : held-out subjects (``sub-01``, ``01`` or ``sub-01_ses-a``).
    train_subjects : subjects the baseline is fitted on (default: every other ``ok`` subject).
    out_tsv : where to write the table (tab-separated, one row per subject and method).
    predicted_inputs : phase 2 only: take FA/MD/colour FA from this folder of phase-1
        predictions (prep-dir layout) instead of the teacher's.
    skull_strip : phase 1 only: score both methods on the skull-stripped T1w.

    Returns the rows: ``subject``, ``method`` (``m2m`` or ``baseline_*``) and the metrics.
    """
    spec = get_phase(spec_name)
    if skull_strip and spec.name != "phase1":
        raise UsageError("skull_strip only applies to phase1 (its input is the T1w)")
    rows = select_rows([Path(prep_dir)], test_subjects)
    tested = {row["subject"] for row, _ in rows}
    train_rows = [(row, prep) for row, prep in select_rows([Path(prep_dir)], train_subjects)
                  if row["subject"] not in tested]
    model, _ = load_translator(spec.name, weights_dir)
    if spec.name == "phase1":
        results = _evaluate_phase1(rows, train_rows, model, device, skull_strip)
    else:
        predicted = Path(predicted_inputs) if predicted_inputs else None
        results = _evaluate_phase2(rows, train_rows, model, device, predicted)
    for method in sorted({r["method"] for r in results}):
        chosen = [r for r in results if r["method"] == method]
        log.info("%s %s: %s", spec.name, method, ", ".join(
            f"{k} {np.nanmean([r[k] for r in chosen]):.4g}" for k in chosen[0] if k not in ("subject", "method")))
    if out_tsv is not None:
        save_tsv(results, Path(out_tsv), missing="")
    return results


def write_phase1_predictions(prep_dir: str | os.PathLike, out_dir: str | os.PathLike,
                             weights_dir: str | os.PathLike | None, subjects: list[str] | None,
                             device: str = "auto") -> list[Path]:
    """Predict FA, MD and colour FA from each subject's T1w into ``out_dir`` (prep-dir layout).

    The files take the manifest's relative paths, so ``out_dir`` can be passed as
    ``predicted_inputs`` to phase-2 training and evaluation.
    """
    model, _ = load_translator("phase1", weights_dir)
    written = []
    for row, _prep in select_rows([Path(prep_dir)], subjects):
        img, data = load_t1w(row["t1w"])
        maps = tensor_derivatives(predict_phase1(img, data, model=model, device=device)["tensor"])
        for key in ("fa", "md", "colfa"):
            written.append(save_nifti(maps[key], img.affine, Path(out_dir) / row[key]))
        log.info("%s: phase-1 predictions written", row["subject"])
    return written


def tractogram_metrics(predicted: list[np.ndarray], teacher: list[np.ndarray], shape: tuple[int, int, int],
                       affine: np.ndarray, brain: np.ndarray) -> dict[str, float]:
    """Agreement of a predicted tractogram with the teacher's, both in world mm on one grid.

    TDI Pearson r in the brain, Dice of the voxels visited by any streamline, and the
    fraction of predicted streamlines within 2 mm (mean closest-point distance) of the
    teacher's points and vice versa.
    """
    pred_tdi, true_tdi = track_density(predicted, shape, affine), track_density(teacher, shape, affine)
    return {"tdi_r_brain": pearson(pred_tdi[brain], true_tdi[brain]),
            "visited_dice": dice((pred_tdi > 0) & brain, (true_tdi > 0) & brain),
            "predicted_near_teacher": fraction_near(predicted, teacher),
            "teacher_near_predicted": fraction_near(teacher, predicted),
            "n_predicted": len(predicted), "n_teacher": len(teacher)}
