"""Choose the T1w detail transfer's sigma and weight on the held-out people of the leave-one-person-out folds.

For every fold (``WORK/loso-test-sub-XX``, trained by ``scripts/train_shipped_weights.sh``,
and any other phase-1 weights given with ``--weights DIR``) the intensity lookup is fitted on
the fold's own training units (its phase-1 recipe's ``subjects``, as ``m2m-train fit-detail``
does), phase 1 runs once per unit of ``WORK/prep`` whose person it was not trained on, and its
FA is written onto the T1w grid the app's way (:func:`~m2m_app.inference.predict.to_output`)
with each candidate ``(sigma_mm, weight)`` (weight 0: no detail transfer), then scored under
the evaluation protocol of docs/training.md (teacher's brain mask ∩ measured FOV): FA SSIM,
r, MAE, bias and WM spread ratio. MD and V1 do not change with the detail transfer.

Prints, as Markdown: per fold and candidate the metrics (a fold's sessions averaged); then,
for each fold, the candidate a leave-one-fold-out choice makes (the best mean FA SSIM over
the two *other* folds) and what it gives on the held-out fold, next to no detail transfer;
and the candidate best over all of them (the one to ship). Usage:

    python benchmarks/ablate_fa_detail.py WORK [--weights DIR ...] [--threads 2]
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger("ablate_fa_detail")
SIGMAS_MM = (3.0, 4.0, 6.0)
WEIGHTS = (0.25, 0.5, 0.75, 1.0)
METRICS = ("fa_ssim_brain", "fa_r_brain", "fa_mae_brain", "fa_bias_brain", "fa_spread_wm")
NONE = (0.0, 0.0)


def score_fold(fold: Path, prep_dir: Path, candidates: list[tuple[float, float]]) -> dict[tuple[float, float], dict]:
    """``{(sigma_mm, weight): mean metrics over the fold's held-out units}``."""
    from m2m_app.inference.predict import load_translator, predict_phase1_model, to_output
    from m2m_app.io.nifti import load_image, load_t1w
    from m2m_app.maths.detail import FaDetail
    from m2m_app.maths.tensor import masked_tensor_maps
    from m2m_app.training.detail import intensity_lookup
    from m2m_app.training.evaluate import evaluation_masks, fa_metrics
    from m2m_app.training.folds import held_out_rows

    model, _ = load_translator("phase1", fold)
    trained_on = json.loads((fold / "phase1.json").read_text())["recipe"]["subjects"]
    lookup = tuple(float(v) for v in intensity_lookup(prep_dir, trained_on).means)
    units: list[dict[tuple[float, float], dict]] = []
    for row, prep in held_out_rows(prep_dir, trained_on):
        log.info("%s: %s", fold.name, row["subject"])
        img, data = load_t1w(row["t1w"])
        mask, wm, _ = evaluation_masks(prep, row)
        true_fa = load_image(prep / row["fa"])[1]
        pred = predict_phase1_model(img, data, model=model, device="cpu", mask_tensor=False)
        grid = pred["grid"]
        support = np.ones(grid.shape, bool)
        maps = {"fa": masked_tensor_maps(pred["tensor"], support)["fa"], "mask": pred["mask"]}
        scores = {}
        for sigma, weight in candidates:
            shift = None
            if weight > 0:
                shift = FaDetail(lookup, sigma, weight).fa_shift_on(data, img.affine, *grid.output_grid())
            fa = to_output(maps, grid, support, fa_shift=shift)["fa"]
            scores[(sigma, weight)] = fa_metrics(fa, true_fa, mask, wm)
        units.append(scores)
    return {c: {m: float(np.mean([u[c][m] for u in units])) for m in METRICS} for c in candidates}


def label(candidate: tuple[float, float]) -> str:
    return "none" if candidate == NONE else f"σ {candidate[0]:g} mm, weight {candidate[1]:g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path, help="the WORK folder of scripts/train_shipped_weights.sh")
    parser.add_argument(
        "--weights",
        type=Path,
        action="append",
        default=[],
        help="other phase-1 weights, scored on the people of WORK/prep they were not trained on; repeatable",
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    import torch

    torch.set_num_threads(args.threads)
    folds = [
        *sorted(path for path in args.work.glob("loso-test-sub-*") if (path / "phase1.safetensors").exists()),
        *args.weights,
    ]
    if len(folds) < 2:
        raise SystemExit(f"need two weights or more: loso-test-sub-*/phase1.safetensors under {args.work}, --weights")
    candidates = [NONE, *itertools.product(SIGMAS_MM, WEIGHTS)]
    scores = {fold.name: score_fold(fold, args.work / "prep", candidates) for fold in folds}
    print("# T1w detail transfer on the held-out people (fold means of their sessions)\n")
    print("| fold | detail transfer | " + " | ".join(METRICS) + " |")
    print("|---" * (len(METRICS) + 2) + "|")
    for name, table in scores.items():
        for candidate in candidates:
            print(
                f"| {name} | {label(candidate)} | " + " | ".join(f"{table[candidate][m]:.4f}" for m in METRICS) + " |"
            )
    print("\n# Leave-one-fold-out choice (best mean FA SSIM of the other folds)\n")
    print("| held-out fold | chosen | FA SSIM none → chosen | FA r none → chosen | FA MAE none → chosen |")
    print("|---|---|---|---|---|")
    for name, table in scores.items():
        others = [t for n, t in scores.items() if n != name]
        chosen = max(candidates[1:], key=lambda c: np.mean([t[c]["fa_ssim_brain"] for t in others]))
        cells = [
            f"{table[NONE][m]:.3f} → {table[chosen][m]:.3f}" for m in ("fa_ssim_brain", "fa_r_brain", "fa_mae_brain")
        ]
        print(f"| {name} | {label(chosen)} | " + " | ".join(cells) + " |")
    best = max(candidates[1:], key=lambda c: np.mean([t[c]["fa_ssim_brain"] for t in scores.values()]))
    print(f"\nBest over all folds (to ship): {label(best)}")


if __name__ == "__main__":
    main()
