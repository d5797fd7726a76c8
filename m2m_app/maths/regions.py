"""Numbers per region of a parcellation, and a structural connectome from streamline end points.

Pure functions on arrays: a label volume ``(X, Y, Z)`` of non-negative integers (0 = no region),
maps on the same grid, streamlines as ``(N_i, 3)`` world points (mm). The end-point rule is
MRtrix3 ``tck2connectome``'s default, a radial search: each end point goes to the region of the
nearest labelled voxel centre within ``radius_mm`` (none beyond it), which is the voxel that holds
the point when that voxel is labelled. scipy's k-d tree does the search (exact Euclidean distances
in mm, any voxel size).
"""

from __future__ import annotations

import numpy as np
from nibabel.affines import apply_affine
from scipy import ndimage
from scipy.spatial import cKDTree

#: MRtrix3 tck2connectome's default radial-search distance (mm).
RADIAL_SEARCH_MM = 4.0


def region_volumes(labels: np.ndarray, indices: np.ndarray, voxel_mm3: float) -> np.ndarray:
    """The volume (mm³) of every region of ``indices`` ``(R,)`` in ``labels``: ``(R,)`` float64."""
    counts = np.bincount(labels.ravel(), minlength=int(indices.max()) + 1)
    return counts[indices].astype(np.float64) * voxel_mm3


def region_means(values: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """The mean of ``values`` (same grid as ``labels``) in every region of ``indices``: ``(R,)``, NaN where empty."""
    index = labels.ravel()
    sums = np.bincount(index, weights=values.ravel().astype(np.float64), minlength=int(indices.max()) + 1)
    counts = np.bincount(index, minlength=int(indices.max()) + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts[indices] > 0, sums[indices] / counts[indices], np.nan)


def region_medians(values: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """The median of ``values`` in every region of ``indices``: ``(R,)``, NaN where empty."""
    present = np.isin(indices, np.unique(labels))
    out = np.full(len(indices), np.nan)
    if present.any():
        out[present] = ndimage.median(values, labels, indices[present])
    return out


def assign_end_points(
    end_points: np.ndarray, labels: np.ndarray, affine: np.ndarray, radius_mm: float = RADIAL_SEARCH_MM
) -> np.ndarray:
    """The region of every end point ``(N, 3)`` (world mm; ``affine`` voxel → mm of ``labels``):
    the label of the nearest labelled voxel centre within ``radius_mm``, else 0: ``(N,)`` int."""
    labelled = np.argwhere(labels > 0)
    if len(end_points) == 0 or len(labelled) == 0:
        return np.zeros(len(end_points), dtype=np.int64)
    tree = cKDTree(apply_affine(affine, labelled))
    distance, nearest = tree.query(np.asarray(end_points, dtype=np.float64), distance_upper_bound=radius_mm)
    found = np.isfinite(distance)
    out = np.zeros(len(end_points), dtype=np.int64)
    out[found] = labels[tuple(labelled[nearest[found]].T)]
    return out


def streamline_means(streamlines: list[np.ndarray], values: np.ndarray) -> np.ndarray:
    """Per streamline, the mean of ``values`` ``(P,)`` given at its points, in order (``P`` = all
    points of all streamlines): ``(S,)`` float64 (NaN for a streamline without points)."""
    lengths = np.array([len(s) for s in streamlines], dtype=np.int64)
    out = np.full(len(lengths), np.nan)
    filled = lengths > 0
    if filled.any():
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        sums = np.add.reduceat(np.asarray(values, dtype=np.float64), starts[filled])
        out[filled] = sums / lengths[filled]
    return out


def connectome(
    first: np.ndarray, last: np.ndarray, indices: np.ndarray, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric ``(R, R)`` matrices over the regions ``indices`` from the regions of the streamlines'
    two ends (``first``, ``last`` ``(S,)``, 0 = unassigned, left out): the streamline count, and
    the mean of ``weights`` ``(S,)`` over each edge's streamlines (NaN where an edge has none; all
    NaN without ``weights``). A streamline with both ends in one region counts on the diagonal once.
    """
    position = np.full(int(max(indices.max(), first.max(initial=0), last.max(initial=0))) + 1, -1)
    position[indices] = np.arange(len(indices))
    a, b = position[first], position[last]
    kept = (first > 0) & (last > 0) & (a >= 0) & (b >= 0)
    a, b = a[kept], b[kept]
    n = len(indices)
    counts = np.zeros((n, n))
    np.add.at(counts, (a, b), 1.0)
    off_diagonal = a != b
    np.add.at(counts, (b[off_diagonal], a[off_diagonal]), 1.0)
    means = np.full((n, n), np.nan)
    if weights is not None:
        sums = np.zeros((n, n))
        w = np.asarray(weights, dtype=np.float64)[kept]
        np.add.at(sums, (a, b), w)
        np.add.at(sums, (b[off_diagonal], a[off_diagonal]), w[off_diagonal])
        with np.errstate(invalid="ignore", divide="ignore"):
            means = np.where(counts > 0, sums / counts, np.nan)
    return counts, means
