"""Print the teacher's QC of a prep dir as the Markdown table of docs/training.md.

    python scripts/teacher_qc_table.py PREP_DIR

One row per unit of ``PREP_DIR/manifest.json`` (written by ``m2m-train prepare``):
registration start, distance from the header alignment and from ANTs (mm, mean over the
T1w brain inside the DWI's field of view), the share of the brain the DWI covers, tissue
volumes, mean white-matter FA, streamlines, runtime and flags.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = [
    ("unit", "subject"),
    ("start", "registration_start"),
    ("from headers (mm)", "registration_from_header_mm"),
    ("vs ANTs (mm)", "registration_vs_ants_mm"),
    ("ANTs runs' spread (mm)", "registration_ants_spread_mm"),
    ("brain in DWI FOV", "fov_fraction"),
    ("brain (ml)", "brain_ml"),
    ("WM (ml)", "wm_ml"),
    ("WM share", "wm_fraction"),
    ("mean WM FA", "mean_fa_wm"),
    ("streamlines", "n_streamlines"),
    ("runtime (s)", "runtime_s"),
    ("flags", "flags"),
]


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 10 else f"{value:.0f}"
    return str(value) if value not in (None, "") else "none"


def main(prep_dir: str) -> None:
    rows = json.loads((Path(prep_dir) / "manifest.json").read_text())["pairs"]
    print("| " + " | ".join(title for title, _ in COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(_cell(row.get(key)) for _, key in COLUMNS) + " |")


if __name__ == "__main__":
    main(*sys.argv[1:])
