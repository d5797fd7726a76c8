"""Fit the T1w detail transfer of trained phase-1 weights and store it with them (``m2m-train fit-detail``).

The lookup (mean teacher FA per normalised-T1w-intensity bin, :class:`~m2m_app.maths.detail.FaDetail`)
is fitted on the units the weights were trained on (their recipe's ``subjects``), inside the
evaluation mask (teacher brain mask ∩ measured FOV), so a fold's held-out person never
enters it. ``sigma_mm`` and ``weight`` are not fitted here: they are the ones the
leave-one-person-out folds chose (``benchmarks/ablate_fa_detail.py``, docs/benchmarks.md).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from m2m_app.data.weights import FA_DETAIL_KEY, weight_files
from m2m_app.errors import UsageError
from m2m_app.io.files import save_json
from m2m_app.io.manifest import select_rows
from m2m_app.maths.detail import BinnedRegression, FaDetail
from m2m_app.training.evaluate import fa_by_intensity
from m2m_app.training.recipe import FA_DETAIL_SIGMA_MM, FA_DETAIL_WEIGHT

log = logging.getLogger(__name__)


def intensity_lookup(prep_dir: str | os.PathLike, subjects: list[str]) -> BinnedRegression:
    """The intensity baseline's lookup (:func:`~m2m_app.training.evaluate.fa_by_intensity`) over
    ``subjects`` of ``prep_dir``."""
    return fa_by_intensity(select_rows([Path(prep_dir)], subjects))


def fit_fa_detail(
    prep_dir: str | os.PathLike,
    weights_dir: str | os.PathLike,
    subjects: list[str] | None = None,
    sigma_mm: float = FA_DETAIL_SIGMA_MM,
    weight: float = FA_DETAIL_WEIGHT,
) -> FaDetail:
    """Fit the lookup on ``subjects`` (default: the units the phase-1 weights were trained on)
    and store the detail transfer in ``weights_dir``'s phase1.json; returns it."""
    path = weight_files("phase1", weights_dir)[1]
    if not path.exists():
        raise UsageError(f"{path}: not found; fit the detail transfer beside trained phase-1 weights")
    meta = json.loads(path.read_text())
    subjects = subjects or list(meta.get("recipe", {}).get("subjects", []))
    if not subjects:
        raise UsageError(f"{path}: the recipe lists no training subjects; give them with --subject")
    lookup = intensity_lookup(prep_dir, subjects)
    if lookup.counts.sum() == 0:
        raise UsageError(f"none of {subjects} is in {prep_dir}'s manifest (or none has brain voxels)")
    detail = FaDetail(tuple(float(v) for v in lookup.means), sigma_mm, weight)
    meta[FA_DETAIL_KEY] = detail.to_dict() | {"fitted_on": sorted(subjects)}
    save_json(meta, path)
    log.info(
        "stored the T1w detail transfer (sigma %.1f mm, weight %.2f, %d units) in %s",
        sigma_mm,
        weight,
        len(subjects),
        path,
    )
    return detail
