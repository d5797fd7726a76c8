#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one script (not yet run: no GPU has been lent so far):
# the CUDA test (training + CPU/GPU agreement), the NeRF fit on the GPU, and the app on
# sub-01 of ds-real on 2 CPU threads and on the GPU (tables on stdout).
#
#   benchmarks/gpu_checks.sh [DS_REAL]
set -euo pipefail
DS_REAL=${1:-../shared/data/ds-real}
nvidia-smi --query-gpu=name,memory.total --format=csv
python -m pytest -q tests/test_translator.py -k cuda -rs
python benchmarks/bench_nerf.py --device cuda --threads 4
python benchmarks/bench_pipeline.py --bids "$DS_REAL" --threads 2 --no-classical
