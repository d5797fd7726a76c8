#!/usr/bin/env bash
# The exact commands that produced the weights shipped in m2m_app/data/models/ and the
# held-out numbers of its model card. Runs on CPU in about an hour (2 cores; one torch
# thread per process is fastest on 2 cores); pass DEVICE=cuda to use a GPU.
# Usage: scripts/train_shipped_weights.sh [DS_REAL] [WORK]
set -euo pipefail
DS_REAL=${1:-../shared/data/ds-real}
WORK=${2:-runs}
DEVICE=${DEVICE:-cpu}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
COMMON=(--width 16 --batch-size 8 --device "$DEVICE" --random-seed 0)

m2m-train prepare "$DS_REAL" "$WORK/prep-ds-real" --nprocs 2
# Held-out design: train on sub-02 (4 sessions, 2D FLASH, 1x1x4.8 mm), test on sub-01 (3D MPRAGE, 1 mm).
m2m-train phase1 "$WORK/prep-ds-real" "$WORK/models" --subject sub-02 --epochs 10 "${COMMON[@]}"
m2m-train evaluate "$WORK/prep-ds-real" "$WORK/models" --phase 1 --test-subject sub-01 \
  --out "$WORK/phase1_heldout_sub-01.tsv"
m2m-train predict "$WORK/prep-ds-real" "$WORK/pred-phase1" --weights-dir "$WORK/models"
m2m-train phase2 "$WORK/prep-ds-real" "$WORK/models" --subject sub-02 --epochs 4 \
  --predicted-inputs "$WORK/pred-phase1" "${COMMON[@]}"
m2m-train evaluate "$WORK/prep-ds-real" "$WORK/models" --phase 2 --test-subject sub-01 \
  --predicted-inputs "$WORK/pred-phase1" --out "$WORK/phase2_heldout_sub-01_predicted_inputs.tsv"
m2m-train evaluate "$WORK/prep-ds-real" "$WORK/models" --phase 2 --test-subject sub-01 \
  --out "$WORK/phase2_heldout_sub-01_teacher_inputs.tsv"
cp "$WORK"/models/phase{1,2}.{safetensors,json} m2m_app/data/models/
