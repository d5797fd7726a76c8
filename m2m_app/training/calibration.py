"""Is the predicted uncertainty right? Its agreement with the actual error on held-out subjects.

For each uncertainty map (``fa_sd`` and ``v1_dispersion`` of phase 1, ``tdi_sd`` of phase 2)
and each held-out subject, against the teacher:

* the Spearman correlation between the uncertainty and the actual error (|FA error|, V1
  angle error in degrees, |relative TDI error|), voxel by voxel, beside the one a perfectly
  calibrated uncertainty of the same spread would reach (:func:`ideal_spearman`);
* a reliability table: the voxels split into ten equal-count bins by uncertainty (deciles),
  with the mean and median error in each;
* coverage: the fraction of voxels whose error is at most ``k × scale × uncertainty``
  (for FA: whose teacher value lies inside the predicted FA ± k scaled SDs), k = 1 and 2;
* the scale :func:`fit_scale` that would make the ±1 coverage :data:`ONE_SD_COVERAGE` on
  this subject.

A fold's coverage must not use a scale fitted on its own test subject: the scale applied
is the median of the other folds' fitted scales (``scale_from``), else the one stored with
the weights (1.0 without one). The pooled scale of every fold is what ships with the
weights (``uncertainty_scale`` in ``<phase>.json``). Voxels: those of the evaluation protocol
(:func:`~m2m_app.training.evaluate.evaluation_masks`: the teacher's brain mask inside the
measured DWI field of view), for V1 where the teacher's FA also exceeds
:data:`~m2m_app.training.evaluate.FA_ANGLE_THRESHOLD`; all on the T1w's own grid.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
from scipy import stats

from m2m_app.data.weights import UNCERTAINTY_SCALE_KEY, uncertainty_scales, weight_files
from m2m_app.errors import BadDataError, UsageError
from m2m_app.inference.predict import load_fa_detail, load_translator, predict_phase1, predict_phase2
from m2m_app.io.files import save_json, save_tsv
from m2m_app.io.manifest import select_rows
from m2m_app.io.nifti import load_image, load_t1w
from m2m_app.maths.detail import FaDetail
from m2m_app.maths.metrics import angular_error_deg
from m2m_app.maths.tensor import tensor_derivatives
from m2m_app.models.phases import get_phase, phase1_inputs, relative_tdi
from m2m_app.training.evaluate import FA_ANGLE_THRESHOLD, evaluation_masks

log = logging.getLogger(__name__)

#: Fraction of a normal distribution within ±1 SD (0.6827): the ±1 coverage a calibrated scale aims at.
ONE_SD_COVERAGE = math.erf(1.0 / math.sqrt(2.0))
#: Bins of the reliability table (deciles).
RELIABILITY_BINS = 10
#: The uncertainty maps of each phase.
PHASE_MAPS = {"phase1": ("fa_sd", "v1_dispersion"), "phase2": ("tdi_sd",)}


def spearman(uncertainty: np.ndarray, error: np.ndarray) -> float:
    """Spearman rank correlation of two flat arrays (NaN when either is constant or empty)."""
    if uncertainty.size < 2 or np.ptp(uncertainty) == 0 or np.ptp(error) == 0:
        return float("nan")
    return float(stats.spearmanr(uncertainty, error).statistic)


def ideal_spearman(uncertainty: np.ndarray, seed: int = 0) -> float:
    """Spearman of ``uncertainty`` (flat, SD units) with errors drawn as ``N(0, uncertainty²)``.

    The rank correlation a perfectly calibrated uncertainty with this spread over the voxels
    would reach: even an exact SD ranks single errors only loosely, the more so the narrower
    its range (an SD that is the same everywhere gives 0). It is the ceiling to read
    :func:`spearman` against; the draw is seeded, so it is repeatable.
    """
    draws = np.random.default_rng(seed).standard_normal(uncertainty.size) * uncertainty
    return spearman(uncertainty, np.abs(draws))


def reliability_table(uncertainty: np.ndarray, error: np.ndarray, bins: int = RELIABILITY_BINS) -> list[dict]:
    """Error by uncertainty bin: the voxels sorted by uncertainty and split into ``bins`` equal-count bins.

    ``uncertainty`` and ``error`` are flat arrays of the same voxels (any units). Returns one
    row per non-empty bin, lowest uncertainty first: ``bin`` (1-based), ``n_voxels``,
    ``uncertainty_min``/``_max``/``_mean`` and ``error_mean``/``_median``. A calibrated
    uncertainty has errors growing with the bin.
    """
    order = np.argsort(uncertainty, kind="stable")
    rows = []
    for number, chosen in enumerate(np.array_split(order, bins), start=1):
        if chosen.size:
            u, e = uncertainty[chosen], error[chosen]
            rows.append(
                {
                    "bin": number,
                    "n_voxels": int(chosen.size),
                    "uncertainty_min": float(u.min()),
                    "uncertainty_max": float(u.max()),
                    "uncertainty_mean": float(u.mean()),
                    "error_mean": float(e.mean()),
                    "error_median": float(np.median(e)),
                }
            )
    return rows


def coverage(error: np.ndarray, uncertainty: np.ndarray, k: float) -> float:
    """Fraction of voxels with ``|error| <= k * uncertainty`` (NaN for no voxels).

    With ``error`` = predicted − teacher FA and ``uncertainty`` the (scaled) FA SD, this is the
    fraction of voxels whose teacher FA lies inside the predicted FA ± k SDs.
    """
    return float(np.mean(np.abs(error) <= k * uncertainty)) if error.size else float("nan")


def fit_scale(error: np.ndarray, uncertainty: np.ndarray, target: float = ONE_SD_COVERAGE) -> float:
    """The scale ``s`` for which ``coverage(error, s * uncertainty, 1) ≈ target``.

    The ``target`` quantile of ``|error| / uncertainty`` over the voxels with a positive
    uncertainty (NaN when there are none).
    """
    positive = uncertainty > 0
    if not positive.any():
        return float("nan")
    return float(np.quantile(np.abs(error[positive]) / uncertainty[positive], target))


def pooled_scale(scales: list[float]) -> float:
    """One scale from several folds' fitted scales: their median (NaNs ignored; 1.0 for none)."""
    finite = [s for s in scales if np.isfinite(s)]
    return float(np.median(finite)) if finite else 1.0


