"""Population-atlas FA baseline: a template FA map warped to the subject's T1w.

The FA template is TractSeg's HCP-space ``MNI_FA_template.nii.gz`` (1.25 mm, from the
``tractseg`` package, Apache-2.0; install with ``pip install "m2m-app[atlas]"`` or
``pip install --no-deps tractseg``, as only its data file is read). The subject is
reached through nilearn's skull-stripped MNI152 T1 (ICBM152 2009a):

1. the two templates are **not in the same space**: TractSeg's FA template is on FSL's
   MNI152 grid (the HCP's MNI space, MNI152NLin6Asym: 145×174×145 at 1.25 mm, origin
   (90, −126, −72)), nilearn's T1 is ICBM152 2009a (197×233×189 at 1 mm). Both use MNI
   world coordinates, but the brains differ by a few millimetres, so the FA template is
   first registered to nilearn's white-matter probability template (same space as its T1;
   affine, Mattes mutual information: high FA is white matter), once per process;
2. nilearn's T1 is registered to the subject's brain-extracted T1w with ANTs SyN (antspyx),
   the metric restricted to the template's brain, at ``spacing_mm`` (a T1w that keeps its
   scalp lets the registration slide along the head: extract the brain first);
3. the FA template goes through both transforms onto the T1w grid (linear), clipped to [0, 1].
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from importlib import resources
from typing import cast

import nibabel as nib
import numpy as np

from m2m_app.errors import UsageError
from m2m_app.io.nifti import ants_image

log = logging.getLogger(__name__)

#: Voxel size (mm) at which the subject is registered to the template.
REGISTRATION_SPACING_MM = 2.0
#: Where the FA template sits inside the ``tractseg`` package.
TRACTSEG_FA_TEMPLATE = "resources/MNI_FA_template.nii.gz"


@dataclass(frozen=True)
class Atlas:
    """A T1 template (skull-stripped, zero outside the brain), the FA template, and the transforms
    (ANTs files, ``ants.apply_transforms`` order) mapping the T1 template's points into the FA
    template's space (empty: the FA template is already in the T1 template's space)."""

    t1: nib.Nifti1Image
    fa: nib.Nifti1Image
    fa_transforms: tuple[str, ...] = ()


def _ants(img: nib.Nifti1Image):
    """An ``ants.ANTsImage`` of a 3D nibabel image (float32, same world geometry)."""
    return ants_image(np.asarray(img.dataobj), img.affine)


def _resample(img: nib.Nifti1Image, spacing_mm: float):
    """``img`` as an ANTs image resampled (linearly) to isotropic ``spacing_mm``."""
    import ants

    return ants.resample_image(_ants(img), (spacing_mm,) * 3, use_voxels=False, interp_type=0)


def tractseg_fa_template() -> nib.Nifti1Image:
    """TractSeg's HCP-space FA template; a :class:`~m2m_app.errors.UsageError` when tractseg is absent."""
    try:
        path = resources.files("tractseg") / TRACTSEG_FA_TEMPLATE
    except ModuleNotFoundError as err:
        raise UsageError(
            "the atlas baseline needs the FA template of the 'tractseg' package: "
            'pip install "m2m-app[atlas]" (or: pip install --no-deps tractseg)'
        ) from err
    with resources.as_file(path) as file:
        img = cast(nib.Nifti1Image, nib.load(file))
        return nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), img.affine)


def load_atlas(spacing_mm: float = REGISTRATION_SPACING_MM) -> Atlas:
    """TractSeg's FA template with nilearn's MNI152 T1, bridged by an affine registration (once per process)."""
    return _load_atlas(float(spacing_mm))


@functools.lru_cache(maxsize=2)
def _load_atlas(spacing_mm: float) -> Atlas:
    import ants
    from nilearn.datasets import load_mni152_template, load_mni152_wm_template

    fa = tractseg_fa_template()
    t1 = load_mni152_template(resolution=1)
    start = time.monotonic()
    bridge = ants.registration(
        fixed=_resample(load_mni152_wm_template(resolution=1), spacing_mm),
        moving=_resample(fa, spacing_mm),
        type_of_transform="Affine",
        aff_metric="mattes",
        random_seed=0,
    )
    log.info(
        "atlas: FA template (MNI152NLin6Asym) registered to the MNI152 2009 template in %.0f s",
        time.monotonic() - start,
    )
    return Atlas(t1=t1, fa=fa, fa_transforms=tuple(bridge["fwdtransforms"]))


def warp_atlas_fa(
    t1w_img: nib.Nifti1Image, atlas: Atlas | None = None, spacing_mm: float = REGISTRATION_SPACING_MM, seed: int = 0
) -> np.ndarray:
    """The atlas FA on the grid of ``t1w_img`` (3D T1w, brain-extracted: zero outside the brain),
    ``(X, Y, Z)`` float32 in [0, 1].

    ``atlas`` defaults to :func:`load_atlas` (TractSeg FA through nilearn's MNI152 T1). The
    template T1 (fixed) is registered to the subject (moving) with SyN at ``spacing_mm``,
    the metric restricted to the template's brain; the FA follows the inverse transforms.
    """
    import ants

    atlas = atlas or load_atlas(spacing_mm)
    start = time.monotonic()
    t1w = nib.Nifti1Image(np.asarray(t1w_img.dataobj, dtype=np.float32).reshape(t1w_img.shape[:3]), t1w_img.affine)
    fixed = _resample(atlas.t1, spacing_mm)
    registration = ants.registration(
        fixed=fixed,
        moving=_resample(t1w, spacing_mm),
        type_of_transform="SyN",
        mask=ants.get_mask(fixed, low_thresh=1e-6 * float(fixed.max()), cleanup=0),
        random_seed=seed,
    )
    # subject point -> template T1 point (the registration's inverse), then -> FA template point
    inverse = list(registration["invtransforms"])
    invert = [name.endswith(".mat") for name in inverse]
    warped = ants.apply_transforms(
        fixed=_ants(t1w),
        moving=_ants(atlas.fa),
        transformlist=[*atlas.fa_transforms, *inverse],
        whichtoinvert=[False] * len(atlas.fa_transforms) + invert,
        interpolator="linear",
    )
    log.info("atlas: FA template warped to the T1w in %.0f s", time.monotonic() - start)
    return np.clip(warped.numpy(), 0.0, 1.0).astype(np.float32)
