"""``m2m-train prepare``: turn one subject's T1w + DWI into m2m's training targets.

For each unit (participant or participant/session) this writes, on the T1w grid:
tensor maps (BEP016 names), the brain mask and tissue classes (from the T1w itself), the
DWI's measured field of view, the b0→T1w transform, a whole-brain tensor tractogram
(``.trx``), its track-density and directional track-density images, a QC figure and a
QC JSON. :func:`~m2m_app.io.manifest.write_manifest` gathers the QC files into ``manifest.tsv``/``manifest.json``,
the list of training pairs; a unit whose QC fails a plausibility check is marked
``flagged`` there, and training leaves it out unless told otherwise.

Several DWI runs: runs that share a grid and a phase-encoding direction are one series
(concatenated); otherwise each series is fitted and registered on its own (so opposite
phase-encoding distortions are never averaged into one b0), their tensors are averaged
on the T1w grid in the log-Euclidean domain, and their tractograms pooled.

DWI already preprocessed by QSIPrep (``m2m-train prepare --dwi-derivatives``) comes with its
preprocessed T1w in the same space: the same targets are built from them with no registration
(an identity transform, which the QC, the manifest and the sidecars name).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import nibabel as nib
import numpy as np
from dipy.tracking.streamline import transform_streamlines
from scipy.ndimage import binary_dilation

from m2m_app import __version__
from m2m_app.errors import BadDataError
from m2m_app.io.files import save_json
from m2m_app.io.manifest import PATH_COLUMNS, qc_path
from m2m_app.io.naming import (
    TDI_PARAMS,
    TENSOR_PARAMS,
    Subject,
    bids_uri,
    derivative_path,
    derivative_paths,
    sidecar_path,
)
from m2m_app.io.nifti import load_dwi, load_t1w, save_nifti
from m2m_app.io.tractogram import save_tractogram
from m2m_app.maths.streamlines import directional_density, track_density
from m2m_app.maths.tensor import log_euclidean_mean, masked_tensor_maps
from m2m_app.teacher import dwi as dwi_math
from m2m_app.teacher.qc import registration_figure
from m2m_app.teacher.register import (
    ANTS_SEEDS,
    MAX_FROM_HEADER_MM,
    MAX_VS_ANTS_MM,
    RigidResult,
    ants_rigid_t1w_to_dwi,
    mask_points,
    mean_displacement_mm,
    register_b0_to_t1w,
    resample_to_t1w,
    save_itk_transform,
    tensor_to_t1w,
)
from m2m_app.teacher.tissue import t1w_brain_mask, tissue_classes, tissue_flags
from m2m_app.teacher.tracking import track_tensor

LOGGER = logging.getLogger(__name__)

#: Below this share of the brain inside the DWI's field of view a unit teaches too little.
MIN_FOV_FRACTION = 0.25
#: Where a unit's DWI comes from: the raw BIDS dataset (registered here to the T1w), or QSIPrep's
#: derivatives (preprocessed, already in the T1w's space: no registration).
DWI_SOURCES = ("raw", "qsiprep")
#: What the sidecars and the QC say about the alignment of the DWI to the T1w, per DWI source.
REGISTRATION_NOTES = {
    "raw": "rigid registration of the mean b0 to the T1w (dipy, Mattes mutual information), "
    "checked against ANTs; the tensors rotated with it",
    "qsiprep": "none: QSIPrep's preprocessed DWI lies in the space of its preprocessed T1w (identity transform)",
}


def tractogram_figure_path(prep_dir: Path, subject: Subject) -> Path:
    """The teacher's streamline figure (drawn by the prepare workflow as the app's report draws its own)."""
    return derivative_path(prep_dir, subject, "figures", "qc", ".svg", desc="tractogram")


def _phase_encoding(path: Path) -> str:
    """The run's ``PhaseEncodingDirection`` from its JSON sidecar (empty when unknown)."""
    sidecar = Path(str(path).replace(".nii.gz", ".json").replace(".nii", ".json"))
    try:
        return str(json.loads(sidecar.read_text()).get("PhaseEncodingDirection", ""))
    except (OSError, ValueError):
        return ""


