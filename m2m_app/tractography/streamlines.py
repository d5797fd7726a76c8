"""Deterministic streamlines through a continuous tractography field, and tractogram files.

Sign ambiguity. The field is fitted to directionally encoded track density, which stores
``|direction|`` per world axis, so it knows each fibre's axis only up to the signs of its
components: ``(|x|, |y|, |z|)`` stands for the 4 axes ``(±|x|, ±|y|, |z|)``. The tracker
resolves this at every RK4 stage by taking, among those 4 axes, the one most nearly parallel
to the previous step and orienting it along that step. At a seed there is no previous step,
so the axis along which the density stays highest over the next few millimetres on both
sides is taken. Limitation: where two bundles cross whose axes differ only by component signs
(e.g. ``(1, 1, 0)`` and ``(1, -1, 0)``) the input cannot tell them apart and the tracker goes
straightest; a fibre turning more than 45° within one step is not followed.

Dipy's ``LocalTracking`` is not used because it reads direction getters on a voxel grid
(one point at a time, in Cython), whereas this tracker evaluates the continuous field at
arbitrary points for all streamlines at once (one batched query per RK4 stage).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from m2m_app.models.nerf import FittedField

LOGGER = logging.getLogger(__name__)

#: ``(N, 3)`` world points (mm) → density ``(N,)`` and orientation ``(N, 3)`` (signed or absolute).
FieldQuery = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]

#: Sign patterns of the 4 axes sharing the same absolute components (the overall sign is free).
_SIGN_PATTERNS = np.array([[1, 1, 1], [1, -1, 1], [-1, 1, 1], [-1, -1, 1]], dtype=float)
#: Distances (in steps) at which the density is probed to pick a seed's initial axis.
_PROBE_STEPS = (2.0, 4.0, 6.0)


def _unit(vectors: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return np.divide(vectors, norm, out=np.zeros_like(vectors), where=norm > 1e-12)


def candidate_axes(orientation: np.ndarray) -> np.ndarray:
    """The 4 unit axes ``(N, 4, 3)`` whose absolute components are those of ``orientation`` ``(N, 3)``."""
    return _unit(np.abs(orientation))[:, None, :] * _SIGN_PATTERNS


def align_axis(orientation: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Unit direction ``(N, 3)``: the candidate axis closest to ``reference`` ``(N, 3)``, pointing along it.

    Zero where the orientation is zero (outside the field). The same as picking among
    :func:`candidate_axes` without building them: the sign patterns' third component is +1.
    """
    unit = _unit(np.abs(orientation))
    products = unit * reference  # the dot products, term by term
    dots = products[:, :1] * _SIGN_PATTERNS[:, 0] + products[:, 1:2] * _SIGN_PATTERNS[:, 1] + products[:, 2:3]
    best = np.abs(dots).argmax(axis=1)
    sign = np.where(dots[np.arange(len(best)), best] < 0, -1.0, 1.0)
    return unit * (_SIGN_PATTERNS[best] * sign[:, None])


def _as_query(field_or_query_fn: FittedField | FieldQuery) -> FieldQuery:
    return field_or_query_fn.query if isinstance(field_or_query_fn, FittedField) else field_or_query_fn


class _MaskLookup:
    """Nearest-voxel lookup of a boolean mask at world points (False outside the grid)."""

    def __init__(self, mask: np.ndarray, affine: np.ndarray) -> None:
        self.mask = np.asarray(mask, dtype=bool)
        self.inverse = np.linalg.inv(np.asarray(affine, dtype=float))

    def voxels(self, points: np.ndarray) -> np.ndarray:
        """Nearest voxel indices ``(N, 3)`` of world points ``(N, 3)``."""
        return np.rint(points @ self.inverse[:3, :3].T + self.inverse[:3, 3]).astype(np.int64)

    def __call__(self, points: np.ndarray) -> np.ndarray:
        ijk = self.voxels(points)
        inside = np.all((ijk >= 0) & (ijk < self.mask.shape), axis=1)
        result = np.zeros(len(points), dtype=bool)
        result[inside] = self.mask[tuple(ijk[inside].T)]
        return result


