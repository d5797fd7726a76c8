"""Finding the inputs of each participant/session in a BIDS dataset with pybids."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from bids import BIDSLayout

from m2m_app.errors import BadDataError, MissingInputError, UsageError
from m2m_app.io.naming import Subject

LOGGER = logging.getLogger(__name__)


def strip_prefix(label: str, prefix: str) -> str:
    """``sub-01`` → ``01`` and ``01`` → ``01`` (labels are accepted with or without prefix)."""
    return label[len(prefix) + 1:] if label.startswith(prefix + "-") else label


def load_layout(bids_dir: Path, validate: bool = False) -> BIDSLayout:
    """Index a BIDS dataset (no derivatives), failing clearly when it is not one."""
    bids_dir = Path(bids_dir)
    if not (bids_dir / "dataset_description.json").exists():
        raise MissingInputError(f"{bids_dir}: not a BIDS dataset (no dataset_description.json)")
    try:
        return BIDSLayout(str(bids_dir), validate=validate)
    except Exception as err:  # pybids raises several unrelated types for invalid datasets
        raise BadDataError(f"{bids_dir}: pybids cannot index this dataset: {err}") from None


def read_filters(path: Path | None) -> dict:
    """Read a ``--bids-filter-file`` (fMRIPrep format: ``{"t1w": {...}, "dwi": {...}}``)."""
    if path is None:
        return {}
    try:
        filters = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UsageError(f"{path}: unreadable BIDS filter file: {err}") from None
    if not isinstance(filters, dict):
        raise UsageError(f"{path}: a BIDS filter file must hold a JSON object")
    return filters


def collect_subjects(layout: BIDSLayout, participant_labels: list[str] | None = None,
                     session_labels: list[str] | None = None) -> list[Subject]:
    """The participant/session units to process, in sorted order.

    Raises :class:`MissingInputError` for a participant label that is not in the dataset.
    """
    available = sorted(layout.get_subjects())
    wanted = [strip_prefix(p, "sub") for p in participant_labels] if participant_labels else available
    unknown = sorted(set(wanted) - set(available))
    if unknown:
        raise MissingInputError(f"participant label(s) not found in {layout.root}: "
                                f"{', '.join(unknown)} (available: {', '.join(available) or 'none'})")
    sessions_wanted = [strip_prefix(s, "ses") for s in session_labels] if session_labels else None
    units = []
    for participant in wanted:
        sessions = sorted(layout.get_sessions(subject=participant)) or [None]
        for session in sessions:
            if sessions_wanted is not None and session not in sessions_wanted:
                continue
            units.append(Subject(participant, session))
    if not units:
        raise MissingInputError("no participant/session matches the requested labels")
    return units


def _query(layout: BIDSLayout, subject: Subject, base: dict, filters: dict) -> list[str]:
    query = {"subject": subject.participant, "extension": [".nii", ".nii.gz"],
             "return_type": "file", **base, **filters}
    query["session"] = subject.session if subject.session else None
    return sorted(layout.get(**query))


def find_t1w(layout: BIDSLayout, subject: Subject, filters: dict | None = None) -> Path:
    """The T1w of a unit; the first (sorted) one if several, with a warning."""
    found = _query(layout, subject, {"datatype": "anat", "suffix": "T1w"}, (filters or {}).get("t1w", {}))
    if not found:
        raise MissingInputError(f"{subject.label}: no T1w image found")
    if len(found) > 1:
        LOGGER.warning("%s: %d T1w images, using %s", subject.label, len(found), Path(found[0]).name)
    return Path(found[0])


def find_dwi(layout: BIDSLayout, subject: Subject, filters: dict | None = None) -> list[Path]:
    """All DWI runs of a unit (to be concatenated), sorted."""
    found = _query(layout, subject, {"datatype": "dwi", "suffix": "dwi"}, (filters or {}).get("dwi", {}))
    if not found:
        raise MissingInputError(f"{subject.label}: no DWI series found")
    return [Path(f) for f in found]
