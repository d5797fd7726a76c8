"""Writing and reading tractograms (.trx, .tck, .trk) in RASMM with a NIfTI reference."""

from __future__ import annotations

import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from dipy.io.stateful_tractogram import Space, StatefulTractogram
from dipy.io.streamline import save_tractogram as dipy_save_tractogram

from m2m_app.io.files import atomic_write

#: File extensions m2m can write, and the format name used on the command line.
TRACTOGRAM_FORMATS = ("trx", "tck", "trk")


def save_tractogram(
    streamlines: Sequence[np.ndarray], reference: nib.Nifti1Image | nib.Nifti1Header, path: str | Path
) -> Path:
    """Write streamlines given in world mm (RASMM) to ``path``; the format follows the extension.

    ``.trx`` goes through trx-python, ``.tck``/``.trk`` through dipy/nibabel; all three
    record ``reference``'s grid (an image or a bare header,
    :func:`~m2m_app.io.nifti.grid_header`) so that other tools (MRtrix, DSI Studio, TrackVis,
    dipy) place the streamlines on the image they belong to. Written atomically.
    """
    path = Path(path)
    fmt = path.suffix.lstrip(".")
    if fmt not in TRACTOGRAM_FORMATS:
        raise ValueError(f"{path}: unknown tractogram format, use one of {TRACTOGRAM_FORMATS}")
    sft = StatefulTractogram([np.asarray(s, dtype=np.float32) for s in streamlines], reference, Space.RASMM)

    def write(tmp: str) -> None:
        if fmt == "trx":
            from trx.trx_file_memmap import TrxFile, save

            trx = TrxFile.from_sft(sft)
            save(trx, tmp)
            trx.close()
        else:
            dipy_save_tractogram(sft, tmp, bbox_valid_check=False)

    return atomic_write(path, write)


def trx_bytes(
    streamlines: Sequence[np.ndarray], reference: nib.Nifti1Image | nib.Nifti1Header, positions_dtype: Any = np.float16
) -> bytes:
    """Streamlines in world mm (RASMM) as the bytes of a zip-deflated TRX file on ``reference``'s grid.

    ``float16`` positions (the default) take 6 bytes a point, with a precision of 1/2048 of the
    coordinate (0.06 mm at 100 mm from the origin): what the report's viewer loads. Written by
    trx-python through a temporary folder.
    """
    from trx.trx_file_memmap import TrxFile, save

    sft = StatefulTractogram([np.asarray(s, dtype=np.float32) for s in streamlines], reference, Space.RASMM)
    sft.dtype_dict = {"positions": positions_dtype, "offsets": np.uint32}
    trx = TrxFile.from_sft(sft)
    try:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "streamlines.trx"
            save(trx, str(path), compression_standard=zipfile.ZIP_DEFLATED)
            return path.read_bytes()
    finally:
        trx.close()


def load_streamlines(path: str | Path, reference: str | Path | nib.Nifti1Image) -> list[np.ndarray]:
    """The streamlines of a ``.trx``/``.tck``/``.trk`` file, ``(K_i, 3)`` RAS+ mm each (dipy)."""
    from dipy.io.streamline import load_tractogram

    ref = reference if isinstance(reference, nib.Nifti1Image) else str(reference)
    return list(load_tractogram(str(path), ref, bbox_valid_check=False).streamlines)
