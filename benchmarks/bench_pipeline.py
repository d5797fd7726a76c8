"""Per-stage wall time and peak memory of the m2m pipeline, next to the MRtrix3 route it replaces.

For each case (a BIDS dataset, a participant, optionally a session), runs the app's own
Nipype workflow (Linear plugin, Nipype's resource monitor on) on the T1w, and, on the same
unit's DWI in the same run, the classical route m2m spares its users (MRtrix3: ``dwi2mask``,
``dwi2tensor``, ``tensor2metric``, ``tckgen -algorithm Tensor_Det -select 45000``,
``tckmap``; installed with apt where missing and possible, else skipped with a message), both
with the same number of threads; then the ``m2m`` command itself as a user runs it (a fresh
process with its start-up and dataset indexing, MultiProc). Prints a summary table (wall time of
both routes and of the command, their ratios, peak memory) and one table per route and case with
seconds and peak GB per stage.
Defaults: ds-real sub-01 (1 mm T1w) and ds-extra sub-03 ses-1 (0.5 mm T1w). Usage:

    python benchmarks/bench_pipeline.py [--case ds-real:01 --case ds-extra:03:1] [--threads 2]
        [--no-classical] [--teacher] [--weights-dir DIR] [--output-spaces MNI152NLin2009aSym ...]

``--teacher`` also times m2m's own teacher (dipy tensor fit, registration, dipy tracking).
``--output-spaces`` runs m2m a second time on each case with those output spaces (fMRIPrep's
syntax) and adds that run's total, and its registration's seconds, to the summary.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_CASES = ("ds-real:01", "ds-extra:03:1")
#: Streamlines the MRtrix3 route selects (as many as the teacher's tractogram holds).
MRTRIX_STREAMLINES = 45000
log = logging.getLogger("bench_pipeline")

Stages = dict[str, tuple[float, float]]  # {stage: (seconds, peak GB)}


@dataclass(frozen=True)
class Case:
    """One unit to benchmark: ``DATASET:PARTICIPANT[:SESSION]``, DATASET a folder or a name under ../shared/data."""

    bids: Path
    participant: str
    session: str | None

    @classmethod
    def parse(cls, text: str) -> Case:
        dataset, participant, *session = text.split(":")
        bids = Path(dataset) if Path(dataset).is_dir() else DATA / dataset
        return cls(bids, participant, session[0] if session else None)

    @property
    def label(self) -> str:
        return f"{self.bids.name} sub-{self.participant}" + (f" ses-{self.session}" if self.session else "")

    def unit(self):
        """The BIDS layout and the :class:`~m2m_app.io.naming.Subject` of this case."""
        from m2m_app.io import bids as bids_io

        layout = bids_io.load_layout(self.bids)
        sessions = [self.session] if self.session else None
        return layout, bids_io.collect_subjects(layout, [self.participant], sessions)[0]


def run_app(
    case: Case, threads: int, device: str, weights_dir: str | None, output_spaces: tuple[str, ...] = ("T1w",)
) -> Stages:
    """Run the workflow once on the case's T1w; returns {stage: (seconds, peak GB)} and the total."""
    import torch
    from nipype import config
    from nipype.utils.filemanip import loadpkl

    from m2m_app.io import bids as bids_io
    from m2m_app.io.timings import STAGE_ORDER
    from m2m_app.workflows.base import init_m2m_wf
    from m2m_app.workflows.config import RunConfig

    config.enable_resource_monitor()
    torch.set_num_threads(threads)
    layout, subject = case.unit()
    with tempfile.TemporaryDirectory() as tmp:
        run_config = RunConfig(
            bids_dir=case.bids,
            output_dir=Path(tmp) / "out",
            work_dir=Path(tmp) / "work",
            weights_dir=weights_dir,
            device=device,
            omp_nthreads=threads,
            output_spaces=output_spaces,
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
    ordered |= {name: stages[name] for name in sorted(stages) if name not in ordered}  # template spaces
    ordered["total"] = (total, max(v[1] for v in stages.values()))
    return ordered


def run_command(case: Case, threads: int, weights_dir: str | None) -> tuple[float, float]:
    """The ``m2m`` command itself on the case, as a user runs it (a fresh process: start-up, dataset
    indexing, MultiProc with ``--nprocs`` and ``--omp-nthreads`` ``threads``): wall seconds and peak GB."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            sys.executable, "-m", "m2m_app.cli.run", str(case.bids), f"{tmp}/out", "participant",
            "--participant-label", case.participant, "-w", f"{tmp}/work",
            "--nprocs", str(threads), "--omp-nthreads", str(threads),
        ]  # fmt: skip
        if case.session:
            command += ["--session-label", case.session]
        if weights_dir:
            command += ["--weights-dir", weights_dir]
        return _timed(command)


def mrtrix_available() -> bool:
    """Whether MRtrix3's commands are on PATH; tries ``apt-get install mrtrix3`` as root when they are not."""
    if shutil.which("tckgen"):
        return True
    if os.geteuid() == 0 and shutil.which("apt-get"):
        log.info("MRtrix3 not found: installing the Debian package mrtrix3")
        for command in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "mrtrix3"]):
            if subprocess.run(command, capture_output=True).returncode != 0:
                break
    return shutil.which("tckgen") is not None


