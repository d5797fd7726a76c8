"""Print the model card's held-out tables (Markdown) from the TSVs of ``train_shipped_weights.sh``.

    python scripts/model_card_tables.py runs

Each row is one fold and method; a fold whose test subject has several sessions shows
their mean (the per-session rows are in the TSVs).
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

FOLDS = {"A: train sub-02, test sub-01": "fold-test-sub-01", "B: train sub-01, test sub-02 (4 sessions)": "fold-test-sub-02"}
TABLES = {
    "phase1_heldout.tsv": ("fa_mae_brain", "fa_r_brain", "fa_mae_wm", "fa_r_wm", "fa_psnr", "fa_ssim",
                           "md_mae_brain", "v1_angle_deg", "mask_dice"),
    "phase1_heldout_skullstripped.tsv": ("fa_mae_brain", "fa_r_brain", "fa_mae_wm", "fa_r_wm", "fa_psnr", "fa_ssim",
                                         "md_mae_brain", "v1_angle_deg", "mask_dice"),
    "phase2_heldout_teacher_inputs.tsv": ("tdi_r_brain", "tdi_dice", "dec_angle_deg"),
    "phase2_heldout_predicted_inputs.tsv": ("tdi_r_brain", "tdi_dice", "dec_angle_deg"),
    "tractogram_heldout.tsv": ("tdi_r_brain", "visited_dice", "predicted_near_teacher", "teacher_near_predicted",
                               "n_predicted", "n_teacher"),
}


def _mean(rows: list[dict], column: str) -> str:
    values = [float(row[column]) for row in rows if row.get(column) not in (None, "")]
    if not values:
        return "—"
    mean = sum(values) / len(values)
    if abs(mean) >= 1000:
        return f"{mean:,.0f}".replace(",", " ")
    return f"{mean:.2e}" if abs(mean) < 0.01 else f"{mean:.3f}" if abs(mean) < 10 else f"{mean:.1f}"


def main(runs: Path) -> None:
    for table, columns in TABLES.items():
        print(f"\n{table}\n")
        print("| fold | method | " + " | ".join(columns) + " |")
        print("|---" * (len(columns) + 2) + "|")
        for fold, folder in FOLDS.items():
            path = runs / folder / table
            if not path.exists():
                continue
            rows = list(csv.DictReader(path.open(), delimiter="\t"))
            for method in dict.fromkeys(row.get("method", "m2m") for row in rows):
                chosen = [row for row in rows if row.get("method", "m2m") == method]
                print(f"| {fold} | {method} | " + " | ".join(_mean(chosen, c) for c in columns) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs"))
