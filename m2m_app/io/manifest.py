"""The prep dir's manifest: the list of training pairs that ``m2m-train prepare`` writes and training reads.

One row per unit (participant or participant/session): its labels, T1w, ``status`` (``ok`` or
``failed``), the teacher's files (:data:`PATH_COLUMNS`, relative to the prep dir), its QC numbers
and flags (:data:`QC_COLUMNS`) and the error of a failed unit. The rows are the units' QC JSON
files (:func:`qc_path`, written by :mod:`m2m_app.teacher.prepare`), gathered by
:func:`write_manifest` into ``manifest.tsv`` and ``manifest.json``; :func:`read_manifest` reads
the ``ok`` rows back and :func:`select_rows` filters them for training and evaluation.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

from m2m_app.errors import UsageError
from m2m_app.io.files import save_json, save_tsv
from m2m_app.io.naming import Subject, derivative_path

log = logging.getLogger(__name__)

#: Manifest columns holding paths (relative to the prep dir), in order.
PATH_COLUMNS = (
    "mask",
    "wm",
    "dseg",
    "fov",
    "fa",
    "md",
    "ad",
    "rd",
    "diffusivity",
    "v1",
    "colfa",
    "tdi",
    "dectdi",
    "tractogram",
    "xfm",
    "qc_figure",
)
#: Manifest columns holding QC numbers and flags.
QC_COLUMNS = (
    "flagged",
    "flags",
    "mean_fa_wm",
    "mean_fa_brain",
    "median_md",
    "n_streamlines",
    "dwi_source",
    "registration_cost",
    "registration_start",
    "registration_from_header_mm",
    "registration_vs_ants_mm",
    "registration_ants_spread_mm",
    "fov_fraction",
    "brain_ml",
    "csf_ml",
    "gm_ml",
    "wm_ml",
    "wm_fraction",
    "tensor_shells",
    "dwi_series",
    "runtime_s",
)
#: Every column of ``manifest.tsv``, in order.
COLUMNS = ("subject", "participant", "session", "t1w", "status", *PATH_COLUMNS, *QC_COLUMNS, "error")


def qc_path(prep_dir: Path, subject: Subject) -> Path:
    """Where a unit's QC JSON (its manifest row) lives; its presence marks the unit as finished."""
    return derivative_path(prep_dir, subject, "", "qc", ".json", desc="prepare")


def write_manifest(prep_dir: Path, failures: dict[str, str] | None = None) -> Path:
    """Collect every unit's QC JSON (and the failures) into ``manifest.tsv`` and ``manifest.json``."""
    prep_dir = Path(prep_dir)
    rows = [json.loads(p.read_text()) for p in sorted(prep_dir.glob("sub-*/**/*_desc-prepare_qc.json"))]
    done = {row["subject"] for row in rows}
    rows += [
        {"subject": label, "status": "failed", "error": message}
        for label, message in sorted((failures or {}).items())
        if label not in done
    ]
    tsv = save_tsv(rows, prep_dir / "manifest.tsv", list(COLUMNS), missing="")
    save_json({"pairs": rows}, prep_dir / "manifest.json")
    return tsv


def read_manifest(prep_dir: Path) -> list[dict[str, str]]:
    """The ``ok`` rows of ``prep_dir/manifest.tsv`` as dicts of column → string."""
    path = Path(prep_dir) / "manifest.tsv"
    if not path.exists():
        raise UsageError(f"{path}: not found; is {prep_dir} a folder written by 'm2m-train prepare'?")
    with path.open(newline="") as handle:
        return [row for row in csv.DictReader(handle, delimiter="\t") if row.get("status") == "ok"]


def select_rows(
    prep_dirs: list[Path], subjects: list[str] | None, include_flagged: bool = False
) -> list[tuple[dict, Path]]:
    """``(row, prep_dir)`` for every ``ok`` manifest row, restricted to ``subjects``.

    Subjects may be given as ``sub-01``, ``01`` (every session of that participant) or ``sub-01_ses-a``.
    Rows the teacher's QC flagged (implausible registration or tissue classes) are left
    out, with a warning, unless ``include_flagged``.
    """
    rows = [(row, Path(prep)) for prep in prep_dirs for row in read_manifest(Path(prep))]
    if subjects is not None:
        wanted = {s if s.startswith("sub-") else f"sub-{s}" for s in subjects}
        rows = [(row, prep) for row, prep in rows if row["subject"] in wanted or f"sub-{row['participant']}" in wanted]
    flagged = [row for row, _ in rows if str(row.get("flagged", "")).lower() == "true"]
    if flagged and not include_flagged:
        for row in flagged:
            log.warning(
                "%s: left out, the teacher's QC flagged it (%s); --include-flagged keeps it",
                row["subject"],
                row.get("flags", ""),
            )
        rows = [(row, prep) for row, prep in rows if row not in flagged]
    if not rows:
        raise UsageError(
            f"no usable subject (status ok{', in the given list' if subjects else ''}"
            f"{', not flagged by the QC' if flagged and not include_flagged else ''}) "
            f"in {', '.join(str(p) for p in prep_dirs)}"
        )
    return rows
