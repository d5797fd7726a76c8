#!/usr/bin/env bash
# The exact commands that produce the weights shipped in m2m_app/data/models/ and the
# leave-one-person-out numbers of its model card.
#
#   scripts/train_shipped_weights.sh [DS_REAL] [WORK] [PART] [DS_EXTRA]
#
# Both datasets (ds-real: sub-01 Philips, sub-02 Siemens with 4 sessions; ds-extra: sub-03
# United Imaging, 2 sessions, partial-slab DWI) are prepared into one prep dir, WORK/prep.
# PART is "prepare", "a", "b" or "c" (the three leave-one-person-out folds, from
# `python -m m2m_app.training.folds`: test sub-01, sub-02, sub-03, each trained on the two
# other people, all sessions of a person on the same side), "ship" (the same recipe on every
# unit: the weights to ship, whose expected accuracy is that of the folds), "calibrate" (after
# the folds and ship: each fold's uncertainty coverage with the scale fitted on the two other
# folds, the pooled scale of all three stored with the ship weights, which are then copied into
# m2m_app/data/models/), "chain" (after the folds: the app itself on one session of each
# held-out person with its fold's weights, and its tractogram against the teacher's), "tables"
# (the model card's tables) or "all" (every part, in that order; default).
# Each fold is scored under the evaluation protocol of docs/training.md against both baselines
# (T1w intensity and the warped population atlas; the atlas needs `pip install "m2m-app[atlas]"`
# or `pip install --no-deps tractseg`).
# The parts a, b, c and ship can run at the same time in separate shells after "prepare" (one
# torch thread per process is fastest on 2 cores). DEVICE=cuda uses a GPU.
# Re-running resumes: prepare skips finished units and training restarts from its last
# checkpoint (the folds write to WORK/loso-test-sub-XX, so checkpoints of the earlier
# two-person folds in WORK/fold-test-sub-XX are never resumed by mistake); part ship keeps an
# exported phase 1 that carries its detail transfer and goes on with phase 2.
# Environment: DEVICE (cpu), SEED (0), ELASTIC_PX (3) and SKULL_STRIP_PROB (0.25) change the
# recipe; PHASE1_STEPS (2700), PHASE2_STEPS (2660), SHIP_STEPS (3380) set how many batches each
# training sees; the shipped weights use the defaults. FOLD_PHASES ("1 2") names the translators
# the fold parts train and score: FOLD_PHASES=1 first gives every fold's phase-1 numbers (and the
# raw calibrations the ship weights' phase-1 scale needs) sooner; FOLD_PHASES=2 then resumes; part
# calibrate also calibrates only the phases FOLD_PHASES names.
set -euo pipefail
DS_REAL=${1:-../shared/data/ds-real}
WORK=${2:-runs}
PART=${3:-all}
DS_EXTRA=${4:-../shared/data/ds-extra}
DEVICE=${DEVICE:-cpu}
SEED=${SEED:-0}
ELASTIC_PX=${ELASTIC_PX:-3}
SKULL_STRIP_PROB=${SKULL_STRIP_PROB:-0.25}
PHASE1_STEPS=${PHASE1_STEPS:-2700}
PHASE2_STEPS=${PHASE2_STEPS:-2660}
SHIP_STEPS=${SHIP_STEPS:-3380}
FOLD_PHASES=" ${FOLD_PHASES:-1 2} "
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PREP="$WORK/prep"
COMMON=(--width 16 --batch-size 8 --device "$DEVICE" --random-seed "$SEED" --ema-decay 0.999 --elastic-px "$ELASTIC_PX")
# Epochs are set so that each training sees about the same number of batches of 8 slices:
# a unit gives about 28 batches per epoch in phase 1 and 55 in phase 2 (teacher + predicted
# maps), as measured on ds-real (sub-02's four sessions: 112 and 222; sub-01: 30 and 60).
PHASE1_BATCHES_PER_UNIT=28
PHASE2_BATCHES_PER_UNIT=55
# epochs STEPS BATCHES_PER_UNIT UNITS: the epochs (at least 1) that give about STEPS batches.
epochs() { echo $(( ($1 + $2 * $3 / 2) / ($2 * $3) > 0 ? ($1 + $2 * $3 / 2) / ($2 * $3) : 1 )); }
# --ema-decay: the exported generator is the moving average of its weights, because the
# held-out accuracy of the raw weights swings widely from one epoch to the next.
# --elastic-px 3: elastic deformation in half of the geometric augmentations (the model card
# compares the folds with and without it: ELASTIC_PX=0; and with another seed: SEED=1).
# --skull-strip-prob 0.25 (phase 1 only): a quarter of the T1w slices are skull-stripped, so
# that brain-extracted inputs work; the folds are also scored on stripped T1w (--skull-strip).
PHASE1=(--skull-strip-prob "$SKULL_STRIP_PROB")
if [[ $PART == prepare || $PART == all ]]; then
  # one prep dir for both datasets: write_manifest lists every unit found in it
  m2m-train prepare "$DS_REAL" "$PREP" --nprocs 2
  m2m-train prepare "$DS_EXTRA" "$PREP" --nprocs 2
