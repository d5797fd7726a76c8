"""Agreement measures between a prediction and a reference (pure NumPy / scikit-image; no file I/O).

The one home of the project's image metrics: Pearson correlation, PSNR, SSIM (3D, averaged
inside a mask), Dice overlap and the sign-free angle between orientations. The evaluation
protocol that combines them is described in ``docs/training.md`` ("Evaluation protocol").
"""

from __future__ import annotations

import numpy as np
from skimage.metrics import structural_similarity

#: SSIM window (voxels per side) of the evaluation protocol.
SSIM_WINDOW = 7


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two arrays of the same size (flattened; NaN when either is constant)."""
    a = np.asarray(a, float).ravel()
    b = np.asarray(b, float).ravel()
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else float("nan")


def psnr(prediction: np.ndarray, truth: np.ndarray, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB, ``10 log10(data_range² / MSE)`` (inf when equal).

    Pass the voxels to compare (e.g. ``pred[mask]``, ``truth[mask]``); shapes must match.
    """
    mse = float(np.mean((np.asarray(prediction, float) - np.asarray(truth, float)) ** 2))
    return float("inf") if mse == 0 else 10.0 * float(np.log10(data_range**2 / mse))


def _box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """Bounding box of ``mask`` grown by ``margin`` voxels (clipped to the array)."""
    where = np.argwhere(mask)
    low, high = np.maximum(where.min(0) - margin, 0), np.minimum(where.max(0) + margin + 1, mask.shape)
    return tuple(slice(int(lo), int(hi)) for lo, hi in zip(low, high))


def masked_ssim(
    prediction: np.ndarray,
    truth: np.ndarray,
    mask: np.ndarray,
    within: np.ndarray | None = None,
    data_range: float = 1.0,
    win_size: int = SSIM_WINDOW,
) -> float:
    """Mean structural similarity of two volumes ``(X, Y, Z)`` over the voxels of ``within``.

    Both volumes are set to 0 outside ``mask`` (so nothing outside it enters any window),
    scikit-image's SSIM map (uniform ``win_size`` window, ``data_range``, its default
    constants K1 = 0.01, K2 = 0.03 and sample covariance) is computed on the mask's bounding
    box grown by half a window (the same values as on the whole volume), and averaged over
    ``within`` (default: ``mask``; taken inside ``mask``, e.g. white matter). NaN when empty.
    """
    mask = np.asarray(mask, bool)
    within = mask if within is None else np.asarray(within, bool) & mask
    if not within.any():
        return float("nan")
    box = _box(mask, win_size // 2)
    x = np.where(mask, prediction, 0.0)[box].astype(float)
    y = np.where(mask, truth, 0.0)[box].astype(float)
    if min(x.shape) < win_size:  # skimage needs the window to fit: pad with zeros (outside the mask anyway)
        pad = [(0, max(win_size - n, 0)) for n in x.shape]
        x, y = np.pad(x, pad), np.pad(y, pad)
    _, ssim_map = structural_similarity(x, y, data_range=data_range, win_size=win_size, full=True)
    inside = within[box]
    return float(ssim_map[tuple(slice(0, n) for n in inside.shape)][inside].mean())


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks (NaN when both are empty)."""
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return float(2 * np.logical_and(a, b).sum() / total) if total else float("nan")


def angular_error_deg(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Sign-free angle in degrees (0–90) between vectors ``(..., 3)``; NaN where either is zero."""
    norms = np.linalg.norm(u, axis=-1) * np.linalg.norm(v, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = np.abs((u * v).sum(-1)) / norms
    return np.degrees(np.arccos(np.clip(cosine, 0.0, 1.0)))
