"""Spatial normalisation of a T1w to a template with ANTs (antspyx), as fMRIPrep and QSIPrep do.

:func:`register_to_template` runs rigid + affine + SyN (antspyx ``SyNRA``, Mattes mutual
information) of the brain-extracted T1w to the brain-extracted template, both on a
:data:`REGISTRATION_MM` grid, seeded, and writes both directions as ITK composite transforms
(``.h5``) that ``antsApplyTransforms`` and antspyx read as they are. :func:`coordinate_field`
turns a transform into the coordinate field of :mod:`m2m_app.maths.warp`: ANTs resamples
images of the moving space's own RAS coordinates (linear interpolation of a linear function is
exact), so every later step uses ANTs' own mapping.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from m2m_app.data.templates import Template
from m2m_app.errors import BadDataError
from m2m_app.io.nifti import ants_image, load_image, load_t1w
from m2m_app.maths.grid import isotropic_grid, normalise_intensity, resample_scalar
from m2m_app.maths.warp import grid_points

LOGGER = logging.getLogger(__name__)

#: Voxel size (mm) of both images during the registration: the warp is smooth at this scale,
#: and a 1 mm SyN would cost minutes on two cores.
REGISTRATION_MM = 2.0
#: SyN iterations per level (shrink factors 4, 2, 1 of the registration grid).
SYN_ITERATIONS = (40, 20, 10)
#: Fraction of voxels the rigid and affine stages sample (ANTs' default; the seed fixes which):
#: every voxel gave the same Dice and correlation on sub-01 for 45 % more time (32 s against 46 s).
AFFINE_SAMPLING = 0.2
#: Less brain than this (ml) cannot be registered to a whole-brain template (an 84 mm slab holds ~700 ml).
MIN_BRAIN_ML = 100.0
#: Margin (mm) of the coordinate images around the moving grid, so that ANTs' linear
#: interpolation stays exact a little outside the moving image's field of view.
FIELD_MARGIN_MM = 40.0


@dataclass(frozen=True)
class TemplateImages:
    """A template on one grid: T1w intensities in [0, 1], brain, grey- and white-matter probability."""

    shape: tuple[int, int, int]
    affine: np.ndarray
    t1w: np.ndarray
    brain: np.ndarray
    gm: np.ndarray
    wm: np.ndarray


def template_grid(template: Template, resolution_mm: float | None) -> tuple[tuple[int, int, int], np.ndarray]:
    """The grid of a template at ``resolution_mm`` (None: its own 1 mm grid), covering its whole box."""
    img = nib.Nifti1Image.from_filename(template.t1w)
    x, y, z = (int(n) for n in img.shape[:3])
    if resolution_mm is None:
        return (x, y, z), np.asarray(img.affine)
    return isotropic_grid((x, y, z), img.affine, resolution_mm)


def load_template(template: Template, resolution_mm: float | None) -> TemplateImages:
    """The template's images on :func:`template_grid` (linear resampling, anti-aliased)."""
    shape, affine = template_grid(template, resolution_mm)

    def on_grid(path: Path) -> np.ndarray:
        img, data = load_image(path)
        data = data / max(float(data.max()), 1e-6)
        if resolution_mm is None:
            return data
        return resample_scalar(data, img.affine, affine, shape)

    t1w = on_grid(template.t1w)
    return TemplateImages(
        shape, affine, t1w, t1w > template.brain_threshold, on_grid(template.gm), on_grid(template.wm)
    )


def _seeded_ants(seed: int, threads: int):
    """antspyx with its random seed hook and ITK's thread count set; returns the module and the previous seed."""
    import ants
    import ants.config

    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(max(1, threads))
    previous, ants.config._random_seed = ants.config._random_seed, seed
    return ants, previous


