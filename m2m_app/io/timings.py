"""The stage wall-time files of a run: where each participant/session's ``{stage: seconds}`` JSON lives
under the work folder, reading and updating it, and the order the stages run in.

:class:`~m2m_app.workflows.timing.StageTimer` (the Nipype callback) records the times; the
writing nodes and the report (later, in other processes) read them from here.
"""

from __future__ import annotations

import json
from pathlib import Path

from m2m_app.io.files import save_json

#: The stages (workflow node names) of one participant/session, in the order they run.
STAGE_ORDER = (
    "check_t1w",
    "phase1",
    "tensor_maps",
    "phase2",
    "nerf_fit",
    "nerf_render",
    "nerf_track",
    "write_maps",
    "write_nerf",
    "write_report",
)


def timings_path(work_dir: str | Path, unit_workflow: str) -> Path:
    """The stage-time JSON of one participant/session workflow (named as in
    :func:`~m2m_app.workflows.base.node_prefix`)."""
    return Path(work_dir) / "timings" / f"{unit_workflow}.json"


def read_timings(path: str | Path | None) -> dict[str, float]:
    """``{stage: seconds}`` recorded so far (empty when nothing was recorded)."""
    if not path or not Path(path).exists():
        return {}
    return json.loads(Path(path).read_text())


def record_timing(path: str | Path, stage: str, seconds: float) -> Path:
    """Add (or replace) ``stage``'s wall time in the JSON at ``path``, rounded to 10 ms (atomic write)."""
    return save_json({**read_timings(path), stage: round(seconds, 2)}, path)
