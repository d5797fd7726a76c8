#!/usr/bin/env bash
# The exact commands that produced the weights shipped in m2m_app/data/models/ and the
# leave-one-subject-out numbers of its model card.
#
#   scripts/train_shipped_weights.sh [DS_REAL] [WORK] [PART]
#
# PART is "a" (fold A: train on sub-02, test on sub-01), "b" (fold B: train on sub-01, test
# on sub-02), "ship" (the same recipe on every subject: the shipped weights, whose expected
# accuracy is that of the two folds), "chain" (after a and b: the app itself on each held-out
# subject with its fold's weights, and its tractogram against the teacher's) or "all" (the
# four, one after the other; default).
# The parts a, b and ship can run at the same time in separate shells (one torch thread per
# process is fastest on 2 cores). Run that way on a 2-core CPU, folds a and b took about 2 h
# each and ship about 1.5 h; chain takes 4 min afterwards. DEVICE=cuda uses a GPU.
# Re-running resumes: prepare skips finished units and training restarts from its last
# checkpoint.
# Environment: DEVICE (cpu), SEED (0), ELASTIC_PX (3) and SKULL_STRIP_PROB (0.25) change the
# recipe; the shipped weights use the defaults.
set -euo pipefail
DS_REAL=${1:-../shared/data/ds-real}
WORK=${2:-runs}
PART=${3:-all}
DEVICE=${DEVICE:-cpu}
SEED=${SEED:-0}
ELASTIC_PX=${ELASTIC_PX:-3}
SKULL_STRIP_PROB=${SKULL_STRIP_PROB:-0.25}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
COMMON=(--width 16 --batch-size 8 --device "$DEVICE" --random-seed "$SEED" --ema-decay 0.999 --elastic-px "$ELASTIC_PX")
# Epochs are set so that each training sees about the same number of batches of 8 slices:
# phase 1 about 2 700 (sub-02's four sessions: 112 batches per epoch; sub-01 alone: 30),
# phase 2 about 2 660 (teacher + predicted maps: 222 and 60 batches per epoch). The shipped
# weights, trained on all five units, see a little more (3 380 and 3 380).
# --ema-decay: the exported generator is the moving average of its weights, because the
# held-out accuracy of the raw weights swings widely from one epoch to the next.
# --elastic-px 3: elastic deformation in half of the geometric augmentations (the model card
# compares the folds with and without it: ELASTIC_PX=0; and with another seed: SEED=1).
# --skull-strip-prob 0.25 (phase 1 only): a quarter of the T1w slices are skull-stripped, so
# that brain-extracted inputs work; the folds are also scored on stripped T1w (--skull-strip).
PHASE1=(--skull-strip-prob "$SKULL_STRIP_PROB")
PHASE1_EPOCHS_SHIP=24
PHASE2_EPOCHS_SHIP=12

m2m-train prepare "$DS_REAL" "$WORK/prep" --nprocs 2

# fold TRAIN TEST PHASE1_EPOCHS PHASE2_EPOCHS: both translators trained on TRAIN, scored on the held-out TEST.
fold() {
  local train=$1 test=$2 epochs1=$3 epochs2=$4 out="$WORK/fold-test-$2"
  m2m-train phase1 "$WORK/prep" "$out" --subject "$train" --epochs "$epochs1" "${COMMON[@]}" "${PHASE1[@]}"
  m2m-train evaluate "$WORK/prep" "$out" --phase 1 --test-subject "$test" --device "$DEVICE" \
    --out "$out/phase1_heldout.tsv"
  m2m-train evaluate "$WORK/prep" "$out" --phase 1 --test-subject "$test" --device "$DEVICE" --skull-strip \
    --out "$out/phase1_heldout_skullstripped.tsv"
  # the same metrics on the training subject: what the network does where the T1w is no surprise
  m2m-train evaluate "$WORK/prep" "$out" --phase 1 --test-subject "$train" --device "$DEVICE" \
    --out "$out/phase1_training_subject.tsv"
  # phase 2 learns from the teacher's maps and from phase 1's predictions of its training subjects
  m2m-train predict "$WORK/prep" "$out/pred-phase1" --weights-dir "$out" --device "$DEVICE"
  m2m-train phase2 "$WORK/prep" "$out" --subject "$train" --epochs "$epochs2" \
    --predicted-inputs "$out/pred-phase1" "${COMMON[@]}"
  m2m-train evaluate "$WORK/prep" "$out" --phase 2 --test-subject "$test" --device "$DEVICE" \
    --predicted-inputs "$out/pred-phase1" --out "$out/phase2_heldout_predicted_inputs.tsv"
  m2m-train evaluate "$WORK/prep" "$out" --phase 2 --test-subject "$test" --device "$DEVICE" \
    --out "$out/phase2_heldout_teacher_inputs.tsv"
}

if [[ $PART == a || $PART == all ]]; then
  fold sub-02 sub-01 24 12
fi
if [[ $PART == b || $PART == all ]]; then
  fold sub-01 sub-02 90 44
fi
if [[ $PART == ship || $PART == all ]]; then
  out="$WORK/ship"
  m2m-train phase1 "$WORK/prep" "$out" --epochs "$PHASE1_EPOCHS_SHIP" "${COMMON[@]}" "${PHASE1[@]}"
  m2m-train predict "$WORK/prep" "$out/pred-phase1" --weights-dir "$out" --device "$DEVICE"
  m2m-train phase2 "$WORK/prep" "$out" --epochs "$PHASE2_EPOCHS_SHIP" --predicted-inputs "$out/pred-phase1" "${COMMON[@]}"
  cp "$out"/phase{1,2}.{safetensors,json} m2m_app/data/models/
fi

# chain TEST_LABEL SESSION UNIT: the app on a held-out subject with the weights that never saw it.
chain() {
  local label=$1 session=$2 unit=$3 out="$WORK/app-fold-test-sub-$1"
  m2m "$DS_REAL" "$out" participant --participant-label "$label" ${session:+--session-label "$session"} \
    --weights-dir "$WORK/fold-test-sub-$label" -w "$WORK/work-fold-test-sub-$label" --nprocs 2 \
    --device "$DEVICE" --random-seed 0
  m2m-train evaluate-tractogram "$WORK/prep" "$out" --subject "$unit" > "$WORK/fold-test-sub-$label/tractogram_heldout.tsv"
}

if [[ $PART == chain || $PART == all ]]; then
  chain 01 "" sub-01
  chain 02 hfs sub-02_ses-hfs
fi