def register_to_template(
    t1w_data: np.ndarray,
    t1w_affine: np.ndarray,
    brain: np.ndarray,
    template: Template,
    forward_path: Path,
    inverse_path: Path,
    seed: int = 0,
    threads: int = 1,
) -> None:
    """Register the T1w ``(X, Y, Z)`` (voxel → RAS mm ``t1w_affine``), restricted to ``brain``
    (same grid, bool), to ``template``; write the composite transforms.

    ``forward_path`` (``from-T1w_to-<template>_mode-image``) resamples a T1w-space image onto
    the template (``antsApplyTransforms -i t1w_space.nii.gz -r template.nii.gz -t forward``);
    ``inverse_path`` the other way. ``threads``: ITK's threads, read when antspyx is first
    imported in the process (a Nipype node's own process). With one thread, the same inputs and
    seed give the same transforms bit for bit; with more, ITK's multithreaded sums make two runs
    differ by about 0.01 mm (measured), as fMRIPrep documents for its ANTs steps.
    """
    brain_ml = float(np.count_nonzero(brain)) * abs(np.linalg.det(t1w_affine[:3, :3])) / 1000
    if brain_ml < MIN_BRAIN_ML:
        raise BadDataError(
            f"the predicted brain mask holds {brain_ml:.0f} ml (< {MIN_BRAIN_ML:g} ml): too little brain to register "
            f"to {template.name}; check the T1w and its report"
        )
    shape, affine = isotropic_grid(t1w_data.shape, t1w_affine, REGISTRATION_MM)
    masked = np.where(brain, t1w_data, 0.0).astype(np.float32)
    moving = normalise_intensity(resample_scalar(masked, t1w_affine, affine, shape))
    fixed_images = load_template(template, REGISTRATION_MM)
    fixed = np.where(fixed_images.brain, fixed_images.t1w, 0.0)
    ants, previous = _seeded_ants(seed, threads)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            result = ants.registration(
                ants_image(fixed, fixed_images.affine),
                ants_image(moving, affine),
                type_of_transform="SyNRA",
                aff_random_sampling_rate=AFFINE_SAMPLING,
                reg_iterations=SYN_ITERATIONS,
                write_composite_transform=True,
                outprefix=str(Path(tmp) / "t1w_to_template_"),
            )
            for source, target in ((result["fwdtransforms"], forward_path), (result["invtransforms"], inverse_path)):
                Path(target).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
    finally:
        ants.config._random_seed = previous


def register_t1w(
    t1w: Path, mask: Path, template: Template, forward: Path, inverse: Path, seed: int = 0, threads: int = 1
) -> None:
    """:func:`register_to_template` of the T1w file ``t1w`` restricted to ``mask`` (a brain mask
    on any grid over the T1w: resampled linearly onto the T1w's, weight ≥ 0.5)."""
    img, data = load_t1w(t1w)
    mask_img, mask_data = load_image(mask)
    brain = resample_scalar(mask_data > 0, mask_img.affine, img.affine, data.shape[:3]) >= 0.5
    register_to_template(data, img.affine, brain, template, forward, inverse, seed, threads)


def coordinate_field(
    transform: Path,
    fixed_shape: tuple[int, int, int],
    fixed_affine: np.ndarray,
    moving_shape: tuple[int, ...],
    moving_affine: np.ndarray,
    threads: int = 1,
) -> np.ndarray:
    """For every voxel of the fixed grid, the moving-space RAS point (mm) that ``transform`` maps
    there: ``(X, Y, Z, 3)`` float32 (``transform`` in ANTs' image convention, as written by
    :func:`register_to_template`).

    The coordinate images are built on a :data:`REGISTRATION_MM` grid over the moving grid's
    field of view plus :data:`FIELD_MARGIN_MM`; ANTs interpolates them linearly, which is exact.
    """
    zooms = nib.affines.voxel_sizes(moving_affine)
    margin = FIELD_MARGIN_MM / zooms
    padded = np.array(moving_shape[:3]) + 2 * margin
    grown = moving_affine.copy()
    grown[:3, 3] = moving_affine[:3, :3] @ (-margin) + moving_affine[:3, 3]
    shape, affine = isotropic_grid(tuple(int(np.ceil(n)) for n in padded), grown, REGISTRATION_MM)
    world = grid_points(shape, affine).T.reshape((3, *shape)).astype(np.float32)
    ants, previous = _seeded_ants(0, threads)
    try:
        reference = ants_image(np.zeros(fixed_shape, np.float32), fixed_affine)
        field = np.empty(tuple(fixed_shape) + (3,), dtype=np.float32)
        for axis in range(3):
            warped = ants.apply_transforms(
                reference, ants_image(world[axis], affine), transformlist=[str(transform)], interpolator="linear"
            )
            field[..., axis] = warped.numpy()
        return field
    finally:
        ants.config._random_seed = previous