#: Runs argv[2:] and writes its peak resident memory (KiB) to argv[1]. A process forked from this
#: benchmark (GBs of torch and volumes) starts with the benchmark's peak as its own, and an exec
#: keeps it, so the commands are started from this small launcher instead.
_LAUNCHER = (
    "import os, subprocess, sys; p = subprocess.Popen(sys.argv[2:]); _, s, u = os.wait4(p.pid, 0); "
    "open(sys.argv[1], 'w').write(str(u.ru_maxrss)); sys.exit(os.waitstatus_to_exitcode(s))"
)


def _timed(command: list[str]) -> tuple[float, float]:
    """Run one command; its wall seconds and peak resident memory (GB, from the kernel's rusage)."""
    with tempfile.NamedTemporaryFile("r", suffix=".maxrss") as peak:
        start = time.monotonic()
        process = subprocess.run(
            [sys.executable, "-c", _LAUNCHER, peak.name, *command], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        seconds = time.monotonic() - start
        if process.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {process.stderr.decode()[-2000:]}")
        return seconds, int(peak.read()) / 1024**2  # ru_maxrss is in KiB on Linux


def run_mrtrix(case: Case, threads: int) -> Stages:
    """The MRtrix3 tensor route on the case's first DWI run: {stage: (seconds, peak GB)} and the total."""
    from m2m_app.io import bids as bids_io

    layout, subject = case.unit()
    dwi = bids_io.find_dwi(layout, subject)[0]
    bval, bvec = layout.get_bval(str(dwi)), layout.get_bvec(str(dwi))
    n = ["-nthreads", str(threads), "-quiet", "-force"]
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        steps = {
            "mrconvert (grad table)": ["mrconvert", str(dwi), "-fslgrad", bvec, bval, str(t / "dwi.mif"), *n],
            "dwi2mask": ["dwi2mask", str(t / "dwi.mif"), str(t / "mask.mif"), *n],
            "dwi2tensor": ["dwi2tensor", str(t / "dwi.mif"), str(t / "dt.mif"), "-mask", str(t / "mask.mif"), *n],
            "tensor2metric": [
                "tensor2metric", str(t / "dt.mif"), "-fa", str(t / "fa.mif"), "-adc", str(t / "md.mif"),
                "-vector", str(t / "v1.mif"), "-mask", str(t / "mask.mif"), *n,
            ],
            "tckgen Tensor_Det": [
                "tckgen", "-algorithm", "Tensor_Det", str(t / "dwi.mif"), str(t / "tracks.tck"),
                "-seed_image", str(t / "mask.mif"), "-mask", str(t / "mask.mif"),
                "-select", str(MRTRIX_STREAMLINES), *n,
            ],
            "tckmap": ["tckmap", str(t / "tracks.tck"), str(t / "tdi.mif"), "-template", str(t / "fa.mif"), *n],
        }  # fmt: skip
        stages = {name: _timed(command) for name, command in steps.items()}
    stages["total"] = (sum(s for s, _ in stages.values()), max(p for _, p in stages.values()))
    return stages


def run_teacher(case: Case) -> Stages:
    """m2m's teacher on the same unit: {stage: (seconds, nan)} from its QC record."""
    from m2m_app.io import bids as bids_io
    from m2m_app.teacher.prepare import prepare_subject

    layout, subject = case.unit()
    with tempfile.TemporaryDirectory() as prep:
        qc = prepare_subject(subject, bids_io.find_t1w(layout, subject), bids_io.find_dwi(layout, subject), Path(prep))
    stages = {name: (seconds, float("nan")) for name, seconds in qc["stage_seconds"].items()}
    stages["total"] = (qc["runtime_s"], float("nan"))
    return stages


def t1w_description(case: Case) -> str:
    """``X×Y×Z at a×b×c mm`` of the case's T1w."""
    import nibabel as nib

    from m2m_app.io import bids as bids_io

    layout, subject = case.unit()
    image = nib.load(bids_io.find_t1w(layout, subject))
    zooms = "×".join(f"{z:g}" for z in image.header.get_zooms()[:3])
    return "×".join(str(s) for s in image.shape[:3]) + f" at {zooms} mm"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--case", action="append", help=f"DATASET:PARTICIPANT[:SESSION], repeatable (default {DEFAULT_CASES})"
    )
    parser.add_argument("--threads", type=int, default=2, help="threads of both routes (default 2)")
    parser.add_argument("--weights-dir", default=None)
    parser.add_argument("--no-classical", action="store_true", help="time m2m only")
    parser.add_argument("--teacher", action="store_true", help="also time m2m's teacher (dipy) on the same unit")
    parser.add_argument("--output-spaces", nargs="+", default=None, help="also time a run with these output spaces")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    import torch

    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    cases = [Case.parse(text) for text in args.case or DEFAULT_CASES]
    mrtrix = not args.no_classical and mrtrix_available()
    if not args.no_classical and not mrtrix:
        log.warning("MRtrix3 is not installed and could not be installed: the classical route is skipped")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tables: dict[str, Stages] = {}
    summary = []
    with_spaces: list[tuple[Case, float, float]] = []
    for case in cases:
        log.info("%s: m2m (%s, %d threads)", case.label, device, args.threads)
        app = tables[f"{case.label}: m2m {device} {args.threads} threads"] = run_app(
            case, args.threads, device, args.weights_dir
        )
        classical = None
        if mrtrix:
            log.info("%s: MRtrix3 (%d threads)", case.label, args.threads)
            classical = tables[f"{case.label}: MRtrix3 {args.threads} threads"] = run_mrtrix(case, args.threads)
        if args.teacher:
            tables[f"{case.label}: teacher (dipy)"] = run_teacher(case)
        log.info("%s: the m2m command", case.label)
        command = run_command(case, args.threads, args.weights_dir)
        summary.append((case, app["total"], classical["total"] if classical else None, command))
        if args.output_spaces:
            spaces = tuple(args.output_spaces)
            log.info("%s: m2m with --output-spaces %s", case.label, " ".join(spaces))
            spaced = tables[f"{case.label}: m2m {device} {args.threads} threads, {' '.join(spaces)}"] = run_app(
                case, args.threads, device, args.weights_dir, spaces
            )
            registration = sum(seconds for name, (seconds, _) in spaced.items() if name.startswith("register_"))
            with_spaces.append((case, spaced["total"][0], registration))
    print(f"# m2m vs the MRtrix3 route, {args.threads} threads, {device}\n")
    print(
        "| case | T1w | m2m s | m2m peak GB | MRtrix3 s | MRtrix3 peak GB | ratio m2m / MRtrix3 "
        "| `m2m` command s | its ratio to MRtrix3 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for case, (app_s, app_gb), classical, (command_s, _) in summary:
        right = f"{classical[0]:.1f} | {classical[1]:.2f} | {app_s / classical[0]:.2f}" if classical else "— | — | —"
        command_ratio = f"{command_s / classical[0]:.2f}" if classical else "—"
        left = f"| {case.label} | {t1w_description(case)} | {app_s:.1f} | {app_gb:.2f}"
        print(f"{left} | {right} | {command_s:.1f} | {command_ratio} |")
    if with_spaces:
        print(f"\n## With --output-spaces {' '.join(args.output_spaces)}\n")
        print("| case | m2m s (T1w only) | m2m s (with the spaces) | added | registration s |\n|---|---|---|---|---|")
        for (case, (app_s, _), _, _), (_, spaced_s, registration) in zip(summary, with_spaces):
            added = f"+{spaced_s - app_s:.1f} s ({(spaced_s / app_s - 1) * 100:.0f} %)"
            print(f"| {case.label} | {app_s:.1f} | {spaced_s:.1f} | {added} | {registration:.1f} |")
    if len(summary) > 1:
        first = summary[0][1][0]
        relative = ", ".join(f"{c.label} {s / first:.2f}×" for c, (s, _), _, _ in summary)
        print(f"\nm2m wall time relative to the first case: {relative}")
    for label, stages in tables.items():
        print(f"\n## {label}\n| stage | seconds | peak GB |\n|---|---|---|")
        for name, (seconds, peak) in stages.items():
            print(f"| {name} | {seconds:.1f} | {peak:.2f} |")


if __name__ == "__main__":
    main()