def group_dwi_runs(paths: list[Path]) -> list[list[Path]]:
    """Split DWI runs into series that can be fitted together: same grid and phase encoding.

    Runs with opposite phase encoding (``j`` and ``j-``) or another grid are distorted
    differently and each get their own fit and registration.
    """
    groups: dict[tuple, list[Path]] = {}
    for path in paths:
        img = cast(nib.Nifti1Image, nib.load(path))
        key = (img.shape[:3], tuple(np.round(img.affine, 3).ravel()), _phase_encoding(path))
        groups.setdefault(key, []).append(path)
    return list(groups.values())


def load_dwi_runs(paths: list[Path]) -> tuple[nib.Nifti1Image, np.ndarray, np.ndarray, np.ndarray]:
    """Load and concatenate DWI runs on one grid; b-vectors come back in the voxel frame ``(N, 3)``."""
    runs = [load_dwi(p) for p in paths]
    ref = runs[0][0]
    for path, (img, data, *_) in zip(paths[1:], runs[1:]):
        if data.shape[:3] != ref.shape[:3] or not np.allclose(img.affine, ref.affine, atol=1e-3):
            raise BadDataError(
                f"{path}: DWI runs to concatenate must share one grid; "
                f"{paths[0].name} is {ref.shape[:3]}, this one {data.shape[:3]}"
            )
    data = np.concatenate([r[1] for r in runs], axis=-1)
    bvals = np.concatenate([r[2] for r in runs])
    bvecs = np.concatenate([dwi_math.fsl_bvecs_to_voxel(r[3], ref.affine) for r in runs])
    return ref, data, bvals, bvecs


@dataclass
class SeriesResult:
    """One DWI series brought to the T1w grid."""

    name: str
    tensor: np.ndarray  # (X, Y, Z, 6) mm²/s on the T1w grid, world frame
    fov: np.ndarray  # (X, Y, Z) bool: where this series was measured
    b0: np.ndarray  # (X, Y, Z) mean b0 on the T1w grid, for the QC figure
    registration: RigidResult
    from_header_mm: float
    vs_ants_mm: float | None  # None: not registered (identity), so not checked against ANTs
    ants_spread_mm: float | None
    shells: list[int]
    streamlines: list[np.ndarray]
    tracking: dict


