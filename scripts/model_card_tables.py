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
TRACTOGRAM = (
    "tdi_r_brain",
    "visited_dice",
    "predicted_near_teacher",
    "teacher_near_predicted",
    "n_predicted",
    "n_teacher",
)
TABLES = {
    "phase1_heldout.tsv": PHASE1,
    "phase1_heldout_skullstripped.tsv": PHASE1,
    "phase2_heldout_teacher_inputs.tsv": ("tdi_r_brain", "tdi_dice", "dec_angle_deg"),
    "phase2_heldout_predicted_inputs.tsv": ("tdi_r_brain", "tdi_dice", "dec_angle_deg"),
    "tractogram_heldout.tsv": TRACTOGRAM,
    # the same app run with --stop-dispersion 30 (part chain): does stopping where V1 is uncertain help?
    "tractogram_heldout_stopdispersion.tsv": TRACTOGRAM,
}
CALIBRATION = (
    "spearman",
    "spearman_ideal",
    "coverage_1sd_raw",
    "coverage_2sd_raw",
    "scale_applied",
    "coverage_1sd",
    "coverage_2sd",
    "scale_fit",
)
#: Calibration of the uncertainty maps (one row per map, not per method): the scale applied
#: to a fold is the median of the other two folds' fitted scales (``part calibrate``).
CALIBRATION_TABLES = {
    "phase1_calibration.tsv": CALIBRATION,
    "phase2_calibration.tsv": CALIBRATION,
}


def mean(rows: list[dict], column: str) -> float | None:
    """Mean of the non-empty values of ``column`` (None when there are none)."""
    values = [float(row[column]) for row in rows if row.get(column) not in (None, "")]
    return sum(values) / len(values) if values else None


def fold_means(path: Path, columns: tuple[str, ...], key: str = "method") -> dict[str, dict[str, float | None]]:
    """``{method: {column: mean over the fold's sessions}}`` of one TSV (method ``m2m`` when absent);
    grouped by another column (e.g. ``map``) with ``key``."""
    rows = list(csv.DictReader(path.open(), delimiter="\t"))
    groups = dict.fromkeys(row.get(key, "m2m") for row in rows)
    return {g: {c: mean([r for r in rows if r.get(key, "m2m") == g], c) for c in columns} for g in groups}


def cell(value: float | None) -> str:
    """A table cell: — for a missing value, 3 significant decimals, scientific below 0.01."""
    if value is None:
        return "—"
    if abs(value) >= 1000:
        return f"{value:,.0f}".replace(",", " ")
    return f"{value:.2e}" if 0 < abs(value) < 0.01 else f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def table(runs: Path, name: str, columns: tuple[str, ...], key: str = "method") -> list[str]:
    """The Markdown lines of one table: per fold and method (or ``key``), then the mean of the folds per method."""
    lines = [f"| fold | {key} | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    per_fold = {
        fold: fold_means(runs / folder / name, columns, key)
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


def reliability(runs: Path, name: str) -> list[str]:
    """Markdown lines of a reliability table (``<stem>_reliability.tsv`` of ``calibrate``): per fold and
    map, the mean error in each uncertainty decile (lowest uncertainty first; sessions averaged)."""
    lines = ["| fold | map | " + " | ".join(f"d{b}" for b in range(1, 11)) + " |", "|---" * 12 + "|"]
    for fold, folder in FOLDS.items():
        path = runs / folder / name
        if not path.exists():
            continue
        rows = list(csv.DictReader(path.open(), delimiter="\t"))
        for group in dict.fromkeys(row["map"] for row in rows):
            cells = [
                mean([r for r in rows if r["map"] == group and r["bin"] == str(b)], "error_mean") for b in range(1, 11)
            ]
            lines.append(f"| {fold} | {group} | " + " | ".join(cell(v) for v in cells) + " |")
    return lines


def main(runs: Path) -> None:
    for name, columns in TABLES.items():
        print(f"\n{name}\n")
        print("\n".join(table(runs, name, columns)))
    for name, columns in CALIBRATION_TABLES.items():
        print(f"\n{name}\n")
        print("\n".join(table(runs, name, columns, key="map")))
        reliability_name = name.removesuffix(".tsv") + "_reliability.tsv"
        print(f"\n{reliability_name} (mean error by uncertainty decile)\n")
        print("\n".join(reliability(runs, reliability_name)))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs"))
