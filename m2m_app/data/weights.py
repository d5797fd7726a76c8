"""Where the translator weights live: the folder shipped in the package and each phase's files in it.

A phase's weights are ``<phase>.safetensors`` with ``<phase>.json`` beside them (architecture,
SHA-256, training recipe, after ``m2m-train calibrate`` the uncertainty scales and, for phase 1
after ``m2m-train fit-detail``, the T1w detail transfer), in
:data:`PACKAGED_WEIGHTS` or in a folder given with ``--weights-dir``. Only paths and JSON here, no
torch: writing derivatives reads the weights' provenance and scales without importing it.
Checking and loading the weights is :mod:`m2m_app.inference.predict`'s job.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from m2m_app.errors import BadDataError

#: Folder of the packaged weights (``<phase>.safetensors`` + ``<phase>.json`` + the model card ``README.md``).
PACKAGED_WEIGHTS = Path(__file__).resolve().parent / "models"
#: Key of the phase JSON holding ``{uncertainty map: scale}`` (written by ``m2m-train calibrate``).
UNCERTAINTY_SCALE_KEY = "uncertainty_scale"
#: Key of phase1.json holding the T1w detail transfer (written by ``m2m-train fit-detail``;
#: :class:`m2m_app.maths.detail.FaDetail`'s fields).
FA_DETAIL_KEY = "fa_detail"


def weights_folder(weights_dir: str | os.PathLike | None = None) -> Path:
    """``weights_dir``, or :data:`PACKAGED_WEIGHTS` when it is None or empty."""
    return Path(weights_dir) if weights_dir else PACKAGED_WEIGHTS


def weight_files(phase_name: str, weights_dir: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """``(<phase>.safetensors, <phase>.json)`` of phase ``phase_name`` in :func:`weights_folder`."""
    folder = weights_folder(weights_dir)
    return folder / f"{phase_name}.safetensors", folder / f"{phase_name}.json"


def uncertainty_scales(phase_name: str, weights_dir: str | os.PathLike | None = None) -> dict[str, float]:
    """The calibration scale of each uncertainty map stored in ``<phase>.json`` (``{}`` when none).

    A map without a stored scale is used as computed (scale 1.0).
    """
    path = weight_files(phase_name, weights_dir)[1]
    try:
        stored = json.loads(path.read_text()).get(UNCERTAINTY_SCALE_KEY, {}) if path.exists() else {}
        return {str(key): float(value) for key, value in stored.items()}
    except (ValueError, TypeError, AttributeError) as err:
        raise BadDataError(f"{path}: unreadable '{UNCERTAINTY_SCALE_KEY}': {err}") from None


def fa_detail_values(weights_dir: str | os.PathLike | None = None) -> dict | None:
    """The T1w detail transfer stored in phase1.json (:data:`FA_DETAIL_KEY`), None when there is none."""
    path = weight_files("phase1", weights_dir)[1]
    values = json.loads(path.read_text()).get(FA_DETAIL_KEY) if path.exists() else None
    if values is not None and not (
        isinstance(values, dict) and {"fa_by_intensity", "sigma_mm", "weight"} <= set(values)
    ):
        raise BadDataError(f"{path}: '{FA_DETAIL_KEY}' needs fa_by_intensity, sigma_mm and weight")
    return values
