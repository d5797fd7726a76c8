"""Rigid registration of the mean b0 to the T1w (dipy, mutual information), checked against ANTs."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from dipy.align.imaffine import AffineMap, AffineRegistration, MutualInformationMetric, transform_centers_of_mass
from dipy.align.transforms import RigidTransform3D, TranslationTransform3D
from nibabel.affines import apply_affine

from m2m_app.io.nifti import ants_image
from m2m_app.maths.tensor import (
    components_to_matrix,
    exp_tensors,
    frame_rotation,
    log_tensors,
    matrix_to_components,
    rotate_tensors,
)

if TYPE_CHECKING:
    import ants

LOGGER = logging.getLogger(__name__)


#: A registration may move the b0 this far (mean over the DWI brain, mm) from where the image
#: headers put it before it counts as implausible: same-session T1w and DWI share the
#: scanner frame, so only head motion between the two scans (a few mm) separates them.
MAX_FROM_HEADER_MM = 12.0
#: Largest disagreement (mean over the T1w brain, mm) allowed between m2m's registration and
#: the independent ANTs registration before the unit is flagged (about one DWI voxel).
MAX_VS_ANTS_MM = 2.5


@dataclass
class RigidResult:
    """A rigid transform between the T1w (static) and DWI (moving) world spaces.

    ``t1w_to_dwi`` maps a point in T1w world mm to the matching point in DWI world mm
    (the ITK "image" convention: it resamples the DWI onto the T1w grid).
    ``cost`` is dipy's negative mutual information of the final alignment, evaluated on
    every voxel (lower is better); ``start`` names the starting point it was reached from
    (``header``: the image headers; ``centre_of_mass``); ``candidates`` holds each start's
    cost and distance from the header prior (mm), for the QC.
    """

    t1w_to_dwi: np.ndarray
    cost: float
    start: str = "header"
    candidates: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def dwi_to_t1w(self) -> np.ndarray:
        """Inverse transform: DWI world mm → T1w world mm (moves streamlines onto the T1w)."""
        return np.linalg.inv(self.t1w_to_dwi)


def mean_displacement_mm(first: np.ndarray, second: np.ndarray, points: np.ndarray) -> float:
    """Mean distance (mm) between where two 4×4 transforms send the world points ``(N, 3)``."""
    moved = [apply_affine(transform, points) for transform in (first, second)]
    return float(np.linalg.norm(moved[0] - moved[1], axis=1).mean())


def mask_points(mask: np.ndarray, affine: np.ndarray, max_points: int = 20000) -> np.ndarray:
    """World coordinates ``(N, 3)`` of (an even subsample of) the voxels of ``mask``."""
    ijk = np.argwhere(mask)
    ijk = ijk[:: max(1, len(ijk) // max_points)]
    return apply_affine(affine, ijk)


def _coarsen(volume: np.ndarray, affine: np.ndarray, target_voxel_mm3: float) -> tuple[np.ndarray, np.ndarray]:
    """Block-average a volume whose voxels are much smaller than ``target_voxel_mm3``.

    Registering a 1 mm T1w to a 2 mm b0 at the T1w's full resolution costs several
    times more and gains nothing: the b0 carries no finer detail.
    """
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    factors = np.maximum(1, np.floor(target_voxel_mm3 ** (1 / 3) / zooms + 1e-6)).astype(int)
    if np.all(factors == 1):
        return volume, affine
    shape = np.array(volume.shape[:3]) // factors
    trimmed = volume[: shape[0] * factors[0], : shape[1] * factors[1], : shape[2] * factors[2]]
    blocks = trimmed.reshape(shape[0], factors[0], shape[1], factors[1], shape[2], factors[2])
    scaled = affine.copy()
    scaled[:3, :3] = affine[:3, :3] * factors
    scaled[:3, 3] = affine[:3, :3] @ ((factors - 1) / 2) + affine[:3, 3]
    return blocks.mean(axis=(1, 3, 5)), scaled


def _full_cost(
    static: np.ndarray, static_affine: np.ndarray, moving: np.ndarray, moving_affine: np.ndarray, transform: np.ndarray
) -> float:
    """dipy's negative Mattes mutual information of one alignment, on every voxel (no sampling)."""
    metric = MutualInformationMetric(nbins=32, sampling_proportion=None)
    metric.setup(
        RigidTransform3D(),
        static,
        moving,
        static_grid2world=static_affine,
        moving_grid2world=moving_affine,
        starting_affine=transform,
    )
    return float(metric.distance(np.zeros(6)))


