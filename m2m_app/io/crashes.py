"""Reading the crash files Nipype writes for failed nodes (``crash-*.txt`` in a log folder)."""

from __future__ import annotations

from pathlib import Path


def crash_reasons(crash_dir: Path) -> dict[str, str]:
    """Map each crashed node's name to the last line of its error, read from Nipype crash files."""
    reasons = {}
    for crash in sorted(Path(crash_dir).glob("crash-*.txt")):
        text = crash.read_text(errors="replace")
        node = next(
            (line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Node:")), crash.stem
        )
        lines = [line for line in text.splitlines() if line.strip()]
        error = next((line for line in reversed(lines) if "Error:" in line), lines[-1] if lines else "")
        reasons[node] = error.split("Error: ", 1)[-1].strip()
    return reasons