def seed_points(
    query: FieldQuery,
    mask: np.ndarray,
    affine: np.ndarray,
    *,
    threshold: float,
    seeds_per_voxel: int | None,
    n_seeds: int | None,
    rng: np.random.Generator,
) -> np.ndarray:
    """World seed points ``(S, 3)``, uniformly jittered within mask voxels whose density >= ``threshold``.

    ``seeds_per_voxel`` puts that many seeds in every such voxel; ``n_seeds`` draws that many
    voxels among them, with replacement, with probability proportional to their density.
    """
    voxels = np.argwhere(mask)
    centres = voxels @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]
    density = np.asarray(query(centres)[0], dtype=float)
    keep = density >= threshold
    voxels, density = voxels[keep], density[keep]
    if not len(voxels):
        return np.zeros((0, 3))
    if n_seeds is not None:
        chosen = voxels[rng.choice(len(voxels), size=n_seeds, p=density / density.sum())]
    else:
        chosen = np.repeat(voxels, 1 if seeds_per_voxel is None else seeds_per_voxel, axis=0)
    jittered = chosen + rng.uniform(-0.5, 0.5, size=chosen.shape)
    return jittered @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]


def initial_axes(query: FieldQuery, seeds: np.ndarray, step_mm: float) -> np.ndarray:
    """Unit axis ``(S, 3)`` per seed: the candidate along which the density stays highest both ways."""
    candidates = candidate_axes(np.asarray(query(seeds)[1], dtype=float))  # (S, 4, 3)
    offsets = step_mm * np.array([*_PROBE_STEPS, *(-d for d in _PROBE_STEPS)])  # (P,)
    probes = seeds[:, None, None, :] + offsets[None, None, :, None] * candidates[:, :, None, :]
    density = np.asarray(query(probes.reshape(-1, 3))[0], dtype=float).reshape(probes.shape[:3])
    return candidates[np.arange(len(seeds)), density.sum(axis=2).argmax(axis=1)]


def _rk4_direction(query: FieldQuery, position: np.ndarray, k1: np.ndarray, step_mm: float) -> np.ndarray:
    """Unit RK4 direction ``(M, 3)`` from ``position`` given the first stage ``k1`` (already aligned)."""
    k2 = align_axis(query(position + 0.5 * step_mm * k1)[1], k1)
    k3 = align_axis(query(position + 0.5 * step_mm * k2)[1], k2)
    k4 = align_axis(query(position + step_mm * k3)[1], k3)
    return _unit(k1 + 2.0 * k2 + 2.0 * k3 + k4)


