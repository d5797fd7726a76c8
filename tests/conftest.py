"""Shared fixtures: the real data in ../shared/data/ds-real and small BIDS datasets built from it."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DS_REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ds-real"

requires_ds_real = pytest.mark.skipif(not DS_REAL.exists(), reason=f"{DS_REAL} is not present")


def run_cli(module: str, *args: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    """Run ``python -m m2m_app.cli.<module> ARGS`` and return the finished process (text output)."""
    return subprocess.run([sys.executable, "-m", f"m2m_app.cli.{module}", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def make_bids(root: Path, files: dict[str, Path | bytes]) -> Path:
    """Create a BIDS dataset at ``root``: each relative path is a symlink to a Path, or bytes."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "test", "BIDSVersion": "1.10.0"}))
    for rel, source in files.items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, bytes):
            target.write_bytes(source)
        else:
            target.symlink_to(source)
    return root


def ds_real_unit(participant: str, session: str | None, modalities=("anat", "dwi")) -> dict[str, Path]:
    """The ds-real files of one unit, keyed by their path relative to the dataset root."""
    folder = DS_REAL / f"sub-{participant}" / (f"ses-{session}" if session else "")
    files = {}
    for modality in modalities:
        for path in sorted((folder / modality).glob("*")):
            files[str(path.relative_to(DS_REAL))] = path
    return files


@pytest.fixture(scope="session")
def prepared_ds_real(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """``m2m-train prepare`` run once on all of ds-real (about 3 minutes on 2 cores)."""
    if not DS_REAL.exists():
        pytest.skip(f"{DS_REAL} is not present")
    prep = tmp_path_factory.mktemp("prep")
    result = run_cli("train", "prepare", DS_REAL, prep, "--nprocs", "2")
    return prep, result


@pytest.fixture
def copy_of(tmp_path):
    """Copy a file into tmp_path (to corrupt it without touching the source)."""
    def _copy(source: Path, name: str | None = None) -> Path:
        target = tmp_path / (name or source.name)
        shutil.copyfile(source, target)
        return target
    return _copy