def _series_to_t1w(
    paths: list[Path],
    t1w_img: nib.Nifti1Image,
    t1w: np.ndarray,
    brain: np.ndarray,
    random_seed: int,
    register: bool = True,
) -> SeriesResult:
    """Fit, register (checked against ANTs) and track one DWI series; resample it to the T1w grid.

    Without ``register`` (QSIPrep's DWI, already in the T1w's space) the transform is the
    identity: the series is only resampled onto the T1w grid.
    """
    name = paths[0].name
    dwi_img, data, bvals, bvecs = load_dwi_runs(paths)
    used, shells = dwi_math.tensor_volumes(bvals)
    LOGGER.info(
        "%s: tensor fit on %s (%d of %d volumes, shells %s)",
        name,
        dwi_img.shape[:3],
        int(used.sum()),
        len(bvals),
        shells,
    )
    dwi_mask = dwi_math.dwi_brain_mask(data, bvals)
    measured = np.any(data != 0, axis=-1)
    # fit a little beyond the b0 mask, so that the T1w brain's edge finds a tensor
    fit = dwi_math.fit_tensor(
        data[..., used], bvals[used], bvecs[used], binary_dilation(dwi_mask, iterations=2) & measured
    )
    world = dwi_math.world_tensor_components(fit, dwi_img.affine)
    b0 = dwi_math.mean_b0(data, bvals)
    shape, affine = t1w.shape, t1w_img.affine
    if register:
        reg = register_b0_to_t1w(b0, dwi_img.affine, t1w, t1w_img.affine, dwi_mask)
    else:
        reg = RigidResult(np.eye(4), cost=float("nan"), start="identity")
    fov = field_of_view(measured, dwi_img.affine, reg, shape, affine)
    from_header, vs_ants, ants_spread = 0.0, None, None
    if register:
        points = mask_points(brain & fov, affine)
        ants = ants_rigid_t1w_to_dwi(b0, dwi_img.affine, t1w, t1w_img.affine, points)
        from_header = mean_displacement_mm(reg.t1w_to_dwi, np.eye(4), points)
        vs_ants, ants_spread = mean_displacement_mm(reg.t1w_to_dwi, ants.t1w_to_dwi, points), ants.spread_mm
        LOGGER.info(
            "%s: registration from the %s, %.1f mm from the header alignment, %.1f mm from ANTs "
            "(whose %d runs lie within %.1f mm of each other)",
            name,
            reg.start,
            from_header,
            vs_ants,
            len(ANTS_SEEDS),
            ants_spread,
        )
    else:
        LOGGER.info("%s: in the T1w's space already (QSIPrep): no registration, identity transform", name)
    streamlines, tracking = track_tensor(
        fit.evecs[..., :, 0], np.nan_to_num(fit.fa), dwi_img.affine, random_seed=random_seed
    )
    return SeriesResult(
        name=name,
        tensor=tensor_to_t1w(world, dwi_img.affine, reg, shape, affine),
        fov=fov,
        b0=resample_to_t1w(b0, dwi_img.affine, reg, shape, affine),
        registration=reg,
        from_header_mm=from_header,
        vs_ants_mm=vs_ants,
        ants_spread_mm=ants_spread,
        shells=shells,
        streamlines=list(transform_streamlines(streamlines, reg.dwi_to_t1w)),
        tracking=tracking,
    )


def field_of_view(
    measured: np.ndarray,
    dwi_affine: np.ndarray,
    registration: RigidResult,
    t1w_shape: tuple[int, ...],
    t1w_affine: np.ndarray,
) -> np.ndarray:
    """Where the DWI was measured, on the T1w grid: its voxels holding any signal ``(X, Y, Z)``
    brought over by the registration (nearest neighbour), boolean ``(X', Y', Z')``.

    A slab DWI gives a slab here: T1w voxels above or below it are outside, so training
    and evaluation never treat the unmeasured cerebellum as "no tensor".
    """
    return (
        resample_to_t1w(
            measured.astype(np.float32), dwi_affine, registration, t1w_shape, t1w_affine, interpolation="nearest"
        )
        > 0
    )


def qc_flags(series: list[SeriesResult], volumes: dict[str, float], fov_fraction: float) -> list[str]:
    """Reasons to keep a unit out of training (empty when every check passes)."""
    flags = tissue_flags(volumes)
    for result in series:
        if result.vs_ants_mm is not None and result.vs_ants_mm > MAX_VS_ANTS_MM:
            flags.append(
                f"{result.name}: registration is {result.vs_ants_mm:.1f} mm from ANTs' (bound {MAX_VS_ANTS_MM} mm)"
            )
        if result.from_header_mm > MAX_FROM_HEADER_MM:
            flags.append(
                f"{result.name}: registration moved {result.from_header_mm:.1f} mm from the "
                f"image headers (bound {MAX_FROM_HEADER_MM} mm)"
            )
    if fov_fraction < MIN_FOV_FRACTION:
        flags.append(f"only {fov_fraction:.0%} of the brain lies in the DWI's field of view")
    return flags


def _worst(values: list[float | None]) -> float | None:
    """The largest of the series' QC distances (mm, 2 decimals); None where none was measured."""
    measured = [v for v in values if v is not None]
    return round(max(measured), 2) if measured else None


def _sidecar(path: Path, description: str, sources: list[str], **extra) -> None:
    save_json(
        {
            "Description": description,
            "Sources": sources,
            "GeneratedBy": [{"Name": "m2m-train prepare", "Version": __version__}],
            **extra,
        },
        sidecar_path(path),
    )