def _march(
    query: FieldQuery,
    in_mask: _MaskLookup,
    starts: np.ndarray,
    axes: np.ndarray,
    *,
    step_mm: float,
    density_threshold: float,
    max_angle_deg: float,
    max_steps: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Integrate all particles at once; returns particle ids ``(P,)`` and points ``(P, 3)`` in step order.

    A particle stops before a step that ends outside the mask, below ``density_threshold``, or
    turns by more than ``max_angle_deg`` from the previous step.
    """
    cos_max = math.cos(math.radians(max_angle_deg))
    ids = np.arange(len(starts))
    position, previous = starts.astype(float), axes.astype(float)
    orientation = np.asarray(query(position)[1], dtype=float)
    record_ids, record_points = [], []
    for _ in range(max_steps):
        direction = _rk4_direction(query, position, align_axis(orientation, previous), step_mm)
        moved = position + step_mm * direction
        density, orientation = (np.asarray(a, dtype=float) for a in query(moved))
        ok = (np.einsum("nc,nc->n", direction, previous) >= cos_max) & (density >= density_threshold) & in_mask(moved)
        ids, position, previous, orientation = ids[ok], moved[ok], direction[ok], orientation[ok]
        if not len(ids):
            break
        record_ids.append(ids)
        record_points.append(position)
    if not record_ids:
        return np.zeros(0, np.int64), np.zeros((0, 3))
    return np.concatenate(record_ids), np.concatenate(record_points)


def _per_particle(ids: np.ndarray, points: np.ndarray, n_particles: int) -> list[np.ndarray]:
    """Split step-ordered ``points`` into one ``(n_i, 3)`` array per particle id."""
    order = np.argsort(ids, kind="stable")
    return np.split(points[order], np.cumsum(np.bincount(ids, minlength=n_particles))[:-1])


@dataclass(frozen=True)
class TrackingSettings:
    """Tunables of :func:`track_field`; the defaults are the app's (reported in the BEP046 sidecar).

    seeds_per_voxel, n_seeds : seeding, at most one of them (neither: 1 seed per voxel);
        seeds go in mask voxels whose density is at least ``seed_density_threshold``.
    step_mm : integration step (mm).
    density_threshold : tracking stops where the density falls below it (field units: the
        input's robust maximum).
    seed_density_threshold : least density of a seed voxel (field units).
    max_angle_deg : largest turn between consecutive steps (degrees).
    min_length_mm, max_length_mm : streamlines outside this length range (mm) are discarded.
    max_dispersion_deg : if set, voxels whose predicted V1 dispersion (degrees) exceeds it leave
        the tracking mask: particles stop before a step that ends in one and no seed goes there.
        None (the default): off, the dispersion map is not read.
    """

    seeds_per_voxel: int | None = None
    n_seeds: int | None = None
    step_mm: float = 0.5
    density_threshold: float = 0.1
    seed_density_threshold: float = 0.5
    max_angle_deg: float = 45.0
    min_length_mm: float = 20.0
    max_length_mm: float = 250.0
    max_dispersion_deg: float | None = None

    def __post_init__(self) -> None:
        if self.seeds_per_voxel is not None and self.n_seeds is not None:
            raise ValueError("give seeds_per_voxel or n_seeds, not both")


def tracking_mask(
    mask: np.ndarray, dispersion: np.ndarray | None = None, max_dispersion_deg: float | None = None
) -> np.ndarray:
    """The ``(X, Y, Z)`` bool mask tracked in: ``mask`` less the voxels whose V1 ``dispersion``
    ``(X, Y, Z)`` (degrees, same grid) exceeds ``max_dispersion_deg``; ``mask`` itself when that is None."""
    mask = np.asarray(mask, dtype=bool)
    if max_dispersion_deg is None:
        return mask
    if dispersion is None:
        raise ValueError("max_dispersion_deg is set but no V1 dispersion map was given")
    dispersion = np.asarray(dispersion, dtype=float)
    if dispersion.shape != mask.shape:
        raise ValueError(f"V1 dispersion map of shape {dispersion.shape} is not on the mask's grid {mask.shape}")
    return mask & ~(dispersion > max_dispersion_deg)


def track_field(
    field_or_query_fn: FittedField | FieldQuery,
    mask: np.ndarray,
    affine: np.ndarray,
    settings: TrackingSettings = TrackingSettings(),
    *,
    dispersion: np.ndarray | None = None,
    seed: int = 0,
) -> list[np.ndarray]:
    """Bidirectional deterministic RK4 streamlines through the field, in world RAS+ mm.

    Parameters
    ----------
    field_or_query_fn : a :class:`FittedField`, or a function of ``(N, 3)`` world points
        returning density ``(N,)`` and orientation ``(N, 3)`` (its signs are ignored).
    mask : (X, Y, Z) bool tracking mask on the grid of ``affine`` (4, 4, voxel → world mm).
    settings : seeding, step, stopping and length rules (:class:`TrackingSettings`).
    dispersion : (X, Y, Z) predicted V1 dispersion (degrees) on the mask's grid; read, and
        required, only when ``settings.max_dispersion_deg`` is set (see :func:`tracking_mask`).
    seed : seed of the random seed placement.

    Returns a list of ``(n_i, 3)`` float32 streamlines, each running through its seed point.
    """
    s = settings
    seeds_per_voxel = 1 if s.seeds_per_voxel is None and s.n_seeds is None else s.seeds_per_voxel
    query = _as_query(field_or_query_fn)
    mask = tracking_mask(mask, dispersion, s.max_dispersion_deg)
    seeds = seed_points(
        query,
        mask,
        affine,
        threshold=s.seed_density_threshold,
        n_seeds=s.n_seeds,
        seeds_per_voxel=seeds_per_voxel,
        rng=np.random.default_rng(seed),
    )
    if not len(seeds):
        LOGGER.warning("no voxel reaches the seed density %.3g; no streamlines", s.seed_density_threshold)
        return []
    axes = initial_axes(query, seeds, s.step_mm)
    ids, points = _march(
        query,
        _MaskLookup(mask, affine),
        np.concatenate([seeds, seeds]),
        np.concatenate([axes, -axes]),
        step_mm=s.step_mm,
        density_threshold=s.density_threshold,
        max_angle_deg=s.max_angle_deg,
        max_steps=math.ceil(s.max_length_mm / s.step_mm),
    )
    halves = _per_particle(ids, points, 2 * len(seeds))
    streamlines = []
    for i, start in enumerate(seeds):
        line = np.concatenate([halves[len(seeds) + i][::-1], start[None], halves[i]])
        if s.min_length_mm <= (len(line) - 1) * s.step_mm <= s.max_length_mm:
            streamlines.append(line.astype(np.float32))
    LOGGER.info("tracked %d streamlines from %d seeds", len(streamlines), len(seeds))
    return streamlines


def _uncertainty_use(max_dispersion_deg: float | None) -> str:
    """The sidecar's ``UncertaintyUse``: which uncertainty map changed the tracking, and how."""
    if max_dispersion_deg is None:
        return (
            "none: the per-voxel uncertainty maps (FA SD, V1 dispersion, track-density SD) are written beside "
            "the maps but do not change seeding, stepping or stopping; stopping where V1 dispersion exceeds 30 "
            "degrees (--stop-dispersion 30) made the held-out people's tractograms agree less with their DWI "
            "tractograms (model card), so it is off by default"
        )
    return (
        f"stopping: streamlines stop before a step that ends in a voxel whose predicted V1 dispersion (the "
        f"written map: RMS angle of the inference passes' V1 about the fused V1, times the weights' calibration "
        f"scale) exceeds {max_dispersion_deg} degrees, and no seed is "
        "placed in such a voxel; the FA SD and track-density SD maps do not change seeding, stepping or stopping"
    )


def bep046_sidecar(settings: TrackingSettings = TrackingSettings(), n_streamlines: int | None = None) -> dict[str, Any]:
    """BEP046 tractography sidecar for :func:`track_field` run with ``settings``.

    ``n_streamlines`` (optional) is reported as ``Count``. ``MinimumLength``/``MaximumLength``
    (mm) are beyond the BEP's table.
    """
    p = asdict(settings)
    per_voxel = p["n_seeds"] is None
    dispersion_rule = (
        ""
        if p["max_dispersion_deg"] is None
        else f"; the mask less voxels of V1 dispersion > {p['max_dispersion_deg']} degrees"
    )
    sidecar = {
        "TractographyClass": "local",
        "TractographyMethod": "deterministic",
        "StepSizeUnits": "mm",
        "StepSize": p["step_mm"],
        "AngleCurvature": p["max_angle_deg"],
        "SeedingMethod": "seedsPerVoxel" if per_voxel else "globalSeedNumber",
        "SeedingNumberMethod": (p["seeds_per_voxel"] or 1) if per_voxel else p["n_seeds"],
        "TerminationCriterion": "leaveMask",
        "TerminationCriterionTest": "binary",
        "MinimumLength": p["min_length_mm"],
        "MaximumLength": p["max_length_mm"],
        "Description": (
            "Deterministic bidirectional RK4 streamlines through a continuous field (feature grid + MLP) "
            "fitted to the predicted track-density and directionally encoded track-density slices. "
            f"Seeds in mask voxels with field density >= {p['seed_density_threshold']}; tracking stops on "
            f"leaving the mask (nearest voxel{dispersion_rule}), density < {p['density_threshold']} (units of "
            f"the input's robust maximum) or a turn above {p['max_angle_deg']} degrees per step. The field's "
            "orientation is sign-free; among the axes sharing its absolute components the one closest to the "
            "previous step is followed."
        ),
        "UncertaintyUse": _uncertainty_use(p["max_dispersion_deg"]),
    }
    if n_streamlines is not None:
        sidecar["Count"] = int(n_streamlines)
    return sidecar
