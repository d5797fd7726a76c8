"""Report figures (matplotlib, headless Agg): mosaics of volumes and streamline projections."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402

from m2m_app.io.files import atomic_write  # noqa: E402
from m2m_app.maths.orientation import ras_zooms, to_ras  # noqa: E402
from m2m_app.maths.streamlines import random_subset, thinned  # noqa: E402


#: Mosaic slices are drawn with at most about this many pixels along a side (each is shown 140 px wide).
MOSAIC_PIXELS = 256
#: Display percentiles are taken on at most about this many voxels (an even subsample).
PERCENTILE_VOXELS = 2_000_000


def _percentile(volume: np.ndarray, q: float, positive: bool = False) -> float:
    """The ``q``-th percentile of ``volume`` (of its positive values with ``positive``; 1.0 when
    there are none), on an even subsample of at most about :data:`PERCENTILE_VOXELS` voxels."""
    step = max(1, round((volume.size / PERCENTILE_VOXELS) ** (1 / 3)))
    sample = np.asarray(volume[::step, ::step, ::step], dtype=np.float32)
    sample = sample[sample > 0] if positive else sample.ravel()
    return float(np.percentile(sample, q)) if sample.size else 1.0


def mosaic(
    volume: np.ndarray,
    affine: np.ndarray,
    *,
    underlay: np.ndarray | None = None,
    contour: np.ndarray | None = None,
    cmap: str = "gray",
    vmax: float | None = None,
    n_slices: int = 7,
    title: str = "",
    fmt: str = "png",
) -> bytes:
    """A row of axial slices as image bytes in ``fmt`` (``png``, or ``svg`` with the slices embedded as PNG).

    ``volume`` is ``(X, Y, Z)`` (or ``(X, Y, Z, 3)`` RGB in [0, 1]); ``underlay`` a grey
    ``(X, Y, Z)`` image shown beneath a semi-transparent ``volume``; ``contour`` a mask outlined in red.
    Slices are drawn at their true aspect ratio (thick or anisotropic voxels included), thinned
    to at most about :data:`MOSAIC_PIXELS` pixels along a side (what the report shows).
    """
    zooms = ras_zooms(affine)
    aspect = zooms[1] / zooms[0]  # rows run along A, columns along R after rot90
    volume = to_ras(np.asarray(volume), affine)  # views: only the drawn slices are converted
    underlay = None if underlay is None else to_ras(np.asarray(underlay), affine)
    contour = None if contour is None else to_ras(np.asarray(contour), affine)
    reference = contour if contour is not None else volume
    filled = np.where(np.any(reference, axis=(0, 1) if reference.ndim == 3 else (0, 1, 3)))[0]
    lo, hi = (filled[0], filled[-1]) if filled.size else (0, volume.shape[2] - 1)
    picks = np.linspace(lo + 0.1 * (hi - lo), hi - 0.1 * (hi - lo), n_slices).astype(int)
    scale = vmax if vmax is not None else _percentile(volume, 99, positive=True)
    underlay_max = None if underlay is None else _percentile(underlay, 99.5)
    step = max(1, -(-max(volume.shape[:2]) // MOSAIC_PIXELS))  # a 0.5 mm slice is drawn at 1 mm or so
    fig, axes = plt.subplots(1, n_slices, figsize=(2 * n_slices, 2.3), facecolor="black")
    for ax, k in zip(axes, picks):
        ax.axis("off")
        if underlay is not None:
            ax.imshow(np.rot90(underlay[::step, ::step, k]), cmap="gray", vmax=underlay_max, aspect=aspect)
        image = np.rot90(volume[::step, ::step, k].astype(float))
        if image.ndim == 3:
            ax.imshow(np.clip(image / max(scale, 1e-9), 0, 1), aspect=aspect)
        else:
            ax.imshow(image, cmap=cmap, vmin=0, vmax=scale, alpha=0.7 if underlay is not None else 1.0, aspect=aspect)
        if contour is not None:
            ax.contour(np.rot90(contour[::step, ::step, k].astype(float)), levels=[0.5], colors="red", linewidths=0.6)
    if title:
        fig.suptitle(title, color="white", fontsize=10)
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt, dpi=70, bbox_inches="tight", facecolor="black")
    plt.close(fig)
    return buffer.getvalue()


#: Streamline projections: panel name → (horizontal world axis, vertical world axis), neurological view.
PROJECTIONS: dict[str, tuple[int, int]] = {"sagittal": (1, 2), "axial": (0, 1), "coronal": (0, 2)}
_EDGE_LETTERS = ("LR", "PA", "IS")  # (negative, positive) end of the R, A, S world axes


def streamline_figure(
    streamlines: Sequence[np.ndarray],
    out_path: str | os.PathLike,
    *,
    max_streamlines: int = 2000,
    min_segment_mm: float = 3.0,
    seed: int = 0,
    title: str = "",
) -> Path:
    """Draw streamlines as lines in sagittal, axial and coronal projections; returns ``out_path``.

    ``streamlines`` are ``(K_i, 3)`` world points in RAS+ mm (RASMM); at most ``max_streamlines``
    of them (a random subset drawn with ``seed``), thinned to segments of about ``min_segment_mm``
    (every n-th point, ends kept: the drawing cost grows with the segment count), are drawn with
    a matplotlib ``LineCollection``, each segment coloured by its direction in the standard
    convention (red left-right, green anterior-posterior, blue inferior-superior: ``|unit
    segment vector|``); the title says how many were drawn out of how many. The three panels
    share one mm scale (true aspect) and carry L/R, A/P, S/I labels at their edges. The format
    follows the suffix (``.svg``, ``.png``, ...); in an SVG the lines are rasterised (the file stays
    small) and each panel is the group ``panel-<name>``.
    """
    lines = [np.asarray(s, dtype=float) for s in streamlines if len(s) > 1]
    total = len(lines)
    lines = [thinned(s, min_segment_mm) for s in random_subset(lines, max_streamlines, seed)]
    segments = np.concatenate([np.stack([s[:-1], s[1:]], axis=1) for s in lines]) if lines else np.zeros((0, 2, 3))
    vectors = segments[:, 1] - segments[:, 0]
    colours = np.abs(vectors) / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-9)
    points = segments.reshape(-1, 3)
    low, high = (points.min(0), points.max(0)) if len(points) else (np.full(3, -80.0), np.full(3, 80.0))
    pad = 0.04 * (high - low).max()
    low, high = low - pad, high + pad
    extent = high - low
    widths = [extent[h] for h, _ in PROJECTIONS.values()]
    inches_per_mm = 11 * 0.98 / (sum(widths) * (1 + 0.05 * 2 / 3))  # figure width less margins and gaps
    tallest = max(extent[v] / extent[h] * width for (h, v), width in zip(PROJECTIONS.values(), widths))
    fig, axes = plt.subplots(
        1,
        3,
        figsize=(11, inches_per_mm * tallest / 0.85),
        facecolor="black",
        gridspec_kw={"width_ratios": widths, "wspace": 0.05},
    )
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.86)  # fixed layout: drawn once
    for ax, (name, (h, v)) in zip(axes, PROJECTIONS.items()):
        ax.set_facecolor("black")
        ax.set_gid(f"panel-{name}")
        collection = LineCollection(
            segments[:, :, [h, v]],  # type: ignore[arg-type]  # (N, 2, 2) array: stub too narrow
            colors=np.c_[colours, np.full(len(colours), 0.6)],
            linewidths=0.35,
        )
        collection.set_rasterized(True)
        ax.add_collection(collection)
        ax.set_xlim(low[h], high[h])
        ax.set_ylim(low[v], high[v])
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        text = {"color": "white", "fontsize": 11, "fontweight": "bold", "transform": ax.transAxes}
        ax.text(0.02, 0.5, _EDGE_LETTERS[h][0], ha="left", va="center", **text)
        ax.text(0.98, 0.5, _EDGE_LETTERS[h][1], ha="right", va="center", **text)
        ax.text(0.5, 0.98, _EDGE_LETTERS[v][1], ha="center", va="top", **text)
        ax.text(0.5, 0.02, _EDGE_LETTERS[v][0], ha="center", va="bottom", **text)
        ax.set_title(name, color="white", fontsize=9)
        if not lines:
            ax.text(0.5, 0.5, "no streamlines", ha="center", va="center", color="grey", transform=ax.transAxes)
    drawn = f"{len(lines)} of {total}" if total > len(lines) else f"{total}"
    fig.suptitle(title or f"{drawn} streamlines (red L-R, green A-P, blue I-S)", color="white", fontsize=10, y=0.99)
    out_path = Path(out_path)
    fmt = out_path.suffix.lstrip(".") or "png"
    with plt.rc_context({"svg.fonttype": "none"}):  # SVG text stays text (searchable, smaller)
        atomic_write(out_path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=110, facecolor="black"))
    plt.close(fig)
    return out_path


def connectome_figure(counts: np.ndarray, names: list[str], title: str = "") -> bytes:
    """The streamline-count matrix ``(R, R)`` as an SVG heat map (log10(1 + count)), nodes named
    along both axes in the matrix's order (``names``, ``R`` of them)."""
    n = len(names)
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    shown = ax.imshow(np.log10(1.0 + np.asarray(counts, dtype=float)), cmap="viridis", interpolation="nearest")
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="log10(1 + streamlines)")
    ax.set_xticks(range(n), names, rotation=90, fontsize=3.5)
    ax.set_yticks(range(n), names, fontsize=3.5)
    if title:
        ax.set_title(title, fontsize=10)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()