def register_b0_to_t1w(
    b0: np.ndarray,
    b0_affine: np.ndarray,
    t1w: np.ndarray,
    t1w_affine: np.ndarray,
    b0_mask: np.ndarray | None = None,
    *,
    header_prior: bool = True,
    level_iters: tuple[int, ...] = (200, 50, 10),
) -> RigidResult:
    """Estimate the rigid transform aligning the b0 ``(X, Y, Z)`` to the T1w ``(X', Y', Z')``.

    Each start (the image headers when ``header_prior``, i.e. when T1w and DWI come from
    one session and share the scanner frame; always the centres of mass) is refined by
    translation then rigid Mattes mutual information (32 bins, 3-level pyramid, dipy). A start
    whose result lies more than :data:`MAX_FROM_HEADER_MM` from the header alignment (mean
    over ``b0_mask``, the DWI brain) is implausible for one session and only kept if no
    start stays within the bound; among the rest the lowest full-sample cost wins.
    A partial slab against a whole-head T1w is where the centre-of-mass start fails: its
    centre lies far from the T1w's.
    """
    t1w, t1w_affine = _coarsen(t1w, t1w_affine, float(np.abs(np.linalg.det(b0_affine[:3, :3]))))
    metric = MutualInformationMetric(nbins=32, sampling_proportion=0.3)
    # a shallow pyramid (2× at most): a 20-slice slab shrunk 4× keeps too few slices to align
    reg = AffineRegistration(
        metric=metric, level_iters=list(level_iters), sigmas=[2.0, 1.0, 0.0], factors=[2, 1, 1], verbosity=0
    )
    grids = {"static_grid2world": t1w_affine, "moving_grid2world": b0_affine}
    starts = {"centre_of_mass": transform_centers_of_mass(t1w, t1w_affine, b0, b0_affine).affine}
    if header_prior:
        starts = {"header": np.eye(4), **starts}
    points = mask_points(b0_mask if b0_mask is not None else b0 > 0, b0_affine)
    results = {}
    for name, start in starts.items():
        translation = reg.optimize(t1w, b0, TranslationTransform3D(), None, starting_affine=start, **grids)
        rigid = reg.optimize(t1w, b0, RigidTransform3D(), None, starting_affine=translation.affine, **grids)
        # the result's distance from the header alignment, on the b0 brain: T1w points that the
        # two transforms send to the same DWI point agree
        moved = mean_displacement_mm(np.linalg.inv(rigid.affine), np.eye(4), points)
        results[name] = (rigid.affine, _full_cost(t1w, t1w_affine, b0, b0_affine, rigid.affine), moved)
        LOGGER.debug("registration from the %s: cost %.4f, %.1f mm from the header", name, results[name][1], moved)
    plausible = [n for n, r in results.items() if not header_prior or r[2] <= MAX_FROM_HEADER_MM]
    if plausible:
        best = min(plausible, key=lambda n: results[n][1])
    else:  # every start moved far: keep the least implausible one (the QC flags the unit)
        best = min(results, key=lambda n: results[n][2])
    return RigidResult(
        t1w_to_dwi=results[best][0],
        cost=results[best][1],
        start=best,
        candidates={n: {"cost": round(r[1], 5), "from_header_mm": round(r[2], 2)} for n, r in results.items()},
    )


#: Random seeds of the ANTs runs whose medoid is the independent estimate: one run's random
#: sampling moves it by up to 1.9 mm on ds-real (0.3 mm between repeats of one seed, from
#: threading), and on ds-extra's partial slab one run in four lands 12-20 mm off.
ANTS_SEEDS = (1, 2, 3)


@dataclass
class AntsCheck:
    """The independent ANTs estimate of the T1w world → DWI world transform (RAS mm, 4×4).

    ``t1w_to_dwi`` is the medoid of the seeded runs (the run with the least summed distance
    to the others); ``spread_mm`` is the largest mean distance between two runs, over the
    points it was measured on: how far ANTs' own answer is from reproducible.
    """

    t1w_to_dwi: np.ndarray
    spread_mm: float


def _ants_rigid_run(fixed: ants.ANTsImage, moving: ants.ANTsImage, header_prior: bool, seed: int) -> np.ndarray:
    """One antspyx rigid run (Mattes MI, every voxel sampled, 2× pyramid); T1w → DWI in RAS mm."""
    import ants
    import ants.config

    previous, ants.config._random_seed = ants.config._random_seed, seed  # antspyx's seed hook
    try:
        with tempfile.TemporaryDirectory() as tmp:
            # a shallow pyramid, as for dipy: a slab shrunk 6× (ANTs' default) keeps too few slices
            result = ants.registration(
                fixed,
                moving,
                type_of_transform="Rigid",
                aff_metric="mattes",
                aff_random_sampling_rate=1.0,
                aff_shrink_factors=(2, 1),
                aff_smoothing_sigmas=(1, 0),
                aff_iterations=(1000, 500),
                initial_transform="Identity" if header_prior else None,
                outprefix=str(Path(tmp) / "rigid_"),
            )
            (path,) = result["fwdtransforms"]  # one rigid stage: one .mat file
            return itk_transform_to_ras(Path(path))
    finally:
        ants.config._random_seed = previous


