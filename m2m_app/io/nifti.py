"""Validated NIfTI loading and atomic NIfTI writing (any other file: :mod:`m2m_app.io.files`).

Every loader reads the voxel data eagerly, so a truncated or corrupt file fails here
with a message naming the file, not later deep inside a workflow node.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any, cast

import nibabel as nib
import numpy as np
from isal import igzip, isal_zlib

from m2m_app.errors import BadDataError, MissingInputError
from m2m_app.io.files import atomic_write
from m2m_app.maths.grid import intensity_range

#: Smallest number of voxels accepted along each spatial axis of an input image.
MIN_AXIS_VOXELS = 8
#: Compression level (0–3) of the ``.nii.gz`` files m2m writes, deflated by ISA-L (python-isal):
#: an ordinary gzip stream, about as small as zlib's level 1 (nibabel's default) and 4–9× faster
#: to write (a 0.5 mm T1w's tensor: 1.2 s against 5.2 s, see docs/benchmarks.md).
GZIP_LEVEL = 2
#: What ISA-L raises on a corrupt deflate stream (typed as a plain class in its stubs).
_INFLATE_ERROR = cast(type[Exception], isal_zlib.error)


def ants_image(volume: np.ndarray, affine: np.ndarray):  # -> ants.ANTsImage (imported lazily)
    """An antspyx image of a 3D array ``(X, Y, Z)`` with its voxel → RAS mm ``affine`` (float32).

    The NIfTI units are set to mm, so that ANTs neither guesses nor warns about them.
    """
    import ants

    img = nib.Nifti1Image(np.asarray(volume, dtype=np.float32), affine)
    img.header.set_xyzt_units("mm", "sec")
    return ants.from_nibabel_nifti(img)


def load_image(path: str | os.PathLike) -> tuple[nib.Nifti1Image, np.ndarray]:
    """Load a NIfTI image and its data as float32, failing clearly on missing or corrupt files.

    Returns the image (with its original header and affine) and the scaled voxel data.
    """
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"{path}: file not found")
    try:
        img, data = _read(path)
    except (OSError, EOFError, zlib.error, _INFLATE_ERROR, ValueError, nib.filebasedimages.ImageFileError) as err:
        raise BadDataError(f"{path}: cannot be read as NIfTI (truncated or corrupt file?): {err}") from None
    if not np.all(np.isfinite(img.affine)) or abs(np.linalg.det(img.affine[:3, :3])) < 1e-9:
        raise BadDataError(f"{path}: the image affine is degenerate (no usable orientation)")
    return img, data


#: ``sizeof_hdr``, the first four bytes of a NIfTI file (either byte order), and the image class it names.
_NIFTI_CLASSES = {
    size.to_bytes(4, order): klass
    for size, klass in ((348, nib.Nifti1Image), (540, nib.Nifti2Image))
    for order in ("little", "big")
}


def _read(path: Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    """The image at ``path`` and its scaled data as float32.

    A ``.nii.gz`` file is inflated by ISA-L (python-isal; 2–3× faster than the zlib route of
    ``nib.load``: a 0.5 mm T1w's AD map 0.25 s against 0.61 s) and the image returned holds
    its data in memory: its ``dataobj`` is ``data`` itself (scaled, so the header's slope and
    intercept are reset; its stored data type is kept). Other files go through ``nib.load``
    (NIfTI-1 or -2, a subclass).
    """
    if not path.name.endswith(".gz"):
        img = cast(nib.Nifti1Image, nib.load(path))
        return img, np.asarray(img.dataobj, dtype=np.float32)
    with igzip.open(path, "rb") as stream:
        klass = _NIFTI_CLASSES.get(stream.read(4))
        if klass is None:
            raise nib.filebasedimages.ImageFileError("not a NIfTI-1 or NIfTI-2 file (unknown header size)")
        stream.seek(0)
        img = klass.from_stream(stream)
        data = np.asarray(img.dataobj, dtype=np.float32)
    return klass(data, img.affine, img.header), data


def _check_finite_nonempty(path: Path, data: np.ndarray) -> None:
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        raise BadDataError(f"{path}: {bad} voxels are NaN or infinite")
    if not np.any(data):
        raise BadDataError(f"{path}: the image is all zeros")


def load_t1w(path: str | os.PathLike) -> tuple[nib.Nifti1Image, np.ndarray]:
    """Load a T1-weighted image: 3D (a trailing singleton 4th axis is dropped), finite, non-empty."""
    path = Path(path)
    img, data = load_image(path)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise BadDataError(f"{path}: a T1w must be a 3D image, this one has shape {data.shape}")
    if min(data.shape) < MIN_AXIS_VOXELS:
        raise BadDataError(
            f"{path}: a T1w must have at least {MIN_AXIS_VOXELS} voxels on each "
            f"axis, this one has shape {data.shape} (a 2D slice?)"
        )
    _check_finite_nonempty(path, data)
    return img, data


def check_t1w_contrast(path: str | os.PathLike, data: np.ndarray) -> None:
    """Raise :class:`BadDataError` when the head of T1w ``data`` ``(X, Y, Z)`` has a single intensity
    (a binary mask passed as T1w), which intensity normalisation would turn into zeros.

    Two percentiles of the whole volume (about a second at 0.5 mm): run once per subject, where
    the app first reads its input, not in :func:`load_t1w`, which every stage calls.
    """
    low, high = intensity_range(data)
    if high - low <= 1e-6 * max(abs(high), 1.0):
        raise BadDataError(
            f"{path}: the head has no contrast (its intensities inside the foreground are all {high:g}); "
            "a mask or label image instead of a T1w?"
        )


def load_dwi(path: str | os.PathLike) -> tuple[nib.Nifti1Image, np.ndarray, np.ndarray, np.ndarray]:
    """Load a 4D DWI series with its BIDS ``.bval``/``.bvec`` sidecars.

    Returns the image, data ``(X, Y, Z, N)``, b-values ``(N,)`` in s/mm² and b-vectors
    ``(N, 3)`` as written in the file (FSL convention: voxel axes, x flipped when the
    affine's determinant is positive).
    """
    path = Path(path)
    img, data = load_image(path)
    if data.ndim != 4 or data.shape[3] < 7:
        raise BadDataError(
            f"{path}: a DWI must be 4D with at least 7 volumes (1 b0 + 6 directions), this one has shape {data.shape}"
        )
    stem = str(path)[: -len(".nii.gz")] if str(path).endswith(".nii.gz") else str(path.with_suffix(""))
    bval_path, bvec_path = Path(stem + ".bval"), Path(stem + ".bvec")
    for side in (bval_path, bvec_path):
        if not side.exists():
            raise MissingInputError(f"{side}: missing (required beside {path.name})")
    try:
        bvals = np.loadtxt(bval_path, ndmin=1, dtype=float)
        bvecs = np.loadtxt(bvec_path, ndmin=2, dtype=float)
    except ValueError as err:
        raise BadDataError(f"{bval_path.parent}: unreadable .bval/.bvec: {err}") from None
    if bvecs.shape[0] != 3 and bvecs.shape[1] == 3:
        bvecs = bvecs.T
    n = data.shape[3]
    if bvals.shape != (n,) or bvecs.shape != (3, n):
        raise BadDataError(
            f"{path}: {n} volumes but .bval has {bvals.size} values and .bvec has shape {bvecs.shape}; they must match"
        )
    if not np.any(bvals <= 50):
        raise BadDataError(f"{path}: no b=0 volume (b <= 50 s/mm²); the tensor fit needs one")
    _check_finite_nonempty(path, data)
    return img, data, bvals, bvecs.T


def grid_header(shape: tuple[int, int, int], affine: np.ndarray) -> nib.Nifti1Header:
    """A NIfTI header describing the grid ``shape`` (voxels) with ``affine`` (voxel → RAS mm),
    without any voxel data: the reference of a tractogram written on that grid."""
    header = nib.Nifti1Header()
    header.set_data_shape(tuple(int(n) for n in shape))
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    return header


def save_nifti(
    data: np.ndarray,
    affine: np.ndarray,
    path: str | os.PathLike,
    header: nib.Nifti1Header | None = None,
    dtype: Any = np.float32,
) -> Path:
    """Write ``data`` with ``affine`` to ``path`` atomically (qform/sform set, float32 by default)."""
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine, header)
    img.set_data_dtype(dtype)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    return atomic_write(path, lambda tmp: _save(img, tmp))


def _save(img: nib.Nifti1Image, path: str) -> None:
    """``nib.save``, with ``.nii.gz`` files deflated by ISA-L (:data:`GZIP_LEVEL`).

    The gzip header carries neither a time stamp nor a file name (as nibabel writes it), so the
    same image always gives the same bytes: a re-run that writes an output again leaves it
    byte-identical, and the temporary name of the atomic write never leaks into the file.
    """
    if not path.endswith(".gz"):
        nib.save(img, path)
        return
    with (
        open(path, "wb") as raw,
        igzip.IGzipFile(filename="", mode="wb", compresslevel=GZIP_LEVEL, fileobj=raw, mtime=0) as stream,
    ):
        img.to_stream(stream)
