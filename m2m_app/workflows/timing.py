"""Wall time of every workflow stage, logged and kept for the sidecars and the report.

:class:`StageTimer` is a Nipype ``status_callback``: the plugin calls it in the main
process when a node starts and when it ends, before the node's dependents are submitted.
It logs each stage's time and keeps, per participant/session workflow, a JSON file
``{stage: seconds}`` under the work folder, which the writing nodes read (they run later,
in other processes; see :mod:`m2m_app.io.timings`). Times come from the nodes' results, so a
stage restored from the work folder reports the time it took when it ran.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from m2m_app.io.timings import record_timing, timings_path

LOGGER = logging.getLogger("m2m")


class StageTimer:
    """Nipype status callback ``(node, status)`` recording each stage's wall time in seconds."""

    def __init__(self, work_dir: str | Path, labels: dict[str, str] | None = None) -> None:
        """``labels`` maps unit workflow names (``sub_01_wf``) to the labels logged (``sub-01``)."""
        self.work_dir = Path(work_dir)
        self.labels = labels or {}
        self._started: dict[str, float] = {}
        self._lock = threading.Lock()

    def __call__(self, node, status: str) -> None:
        name = node.fullname
        if status == "start":
            self._started[name] = time.monotonic()
            return
        started = self._started.pop(name, None)
        parts = name.split(".")  # m2m_wf.<unit workflow>[.<sub-workflow>].<stage>
        if len(parts) < 3:  # not a node of a participant/session workflow
            return
        unit, stage = self.labels.get(parts[1], parts[1]), parts[-1]
        seconds = _run_seconds(node)  # kept in the node's cached result, so a resumed run reports it too
        if seconds is None:
            seconds = time.monotonic() - started if started is not None else float("nan")
        LOGGER.info("%s: %s %s in %.1f s", unit, stage, "finished" if status == "end" else "FAILED", seconds)
        with self._lock:
            path = timings_path(self.work_dir, parts[1])
            record_timing(path, stage, seconds)


def _run_seconds(node) -> float | None:
    """How long the node's interface ran, from its (possibly cached) result; None if unknown."""
    try:
        return float(node.result.runtime.duration)
    except Exception:  # no result file (a crash), or an interface without a runtime
        return None
