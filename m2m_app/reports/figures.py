"""Mosaic figures of volumes (matplotlib, no display needed)."""
from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402


def _canonical(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Reorder axes so the volume reads RAS (axial slices along the last axis)."""
    ornt = nib.orientations.io_orientation(affine)
    return nib.orientations.apply_orientation(volume, ornt)


def _canonical_zooms(affine: np.ndarray) -> np.ndarray:
    """Voxel sizes (mm) along the R, A, S axes of :func:`_canonical`'s output."""
    ornt = nib.orientations.io_orientation(affine)
    zooms = np.zeros(3)
    zooms[ornt[:, 0].astype(int)] = np.linalg.norm(affine[:3, :3], axis=0)
    return zooms


def mosaic_png(volume: np.ndarray, affine: np.ndarray, *, underlay: np.ndarray | None = None,
               contour: np.ndarray | None = None, cmap: str = "gray", vmax: float | None = None,
               n_slices: int = 7, title: str = "") -> bytes:
    """A row of axial slices as PNG bytes.

    ``volume`` is ``(X, Y, Z)`` (or ``(X, Y, Z, 3)`` RGB in [0, 1]); ``underlay`` a grey
    ``(X, Y, Z)`` image shown beneath a semi-transparent ``volume``; ``contour`` a mask outlined in red.
    Slices are drawn at their true aspect ratio (thick or anisotropic voxels included).
    """
    zooms = _canonical_zooms(affine)
    aspect = zooms[1] / zooms[0]  # rows run along A, columns along R after rot90
    volume = _canonical(np.asarray(volume, dtype=float), affine)
    underlay = None if underlay is None else _canonical(np.asarray(underlay, dtype=float), affine)
    contour = None if contour is None else _canonical(np.asarray(contour, dtype=float), affine)
    reference = contour if contour is not None else (np.abs(volume).sum(-1) if volume.ndim == 4 else volume)
    filled = np.where(reference.reshape(-1, reference.shape[2]).any(axis=0))[0]
    lo, hi = (filled[0], filled[-1]) if filled.size else (0, volume.shape[2] - 1)
    picks = np.linspace(lo + 0.1 * (hi - lo), hi - 0.1 * (hi - lo), n_slices).astype(int)
    scale = vmax if vmax is not None else (np.percentile(volume[volume > 0], 99) if np.any(volume > 0) else 1.0)
    fig, axes = plt.subplots(1, n_slices, figsize=(2 * n_slices, 2.3), facecolor="black")
    for ax, k in zip(axes, picks):
        ax.axis("off")
        if underlay is not None:
            ax.imshow(np.rot90(underlay[:, :, k]), cmap="gray", vmax=np.percentile(underlay, 99.5), aspect=aspect)
        image = np.rot90(volume[:, :, k])
        if image.ndim == 3:
            ax.imshow(np.clip(image / max(scale, 1e-9), 0, 1), aspect=aspect)
        else:
            ax.imshow(image, cmap=cmap, vmin=0, vmax=scale, alpha=0.7 if underlay is not None else 1.0,
                      aspect=aspect)
        if contour is not None:
            ax.contour(np.rot90(contour[:, :, k]), levels=[0.5], colors="red", linewidths=0.6)
    if title:
        fig.suptitle(title, color="white", fontsize=10)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=70, bbox_inches="tight", facecolor="black")
    plt.close(fig)
    return buffer.getvalue()
