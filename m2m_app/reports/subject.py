"""The per-subject HTML report (``sub-<label>.html`` with its figures under ``sub-<label>/figures/``).

Sections, each reachable from the navigation bar: Summary, Viewer (NiiVue on the T1w, the maps
and the tractogram: :mod:`m2m_app.reports.viewer`), Maps (FA over the T1w as a
T1w/FA toggle with the brain-mask contour, MD, colour FA), Tracts (streamline projections,
track density, NeRF views and turntable), Uncertainty, Methods (boilerplate, references,
BibTeX), Errors (the unit's crash files) and About (command line, version, weights, date,
environment). Everything the page shows lies inside the output folder and is linked
relatively, so a moved or copied output folder keeps working
offline.
"""

from __future__ import annotations

import html
import json
import os
import platform
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np

from m2m_app import __version__
from m2m_app.io.crashes import crash_reasons
from m2m_app.io.files import atomic_write, save_bytes
from m2m_app.io.naming import Subject, derivative_path
from m2m_app.io.nifti import load_image
from m2m_app.io.timings import STAGE_ORDER
from m2m_app.io.tractogram import load_streamlines
from m2m_app.reports.figures import mosaic, streamline_figure
from m2m_app.reports.methods import cited, references_html, write_bibtex
from m2m_app.reports.viewer import STYLE as VIEWER_STYLE
from m2m_app.reports.viewer import VIEWER_VOLUMES, prepare_viewer_data, viewer_html, write_viewer

#: Navigation bar: section id → title, in page order.
SECTIONS: dict[str, str] = {
    "summary": "Summary",
    "viewer": "Viewer",
    "maps": "Maps",
    "tracts": "Tracts",
    "spaces": "Template space",
    "regions": "Regions",
    "uncertainty": "Uncertainty",
    "methods": "Methods",
    "errors": "Errors",
    "about": "About",
}
#: Uncertainty maps: key in the written maps → (title, colour map).
UNCERTAINTY_MAPS: dict[str, tuple[str, str]] = {
    "fa_sd": ("FA standard deviation (phase 1)", "magma"),
    "v1_dispersion": ("principal-eigenvector dispersion (phase 1)", "magma"),
    "tdi_sd": ("track-density standard deviation (phase 2)", "magma"),
}
#: Standard NeRF views shown in the report, in order.
NERF_VIEWS = ("left", "right", "top", "front")
#: Where the BibTeX file of the methods goes, relative to the output folder (beside logs/CITATION.md).
BIBTEX = Path("logs") / "CITATION.bib"

STYLE = """body{font-family:sans-serif;max-width:1150px;margin:auto;padding:0 1em 2em;color:#222}
nav{position:sticky;top:0;background:#223;padding:.4em .6em;z-index:10}
nav a{color:#fff;margin-right:1.2em;text-decoration:none}nav a:hover{text-decoration:underline}
section{scroll-margin-top:3em}img,svg{max-width:100%;height:auto;display:block;margin:.4em 0}
h2{border-bottom:1px solid #ccc;margin-top:1.5em}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}
.error{background:#fdd;padding:.5em;white-space:pre-wrap}.note{color:#666}
.views{display:grid;grid-template-columns:repeat(4,1fr);gap:.4em}
.view{position:relative;margin:0;background:#000;color:#fff;font-weight:bold}
.view img{width:100%;margin:0}.view span{position:absolute;font-size:.9em}
.view .left{left:.3em;top:50%}.view .right{right:.3em;top:50%}
.view .top{top:.2em;left:50%}.view .bottom{bottom:1.6em;left:50%}
.view figcaption{text-align:center;padding:.1em}
.toggle input{margin-right:.3em}.toggle .after{display:none}
.toggle input:checked~.after{display:block}.toggle input:checked~.before{display:none}"""


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img, data = load_image(path)
    return data, img.affine


def _relative(path: Path, output_dir: Path) -> str:
    return html.escape(path.relative_to(output_dir).as_posix())


class _Maps(Mapping[str, np.ndarray]):
    """The T1w underlay (``t1w``) and written maps by key, each read from its file when asked for
    (so that the viewer's preparation holds one full-resolution map per thread at a time)."""

    def __init__(self, paths: dict[str, Path]) -> None:
        self.paths = paths

    def __getitem__(self, key: str) -> np.ndarray:
        return _load(self.paths[key])[0]

    def __iter__(self) -> Iterator[str]:
        return iter(self.paths)

    def __len__(self) -> int:
        return len(self.paths)


