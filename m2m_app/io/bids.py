"""Finding the inputs of each participant/session in a BIDS dataset with pybids."""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path

from bids import BIDSLayout
from bids.layout import Query
from bids.config import get_option

from m2m_app.errors import BadDataError, MissingInputError, UsageError
from m2m_app.io.naming import Subject

LOGGER = logging.getLogger(__name__)


def strip_prefix(label: str, prefix: str) -> str:
    """``sub-01`` → ``01`` and ``01`` → ``01`` (labels are accepted with or without prefix)."""
    return label[len(prefix) + 1 :] if label.startswith(prefix + "-") else label


def root_relative_config(root: Path, name: str = "bids") -> dict:
    """pybids' entity configuration ``name`` (``bids``, or ``derivatives`` for ``space``, ``desc``,
    ``res``...) with every pattern matched below ``root`` only.

    pybids (0.22 and earlier) matches the entity patterns against each file's *absolute* path,
    so a folder above the dataset named like a datatype (``/data/perf/bids``) or an entity
    (``/data/sub-pilot/bids``) becomes the datatype or subject of every file
    (bids-standard/pybids#1270, fixed upstream by #1273 after 0.22.0, not in a release yet).
    Each pattern is prefixed with the escaped absolute root and a lazy ``.*?``, so its leftmost
    match is the one a search of the root-relative path finds, as in the upstream fix.
    """
    config = json.loads(Path(get_option("config_paths")[name]).read_text())
    prefix = "^" + re.escape(str(Path(root).absolute())) + ".*?"
    for entity in config["entities"]:
        if entity.get("pattern"):
            entity["pattern"] = prefix + entity["pattern"]
    return config


def load_layout(bids_dir: Path, validate: bool = False, derivative: bool = False) -> BIDSLayout:
    """Index a BIDS dataset (no derivatives), failing clearly when it is not one.

    With ``derivative`` the dataset is a BIDS-Derivatives one (QSIPrep's output), indexed with
    pybids' ``derivatives`` entities too (``space``, ``desc``, ``res``...). Entities come from the
    path relative to ``bids_dir`` (see :func:`root_relative_config`).
    """
    bids_dir = Path(bids_dir)
    what = "BIDS-Derivatives dataset" if derivative else "BIDS dataset"
    if not (bids_dir / "dataset_description.json").exists():
        raise MissingInputError(f"{bids_dir}: not a {what} (no dataset_description.json)")
    configs = ["bids", "derivatives"] if derivative else ["bids"]
    try:
        return BIDSLayout(
            str(bids_dir), validate=validate, config=[root_relative_config(bids_dir, name) for name in configs]
        )
    except Exception as err:  # pybids raises several unrelated types for invalid datasets
        raise BadDataError(f"{bids_dir}: pybids cannot index this {what}: {err}") from None


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


def collect_subjects(
    layout: BIDSLayout, participant_labels: list[str] | None = None, session_labels: list[str] | None = None
) -> list[Subject]:
    """The participant/session units to process, in sorted order.

    Raises :class:`MissingInputError` for a participant label that is not in the dataset.
    """
    available = sorted(layout.get_subjects())
    wanted = [strip_prefix(p, "sub") for p in participant_labels] if participant_labels else available
    unknown = sorted(set(wanted) - set(available))
    if unknown:
        raise MissingInputError(
            f"participant label(s) not found in {layout.root}: "
            f"{', '.join(unknown)} (available: {', '.join(available) or 'none'})"
        )
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
    query = {"subject": subject.participant, "extension": [".nii", ".nii.gz"], "return_type": "file", **base, **filters}
    query["session"] = subject.session if subject.session else None
    return sorted(layout.get(**query))


def _not_found(layout: BIDSLayout, subject: Subject, what: str, base: dict, filters: dict) -> MissingInputError:
    """The error for a unit without ``what``, naming the NIfTI images that *were* found for it.

    ``found 1 func file, 1 anat file (sub-01_T1W.nii.gz), no T1w`` tells a layout or naming
    problem from a scan that is really missing; the images of the wanted datatype and those
    outside any datatype folder are named, and a BIDS filter file that excludes every
    candidate is said so.
    """
    kinds = {
        Path(f): layout.get_file(f).entities.get("datatype", "outside-a-datatype-folder")
        for f in _query(layout, subject, {}, {})
    }
    found = []
    for kind, n in sorted(Counter(kinds.values()).items()):
        names = sorted(f.name for f, k in kinds.items() if k == kind)
        shown = kind in (base["datatype"], "outside-a-datatype-folder")
        found.append(f"{n} {kind} file{'s' if n > 1 else ''}" + (f" ({', '.join(names)})" if shown else ""))
    excluded = _query(layout, subject, base, {}) if filters else []
    tail = f"; the BIDS filter file excludes {len(excluded)} {what}" if excluded else ""
    expected = subject.folder(Path(), base["datatype"]) / f"{subject.label}[_<entities>]_{base['suffix']}.nii[.gz]"
    return MissingInputError(
        f"{subject.label}: no {what} image found: found {', '.join(found) or 'no NIfTI image'}, "
        f"no {what}{tail} (expected {expected.as_posix()})"
    )


