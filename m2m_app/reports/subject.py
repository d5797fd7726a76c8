"""The per-subject HTML report (``sub-<label>.html`` with images under ``sub-<label>/figures/``)."""
from __future__ import annotations

import html
import json
from pathlib import Path

import nibabel as nib
import numpy as np

from m2m_app import __version__
from m2m_app.io.naming import Subject, derivative_path
from m2m_app.io.nifti import atomic_write
from m2m_app.reports.figures import mosaic_png
from m2m_app.workflows.timing import STAGE_ORDER

STYLE = """body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em;color:#222}
img{max-width:100%;display:block;margin:.5em 0}h2{border-bottom:1px solid #ccc}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}
.error{background:#fdd;padding:.5em;white-space:pre-wrap}.views img{display:inline-block;width:24%}"""


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(path)
    return np.asarray(img.dataobj, dtype=np.float32), img.affine


def report_figures(output_dir: Path, subject: Subject, t1w: str, written: dict[str, Path]) -> dict[str, Path]:
    """Draw the report's mosaics (T1w + mask, FA, MD, colour FA, TDI) into ``sub-X/figures/``."""
    t1, affine = _load(Path(t1w))
    mask, _ = _load(written["mask"])
    drawn = {
        "brainmask": mosaic_png(t1, affine, contour=mask > 0, title="T1w and predicted brain mask"),
        "fa": mosaic_png(_load(written["fa"])[0], affine, underlay=t1, cmap="inferno", vmax=0.8,
                         title="FA over the T1w"),
        "md": mosaic_png(_load(written["md"])[0], affine, cmap="viridis", vmax=2e-3, title="MD (mm²/s)"),
        "colfa": mosaic_png(_load(written["colfa"])[0], affine, vmax=0.8,
                            title="colour FA (red L-R, green A-P, blue I-S)"),
    }
    if "tdi" in written:
        drawn["tdi"] = mosaic_png(_load(written["tdi"])[0], affine, cmap="hot", title="predicted track density")
    out = {}
    for name, png in drawn.items():
        path = derivative_path(output_dir, subject, "figures", name, ".png", desc="m2m")
        out[name] = atomic_write(path, lambda tmp, data=png: Path(tmp).write_bytes(data))
    return out


def _table(rows: dict, header: tuple[str, str] | None = None) -> str:
    """A two-column HTML table of ``rows`` (dict and list values as JSON)."""
    head = f"<tr><th>{html.escape(header[0])}</th><th>{html.escape(header[1])}</th></tr>" if header else ""
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>"
                   f"{html.escape(json.dumps(v) if isinstance(v, (dict, list)) else str(v))}</td></tr>"
                   for k, v in rows.items())
    return f"<table>{head}{body}</table>"


def write_report(output_dir: Path, subject: Subject, t1w: str, written: dict[str, Path] | None,
                 summary: dict, boilerplate: str, errors: list[str],
                 timings: dict[str, float] | None = None) -> Path:
    """Write ``sub-<label>[_ses-<label>].html``; with ``written=None`` (a failed run) it shows the errors only.

    ``summary`` rows go into the summary table after the m2m version; ``timings``
    ({stage: seconds}) become a table of wall times with their total.
    """
    output_dir = Path(output_dir)
    parts = [f"<h1>m2m report: {html.escape(subject.label)}</h1>",
             "<p>All diffusion maps and streamlines on this page are <b>predicted from the T1w</b>; "
             "no diffusion data was used.</p>", "<h2>Summary</h2>", _table({"m2m version": __version__, **summary})]
    if timings:
        ordered = sorted(timings, key=lambda s: STAGE_ORDER.index(s) if s in STAGE_ORDER else len(STAGE_ORDER))
        rows = {stage: f"{timings[stage]:.1f}" for stage in ordered}
        parts += ["<h2>Run time</h2>", _table({**rows, "total": f"{sum(timings.values()):.1f}"},
                                              ("stage", "wall time (s)"))]
    if errors:
        parts.append("<h2>Errors</h2>" + "".join(f'<div class="error">{html.escape(e)}</div>' for e in errors))
    if written:
        figures = report_figures(output_dir, subject, t1w, written)
        for name, title in (("brainmask", "Brain mask"), ("fa", "Fractional anisotropy"),
                            ("md", "Mean diffusivity"), ("colfa", "Colour FA"), ("tdi", "Track density (phase 2)")):
            if name in figures:
                parts.append(f"<h2>{title}</h2><img src=\"{figures[name].relative_to(output_dir).as_posix()}\" "
                             f"alt=\"{name}\">")
        views = [written[f"figure_{v}"] for v in ("left", "right", "top", "front") if f"figure_{v}" in written]
        if views:
            parts.append("<h2>NeRF tractography field</h2><div class=\"views\">" + "".join(
                f'<img src="{v.relative_to(output_dir).as_posix()}" alt="{v.stem}">' for v in views) + "</div>")
        if "figure_turntable" in written:
            parts.append(f'<img src="{written["figure_turntable"].relative_to(output_dir).as_posix()}" alt="turntable">')
    parts.append(f"<h2>Methods</h2><p>{html.escape(boilerplate)}</p>")
    page = (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>m2m {subject.label}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")
    path = output_dir / f"{subject.label}.html"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(page))


def report_summary(written: dict[str, Path], n_streamlines: int | None, field_report: dict,
                   weights_dir: str | None) -> dict:
    """Summary rows about the outputs: weights used, streamline count (from the QC row) and the NeRF fit."""
    from m2m_app.io.derivatives import weights_provenance

    rows = {f"{phase} weights": f"sha256 {meta['sha256'][:16]}…, trained on {', '.join(meta['trained_on'] or [])}"
            for phase, meta in weights_provenance(weights_dir).items()}
    if "tractogram" in written:
        rows["streamlines"] = f"{n_streamlines} ({written['tractogram'].name})"
    if field_report:
        rows["NeRF fit"] = (f"{field_report.get('steps')} steps, {field_report.get('seconds', 0):.1f} s; PSNR "
                            f"{field_report.get('psnr_density_db', float('nan')):.1f} dB density, "
                            f"{field_report.get('psnr_direction_db', float('nan')):.1f} dB direction")
    return rows