def report_figures(
    output_dir: Path,
    subject: Subject,
    t1w: str,
    written: dict[str, Path],
    streamlines: Sequence[np.ndarray] | None = None,
) -> dict[str, Path]:
    """Draw the report's figures into ``sub-X/figures/`` and return name → path.

    ``t1w`` and ``fa`` are SVG mosaics with the same slices and the brain-mask contour (the
    two sides of the T1w/FA toggle); ``md``, ``colfa``, ``tdi`` and the uncertainty maps
    present in ``written`` are PNG mosaics; ``streamlines`` is the SVG of
    :func:`~m2m_app.reports.figures.streamline_figure` of ``streamlines`` (the written
    tractogram's, ``(K_i, 3)`` RAS+ mm each) when given.
    """
    t1, affine = _load(Path(t1w))
    mask = _load(written["mask"])[0] > 0
    fa = _load(written["fa"])[0]
    drawn = {
        "t1w": (mosaic(t1, affine, contour=mask, fmt="svg"), ".svg"),
        "fa": (mosaic(fa, affine, underlay=t1, contour=mask, cmap="inferno", vmax=0.8, fmt="svg"), ".svg"),
        "md": (mosaic(_load(written["md"])[0], affine, cmap="viridis", vmax=2e-3, title="MD (mm²/s)"), ".png"),
        "colfa": (
            mosaic(_load(written["colfa"])[0], affine, vmax=0.8, title="colour FA (red L-R, green A-P, blue I-S)"),
            ".png",
        ),
    }
    if "tdi" in written:
        drawn["tdi"] = (mosaic(_load(written["tdi"])[0], affine, cmap="hot", title="predicted track density"), ".png")
    for key, (title, cmap) in UNCERTAINTY_MAPS.items():
        if key in written:
            drawn[key] = (mosaic(_load(written[key])[0], affine, cmap=cmap, title=title), ".png")
    out = {}
    for name, (data, extension) in drawn.items():
        path = derivative_path(output_dir, subject, "figures", name.replace("_", ""), extension, desc="m2m")
        out[name] = save_bytes(data, path)
    if streamlines is not None:
        out["streamlines"] = streamline_figure(
            streamlines,
            derivative_path(output_dir, subject, "figures", "streamlines", ".svg", desc="m2m"),
        )
    return out


def _table(rows: dict, header: tuple[str, str] | None = None) -> str:
    """A two-column HTML table of ``rows`` (dict and list values as JSON)."""
    head = f"<tr><th>{html.escape(header[0])}</th><th>{html.escape(header[1])}</th></tr>" if header else ""
    body = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>"
        f"{html.escape(json.dumps(v) if isinstance(v, (dict, list)) else str(v))}</td></tr>"
        for k, v in rows.items()
    )
    return f"<table>{head}{body}</table>"


def _image(path: Path, output_dir: Path, alt: str) -> str:
    return f'<img src="{_relative(path, output_dir)}" alt="{html.escape(alt)}">'


def _maps_section(figures: dict[str, Path], output_dir: Path) -> str:
    toggle = (
        '<h3>FA over the T1w, brain-mask contour in red</h3><div class="toggle" id="fa-toggle">'
        '<input type="checkbox" id="fa-toggle-switch"><label for="fa-toggle-switch">show FA '
        "(unticked: T1w)</label>"
        f'<div class="before">{_image(figures["t1w"], output_dir, "t1w")}</div>'
        f'<div class="after">{_image(figures["fa"], output_dir, "fa")}</div></div>'
    )
    return (
        toggle
        + "<h3>Mean diffusivity</h3>"
        + _image(figures["md"], output_dir, "md")
        + "<h3>Colour FA</h3>"
        + _image(figures["colfa"], output_dir, "colfa")
    )


def _tracts_section(figures: dict[str, Path], written: dict[str, Path], output_dir: Path) -> str:
    from m2m_app.tractography.views import view_orientation

    parts = []
    if "streamlines" in figures:
        parts.append(
            '<h3>Streamlines</h3><div id="streamline-figure">'
            f"{_image(figures['streamlines'], output_dir, 'streamlines')}</div>"
        )
    if "tdi" in figures:
        parts.append("<h3>Track density (phase 2)</h3>" + _image(figures["tdi"], output_dir, "tdi"))
    views = [name for name in NERF_VIEWS if f"figure_{name}" in written]
    if views:
        cells = []
        for name in views:
            edges = "".join(f'<span class="{edge}">{letter}</span>' for edge, letter in view_orientation(name).items())
            cells.append(
                f'<figure class="view">{_image(written[f"figure_{name}"], output_dir, name)}{edges}'
                f"<figcaption>{name}</figcaption></figure>"
            )
        parts.append('<h3>NeRF tractography field</h3><div class="views">' + "".join(cells) + "</div>")
    if "figure_turntable" in written:
        parts.append("<h3>Turntable</h3>" + _image(written["figure_turntable"], output_dir, "turntable"))
    return "".join(parts) or '<p class="note">No tractography: phase 2 or the NeRF was skipped.</p>'