def calibration_rows(
    subject: str, name: str, uncertainty: np.ndarray, error: np.ndarray, scale: float
) -> tuple[dict, list[dict]]:
    """Summary row and reliability rows of one subject's uncertainty map ``name``.

    ``uncertainty`` is the raw (unscaled) map and ``error`` the signed or absolute error at the
    same voxels (flat arrays); ``scale`` is the calibration scale applied for the coverage.
    """
    absolute = np.abs(error)
    summary = {
        "subject": subject,
        "map": name,
        "n_voxels": int(error.size),
        "spearman": spearman(uncertainty, absolute),
        "spearman_ideal": ideal_spearman(uncertainty),
        "uncertainty_mean": float(uncertainty.mean()),
        "error_mean": float(absolute.mean()),
        "scale_fit": fit_scale(absolute, uncertainty),
        "scale_applied": scale,
        "coverage_1sd_raw": coverage(absolute, uncertainty, 1.0),
        "coverage_2sd_raw": coverage(absolute, uncertainty, 2.0),
        "coverage_1sd": coverage(absolute, scale * uncertainty, 1.0),
        "coverage_2sd": coverage(absolute, scale * uncertainty, 2.0),
    }
    return summary, [{"subject": subject, "map": name, **row} for row in reliability_table(uncertainty, absolute)]


