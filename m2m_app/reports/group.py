"""Group level: one QC row per unit, as TSV, a strip plot of each QC number and an HTML page."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from m2m_app.errors import MissingInputError
from m2m_app.io.files import atomic_write, save_bytes, save_tsv
from m2m_app.io.naming import Subject
from m2m_app.reports.viewer import viewer_data_path

#: A value further than this many robust standard deviations (1.4826 × MAD) from the median is an outlier.
OUTLIER_Z = 3.0

STYLE = """body{font-family:sans-serif;max-width:1150px;margin:auto;padding:1em;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}
td.outlier{background:#fcc;font-weight:bold}img{max-width:100%;display:block;margin:.5em 0}"""


def numeric_columns(rows: list[dict], columns: list[str]) -> list[str]:
    """The columns whose values are numbers (ints or floats, not booleans) in at least one row."""
    return [
        c
        for c in columns
        if any(isinstance(row.get(c), (int, float)) and not isinstance(row.get(c), bool) for row in rows)
    ]


def outliers(values: np.ndarray) -> np.ndarray:
    """Boolean mask of the finite values more than :data:`OUTLIER_Z` robust SDs from the median."""
    finite = np.isfinite(values)
    if finite.sum() < 3:
        return np.zeros(values.shape, bool)
    median = np.median(values[finite])
    spread = 1.4826 * np.median(np.abs(values[finite] - median))
    if spread == 0:
        return finite & (values != median)
    return finite & (np.abs(values - median) > OUTLIER_Z * spread)


def _values(rows: list[dict], column: str) -> np.ndarray:
    return np.array([float(v) if isinstance(v := row.get(column), (int, float)) else np.nan for row in rows])


def strip_plot(rows: list[dict], metrics: list[str], path: Path) -> Path:
    """One strip per QC number with every unit's point (outliers red and labelled); an SVG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(2.2 * len(metrics), 3.2), squeeze=False)
    jitter = np.random.default_rng(0).uniform(-0.15, 0.15, len(rows))
    for ax, metric in zip(axes[0], metrics):
        values = _values(rows, metric)
        flagged = outliers(values)
        ax.scatter(jitter[~flagged], values[~flagged], s=18, color="#3465a4", alpha=0.8)
        ax.scatter(jitter[flagged], values[flagged], s=30, color="#cc0000")
        for x, y, row in zip(jitter[flagged], values[flagged], np.array(rows, dtype=object)[flagged]):
            ax.annotate(row["subject"], (x, y), fontsize=7, color="#cc0000", xytext=(4, 0), textcoords="offset points")
        ax.set_xlim(-0.6, 0.6)
        ax.set_xticks([])
        ax.set_title(metric, fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    with plt.rc_context({"svg.fonttype": "none"}):  # labels stay text
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="svg"))
    plt.close(fig)
    return path


def _space_section(space: dict, output_dir: Path) -> str:
    """The FA mean and SD maps of one template space as mosaics, and its tissue table."""
    from m2m_app.io.nifti import load_image
    from m2m_app.reports.figures import mosaic

    figures = []
    for key, title, vmax in (("mean", "mean FA", 0.8), ("sd", "SD of FA", 0.2)):
        img, data = load_image(space["maps"][key])
        label = space["space"].replace(":", "_")
        path = output_dir / "figures" / f"group_{label}_{key}_FA.svg"
        picture = mosaic(data, img.affine, cmap="inferno", vmax=vmax, fmt="svg", title=f"{title} in {space['space']}")
        save_bytes(picture, path)
        figures.append(f'<img src="{path.relative_to(output_dir).as_posix()}" alt="{html.escape(title)}">')
    columns = list(dict.fromkeys(key for row in space["rows"] for key in row))
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(row.get(c)))}</td>" for c in columns) + "</tr>"
        for row in space["rows"]
    )
    table = f'<table class="tissue"><tr>{"".join(f"<th>{html.escape(c)}</th>" for c in columns)}</tr>{rows}</table>'
    link = Path(space["table"]).name
    note = '<p class="note">The SD needs at least two units.</p>' if len(space["rows"]) < 2 else ""
    return (
        f"<h2>{html.escape(space['space'])}: {len(space['rows'])} units</h2>{''.join(figures)}{note}"
        f'<p>Mean FA, MD, AD, RD in the template\'s white (wm) and grey (gm) matter: <a href="{html.escape(link)}">'
        f"{html.escape(link)}</a></p>{table}"
    )


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_group_outputs(output_dir: Path, spaces: list[dict] | None = None, regions: list[Path] | None = None) -> Path:
    """Gather every ``*_desc-m2m_qc.json`` into ``group_qc.tsv``, ``figures/group_qc.svg`` and ``group.html``.

    The page has the table (one row per unit, outlying numbers highlighted, a link to each
    unit's report and, where it was written, to its interactive viewer) and the strip plot of the
    numeric QC columns; then, for each template space
    in ``spaces`` (``space`` label, ``maps`` with the ``mean`` and ``sd`` FA paths, ``table`` TSV
    and its ``rows``), the group FA maps and the tissue table; last, links to the group region
    tables (``regions``). Returns the TSV.
    """
    output_dir = Path(output_dir)
    rows = [json.loads(p.read_text()) for p in sorted(output_dir.glob("sub-*/**/*_desc-m2m_qc.json"))]
    if not rows:
        raise MissingInputError(f"{output_dir}: no participant results; run the participant level first")
    columns = list(dict.fromkeys(["subject", *(key for row in rows for key in row)]))
    tsv = save_tsv(rows, output_dir / "group_qc.tsv", columns)
    metrics = numeric_columns(rows, columns)
    flagged = {c: outliers(_values(rows, c)) for c in metrics}
    plot = strip_plot(rows, metrics, output_dir / "figures" / "group_qc.svg") if metrics else None

    def viewer_link(label: str) -> str:
        if not viewer_data_path(output_dir, Subject.from_label(label)).exists():
            return ""
        return f' · <a class="viewer" href="{html.escape(label)}.html#viewer">viewer</a>'

    def cell(i: int, column: str) -> str:
        css = ' class="outlier"' if column in flagged and flagged[column][i] else ""
        return f"<td{css}>{html.escape(str(rows[i].get(column, 'n/a')))}</td>"

    cells = "".join(
        f'<tr id="row-{html.escape(row["subject"])}">'
        + "".join(cell(i, c) for c in columns)
        + f'<td><a href="{html.escape(row["subject"])}.html">report</a>{viewer_link(row["subject"])}</td></tr>'
        for i, row in enumerate(rows)
    )
    figure = (
        (
            f"<h2>QC numbers across units</h2><p>Red: more than {OUTLIER_Z:g} robust SDs from the median.</p>"
            f'<img src="{plot.relative_to(output_dir).as_posix()}" alt="QC strip plot">'
        )
        if plot
        else ""
    )
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>m2m group QC</title>'
        f"<style>{STYLE}</style></head><body><h1>m2m group QC</h1><p>{len(rows)} units; every number "
        'comes from maps predicted from the T1w.</p><table id="qc-table"><tr>'
        + "".join(f"<th>{html.escape(c)}</th>" for c in columns)
        + "<th></th></tr>"
        + cells
        + f"</table>{figure}{''.join(_space_section(space, output_dir) for space in spaces or [])}</body></html>"
    )
    if regions:
        links = "".join(f'<li><a href="{html.escape(p.name)}">{html.escape(p.name)}</a></li>' for p in regions)
        page = page.replace(
            "</body>", f"<h2>Regions</h2><p>Region statistics of every unit, per atlas:</p><ul>{links}</ul></body>"
        )
    atomic_write(output_dir / "group.html", lambda tmp: Path(tmp).write_text(page))
    return tsv