def _uncertainty_section(figures: dict[str, Path], output_dir: Path) -> str:
    return "".join(
        f"<h3>{html.escape(title)}</h3>"
        + (
            _image(figures[key], output_dir, key)
            if key in figures
            else f'<p class="note" id="{key}-missing">not computed</p>'
        )
        for key, (title, _) in UNCERTAINTY_MAPS.items()
    )


def _spaces_section(spaces: list[dict], output_dir: Path) -> str:
    """Per template space: the normalisation reportlet, the FA in the template and the registration's QC."""
    if not spaces:
        return '<p class="note">No template space was asked for (<code>--output-spaces</code>).</p>'
    parts = []
    for space in spaces:
        qc, written = space["qc"], {key: Path(path) for key, path in space["written"].items()}
        verdict = (
            '<p class="error">Registration flagged: check the figure before using this space\'s outputs.</p>'
            if qc.get("flagged")
            else ""
        )
        rows = {
            "Dice of the warped brain mask with the template's brain": qc.get("dice"),
            "correlation of the warped T1w with the template's T1w (template brain)": qc.get("correlation"),
            "transform T1w → template": written["forward"].name,
        }
        figures = "".join(
            _image(written[key], output_dir, key)
            for key in ("figure_normalization", "figure_fa_template")
            if key in written
        )
        parts.append(f"<h3>{html.escape(space['space'])}</h3>{verdict}{_table(rows)}{figures}")
    return "".join(parts)


def _regions_section(regions: list[dict], output_dir: Path) -> str:
    """Per atlas: how many regions the parcellation found, how many streamlines reached two
    regions, the count matrix, and links to the tables."""
    if not regions:
        return '<p class="note">No parcellation was asked for (<code>--atlases</code>).</p>'
    parts = []
    for entry in regions:
        summary, written = entry["summary"], {key: Path(path) for key, path in entry["written"].items()}
        rows = {"regions found (of the atlas's)": f"{summary['regions_found']} of {summary['regions']}"}
        if "streamlines" in summary:
            share = summary["assigned"] / max(summary["streamlines"], 1)
            rows["streamlines with both ends assigned"] = (
                f"{summary['assigned']} of {summary['streamlines']} ({100 * share:.0f} %)"
            )
        links = " · ".join(
            f'<a href="{_relative(written[key], output_dir)}">{html.escape(written[key].name)}</a>'
            for key in ("regions", "count", "mean_fa", "dseg")
            if key in written
        )
        figure = _image(written["figure"], output_dir, "connectome") if "figure" in written else ""
        parts.append(f"<h3>{html.escape(entry['atlas'])}</h3>{_table(rows)}<p>{links}</p>{figure}")
    return "".join(parts)


def _errors_section(output_dir: Path, subject: Subject, errors: list[str]) -> str:
    log_dir = subject.folder(output_dir, "log")
    crashes = sorted(log_dir.glob("crash-*.txt")) if log_dir.is_dir() else []
    parts = [f'<div class="error">{html.escape(e)}</div>' for e in errors]
    if crashes:
        parts.append(_table(crash_reasons(log_dir), ("node", "error")))
        parts.append(
            '<ul class="crash-files">'
            + "".join(f'<li><a href="{_relative(c, output_dir)}">{html.escape(c.name)}</a></li>' for c in crashes)
            + "</ul>"
        )
    return "".join(parts) or '<p class="note">No errors: no crash file in this unit\'s log folder.</p>'


def _about_section(command_line: str, weights_dir: str | None) -> str:
    import torch

    from m2m_app.io.derivatives import weights_provenance
    from m2m_app.io.environment import container_image, container_type

    engine, image = container_type(), container_image()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible"
    rows = {
        "command line": command_line or "n/a",
        "m2m version": __version__,
        **{f"{phase} weights SHA-256": meta["sha256"] for phase, meta in weights_provenance(weights_dir).items()},
        "report written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": (f"container ({engine}{', ' + image if image else ''})" if engine else "not in a container"),
        "CPU": f"{' '.join(filter(None, (platform.machine(), platform.processor())))}, {os.cpu_count()} logical cores",
        "GPU": gpu,
        "Python": platform.python_version(),
        "PyTorch": torch.__version__,
    }
    return _table(rows)