def find_t1w(layout: BIDSLayout, subject: Subject, filters: dict | None = None) -> Path:
    """The T1w of a unit; the first (sorted) one if several, with a warning."""
    base, wanted = {"datatype": "anat", "suffix": "T1w"}, (filters or {}).get("t1w", {})
    found = _query(layout, subject, base, wanted)
    if not found:
        raise _not_found(layout, subject, "T1w", base, wanted)
    if len(found) > 1:
        LOGGER.warning("%s: %d T1w images, using %s", subject.label, len(found), Path(found[0]).name)
    return Path(found[0])


def find_dwi(layout: BIDSLayout, subject: Subject, filters: dict | None = None) -> list[Path]:
    """All DWI runs of a unit, sorted (the teacher fits runs together only when they share a grid
    and a phase-encoding direction: :func:`m2m_app.teacher.prepare.group_dwi_runs`)."""
    base, wanted = {"datatype": "dwi", "suffix": "dwi"}, (filters or {}).get("dwi", {})
    found = _query(layout, subject, base, wanted)
    if not found:
        raise _not_found(layout, subject, "DWI", base, wanted)
    return [Path(f) for f in found]


#: The spaces in which QSIPrep writes its preprocessed DWI, and the ``space`` of the preprocessed
#: T1w in the same world frame: ``ACPC`` (QSIPrep 1.0 and later: ``space-ACPC_desc-preproc_T1w``)
#: and ``T1w`` (earlier releases: ``desc-preproc_T1w``, without ``space``).
PREPROCESSED_SPACES: dict[str, list] = {"ACPC": ["ACPC"], "T1w": [Query.NONE, "T1w"]}


def find_preprocessed_dwi(layout: BIDSLayout, subject: Subject, filters: dict | None = None) -> tuple[Path, list[Path]]:
    """The preprocessed T1w and DWI runs of a unit in a QSIPrep derivatives ``layout``
    (:func:`load_layout` with ``derivative``), both in one space: no registration is needed.

    The DWI are the unit's ``desc-preproc`` ``dwi`` images in ``space-ACPC`` or ``space-T1w``
    (:data:`PREPROCESSED_SPACES`), ``filters["dwi"]`` (``--bids-filter-file``) choosing among them,
    e.g. ``{"dwi": {"res": "2mm"}}``; the T1w is the ``desc-preproc`` ``T1w`` of the same space,
    from the session's ``anat`` folder or else the participant's (QSIPrep's default: one
    anatomical reference per participant).

    Raises :class:`MissingInputError` when the participant, its DWI or its T1w is not in the
    derivatives, and :class:`BadDataError` when its DWI are in several spaces or resolutions
    (the same data resampled twice: choose one with a filter).
    """
    participants = sorted(layout.get_subjects())
    if subject.participant not in participants:
        raise MissingInputError(
            f"{subject.label}: not in the DWI derivatives {layout.root} "
            f"(participants there: {', '.join(participants) or 'none'})"
        )
    base = {"datatype": "dwi", "suffix": "dwi", "desc": "preproc", "space": list(PREPROCESSED_SPACES)}
    wanted = (filters or {}).get("dwi", {})
    dwi = _query(layout, subject, base, wanted)
    if not dwi:
        raise _not_found(layout, subject, "preprocessed DWI (desc-preproc, space-ACPC or space-T1w)", base, wanted)
    variants = sorted({tuple(layout.get_file(f).entities.get(k) or "" for k in ("space", "res")) for f in dwi})
    if len(variants) > 1:
        names = ", ".join(f"space-{space}" + (f"_res-{res}" if res else "") for space, res in variants)
        raise BadDataError(
            f"{subject.label}: preprocessed DWI in {len(variants)} spaces or resolutions ({names}) in "
            f'{layout.root}; choose one with --bids-filter-file, e.g. {{"dwi": {{"res": "2mm"}}}}'
        )
    space = variants[0][0]
    anat = {"datatype": "anat", "suffix": "T1w", "desc": "preproc", "space": PREPROCESSED_SPACES[space]}
    for session in dict.fromkeys([subject.session, None]):
        t1w = _query(layout, Subject(subject.participant, session), anat, {})
        if t1w:
            return Path(t1w[0]), [Path(f) for f in dwi]
    raise _not_found(layout, subject, f"preprocessed T1w (desc-preproc) in the DWI's space-{space}", anat, {})
