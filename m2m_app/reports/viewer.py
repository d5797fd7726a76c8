"""The report's interactive viewer: NiiVue (WebGL2) on the T1w, the maps and the tractogram, offline.

A page opened from ``file://`` may neither ``fetch`` a local file nor load an ES module in
Chromium, so everything reaches the page as classic scripts in the unit's ``figures/`` folder
(beside the other figures, which ``.bidsignore`` keeps off the BIDS validator): NiiVue itself
(:data:`~m2m_app.data.viewer.NIIVUE_BUNDLE`, copied) and the unit's data
(``sub-X_desc-m2m_viewer.js``: each volume as base64 gzipped NIfTI, the streamline subset as a
base64 TRX file with float16 positions), which :data:`~m2m_app.data.viewer.VIEWER_SCRIPT`, inlined in the page,
hands to NiiVue as array buffers.

:func:`prepare_viewer_data` (pure NumPy) makes what is shown: the volumes on an isotropic grid of
:data:`VIEWER_MM` mm quantised to uint8, and a random subset of the streamlines (fixed seed)
thinned to segments of about :data:`VIEWER_SEGMENT_MM` mm. NiiVue colours each segment by its
direction itself (red left-right, green anterior-posterior, blue inferior-superior, as the
static figures).
"""

from __future__ import annotations

import base64
import gzip
import html
import json
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from m2m_app.data.viewer import NIIVUE_BUNDLE, VIEWER_SCRIPT, niivue_record
from m2m_app.io.files import save_bytes
from m2m_app.io.naming import Subject, derivative_path
from m2m_app.io.nifti import grid_header
from m2m_app.io.tractogram import trx_bytes
from m2m_app.maths.grid import isotropic_grid, resample_volume
from m2m_app.maths.streamlines import random_subset, thinned

#: Voxel size (mm) of the viewer's volumes; a coarser output grid is kept as it is.
VIEWER_MM = 2.0
#: At most this many streamlines are drawn in 3D (a random subset, seed :data:`VIEWER_SEED`).
VIEWER_STREAMLINES = 5000
#: Streamlines are thinned to segments of about this length (mm) for the viewer.
VIEWER_SEGMENT_MM = 2.0
#: Seed of the streamline subset.
VIEWER_SEED = 0
#: The viewer's volumes in order (the first is the underlay): key of the written maps (``t1w``:
#: the report's T1w underlay) → (title, NiiVue colour map, top of the display range; ``None``: the
#: 99th percentile of the positive values). Colour FA is RGB: |V1|·FA per axis, full brightness at
#: its top, as in the static figure.
VIEWER_VOLUMES: dict[str, tuple[str, str, float | None]] = {
    "t1w": ("T1w", "gray", None),
    "fa": ("FA", "inferno", 0.8),
    "colfa": ("colour FA", "", 0.8),
    "fa_sd": ("FA SD", "magma", None),
    "v1_dispersion": ("V1 dispersion (°)", "magma", None),
    "tdi_sd": ("TDI SD", "magma", None),
}
#: The overlay shown when the page opens.
DEFAULT_OVERLAY = "fa"
#: The T1w (arbitrary units) is quantised up to this percentile, so that a few bright voxels do
#: not take the grey levels of the brain; the maps are quantised up to their maximum.
T1W_TOP_PERCENTILE = 99.9

STYLE = """.viewer-panes{display:grid;grid-template-columns:2fr 1fr;gap:.4em;height:380px}
.viewer-pane{position:relative;background:#000;min-width:0}.viewer-pane canvas{width:100%;height:100%}
.viewer-controls label{margin-right:1.2em}#viewer-readout{font-family:monospace;font-size:.9em;min-height:1.2em}
#viewer-status.error{background:#fdd;padding:.3em}"""


@dataclass(frozen=True)
class ViewerVolume:
    """One volume on the viewer grid.

    ``data`` is uint8 ``(X, Y, Z)``, the value being ``data * slope + intercept`` in the map's
    units; or RGB ``(X, Y, Z, 3)`` with ``data / 255 * display[1]`` per axis. ``display`` is
    the (low, high) range shown, in the map's units.
    """

    key: str
    title: str
    colormap: str
    data: np.ndarray
    slope: float
    intercept: float
    display: tuple[float, float]

    @property
    def rgb(self) -> bool:
        """Whether the volume is RGB (colour FA)."""
        return self.data.ndim == 4


@dataclass(frozen=True)
class ViewerData:
    """What the viewer shows of one unit.

    ``affine`` (4, 4) maps the viewer grid's voxels to RAS+ mm; ``volumes`` follow
    :data:`VIEWER_VOLUMES`' order; ``streamlines`` are the drawn subset, ``(K_i, 3)`` float32
    RAS+ mm each, of the tractogram's ``n_streamlines``.
    """

    affine: np.ndarray
    volumes: list[ViewerVolume]
    streamlines: list[np.ndarray]
    n_streamlines: int


