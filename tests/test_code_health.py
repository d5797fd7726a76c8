"""The project's code checks, run with the tests so that `.ci/run` (the README's test command) runs them.

Each check calls the tool the ``[test]`` extra installs: import-linter (the layers contract of
pyproject.toml), ruff (lint rules and formatting of pyproject.toml) and mypy (its strictness is
stated in pyproject.toml). A failure prints the tool's own report.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["m2m_app", "tests", "scripts", "benchmarks"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True)


def test_layers_hold():
    """No module imports a layer above its own (import-linter, `lint-imports`)."""
    result = subprocess.run(
        [str(Path(sys.executable).with_name("lint-imports")), "--no-cache"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_ruff_lint_is_clean():
    result = _run("ruff", "check", *SOURCES)
    assert result.returncode == 0, result.stdout[-4000:]


def test_ruff_format_is_applied():
    result = _run("ruff", "format", "--check", *SOURCES)
    assert result.returncode == 0, result.stdout[-4000:]


@pytest.mark.slow
def test_mypy_is_clean():
    """mypy on the package at the strictness of pyproject.toml: zero errors."""
    result = _run("mypy", "--no-pretty")
    assert result.returncode == 0, result.stdout[-4000:]