def itk_transform_to_ras(path: Path) -> np.ndarray:
    """The 4×4 RAS-mm matrix of an ITK affine transform file (``.mat`` as ANTs writes it, or ``.txt``).

    ITK maps fixed → moving points in LPS mm around a centre; nitransforms converts that to the
    matrix sending a fixed-space RAS point to its moving-space RAS point.
    """
    from nitransforms.io.itk import ITKLinearTransform

    return np.asarray(ITKLinearTransform.from_filename(str(path)).to_ras(), dtype=np.float64)


def ants_rigid_t1w_to_dwi(
    b0: np.ndarray,
    b0_affine: np.ndarray,
    t1w: np.ndarray,
    t1w_affine: np.ndarray,
    points: np.ndarray,
    header_prior: bool = True,
    seeds: tuple[int, ...] = ANTS_SEEDS,
) -> AntsCheck:
    """An independent estimate of the same transform: ANTs rigid Mattes MI (antspyx), as QSIPrep uses.

    One ANTs run per seed in ``seeds``, each from the image headers (``header_prior``) or
    from the centres of mass; the medoid over the T1w world ``points`` ``(N, 3)`` is kept,
    so that one run's random sampling (or its outright failure) does not decide the QC.
    """
    t1w, t1w_affine = _coarsen(t1w, t1w_affine, float(np.abs(np.linalg.det(b0_affine[:3, :3]))))
    fixed, moving = ants_image(t1w, t1w_affine), ants_image(b0, b0_affine)
    runs = [_ants_rigid_run(fixed, moving, header_prior, seed) for seed in seeds]
    distances = np.array([[mean_displacement_mm(a, b, points) for b in runs] for a in runs])
    return AntsCheck(t1w_to_dwi=runs[int(distances.sum(axis=1).argmin())], spread_mm=float(distances.max()))


def resample_to_t1w(
    volume: np.ndarray,
    dwi_affine: np.ndarray,
    result: RigidResult,
    t1w_shape: tuple[int, ...],
    t1w_affine: np.ndarray,
    interpolation: str = "linear",
) -> np.ndarray:
    """Resample a DWI-grid scalar volume onto the T1w grid with the rigid transform."""
    mapping = AffineMap(
        result.t1w_to_dwi,
        domain_grid_shape=t1w_shape[:3],
        domain_grid2world=t1w_affine,
        codomain_grid_shape=volume.shape[:3],
        codomain_grid2world=dwi_affine,
    )
    return mapping.transform(volume, interpolation=interpolation)


def save_itk_transform(result: RigidResult, path: Path) -> None:
    """Write the T1w→DWI point transform as an ITK text transform (nitransforms)."""
    from nitransforms.linear import Affine

    Affine(result.t1w_to_dwi).to_filename(str(path), fmt="itk")


def tensor_to_t1w(
    components: np.ndarray,
    dwi_affine: np.ndarray,
    result: RigidResult,
    t1w_shape: tuple[int, ...],
    t1w_affine: np.ndarray,
) -> np.ndarray:
    """Bring a world-frame tensor field ``(X, Y, Z, 6)`` from the DWI grid onto the T1w grid.

    The tensors are interpolated in the log-Euclidean domain (linear interpolation of
    ``log D``, so the result stays positive-definite and does not swell) and rotated
    by the rotation of the DWI→T1w transform (``D' = R D Rᵀ``): resampling the six
    components alone would leave the fibre directions pointing the old way.
    Returns ``(X', Y', Z', 6)`` float32 in mm²/s, world frame of the T1w; zero where
    the DWI had no tensor.
    """
    support = np.any(components != 0, axis=-1)
    logs = np.zeros_like(components, dtype=np.float64)
    logs[support] = matrix_to_components(log_tensors(components_to_matrix(components[support])))
    # normalised interpolation: voxels without a tensor get no say (a zero log would mean D = I mm²/s)
    weight = resample_to_t1w(support.astype(np.float64), dwi_affine, result, t1w_shape, t1w_affine)
    inside = weight > 0.5
    resampled = (
        np.stack(
            [resample_to_t1w(logs[..., k], dwi_affine, result, t1w_shape, t1w_affine)[inside] for k in range(6)],
            axis=-1,
        )
        / weight[inside][:, None]
    )
    rotation = frame_rotation(result.dwi_to_t1w)
    out = np.zeros(tuple(t1w_shape[:3]) + (6,), dtype=np.float32)
    rotated = rotate_tensors(components_to_matrix(resampled), rotation)
    out[inside] = matrix_to_components(exp_tensors(rotated))
    return out
