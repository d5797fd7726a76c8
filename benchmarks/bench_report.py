"""Time the report of one unit from an existing participant output folder.

Usage: ``python benchmarks/bench_report.py OUT T1W --participant MNI152 [--session S] [--threads 2]
[--render]``. ``OUT`` is the output folder of ``m2m BIDS_DIR OUT participant`` and ``T1W`` the
unit's input T1w. With ``--render`` the NeRF views and turntable are first re-rendered from the
written field, baked once (the ``nerf_render`` node's work), into the output folder's figure paths. Prints
one row per stage with its wall and CPU time (user + system, all threads) and the load average
(the machine may be shared); the report itself is rewritten in place.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from m2m_app.io.naming import Subject, derivative_path, derivative_paths
from m2m_app.models.nerf import FittedField
from m2m_app.reports.subject import NERF_VIEWS, report_summary, write_report
from m2m_app.tractography.views import bake_field, write_standard_views, write_turntable


def written_outputs(output_dir: Path, subject: Subject) -> dict[str, Path]:
    """The unit's written derivatives keyed as the workflow's ``written`` dicts (only existing files)."""
    paths = {key: path for key, path in derivative_paths(output_dir, subject, "nerf").items() if path.exists()}
    paths["field"] = derivative_path(
        output_dir, subject, "dwi", "model", ".safetensors", space="T1w", tract="wholebrain", desc="nerf"
    )
    for name, extension in [*((view, ".png") for view in NERF_VIEWS), ("turntable", ".gif")]:
        paths[f"figure_{name}"] = derivative_path(output_dir, subject, "figures", "nerf", extension, desc=name)
    return {key: path for key, path in paths.items() if path.exists()}


def _timed(rows: list[tuple[str, float, float]], name: str, work):
    """Run ``work()``, append its wall and CPU seconds to ``rows`` and return its result."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = work()
    rows.append((name, time.perf_counter() - wall, time.process_time() - cpu))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("t1w", type=Path)
    parser.add_argument("--participant", required=True)
    parser.add_argument("--session")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--render", action="store_true", help="re-render the NeRF views and turntable first")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    subject = Subject(args.participant, args.session)
    written = written_outputs(args.output_dir, subject)
    rows: list[tuple[str, float, float]] = []
    if args.render:
        # one bake for the views and the turntable, as the app's nerf_render
        baked = _timed(rows, "NeRF bake (96³ grid)", lambda: bake_field(FittedField.load(written["field"])))
        _timed(
            rows,
            "NeRF views (4 × 512 px)",
            lambda: write_standard_views(baked, {view: written[f"figure_{view}"] for view in NERF_VIEWS}),
        )
        _timed(rows, "NeRF turntable", lambda: write_turntable(baked, written["figure_turntable"]))
    _timed(
        rows,
        "write_report (figures + page)",
        lambda: write_report(
            args.output_dir,
            subject,
            str(args.t1w),
            written,
            report_summary(written, None, {}, None),
            "benchmark",
            [],
            command_line="bench_report.py",
        ),
    )
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, {args.threads} threads")
    print("| stage | wall s | CPU s |\n|---|---|---|")
    for name, wall, cpu in rows:
        print(f"| {name} | {wall:.1f} | {cpu:.1f} |")


if __name__ == "__main__":
    main()
