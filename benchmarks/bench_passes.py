"""What each of phase 1's six inference passes buys, on the held-out people of the leave-one-person-out folds.

m2m runs the phase-1 network over the sagittal, coronal and axial slices of the T1w and of
its left-right mirror image, and fuses the six outputs. For every held-out unit of every fold
(``WORK/loso-test-sub-XX``, trained by ``scripts/train_shipped_weights.sh``), this runs the six
passes once, timing each, then fuses subsets of them and scores each subset under the
evaluation protocol of docs/training.md (FA, MD, V1 on the T1w grid, teacher's brain mask ∩
measured FOV): FA MAE, r and SSIM, V1 angle; and, for subsets of two passes or more, the
Spearman correlation of the FA SD with the actual FA error (the uncertainty's worth). Prints
one table: per subset, the network seconds (sum of its passes' times, 2 threads by default)
and the mean over the three folds of each metric (a fold's sessions averaged first). Usage:

    python benchmarks/bench_passes.py WORK [--threads 2]
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("bench_passes")
#: The passes in the order :func:`~m2m_app.inference.predict.predict_views` returns them for one axis.
AXIS_NAMES = ("sagittal", "coronal", "axial")
#: Subsets scored: (label, passes as (axis, mirrored) pairs).
SUBSETS: tuple[tuple[str, tuple[tuple[int, bool], ...]], ...] = (
    ("3 views × mirror (the app)", tuple((a, m) for m in (False, True) for a in range(3))),
    ("3 views", ((0, False), (1, False), (2, False))),
    ("coronal + axial × mirror", ((1, False), (2, False), (1, True), (2, True))),
    ("axial × mirror", ((2, False), (2, True))),
    ("coronal × mirror", ((1, False), (1, True))),
    ("sagittal × mirror", ((0, False), (0, True))),
    ("axial", ((2, False),)),
    ("coronal", ((1, False),)),
    ("sagittal", ((0, False),)),
)
METRICS = ("fa_mae_brain", "fa_r_brain", "fa_ssim_brain", "fa_r_wm", "v1_angle_deg_brain", "fa_sd_spearman")


def finite_mean(values: list[float]) -> float:
    """Mean of the finite values (NaN when there are none, e.g. the FA SD of a single pass)."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def score_unit(row: dict, prep: Path, model) -> tuple[dict[tuple[int, bool], float], dict[str, dict[str, float]]]:
    """Seconds per pass and ``{subset label: metrics}`` of one held-out unit."""
    from m2m_app.inference.predict import phase1_from_views, phase1_to_output, predict_views
    from m2m_app.io.nifti import load_image, load_t1w
    from m2m_app.maths.tensor import tensor_derivatives
    from m2m_app.models.phases import get_phase, phase1_inputs
    from m2m_app.training.calibration import spearman
    from m2m_app.training.evaluate import evaluation_masks, phase1_metrics

    spec = get_phase("phase1")
    inputs, grid = phase1_inputs(*load_t1w(row["t1w"]))
    views, seconds = {}, {}
    for axis in range(3):
        start = time.monotonic()
        plain, mirrored = predict_views(model, spec, inputs, "cpu", axes=(axis,))
        seconds[(axis, False)] = seconds[(axis, True)] = (time.monotonic() - start) / 2
        views[(axis, False)], views[(axis, True)] = plain, mirrored
    mask, wm, _ = evaluation_masks(prep, row)
    true_tensor = load_image(prep / row["diffusivity"])[1]
    teacher_fa = tensor_derivatives(true_tensor[mask])["fa"]
    scores = {}
    for label, passes in SUBSETS:
        uncertain = len(passes) > 1
        pred = phase1_to_output(
            phase1_from_views([views[p] for p in passes], grid, mask_tensor=False, uncertainty=uncertain), False
        )
        metrics = phase1_metrics(pred, true_tensor, mask, wm)
        if uncertain:
            metrics["fa_sd_spearman"] = spearman(pred["fa_sd"][mask], np.abs(pred["fa"][mask] - teacher_fa))
        scores[label] = metrics
    return seconds, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path, help="the WORK folder of scripts/train_shipped_weights.sh")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    import torch

    from m2m_app.inference.predict import load_translator
    from m2m_app.io.manifest import select_rows

    torch.set_num_threads(args.threads)
    folds = sorted(path for path in args.work.glob("loso-test-sub-*") if (path / "phase1.safetensors").exists())
    if not folds:
        raise SystemExit(f"no fold weights (loso-test-sub-*/phase1.safetensors) under {args.work}")
    per_fold: list[dict[str, dict[str, float]]] = []
    pass_seconds: list[dict[tuple[int, bool], float]] = []
    for fold in folds:
        test = fold.name.removeprefix("loso-test-")
        model, _ = load_translator("phase1", fold)
        units = []
        for row, prep in select_rows([args.work / "prep"], [test]):
            log.info("%s: %s", fold.name, row["subject"])
            seconds, scores = score_unit(row, prep, model)
            pass_seconds.append(seconds)
            units.append(scores)
        per_fold.append(
            {label: {m: finite_mean([u[label].get(m, np.nan) for u in units]) for m in METRICS} for label, _ in SUBSETS}
        )
    mean_seconds = {p: float(np.mean([s[p] for s in pass_seconds])) for p in pass_seconds[0]}
    names = ", ".join(f.name for f in folds)
    print(f"# phase-1 passes, mean of {len(folds)} folds ({names}), {args.threads} threads\n")
    print("| passes | n | network s | " + " | ".join(METRICS) + " |")
    print("|---" * (len(METRICS) + 3) + "|")
    for label, passes in SUBSETS:
        values = [finite_mean([fold[label][m] for fold in per_fold]) for m in METRICS]
        cells = " | ".join("—" if np.isnan(v) else f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}" for v in values)
        print(f"| {label} | {len(passes)} | {sum(mean_seconds[p] for p in passes):.1f} | {cells} |")


if __name__ == "__main__":
    main()
