"""Per-stage wall time and peak memory of the m2m pipeline on one T1w, next to the classical route.

Runs the app's own Nipype workflow (Linear plugin, Nipype's resource monitor on) on one
subject for each thread count (and on CUDA when available), then, on the same subject,
the classical route m2m replaces: DWI → dipy tensor fit → registration → dipy whole-brain
tracking (the teacher, ``m2m-train prepare``). Prints one table. Usage:

    python benchmarks/bench_pipeline.py [--threads 2 --threads 16] [--participant 01] [--no-classical]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

DEFAULT_BIDS = Path(__file__).resolve().parents[2] / "shared" / "data" / "ds-real"


def run_app(bids: Path, participant: str, threads: int, device: str, weights_dir: str | None) -> dict:
    """Run the workflow once; returns {stage: (seconds, peak GB)}."""
    import torch
    from nipype import config
    from nipype.utils.filemanip import loadpkl

    from m2m_app.io import bids as bids_io
    from m2m_app.io.timings import STAGE_ORDER
    from m2m_app.workflows.base import init_m2m_wf
    from m2m_app.workflows.config import RunConfig

    config.enable_resource_monitor()
    torch.set_num_threads(threads)
    layout = bids_io.load_layout(bids)
    subject = bids_io.collect_subjects(layout, [participant])[0]
    with tempfile.TemporaryDirectory() as tmp:
        run_config = RunConfig(
            bids_dir=Path(bids),
            output_dir=Path(tmp) / "out",
            work_dir=Path(tmp) / "work",
            weights_dir=weights_dir,
            device=device,
            omp_nthreads=threads,
        )
        workflow = init_m2m_wf({subject: bids_io.find_t1w(layout, subject)}, run_config)
        start, previous = time.monotonic(), os.getcwd()
        os.chdir(tmp)  # Nipype's resource monitor writes its .proc-* files into the current folder
        try:
            workflow.run(plugin="Linear")
        finally:
            os.chdir(previous)
        total = time.monotonic() - start
        stages = {}
        for result in Path(tmp, "work").rglob("result_*.pklz"):
            runtime = loadpkl(result).runtime
            stages[result.parent.name] = (runtime.duration, getattr(runtime, "mem_peak_gb", float("nan")))
    ordered = {name: stages[name] for name in STAGE_ORDER if name in stages}
    ordered["total"] = (total, max(v[1] for v in stages.values()))
    return ordered


def run_classical(bids: Path, participant: str) -> dict:
    """The teacher on the same subject: {stage: (seconds, nan)} from its QC record."""
    from m2m_app.io import bids as bids_io
    from m2m_app.teacher.prepare import prepare_subject

    layout = bids_io.load_layout(bids)
    subject = bids_io.collect_subjects(layout, [participant])[0]
    with tempfile.TemporaryDirectory() as prep:
        qc = prepare_subject(subject, bids_io.find_t1w(layout, subject), bids_io.find_dwi(layout, subject), Path(prep))
    stages = {name: (seconds, float("nan")) for name, seconds in qc["stage_seconds"].items()}
    stages["total"] = (qc["runtime_s"], float("nan"))
    return stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bids", type=Path, default=DEFAULT_BIDS)
    parser.add_argument("--participant", default="01")
    parser.add_argument("--threads", type=int, action="append", help="repeatable; default 2 and all cores")
    parser.add_argument("--weights-dir", default=None)
    parser.add_argument("--no-classical", action="store_true")
    args = parser.parse_args()
    import torch

    runs = [(f"m2m cpu {n} threads", n, "cpu") for n in (args.threads or sorted({2, os.cpu_count() or 2}))]
    if torch.cuda.is_available():
        runs.append(("m2m cuda", 4, "cuda"))
    columns = {label: run_app(args.bids, args.participant, n, device, args.weights_dir) for label, n, device in runs}
    if not args.no_classical:
        os.environ["OMP_NUM_THREADS"] = "2"
        columns["classical (teacher) 2 threads"] = run_classical(args.bids, args.participant)
    print(f"# sub-{args.participant}: seconds (peak GB where measured)")
    for label, stages in columns.items():
        print(f"\n## {label}\n| stage | seconds | peak GB |\n|---|---|---|")
        for name, (seconds, peak) in stages.items():
            print(f"| {name} | {seconds:.1f} | {peak:.2f} |")


if __name__ == "__main__":
    main()
