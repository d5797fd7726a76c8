"""Brain mask and tissue classes of a T1w image, from the T1w itself.

The brain mask comes from deepbet (Fisch et al. 2024, a CNN trained on 7,837 T1w images
of 191 datasets; weights ship in its wheel), the tissue classes from ANTs Atropos
(k-means-initialised 3-class Gaussian mixture with a Markov random field, antspyx) on the
N4-corrected T1w inside that mask. Neither depends on the DWI, so a DWI mask that
includes scalp fat, or a DWI slab that covers half the brain, cannot move them.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from m2m_app.io.nifti import ants_image

LOGGER = logging.getLogger(__name__)

#: Plausible white-matter share of the brain volume (adults: about 0.3-0.45); outside it
#: the segmentation (or the T1w contrast) is suspect and the unit is flagged.
WM_FRACTION_RANGE = (0.2, 0.55)
#: Plausible brain (intracranial, deepbet) volume in ml.
BRAIN_VOLUME_RANGE_ML = (800.0, 2200.0)
#: Atropos runs on a grid no finer than this (mm): a 0.5 mm T1w gains nothing but time.
SEGMENTATION_VOXEL_MM = 1.0


@contextmanager
def _private_temp_dir() -> Iterator[None]:
    """Point :mod:`tempfile` at a directory of our own for the duration, then remove it.

    antspyx's ``atropos`` writes its class-probability images under the temp dir and never
    deletes them (three files per call); inside this they go with the directory.
    """
    with tempfile.TemporaryDirectory(prefix="m2m-atropos-") as tmp:
        previous, tempfile.tempdir = tempfile.tempdir, tmp
        try:
            yield
        finally:
            tempfile.tempdir = previous


@dataclass(frozen=True)
class Tissues:
    """Boolean masks ``(X, Y, Z)`` on the T1w grid; ``csf | gm | wm == brain``."""

    brain: np.ndarray
    csf: np.ndarray
    gm: np.ndarray
    wm: np.ndarray

    def volumes_ml(self, affine: np.ndarray) -> dict[str, float]:
        """Volume of each class in ml, and the white-matter share of the brain."""
        voxel_ml = float(abs(np.linalg.det(affine[:3, :3]))) / 1000
        volumes = {
            f"{name}_ml": round(float(getattr(self, name).sum()) * voxel_ml, 1) for name in ("brain", "csf", "gm", "wm")
        }
        volumes["wm_fraction"] = round(volumes["wm_ml"] / max(volumes["brain_ml"], 1e-6), 3)
        return volumes


def t1w_brain_mask(img: nib.Nifti1Image, num_threads: int = 1) -> np.ndarray:
    """deepbet's brain mask of a T1w (any orientation and voxel size), boolean on its grid."""
    import torch
    from deepbet.bet import BrainExtraction

    torch.set_num_threads(num_threads)
    data = np.asarray(img.dataobj, dtype=np.float32)
    _, mask, _ = BrainExtraction(no_gpu=True).run(nib.Nifti1Image(data, img.affine))
    return np.asarray(mask.dataobj) > 0


def tissue_classes(img: nib.Nifti1Image, brain: np.ndarray) -> Tissues:
    """CSF, grey and white matter inside ``brain``: N4 then Atropos (antspyx), by T1w intensity.

    Classes are ordered by mean intensity (T1w: CSF darkest, white matter brightest).
    The segmentation runs on a grid of at most :data:`SEGMENTATION_VOXEL_MM` and its labels
    come back to the T1w grid by nearest neighbour.
    """
    import ants

    data = np.asarray(img.dataobj, dtype=np.float32)
    t1w, mask = ants_image(data, img.affine), ants_image(brain, img.affine)
    spacing = np.asarray(t1w.spacing)
    work, work_mask = t1w, mask
    if spacing.min() < SEGMENTATION_VOXEL_MM:
        work = ants.resample_image(
            t1w, tuple(np.maximum(spacing, SEGMENTATION_VOXEL_MM)), use_voxels=False, interp_type=0
        )
        work_mask = ants.resample_image_to_target(mask, work, interp_type="nearestNeighbor")
    corrected = ants.n4_bias_field_correction(work, mask=work_mask, shrink_factor=4)
    with _private_temp_dir():
        labels = ants.atropos(a=corrected, x=work_mask, i="Kmeans[3]", m="[0.1,1x1x1]", c="[5,0]")["segmentation"]
    if work is not t1w:
        labels = ants.resample_image_to_target(labels, t1w, interp_type="nearestNeighbor")
    labels = labels.numpy().astype(np.int16) * brain
    # Atropos numbers k-means classes by increasing mean; check rather than trust it
    means = [data[labels == k].mean() if np.any(labels == k) else -np.inf for k in (1, 2, 3)]
    csf, gm, wm = (labels == k + 1 for k in np.argsort(means))
    return Tissues(brain=brain, csf=csf, gm=gm, wm=wm)


def tissue_flags(volumes: dict[str, float]) -> list[str]:
    """QC reasons to distrust a segmentation (empty when plausible)."""
    flags = []
    low, high = WM_FRACTION_RANGE
    if not low <= volumes["wm_fraction"] <= high:
        flags.append(f"white matter is {volumes['wm_fraction']:.2f} of the brain (plausible: {low}-{high})")
    low, high = BRAIN_VOLUME_RANGE_ML
    if not low <= volumes["brain_ml"] <= high:
        flags.append(f"brain volume {volumes['brain_ml']:.0f} ml (plausible: {low:.0f}-{high:.0f} ml)")
    return flags