def teacher_paths(prep_dir: Path, subject: Subject) -> dict[str, Path]:
    """Every file the teacher writes for a unit, keyed like the manifest's path columns."""
    paths = {key: path for key, path in derivative_paths(prep_dir, subject, "tensordet").items() if key in PATH_COLUMNS}
    paths["dseg"] = derivative_path(prep_dir, subject, "anat", "dseg", space="T1w")
    paths["fov"] = derivative_path(prep_dir, subject, "dwi", "mask", space="T1w", desc="dwifov")
    paths["qc_figure"] = derivative_path(prep_dir, subject, "figures", "qc", ".png", desc="registration")
    return paths


def prepare_subject(
    subject: Subject,
    t1w_path: Path,
    dwi_paths: list[Path],
    prep_dir: Path,
    random_seed: int = 0,
    num_threads: int = 1,
    source_link: str = "raw",
    dwi_source: str = "raw",
) -> dict:
    """Run the teacher on one unit and write its outputs; returns the unit's QC record.

    ``source_link`` is the prep dir's ``DatasetLinks`` key of the unit's BIDS dataset
    (:func:`~m2m_app.io.derivatives.source_link_name`), the dataset of its sidecars' ``Sources``.
    ``dwi_source`` (:data:`DWI_SOURCES`): ``raw`` registers each DWI series to the T1w;
    ``qsiprep`` takes QSIPrep's preprocessed T1w and DWI, which share one space, as they are
    (identity transform, no ANTs check).
    """
    register = dwi_source == "raw"
    aligned = REGISTRATION_NOTES[dwi_source]
    start = time.monotonic()
    stages: dict[str, float] = {}

    def lap(name: str) -> None:
        stages[name] = round(time.monotonic() - start - sum(stages.values()), 2)

    prep_dir = Path(prep_dir)
    t1w_img, t1w = load_t1w(t1w_path)
    sources = [bids_uri(p, source_link) for p in [t1w_path, *dwi_paths]]
    LOGGER.info("%s: brain mask (deepbet) and tissue classes (ANTs Atropos) of the T1w", subject.label)
    tissues = tissue_classes(t1w_img, t1w_brain_mask(t1w_img, num_threads))
    volumes = tissues.volumes_ml(t1w_img.affine)
    lap("t1w_brain_and_tissues")

    series = [
        _series_to_t1w(group, t1w_img, t1w, tissues.brain, random_seed, register) for group in group_dwi_runs(dwi_paths)
    ]
    lap("dwi_fit_registration_tracking")
    shape, affine = t1w.shape, t1w_img.affine
    fov = np.any([s.fov for s in series], axis=0)
    tensor = log_euclidean_mean([s.tensor for s in series])
    measured_brain = tissues.brain & fov & np.any(tensor != 0, axis=-1)
    tensor[~measured_brain] = 0
    maps = masked_tensor_maps(tensor, measured_brain)
    streamlines = [line for s in series for line in s.streamlines]
    tdi = {"tdi": track_density(streamlines, shape, affine), "dectdi": directional_density(streamlines, shape, affine)}
    fov_fraction = float((tissues.brain & fov).sum() / max(tissues.brain.sum(), 1))
    flags = qc_flags(series, volumes, fov_fraction)
    lap("to_t1w_grid_and_maps")

    paths = teacher_paths(prep_dir, subject)
    for param, (description, units) in TENSOR_PARAMS.items():
        image = tensor if param == "diffusivity" else maps[param]
        save_nifti(image, affine, paths[param], dtype=np.float32)
        _sidecar(
            paths[param],
            f"{description}, measured: WLS tensor fit (dipy) of the "
            f"{'DWI' if register else 'DWI preprocessed by QSIPrep'}, brought to the T1w grid with "
            f"log-Euclidean interpolation{' and tensor rotation' if register else ''}; "
            "zero outside the brain and the DWI's field of view",
            sources,
            Units=units,
            Model="tensor",
            Registration=aligned,
        )
    for param, description in TDI_PARAMS.items():
        save_nifti(tdi[param], affine, paths[param])
        _sidecar(paths[param], f"{description}, from the teacher tractogram", sources, Registration=aligned)
    save_nifti(tissues.brain, affine, paths["mask"], dtype=np.uint8)
    _sidecar(paths["mask"], "brain mask of the T1w (deepbet)", sources[:1], Type="Brain")
    save_nifti(tissues.wm, affine, paths["wm"], dtype=np.uint8)
    _sidecar(paths["wm"], "white matter of the T1w (ANTs Atropos, 3 classes, inside the brain mask)", sources[:1])
    labels = tissues.csf * 1 + tissues.gm * 2 + tissues.wm * 3
    save_nifti(labels, affine, paths["dseg"], dtype=np.uint8)
    _sidecar(
        paths["dseg"],
        "tissue classes of the T1w: N4 then ANTs Atropos (k-means, MRF) in the brain mask",
        sources[:1],
        Labels={"0": "background", "1": "CSF", "2": "GM", "3": "WM"},
    )
    save_nifti(fov, affine, paths["fov"], dtype=np.uint8)
    _sidecar(
        paths["fov"],
        "where the DWI was measured (its field of view, every series, on the T1w grid)",
        sources[1:],
        Type="ROI",
        Registration=aligned,
    )
    paths["xfm"].parent.mkdir(parents=True, exist_ok=True)
    save_itk_transform(series[0].registration, paths["xfm"])
    _sidecar(
        paths["xfm"],
        "T1w world -> DWI world point transform (ITK, RAS mm converted by nitransforms) of the first DWI series",
        sources,
        Registration=aligned,
    )
    save_tractogram(streamlines, t1w_img, paths["tractogram"])
    _sidecar(
        paths["tractogram"],
        "whole-brain deterministic tensor tractography of the DWI (every series "
        "pooled), streamlines in RASMM of the T1w",
        sources,
        Registration=aligned,
        **series[0].tracking,
    )
    registration_figure(
        t1w, affine, np.mean([s.b0 for s in series], axis=0), maps["fa"], tissues.wm, fov, paths["qc_figure"]
    )

    qc: dict[str, Any] = {
        "subject": subject.label,
        "participant": subject.participant,
        "session": subject.session or "",
        "t1w": str(Path(t1w_path).resolve()),
        "status": "ok",
        **{k: str(p.relative_to(prep_dir)) for k, p in paths.items()},
        "flagged": bool(flags),
        "flags": "; ".join(flags),
        "mean_fa_wm": float(maps["fa"][tissues.wm & measured_brain].mean())
        if np.any(tissues.wm & measured_brain)
        else float("nan"),
        "mean_fa_brain": float(maps["fa"][measured_brain].mean()),
        "median_md": float(np.median(maps["md"][measured_brain])),
        "n_streamlines": len(streamlines),
        "dwi_source": dwi_source,
        "registration": aligned,
        "registration_cost": series[0].registration.cost if register else None,
        "registration_start": series[0].registration.start,
        "registration_candidates": {s.name: s.registration.candidates for s in series},
        "registration_from_header_mm": round(max(s.from_header_mm for s in series), 2),
        "registration_vs_ants_mm": _worst([s.vs_ants_mm for s in series]),
        "registration_ants_spread_mm": _worst([s.ants_spread_mm for s in series]),
        "fov_fraction": round(fov_fraction, 3),
        **volumes,
        "tensor_shells": ",".join(str(b) for b in sorted({b for s in series for b in s.shells})),
        "dwi_series": len(series),
        "runtime_s": round(time.monotonic() - start, 1),
        "version": __version__,
    }
    lap("writing")
    qc["stage_seconds"] = stages
    save_json(qc, qc_path(prep_dir, subject))
    LOGGER.info(
        "%s: done in %.0f s (%d streamlines)%s",
        subject.label,
        qc["runtime_s"],
        len(streamlines),
        f"; FLAGGED: {qc['flags']}" if flags else "",
    )
    return qc