fi

# fold TEST: both translators trained on every other person, scored on the held-out person TEST.
fold() {
  local test=$1 out="$WORK/loso-test-$1" line train units
  line=$(python -m m2m_app.training.folds "$PREP" | awk -F'\t' -v t="$test" '$1 == t')
  [[ -n $line ]] || { echo "no fold with test person $test in $PREP/manifest.tsv" >&2; exit 1; }
  IFS=$'\t' read -r _ train units <<< "$line"
  local subjects=() person
  for person in ${train//,/ }; do subjects+=(--subject "$person"); done
  local epochs1 epochs2
  epochs1=$(epochs "$PHASE1_STEPS" "$PHASE1_BATCHES_PER_UNIT" "$units")
  epochs2=$(epochs "$PHASE2_STEPS" "$PHASE2_BATCHES_PER_UNIT" "$units")
  # grid: the ceiling of the 2 mm model grid (the teacher's FA through it and back), not a baseline
  local scored=(--phase 1 --baseline intensity --baseline atlas --baseline grid --device "$DEVICE")
  if [[ $FOLD_PHASES == *" 1 "* ]]; then
    m2m-train phase1 "$PREP" "$out" "${subjects[@]}" --epochs "$epochs1" "${COMMON[@]}" "${PHASE1[@]}"
    # the T1w detail transfer's intensity lookup, fitted on the same training units (defaults: sigma, weight)
    m2m-train fit-detail "$PREP" "$out"
    m2m-train evaluate "$PREP" "$out" "${scored[@]}" --test-subject "$test" --out "$out/phase1_heldout.tsv"
    m2m-train evaluate "$PREP" "$out" "${scored[@]}" --test-subject "$test" --skull-strip \
      --out "$out/phase1_heldout_skullstripped.tsv"
    # the same metrics on the training people: what the network does where the T1w is no surprise
    m2m-train evaluate "$PREP" "$out" --phase 1 --device "$DEVICE" "${subjects[@]/--subject/--test-subject}" \
      --out "$out/phase1_training_subject.tsv"
    # the uncertainty maps against the actual error, unscaled (their fitted scale_fit calibrates the other folds)
    m2m-train calibrate "$PREP" "$out" --phase 1 --test-subject "$test" --device "$DEVICE" \
      --out "$out/phase1_calibration_raw.tsv"
  fi
  [[ $FOLD_PHASES == *" 2 "* ]] || return 0
  # phase 2 learns from the teacher's maps and from phase 1's predictions of its training subjects
  m2m-train predict "$PREP" "$out/pred-phase1" --weights-dir "$out" --device "$DEVICE"
  m2m-train phase2 "$PREP" "$out" "${subjects[@]}" --epochs "$epochs2" \
    --predicted-inputs "$out/pred-phase1" "${COMMON[@]}"
  m2m-train evaluate "$PREP" "$out" --phase 2 --test-subject "$test" --device "$DEVICE" \
    --predicted-inputs "$out/pred-phase1" --out "$out/phase2_heldout_predicted_inputs.tsv"
  m2m-train evaluate "$PREP" "$out" --phase 2 --test-subject "$test" --device "$DEVICE" \
    --out "$out/phase2_heldout_teacher_inputs.tsv"
  m2m-train calibrate "$PREP" "$out" --phase 2 --test-subject "$test" --device "$DEVICE" \
    --predicted-inputs "$out/pred-phase1" --out "$out/phase2_calibration_raw.tsv"
}

if [[ $PART == a || $PART == all ]]; then fold sub-01; fi
if [[ $PART == b || $PART == all ]]; then fold sub-02; fi
if [[ $PART == c || $PART == all ]]; then fold sub-03; fi
if [[ $PART == ship || $PART == all ]]; then
  out="$WORK/ship"
  units=$(awk -F'\t' 'NR == 1 {for (i = 1; i <= NF; i++) if ($i == "status") c = i; next} $c == "ok"' \
    "$PREP/manifest.tsv" | wc -l)
  # phase 1 exported with its detail transfer (fit-detail adds "fa_detail" to phase1.json): kept, so that
  # phase 2 can follow in a later run even when the checkpoints are gone (WORK/ship seeded with the
  # packaged phase1.safetensors and phase1.json)
  if ! grep -qs '"fa_detail"' "$out/phase1.json"; then
    m2m-train phase1 "$PREP" "$out" --epochs "$(epochs "$SHIP_STEPS" "$PHASE1_BATCHES_PER_UNIT" "$units")" \
      "${COMMON[@]}" "${PHASE1[@]}"
    m2m-train fit-detail "$PREP" "$out"
  fi
  m2m-train predict "$PREP" "$out/pred-phase1" --weights-dir "$out" --device "$DEVICE"
  m2m-train phase2 "$PREP" "$out" --epochs "$(epochs "$SHIP_STEPS" "$PHASE2_BATCHES_PER_UNIT" "$units")" \
    --predicted-inputs "$out/pred-phase1" "${COMMON[@]}"
fi

FOLD_TESTS=(sub-01 sub-02 sub-03)
if [[ $PART == calibrate || $PART == all ]]; then
  # FOLD_PHASES=1: only phase 1's scale (the folds' phase-2 tables are not needed for it)
  for phase in $FOLD_PHASES; do
    pooled=()
    for test in "${FOLD_TESTS[@]}"; do
      out="$WORK/loso-test-$test"
      # --store-scale: the fold's weights then carry that scale, so the app run with them (chain) writes
      # calibrated uncertainty maps as it does with the shipped weights (--stop-dispersion acts on those)
      args=(--phase "$phase" --test-subject "$test" --device "$DEVICE" --store-scale
        --out "$out/phase${phase}_calibration.tsv")
      [[ $phase == 1 ]] || args+=(--predicted-inputs "$out/pred-phase1")
      for other in "${FOLD_TESTS[@]}"; do
        [[ $other == "$test" ]] || args+=(--scale-from "$WORK/loso-test-$other/phase${phase}_calibration_raw.tsv")
      done
      m2m-train calibrate "$PREP" "$out" "${args[@]}"
      pooled+=(--scale-from "$out/phase${phase}_calibration_raw.tsv")
    done
    # weights trained on everyone have no held-out person: they get the scale pooled over the three folds
    m2m-train calibrate "$PREP" "$WORK/ship" --phase "$phase" --store-scale "${pooled[@]}"
  done
  cp "$WORK/ship"/phase{1,2}.{safetensors,json} m2m_app/data/models/
fi

# chain BIDS_DIR TEST_LABEL SESSION UNIT: the app on a held-out person with the weights that never saw them,
# then again with streamlines stopped where the predicted V1 dispersion is high: does that help the tractogram?
# 30 degrees: in the folds' phase-1 reliability tables the top decile of V1 dispersion (about 33-66 degrees)
# has V1 errors of about 50 degrees, so the rule cuts roughly that decile. The second run shares the work
# folder: phase 1, phase 2 and the NeRF fit have the same inputs and are reused; tracking and writing run again.
chain() {
  local bids=$1 label=$2 session=$3 unit=$4 fold_dir="$WORK/loso-test-sub-$2" out="$WORK/app-loso-test-sub-$2"
  local options=(participant --participant-label "$label" ${session:+--session-label "$session"}
    --weights-dir "$fold_dir" -w "$WORK/work-loso-test-sub-$label" --nprocs 2 --device "$DEVICE" --random-seed 0)
  m2m "$bids" "$out" "${options[@]}"
  m2m-train evaluate-tractogram "$PREP" "$out" --subject "$unit" > "$fold_dir/tractogram_heldout.tsv"
  m2m "$bids" "$out-stopdispersion" "${options[@]}" --stop-dispersion 30
  m2m-train evaluate-tractogram "$PREP" "$out-stopdispersion" --subject "$unit" \
    > "$fold_dir/tractogram_heldout_stopdispersion.tsv"
}

if [[ $PART == chain || $PART == all ]]; then
  chain "$DS_REAL" 01 "" sub-01
  chain "$DS_REAL" 02 hfs sub-02_ses-hfs
  chain "$DS_EXTRA" 03 1 sub-03_ses-1
fi
if [[ $PART == tables || $PART == all ]]; then
  python scripts/model_card_tables.py "$WORK"
fi