def _phase1_errors(
    row: dict, prep: Path, model, device: str, fa_detail: FaDetail | None = None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{map: (raw uncertainty, error)}`` of one subject: FA error in the evaluation mask, V1 angle error
    (degrees) in its fibres."""
    img, data = load_t1w(row["t1w"])
    brain = evaluation_masks(prep, row)[0]
    pred = predict_phase1(
        img, data, model=model, device=device, mask_tensor=False, uncertainty=True, fa_detail=fa_detail
    )
    fa, v1 = pred["fa"][brain], pred["v1"][brain]  # the maps as the app writes them
    teacher = tensor_derivatives(load_image(prep / row["diffusivity"])[1][brain])
    fibres = teacher["fa"] > FA_ANGLE_THRESHOLD
    angles = angular_error_deg(v1[fibres], teacher["v1"][fibres])
    measured = np.isfinite(angles)
    return {
        "fa_sd": (pred["fa_sd"][brain], fa - teacher["fa"]),
        "v1_dispersion": (pred["v1_dispersion"][brain][fibres][measured], angles[measured]),
    }


def _phase2_errors(
    row: dict, prep: Path, model, device: str, predicted_inputs: Path | None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"tdi_sd": (raw uncertainty, relative-density error)}`` of one subject inside the evaluation mask."""
    source = predicted_inputs or prep
    fa, md, colfa = (load_image(source / row[c])[1] for c in ("fa", "md", "colfa"))
    _, grid = phase1_inputs(*load_t1w(row["t1w"]))
    brain = evaluation_masks(prep, row)[0]
    pred = predict_phase2(fa, md, colfa, grid, mask=brain, model=model, device=device, uncertainty=True)
    truth = relative_tdi(load_image(prep / row["tdi"])[1], brain)
    return {"tdi_sd": (pred["tdi_sd"][brain], pred["tdi"][brain] - truth[brain])}


def scales_from_tables(tables: list[Path], maps: tuple[str, ...]) -> dict[str, float]:
    """``{map: pooled scale}`` from other folds' summary tables (their ``scale_fit`` column)."""
    fitted: dict[str, list[float]] = {name: [] for name in maps}
    for table in tables:
        with Path(table).open(newline="") as handle:
            reader = csv.DictReader(handle, delimiter="\t")
            if "scale_fit" not in (reader.fieldnames or []):
                raise BadDataError(f"{table}: not a table written by 'm2m-train calibrate' (no scale_fit column)")
            for row in reader:
                if row["map"] in fitted and row["scale_fit"]:
                    fitted[row["map"]].append(float(row["scale_fit"]))
    return {name: pooled_scale(values) for name, values in fitted.items()}


def store_scales(weights_dir: str | os.PathLike | None, phase: str, scales: dict[str, float]) -> Path:
    """Write ``scales`` into the phase's weights JSON (:func:`~m2m_app.data.weights.weight_files`;
    the packaged weights when ``weights_dir`` is None) under :data:`UNCERTAINTY_SCALE_KEY`."""
    path = weight_files(get_phase(phase).name, weights_dir)[1]
    if not path.exists():
        raise UsageError(f"{path}: not found; store scales beside trained weights")
    meta = json.loads(path.read_text())
    meta[UNCERTAINTY_SCALE_KEY] = {**meta.get(UNCERTAINTY_SCALE_KEY, {}), **scales}
    return save_json(meta, path)


def calibrate_phase(
    spec_name: str,
    prep_dir: str | os.PathLike,
    weights_dir: str | os.PathLike | None,
    test_subjects: list[str],
    scale_from: list[Path] | None = None,
    out_tsv: str | os.PathLike | None = None,
    device: str = "auto",
    predicted_inputs: str | os.PathLike | None = None,
    store: bool = False,
) -> tuple[list[dict], list[dict]]:
    """Calibration of one phase's uncertainty maps on held-out subjects.

    Parameters
    ----------
    spec_name : ``phase1`` or ``phase2``.
    prep_dir : the prep dir holding the teacher maps.
    weights_dir : the translator scored (None: the packaged weights), trained without ``test_subjects``.
    scale_from : summary tables of the other folds; the scale applied is their pooled
        ``scale_fit`` (:func:`scales_from_tables`). Default: the scale stored with the weights.
    out_tsv : write the summary here and the reliability table beside it (``<stem>_reliability.tsv``).
    predicted_inputs : phase 2 only: take FA/MD/colour FA from phase-1 predictions (prep-dir layout).
    store : write the applied scales into the weights' ``<phase>.json`` (needs ``scale_from``).

    Returns the summary rows (one per subject and map, see :func:`calibration_rows`) and the
    reliability rows.
    """
    spec = get_phase(spec_name)
    maps = PHASE_MAPS[spec.name]
    if store and not scale_from:
        raise UsageError(
            "storing a scale needs the other folds' tables (scale_from): a scale fitted on "
            "the subjects it is scored on would hide its error"
        )
    if scale_from:
        scales = scales_from_tables(scale_from, maps)
    else:
        stored = uncertainty_scales(spec.name, weights_dir)
        scales = {name: stored.get(name, 1.0) for name in maps}
    model, _ = load_translator(spec.name, weights_dir)
    summary, reliability = [], []
    for row, prep in select_rows([Path(prep_dir)], test_subjects):
        if spec.name == "phase1":
            pairs = _phase1_errors(row, prep, model, device, load_fa_detail(weights_dir))
        else:
            pairs = _phase2_errors(row, prep, model, device, Path(predicted_inputs) if predicted_inputs else None)
        for name, (uncertainty, error) in pairs.items():
            one, table = calibration_rows(
                row["subject"], name, uncertainty.astype(float), error.astype(float), scales[name]
            )
            summary.append(one)
            reliability.extend(table)
            log.info(
                "%s %s: Spearman %.3f (ideal %.3f), ±1 coverage %.3f, ±2 coverage %.3f (scale %.3g), fitted scale %.3g",
                row["subject"],
                name,
                one["spearman"],
                one["spearman_ideal"],
                one["coverage_1sd"],
                one["coverage_2sd"],
                one["scale_applied"],
                one["scale_fit"],
            )
    if out_tsv is not None:
        out_tsv = Path(out_tsv)
        save_tsv(summary, out_tsv, missing="")
        save_tsv(reliability, out_tsv.with_name(out_tsv.name.removesuffix(".tsv") + "_reliability.tsv"), missing="")
    if store:
        path = store_scales(weights_dir, spec.name, scales)
        log.info("stored %s in %s", scales, path)
    return summary, reliability
