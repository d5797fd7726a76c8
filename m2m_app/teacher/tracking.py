"""Whole-brain deterministic tensor tractography with dipy."""

from __future__ import annotations

import logging

import numpy as np
from dipy.data import default_sphere
from dipy.direction.peaks import PeaksAndMetrics
from dipy.tracking.stopping_criterion import ThresholdStoppingCriterion
from dipy.tracking.tracker import eudx_tracking
from dipy.tracking.utils import random_seeds_from_mask

LOGGER = logging.getLogger(__name__)


def tensor_peaks(v1_voxel: np.ndarray, fa: np.ndarray) -> PeaksAndMetrics:
    """One peak per voxel, the tensor's V1 (voxel frame, ``(X, Y, Z, 3)``), weighted by FA.

    This is what ``dipy.direction.peaks_from_model`` gives for a tensor model with one
    peak, without fitting the tensor a second time and evaluating its ODF everywhere.
    """
    vertices = default_sphere.vertices
    flat = v1_voxel.reshape(-1, 3)
    indices = np.empty(flat.shape[0], dtype=np.int32)
    for start in range(0, flat.shape[0], 65536):  # chunks keep the dot-product table small
        indices[start : start + 65536] = np.abs(flat[start : start + 65536] @ vertices.T).argmax(axis=1)
    pam = PeaksAndMetrics()
    pam.sphere = default_sphere
    pam.peak_indices = indices.reshape(fa.shape + (1,))
    pam.peak_values = fa[..., None].astype(float)
    pam.peak_dirs = vertices[pam.peak_indices]
    return pam


def track_tensor(
    v1_voxel: np.ndarray,
    fa: np.ndarray,
    affine: np.ndarray,
    *,
    seed_fa: float = 0.3,
    stop_fa: float = 0.15,
    seeds_per_voxel: int = 1,
    step_mm: float = 0.5,
    max_angle_deg: float = 45.0,
    min_length_mm: float = 20.0,
    max_length_mm: float = 250.0,
    random_seed: int = 0,
) -> tuple[list[np.ndarray], dict]:
    """Deterministic (EuDX-style) whole-brain tracking on a tensor field.

    Parameters
    ----------
    v1_voxel : (X, Y, Z, 3) principal eigenvectors along the voxel axes.
    fa : (X, Y, Z) fractional anisotropy; seeds where FA > ``seed_fa`` (white matter),
        stops where FA < ``stop_fa``.
    affine : voxel-to-world matrix of the grid.

    Returns
    -------
    Streamlines as ``(K_i, 3)`` arrays in world mm (RASMM) and the tracking parameters
    (for the BEP046 sidecar).
    """
    seeds = random_seeds_from_mask(
        fa > seed_fa, affine, seeds_count=seeds_per_voxel, seed_count_per_voxel=True, random_seed=random_seed
    )
    criterion = ThresholdStoppingCriterion(fa.astype(float), stop_fa)
    tractogram = eudx_tracking(
        seeds,
        criterion,
        affine,
        pam=tensor_peaks(v1_voxel, fa),
        step_size=step_mm,
        max_angle=max_angle_deg,
        pmf_threshold=stop_fa,
        min_len=min_length_mm,
        max_len=max_length_mm,
        random_seed=random_seed,
        return_all=True,
    )
    streamlines = [np.asarray(s, dtype=np.float32) for s in tractogram]
    LOGGER.info("tracked %d streamlines from %d seeds", len(streamlines), len(seeds))
    params = {
        "SeedingMethod": f"random, {seeds_per_voxel} per voxel where FA > {seed_fa}",
        "SeedingNumberSeeds": int(len(seeds)),
        "StepSize": step_mm,
        "StepSizeUnits": "mm",
        "AngleCurvature": max_angle_deg,
        "TerminationCriterion": f"FA < {stop_fa}",
        "MinimumLength": min_length_mm,
        "MaximumLength": max_length_mm,
        "TractographyMethod": "deterministic",
        "TractographyClass": "local",
        "Algorithm": "dipy eudx_tracking on the tensor's principal eigenvector",
    }
    return streamlines, params
