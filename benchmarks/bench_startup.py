"""Start-up of ``m2m ... participant``'s main process: what it imports and checks before the workflow runs.

Runs, in fresh interpreters, the imports of the main process (the command line, the workflow
builders) and its checks of the translator weights (files and SHA-256), and prints the median
CPU and wall seconds over ``--repeats`` runs, with which heavy libraries ended up imported
(torch, dipy and matplotlib each cost about a second or more). CPU seconds barely move when other
work shares the machine; wall seconds do. Compare two checkouts with ``PYTHONPATH=OTHER``::

    python benchmarks/bench_startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile

PROBE = """
import json, sys, time
cpu, wall = time.process_time(), time.perf_counter()
import m2m_app.cli.run, m2m_app.workflows.base
try:
    from m2m_app.io.derivatives import checked_weight_files as check
except ImportError:  # before 2026-12-07: the torch-based check
    from m2m_app.inference.predict import verify_weights as check
for phase in ("phase1", "phase2"):
    check(phase)
heavy = ("torch", "dipy", "matplotlib", "bids", "nipype")
loaded = [name for name in heavy if name in sys.modules]
print(json.dumps({"cpu": time.process_time() - cpu, "wall": time.perf_counter() - wall, "loaded": loaded}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    command = [sys.executable, "-c", PROBE]  # run outside the checkout: the installed m2m, or PYTHONPATH's
    runs = [
        json.loads(
            subprocess.run(command, capture_output=True, text=True, check=True, cwd=tempfile.gettempdir()).stdout
        )
        for _ in range(args.repeats)
    ]
    print("| what | median CPU s | median wall s | heavy libraries imported |")
    print("|---|---|---|---|")
    cpu, wall = (statistics.median(run[key] for run in runs) for key in ("cpu", "wall"))
    print(f"| main-process imports + weight checks | {cpu:.2f} | {wall:.2f} | {', '.join(runs[0]['loaded'])} |")


if __name__ == "__main__":
    main()
