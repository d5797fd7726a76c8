#!/usr/bin/env bash
# Fine-tuning against training from scratch, for the same number of steps (docs/training.md, "Does
# fine-tuning pay?"). A lab's case: translator weights that never saw its scanner nor its people (a
# leave-one-person-out fold's, e.g. WORK/loso-test-sub-03 of scripts/train_shipped_weights.sh), and a
# few sessions of its own (TRAIN_UNIT...) in PREP_DIR; TEST_UNIT, another of its sessions, is held out.
#
#   scripts/compare_finetuning.sh PREP_DIR FOLD_WEIGHTS_DIR OUT_DIR TEST_UNIT TRAIN_UNIT...
#
# Trains phase 1 on TRAIN_UNIT... twice for about STEPS (default 300) batches of 8 slices: from
# FOLD_WEIGHTS_DIR (--init-weights, its default learning rate 5e-5) and from scratch (2e-4); scores
# both and the fold's weights as they are on TEST_UNIT (m2m-train evaluate), and prints one table.
# Re-running resumes the trainings from their checkpoints and scores again.
set -euo pipefail
[[ $# -ge 5 ]] || { sed -n 2,12p "$0"; exit 2; }
PREP=$1 FOLD=$2 OUT=$3 TEST=$4
shift 4
TRAIN=("$@")
STEPS=${STEPS:-300}
# about 28 batches of 8 slices per unit and epoch (phase 1's slices of one T1w, as train_shipped_weights.sh)
EPOCHS=$(( (STEPS + 28 * ${#TRAIN[@]} - 1) / (28 * ${#TRAIN[@]}) ))
mkdir -p "$OUT"
subjects=()
for unit in "${TRAIN[@]}"; do subjects+=(--subject "$unit"); done
m2m-train phase1 "$PREP" "$OUT/finetuned" "${subjects[@]}" --epochs "$EPOCHS" --init-weights "$FOLD"
m2m-train phase1 "$PREP" "$OUT/scratch" "${subjects[@]}" --epochs "$EPOCHS"
for run in fold finetuned scratch; do
  weights=$OUT/$run
  [[ $run == fold ]] && weights=$FOLD
  m2m-train evaluate "$PREP" "$weights" --phase 1 --test-subject "$TEST" --train-subject "${TRAIN[0]}" \
    --out "$OUT/$run.tsv"
done
python - "$OUT" "$TEST" "$EPOCHS" <<'EOF'
import csv
import json
import sys
from pathlib import Path

out, test, epochs = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
columns = ("fa_r_brain", "fa_mae_brain", "fa_r_wm", "md_r_brain", "v1_angle_deg_wm", "mask_dice")
print(f"phase 1 on {test} (held out); {epochs} epochs on the lab's sessions")
print("| weights | steps | lr | " + " | ".join(columns) + " |")
print("|---" * (len(columns) + 3) + "|")
for run in ("fold", "finetuned", "scratch"):
    rows = [r for r in csv.DictReader(open(out / f"{run}.tsv"), delimiter="\t") if r["method"] == "m2m"]
    steps, lr = "0", "-"
    if run != "fold":
        recipe = json.loads((out / run / "phase1.json").read_text())["recipe"]
        steps, lr = str(recipe["final_losses"]["batches"] * recipe["epochs"]), f"{recipe['lr']:g}"
    print(f"| {run} | {steps} | {lr} | " + " | ".join(f"{float(rows[0][c]):.3f}" for c in columns) + " |")
EOF
