"""Print the model card's held-out tables (Markdown) from the TSVs of ``train_shipped_weights.sh``.

    python scripts/model_card_tables.py runs

Three leave-one-person-out folds (``runs/loso-test-sub-XX``), scored under the evaluation
protocol of docs/training.md. Each row is one fold and method; a fold whose test person has
several sessions shows their mean (the per-session rows are in the TSVs). After the folds,
one row per method gives the mean of the three folds (each fold weighs the same, whatever
its number of sessions); it is left out while a fold is missing.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

FOLDS = {
    "sub-01 (Philips)": "loso-test-sub-01",
    "sub-02 (Siemens, 4 sessions)": "loso-test-sub-02",
    "sub-03 (United Imaging, 2 sessions)": "loso-test-sub-03",
}
PHASE1 = (
    "fa_mae_brain",
    "fa_r_brain",
    "fa_bias_brain",
    "fa_spread_brain",
    "fa_ssim_brain",
    "fa_psnr_brain",
    "fa_mae_wm",
    "fa_r_wm",
    "fa_bias_wm",
    "fa_spread_wm",
    "fa_ssim_wm",
    "md_mae_brain",
    "md_r_brain",
    "v1_angle_deg_brain",
    "v1_angle_deg_wm",
    "mask_dice",
)
TABLES = {
    "phase1_heldout.tsv": PHASE1,
    "phase1_heldout_skullstripped.tsv": PHASE1,
    "phase2_heldout_teacher_inputs.tsv": ("tdi_r_brain", "tdi_dice", "dec_angle_deg"),
    "phase2_heldout_predicted_inputs.tsv": ("tdi_r_brain", "tdi_dice", "dec_angle_deg"),
    "tractogram_heldout.tsv": (
        "tdi_r_brain",
        "visited_dice",
        "predicted_near_teacher",
        "teacher_near_predicted",
        "n_predicted",
        "n_teacher",
    ),
}


def mean(rows: list[dict], column: str) -> float | None:
    """Mean of the non-empty values of ``column`` (None when there are none)."""
    values = [float(row[column]) for row in rows if row.get(column) not in (None, "")]
    return sum(values) / len(values) if values else None


def fold_means(path: Path, columns: tuple[str, ...]) -> dict[str, dict[str, float | None]]:
    """``{method: {column: mean over the fold's sessions}}`` of one TSV (method ``m2m`` when absent)."""
    rows = list(csv.DictReader(path.open(), delimiter="\t"))
    methods = dict.fromkeys(row.get("method", "m2m") for row in rows)
    return {m: {c: mean([r for r in rows if r.get("method", "m2m") == m], c) for c in columns} for m in methods}


def cell(value: float | None) -> str:
    """A table cell: — for a missing value, 3 significant decimals, scientific below 0.01."""
    if value is None:
        return "—"
    if abs(value) >= 1000:
        return f"{value:,.0f}".replace(",", " ")
    return f"{value:.2e}" if 0 < abs(value) < 0.01 else f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def table(runs: Path, name: str, columns: tuple[str, ...]) -> list[str]:
    """The Markdown lines of one table: per fold and method, then the mean of the folds per method."""
    lines = ["| fold | method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    per_fold = {
        fold: fold_means(runs / folder / name, columns)
        for fold, folder in FOLDS.items()
        if (runs / folder / name).exists()
    }
    for fold, methods in per_fold.items():
        lines += [f"| {fold} | {m} | " + " | ".join(cell(v[c]) for c in columns) + " |" for m, v in methods.items()]
    if len(per_fold) == len(FOLDS):
        for method in dict.fromkeys(m for methods in per_fold.values() for m in methods):
            values = [methods[method] for methods in per_fold.values() if method in methods]
            if len(values) == len(FOLDS):
                means = [[v[c] for v in values] for c in columns]
                lines.append(
                    f"| **mean of {len(FOLDS)} folds** | {method} | "
                    + " | ".join(cell(sum(x) / len(x)) if None not in x else "—" for x in means)
                    + " |"
                )
    return lines


def main(runs: Path) -> None:
    for name, columns in TABLES.items():
        print(f"\n{name}\n")
        print("\n".join(table(runs, name, columns)))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs"))
