"""Benchmark of the teacher (``m2m-train prepare``), i.e. the classical DWI route m2m replaces.

Runs the teacher on each unit of a BIDS dataset (default: ../shared/data/ds-real) and prints
one row per unit: wall time of each stage (T1w brain mask and tissue classes; DWI fit,
registration with its ANTs check and tractography; resampling to the T1w; writing), total,
and peak memory. Usage:

    python benchmarks/bench_teacher.py --threads 2 [--bids DIR] [--participant 01]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

DEFAULT_BIDS = Path(__file__).resolve().parents[2] / "shared" / "data" / "ds-real"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bids", type=Path, default=DEFAULT_BIDS)
    parser.add_argument("--threads", type=int, default=2, help="BLAS/OpenMP threads")
    parser.add_argument("--participant", action="append", help="participant label(s); default all")
    args = parser.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        os.environ[var] = str(args.threads)  # before NumPy is imported

    import resource

    from m2m_app.io import bids as bids_io
    from m2m_app.teacher.prepare import prepare_subject

    layout = bids_io.load_layout(args.bids)
    rows = []
    with tempfile.TemporaryDirectory() as prep:
        for subject in bids_io.collect_subjects(layout, args.participant):
            qc = prepare_subject(
                subject,
                bids_io.find_t1w(layout, subject),
                bids_io.find_dwi(layout, subject),
                Path(prep),
                num_threads=args.threads,
            )
            rows.append((subject.label, qc["stage_seconds"], qc["runtime_s"], qc["n_streamlines"]))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    stages = list(rows[0][1])
    header = ["unit", *stages, "total_s", "streamlines"]
    print(f"# teacher benchmark, {args.threads} thread(s), peak RSS {peak_mb:.0f} MB")
    print(" | ".join(header))
    for label, times, total, count in rows:
        print(" | ".join([label, *[f"{times[s]:.1f}" for s in stages], f"{total:.1f}", str(count)]))


if __name__ == "__main__":
    sys.exit(main())
