"""Group level: one QC row per subject, as TSV and a small HTML table."""
from __future__ import annotations

import html
import json
from pathlib import Path

from m2m_app.errors import MissingInputError
from m2m_app.io.nifti import atomic_write, save_tsv


def write_group_outputs(output_dir: Path) -> Path:
    """Gather every ``*_desc-m2m_qc.json`` into ``group_qc.tsv`` and ``group.html``; returns the TSV."""
    output_dir = Path(output_dir)
    rows = [json.loads(p.read_text()) for p in sorted(output_dir.glob("sub-*/**/*_desc-m2m_qc.json"))]
    if not rows:
        raise MissingInputError(f"{output_dir}: no participant results; run the participant level first")
    columns = list(dict.fromkeys(["subject", *(key for row in rows for key in row)]))
    tsv = save_tsv(rows, output_dir / "group_qc.tsv", columns)
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(str(row.get(c, 'n/a')))}</td>" for c in columns)
                    + f'<td><a href="{html.escape(row["subject"])}.html">report</a></td></tr>' for row in rows)
    page = ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>m2m group QC</title></head>"
            "<body><h1>m2m group QC</h1><table border=\"1\"><tr>"
            + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "<th></th></tr>" + cells
            + "</table></body></html>")
    atomic_write(output_dir / "group.html", lambda tmp: Path(tmp).write_text(page))
    return tsv
