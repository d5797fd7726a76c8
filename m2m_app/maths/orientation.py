"""Reading arrays in RAS order, for figures (pure NumPy/nibabel; no resampling)."""

from __future__ import annotations

import nibabel as nib
import numpy as np


def to_ras(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """``volume`` with its first three axes permuted and flipped to read R, A, S (nearest to the
    voxel-to-world ``affine``); trailing axes are kept."""
    return nib.orientations.apply_orientation(volume, nib.orientations.io_orientation(affine))


def ras_zooms(affine: np.ndarray) -> np.ndarray:
    """Voxel sizes ``(3,)`` in mm along the R, A, S axes of :func:`to_ras`'s output."""
    ornt = nib.orientations.io_orientation(affine)
    zooms = np.zeros(3)
    zooms[ornt[:, 0].astype(int)] = np.linalg.norm(affine[:3, :3], axis=0)
    return zooms
