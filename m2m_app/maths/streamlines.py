"""Track-density maps from streamlines, and the subsets the report draws (pure NumPy; no file I/O)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from dipy.tracking.utils import density_map


def clip_to_grid(streamline: np.ndarray, shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    """The points of a ``(K, 3)`` world-mm streamline that fall inside the grid's voxels."""
    inverse = np.linalg.inv(affine)
    voxels = streamline @ inverse[:3, :3].T + inverse[:3, 3]
    inside = np.all((voxels >= -0.5) & (voxels < np.asarray(shape) - 0.5), axis=1)
    return streamline[inside]


def track_density(streamlines: Sequence[np.ndarray], shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    """Track-density image: streamlines visiting each voxel, ``(X, Y, Z)`` float32.

    ``streamlines`` are ``(K_i, 3)`` arrays in world mm; ``affine`` is the voxel-to-world
    matrix of the target grid; points outside the grid are ignored. Thin wrapper over
    dipy's ``density_map``.
    """
    clipped = [s for s in (clip_to_grid(s, shape, affine) for s in streamlines) if len(s)]
    if not clipped:
        return np.zeros(shape, dtype=np.float32)
    return density_map(clipped, affine, shape).astype(np.float32)


def directional_density(
    streamlines: Sequence[np.ndarray], shape: tuple[int, int, int], affine: np.ndarray
) -> np.ndarray:
    """Directionally encoded track density ``(X, Y, Z, 3)``: mean |segment direction| per voxel.

    Each segment contributes its absolute unit direction (world x, y, z → R, G, B) to
    the voxel holding its midpoint; each voxel holds the average, so values lie in
    [0, 1] and a voxel crossed left-right reads pure red. dipy has no such map, hence
    this short function.
    """
    total = np.zeros(shape + (3,), dtype=np.float64)
    count = np.zeros(shape, dtype=np.float64)
    if len(streamlines) == 0:
        return total.astype(np.float32)
    points = np.concatenate([s[:-1] for s in streamlines if len(s) > 1])
    steps = np.concatenate([np.diff(s, axis=0) for s in streamlines if len(s) > 1])
    lengths = np.linalg.norm(steps, axis=1)
    keep = lengths > 0
    mids, units = points[keep] + steps[keep] / 2, np.abs(steps[keep]) / lengths[keep, None]
    voxels = np.rint(mids @ np.linalg.inv(affine)[:3, :3].T + np.linalg.inv(affine)[:3, 3]).astype(int)
    inside = np.all((voxels >= 0) & (voxels < np.array(shape)), axis=1)
    index = np.ravel_multi_index(voxels[inside].T, shape)
    count.flat[:] += np.bincount(index, minlength=count.size)
    for axis in range(3):
        total[..., axis].flat[:] += np.bincount(index, weights=units[inside, axis], minlength=count.size)
    np.divide(total, count[..., None], out=total, where=count[..., None] > 0)
    return total.astype(np.float32)


def fraction_near(
    streamlines: Sequence[np.ndarray],
    reference: Sequence[np.ndarray],
    distance_mm: float = 2.0,
    max_points: int = 2_000_000,
    seed: int = 0,
) -> float:
    """Fraction of ``streamlines`` whose mean distance to the nearest ``reference`` point is below ``distance_mm``.

    Both sets are ``(K_i, 3)`` arrays in world mm. Reference points are subsampled to at
    most ``max_points`` (uniformly, seeded) to bound memory; a k-d tree (SciPy) answers
    the nearest-point queries.
    """
    from scipy.spatial import cKDTree

    if len(streamlines) == 0 or len(reference) == 0:
        return float("nan")
    points = np.concatenate(reference)
    if len(points) > max_points:
        points = points[np.random.default_rng(seed).choice(len(points), max_points, replace=False)]
    tree = cKDTree(points)
    lengths = np.array([len(s) for s in streamlines])
    distances, _ = tree.query(np.concatenate(streamlines))
    means = np.add.reduceat(distances, np.r_[0, np.cumsum(lengths)[:-1]]) / lengths
    return float(np.mean(means < distance_mm))


def random_subset(streamlines: Sequence[np.ndarray], max_streamlines: int, seed: int = 0) -> list[np.ndarray]:
    """At most ``max_streamlines`` of ``streamlines``, drawn at random with ``seed`` (the same subset
    for the same inputs), in their original order; all of them when there are no more."""
    if len(streamlines) <= max_streamlines:
        return list(streamlines)
    picks = np.random.default_rng(seed).choice(len(streamlines), max_streamlines, replace=False)
    return [streamlines[i] for i in np.sort(picks)]


def thinned(streamline: np.ndarray, min_segment_mm: float) -> np.ndarray:
    """Every n-th point of a ``(K, 3)`` streamline (first and last kept), segments ≥ ~``min_segment_mm``
    (n from the median step; the drawing cost of a streamline grows with its segment count)."""
    step = float(np.median(np.linalg.norm(np.diff(streamline, axis=0), axis=1)))
    stride = max(1, round(min_segment_mm / max(step, 1e-6)))
    kept = streamline[::stride]
    return kept if (len(streamline) - 1) % stride == 0 else np.vstack([kept, streamline[-1:]])