def write_report(
    output_dir: Path,
    subject: Subject,
    t1w: str,
    written: dict[str, Path] | None,
    summary: dict,
    boilerplate: str,
    errors: list[str],
    timings: dict[str, float] | None = None,
    *,
    command_line: str = "",
    weights_dir: str | None = None,
    spaces: list[dict] | None = None,
    regions: list[dict] | None = None,
    threads: int = 1,
) -> Path:
    """Write ``sub-<label>[_ses-<label>].html``; with ``written=None`` (a failed run) it shows no figures.

    ``summary`` rows go into the summary table after the m2m version; ``timings``
    ({stage: seconds}) become a table of wall times with their total; ``errors`` are shown
    above the crash files found in ``sub-X/log/``; ``command_line`` and ``weights_dir`` go
    into the About section; ``spaces`` (from the template-space writer: space label, written
    paths, registration QC) fill the Template space section, ``regions`` (from the parcellation
    writer: atlas, written paths, summary) the Regions section. The methods' references are
    written to ``logs/CITATION.bib``; the viewer's data script and a copy of NiiVue go into the
    unit's ``figures/`` folder (:func:`~m2m_app.reports.viewer.write_viewer`), its volumes
    resampled in ``threads`` threads.
    """
    output_dir = Path(output_dir)
    summary_html = _table({"m2m version": __version__, **summary})
    if timings:
        ordered = sorted(timings, key=lambda s: STAGE_ORDER.index(s) if s in STAGE_ORDER else len(STAGE_ORDER))
        rows = {stage: f"{timings[stage]:.1f}" for stage in ordered}
        summary_html += "<h3>Run time</h3>" + _table(
            {**rows, "total": f"{sum(timings.values()):.1f}"}, ("stage", "wall time (s)")
        )
    failed = '<p class="note">No outputs: this unit failed (see Errors).</p>'
    figures, viewer, scripts = {}, failed, ""
    if written:
        streamlines = load_streamlines(written["tractogram"], t1w) if "tractogram" in written else None
        figures = report_figures(output_dir, subject, t1w, written, streamlines)
        maps = _Maps({"t1w": Path(t1w)} | {key: written[key] for key in VIEWER_VOLUMES if key in written})
        data = prepare_viewer_data(maps, cast(nib.Nifti1Image, nib.load(t1w)).affine, streamlines, threads=threads)
        viewer, scripts = viewer_html(write_viewer(output_dir, subject, data), data, output_dir)
    keys = cited(
        with_nerf=bool(written and "tractogram" in written), with_template=bool(spaces), with_atlas=bool(regions)
    )
    bibtex = write_bibtex(output_dir / BIBTEX, keys)
    methods = (
        f"<p>{html.escape(boilerplate or 'No processing ran.')}</p><h3>References</h3>"
        f'{references_html(keys)}<p>BibTeX: <a href="{_relative(bibtex, output_dir)}">'
        f"{BIBTEX.as_posix()}</a></p>"
    )
    bodies = {
        "summary": summary_html,
        "viewer": viewer,
        "maps": _maps_section(figures, output_dir) if figures else failed,
        "tracts": _tracts_section(figures, written or {}, output_dir) if figures else failed,
        "spaces": _spaces_section(spaces or [], output_dir),
        "regions": _regions_section(regions or [], output_dir),
        "uncertainty": _uncertainty_section(figures, output_dir) if figures else failed,
        "methods": methods,
        "errors": _errors_section(output_dir, subject, errors),
        "about": _about_section(command_line, weights_dir),
    }
    nav = "<nav>" + "".join(f'<a href="#{key}">{title}</a>' for key, title in SECTIONS.items()) + "</nav>"
    sections = "".join(f'<section id="{key}"><h2>{SECTIONS[key]}</h2>{bodies[key]}</section>' for key in SECTIONS)
    page = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>m2m {subject.label}</title>'
        f"<style>{STYLE}\n{VIEWER_STYLE}</style></head><body>{nav}<h1>m2m report: {html.escape(subject.label)}</h1>"
        "<p>All diffusion maps and streamlines on this page are <b>predicted from the T1w</b>; "
        f"no diffusion data was used.</p>{sections}{scripts}</body></html>"
    )
    path = output_dir / f"{subject.label}.html"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(page))


def report_summary(
    written: dict[str, Path], n_streamlines: int | None, field_report: dict, weights_dir: str | None
) -> dict:
    """Summary rows about the outputs: weights used, streamline count (from the QC row) and the NeRF fit."""
    from m2m_app.io.derivatives import weights_provenance

    rows = {
        f"{phase} weights": f"sha256 {meta['sha256'][:16]}…, trained on {', '.join(meta['trained_on'] or [])}"
        for phase, meta in weights_provenance(weights_dir).items()
    }
    if "tractogram" in written:
        rows["streamlines"] = f"{n_streamlines} ({written['tractogram'].name})"
    if field_report:
        rows["NeRF fit"] = (
            f"{field_report.get('steps')} steps, {field_report.get('seconds', 0):.1f} s; PSNR "
            f"{field_report.get('psnr_density_db', float('nan')):.1f} dB density, "
            f"{field_report.get('psnr_direction_db', float('nan')):.1f} dB direction"
        )
    return rows