def quantise(volume: np.ndarray, top: float | None = None) -> tuple[np.ndarray, float, float]:
    """``(uint8 volume, slope, intercept)`` with ``volume ≈ uint8 * slope + intercept``.

    The range runs from the minimum to ``top`` (the maximum when ``None``; values above read as
    ``top``): every value within it is kept to half a step, ``slope / 2``. NaN reads as the minimum.
    """
    finite = np.nan_to_num(np.asarray(volume, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    low = float(finite.min()) if finite.size else 0.0
    high = float(finite.max()) if top is None else float(top)
    slope = (high - low) / 255.0 if high > low else 1.0
    levels = np.clip(np.rint((finite - low) / slope), 0, 255).astype(np.uint8)
    return levels, slope, low


def _volume(key: str, resampled: np.ndarray) -> ViewerVolume:
    """The :class:`ViewerVolume` of ``key`` from its values on the viewer grid."""
    title, colormap, top = VIEWER_VOLUMES[key]
    if resampled.ndim == 4:
        high = float(top or 1.0)
        data = np.rint(np.clip(resampled / high, 0.0, 1.0) * 255).astype(np.uint8)
        return ViewerVolume(key, title, colormap, data, high / 255.0, 0.0, (0.0, high))
    positive = resampled[resampled > 0]

    def percentile(q: float) -> float:
        return float(np.percentile(positive, q)) if positive.size else 1.0

    if key == "t1w":
        data, slope, intercept = quantise(resampled, percentile(T1W_TOP_PERCENTILE))
        return ViewerVolume(key, title, colormap, data, slope, intercept, (0.0, percentile(99.5)))
    data, slope, intercept = quantise(resampled)
    high = float(top) if top is not None else percentile(99)
    return ViewerVolume(key, title, colormap, data, slope, intercept, (0.0, max(high, slope)))


def prepare_viewer_data(
    images: Mapping[str, np.ndarray],
    affine: np.ndarray,
    streamlines: Sequence[np.ndarray] | None = None,
    *,
    resolution_mm: float = VIEWER_MM,
    max_streamlines: int = VIEWER_STREAMLINES,
    segment_mm: float = VIEWER_SEGMENT_MM,
    seed: int = VIEWER_SEED,
    threads: int = 1,
) -> ViewerData:
    """What the viewer shows: the volumes of ``images`` on a coarser grid, and a streamline subset.

    ``images`` maps keys of :data:`VIEWER_VOLUMES` (``t1w`` required; other keys are ignored)
    to ``(X, Y, Z)`` or RGB ``(X, Y, Z, 3)`` arrays on one grid, ``affine`` (4, 4, voxel → RAS+
    mm). They are resampled linearly (with anti-aliasing) onto the isotropic grid of
    ``resolution_mm`` mm (or of the smallest voxel size, when larger) with the same axes and
    field of view, then quantised (:func:`quantise`). ``streamlines`` (``(K_i, 3)`` RAS+ mm):
    at most ``max_streamlines`` of those with two points or more, drawn with ``seed``, thinned
    to segments of about ``segment_mm`` mm. The volumes are prepared in ``threads`` threads.
    """
    voxel = max(resolution_mm, float(nib.affines.voxel_sizes(affine).min()))
    underlay = images["t1w"]
    shape, grid = isotropic_grid(underlay.shape[:3], affine, voxel)

    def prepared(key: str) -> ViewerVolume:
        values = np.asarray(underlay if key == "t1w" else images[key], np.float32)
        return _volume(key, resample_volume(values, affine, grid, shape, 1))

    # one volume per thread (reading, anti-aliasing and interpolating release the GIL)
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        volumes = list(pool.map(prepared, [key for key in VIEWER_VOLUMES if key in images]))
    lines = [np.asarray(s, np.float32) for s in streamlines or [] if len(s) > 1]
    subset = [thinned(s, segment_mm) for s in random_subset(lines, max_streamlines, seed)]
    return ViewerData(grid, volumes, subset, len(streamlines or []))


def nifti_bytes(volume: ViewerVolume, affine: np.ndarray) -> bytes:
    """``volume`` as gzipped NIfTI-1 bytes (uint8 with its slope and intercept, or RGBA32), its
    display range in ``cal_min``/``cal_max``; the same volume gives the same bytes."""
    if volume.rgb:  # RGBA32: opaque where any channel is lit, so the T1w shows through elsewhere
        alpha = np.where(volume.data.any(axis=-1), 255, 0).astype(np.uint8)[..., None]
        rgba = np.ascontiguousarray(np.concatenate([volume.data, alpha], axis=-1))
        data = rgba.view([("R", "u1"), ("G", "u1"), ("B", "u1"), ("A", "u1")])[..., 0]
    else:
        data = volume.data
    img = nib.Nifti1Image(data, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    if not volume.rgb:
        img.header.set_slope_inter(volume.slope, volume.intercept)
    img.header["cal_min"], img.header["cal_max"] = volume.display
    img.header["descrip"] = f"m2m viewer: {volume.title}".encode()[:79]
    return gzip.compress(img.to_bytes(), compresslevel=9, mtime=0)


def data_script(data: ViewerData, subject: Subject) -> str:
    """The classic script that defines ``window.m2mViewerData`` for :data:`VIEWER_SCRIPT`."""
    shape = data.volumes[0].data.shape[:3]

    def encoded(raw: bytes) -> str:
        return base64.b64encode(raw).decode("ascii")

    payload = {
        "subject": subject.label,
        "volumes": [
            {
                "key": v.key,
                "title": v.title,
                "name": f"{subject.label}_{v.key}.nii.gz",
                "colormap": v.colormap,
                "display": list(v.display),
                "rgb": v.display[1] if v.rgb else 0,
                "nifti": encoded(nifti_bytes(v, data.affine)),
            }
            for v in data.volumes
        ],
        "tractogram": (
            {
                "name": f"{subject.label}_streamlines.trx",
                "shown": len(data.streamlines),
                "total": data.n_streamlines,
                "trx": encoded(trx_bytes(data.streamlines, grid_header(shape, data.affine))),
            }
            if data.n_streamlines
            else None
        ),
    }
    comment = f"/* m2m report viewer data of {subject.label}: written by m2m, read by the page */"
    return f"{comment}\nwindow.m2mViewerData = {json.dumps(payload)};\n"


def viewer_data_path(output_dir: Path, subject: Subject) -> Path:
    """Where the unit's data script goes: ``sub-X/[ses-Y/]figures/sub-X[_ses-Y]_desc-m2m_viewer.js``."""
    return derivative_path(output_dir, subject, "figures", "viewer", ".js", desc="m2m")


def write_viewer(output_dir: Path, subject: Subject, data: ViewerData) -> dict[str, Path]:
    """Write the unit's data script and a copy of the NiiVue bundle into its ``figures/`` folder;
    returns their paths (``data``, ``niivue``)."""
    script = viewer_data_path(output_dir, subject)
    bundle = script.parent / NIIVUE_BUNDLE.name
    return {
        "data": save_bytes(data_script(data, subject).encode(), script),
        "niivue": save_bytes(NIIVUE_BUNDLE.read_bytes(), bundle),
    }


def viewer_html(files: Mapping[str, Path], data: ViewerData, output_dir: Path) -> tuple[str, str]:
    """``(section body, scripts)`` of the viewer in a page at the top of ``output_dir``: the
    canvases, overlay controls, crosshair read-out and status line; then the scripts, to go at
    the end of the page (relative links to ``files`` from :func:`write_viewer`)."""
    record = niivue_record()
    options = "".join(
        f'<option value="{v.key}"{" selected" if v.key == DEFAULT_OVERLAY else ""}>{html.escape(v.title)}</option>'
        for v in data.volumes[1:]
    )
    tracts = (
        f"; drag the 3D view to turn the tractogram ({len(data.streamlines):,} of {data.n_streamlines:,} "
        "streamlines, coloured by direction: red L-R, green A-P, blue I-S)"
        if data.n_streamlines
        else " (no tractogram was written)"
    )
    body = (
        '<div id="viewer"><p class="note">Drag in the slices to move the crosshair (its values below), scroll '
        f"to page through them{tracts}. "
        f"Volumes at {float(nib.affines.voxel_sizes(data.affine).min()):g} mm, 8 bits.</p>"
        '<p class="viewer-controls"><label>overlay <select id="viewer-overlay"><option value="">none</option>'
        f'{options}</select></label><label>opacity <input id="viewer-opacity" type="range" min="0" max="1" '
        'step="0.05" value="0.7"></label></p>'
        '<div class="viewer-panes"><div class="viewer-pane"><canvas id="viewer-slices"></canvas></div>'
        '<div class="viewer-pane"><canvas id="viewer-tracts"></canvas></div></div>'
        '<p id="viewer-readout"></p>'
        '<p id="viewer-status" class="note" data-state="loading">viewer: loading… '
        "<noscript>(JavaScript is off: the static figures below show the same data)</noscript></p>"
        f'<p class="note">NiiVue {html.escape(record["version"])} ({html.escape(record["license"])}), '
        "shipped with m2m: nothing is downloaded.</p></div>"
    )
    scripts = "".join(
        f'<script src="{html.escape(files[key].relative_to(output_dir).as_posix())}"></script>'
        for key in ("niivue", "data")
    )
    return body, scripts + f"<script>{VIEWER_SCRIPT.read_text(encoding='utf-8')}</script>"
