"""Shared fixtures: the real data in ../shared/data/ds-real and small BIDS datasets built from it."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from m2m_app.maths.tensor import tensor_derivatives

DS_REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ds-real"

requires_ds_real = pytest.mark.skipif(not DS_REAL.exists(), reason=f"{DS_REAL} is not present")
DS_EXTRA = DS_REAL.parent / "ds-extra"
requires_ds_extra = pytest.mark.skipif(not DS_EXTRA.exists(), reason=f"{DS_EXTRA} is not present")


def run_cli(
    module: str, *args: str, timeout: float = 1200, prefix: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """Run ``[PREFIX] python -m m2m_app.cli.<module> ARGS`` and return the finished process (text output)."""
    return subprocess.run(
        [*prefix, sys.executable, "-m", f"m2m_app.cli.{module}", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_only_mount_prefix(mount_point: Path) -> tuple[str, ...]:
    """A command prefix that runs the rest with a read-only tmpfs over ``mount_point``
    (``unshare -m``: as root, permission bits alone do not stop writes); skips the test
    where mounting is not allowed."""
    if not shutil.which("unshare") or subprocess.run(["unshare", "-m", "true"]).returncode != 0:
        pytest.skip("cannot mount a read-only file system here")
    return ("unshare", "-m", "sh", "-c", 'mount -t tmpfs -o ro,size=1m none "$0" && exec "$@"', str(mount_point))


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
    """``m2m-train prepare`` run once on all of ds-real (about 15 minutes on 2 cores), without the
    teacher's parcellations (``--atlases none``: a registration per unit; the test of the re-run adds
    sub-01's)."""
    if not DS_REAL.exists():
        pytest.skip(f"{DS_REAL} is not present")
    prep = tmp_path_factory.mktemp("prep")
    result = run_cli("train", "prepare", DS_REAL, prep, "--nprocs", "2", "--atlases", "none")
    return prep, result


@pytest.fixture(scope="session")
def example_outputs(tmp_path_factory) -> tuple[Path, Path]:
    """The embedded example through the whole app once, with a template space (about 4 minutes on 2 cores);
    then the group level. Shared by the tests that read its derivatives (the validator's, the report
    viewer's): CI runs the pipeline on it once."""
    root = tmp_path_factory.mktemp("example_run")
    assert run_cli("run", "example-data", root / "example").returncode == 0
    result = run_cli(
        "run",
        root / "example",
        root / "out",
        "participant",
        "-w",
        root / "work",
        "--nprocs",
        "1",
        "--omp-nthreads",
        "2",
        "--output-spaces",
        "MNI152NLin2009aSym:res-2",
        "T1w",
        "--atlases",
        "DesikanKilliany",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_cli("run", root / "example", root / "out", "group")
    assert result.returncode == 0, result.stderr[-2000:]
    return root / "example", root / "out"


@pytest.fixture
def copy_of(tmp_path):
    """Copy a file into tmp_path (to corrupt it without touching the source)."""

    def _copy(source: Path, name: str | None = None) -> Path:
        target = tmp_path / (name or source.name)
        shutil.copyfile(source, target)
        return target

    return _copy


# A left-right fibre in white matter, isotropic grey matter (mm²/s).
WM_EVALS, GM_EVAL = (1.7e-3, 0.3e-3, 0.3e-3), 0.8e-3


def synthetic_affine(kind: str, zooms: tuple[float, float, float] = (4.0, 4.0, 4.0)) -> np.ndarray:
    """RAS, LAS, PSR or oblique (15° about z, 10° about x) voxel-to-world affine."""
    linear = np.diag(zooms)
    if kind == "las":
        linear[0, 0] *= -1
    elif kind == "psr":  # voxel axes i, j, k run posterior, superior, right (sub-02's sagittal T1w)
        linear = np.array([[0, 0, 1], [-1, 0, 0], [0, 1, 0]]) @ linear
    elif kind == "oblique":
        a, b = np.radians(15), np.radians(10)
        rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
        rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
        linear = rz @ rx @ linear
    affine = np.eye(4)
    affine[:3, :3] = linear
    return affine


def synthetic_head(
    kind: str = "ras", shape: tuple[int, int, int] = (48, 56, 48), zooms: tuple[float, float, float] = (4.0, 4.0, 4.0)
) -> dict[str, np.ndarray]:
    """A synthetic head on a grid centred on the world origin: T1w, masks, tensors and track maps."""
    affine = synthetic_affine(kind, zooms)
    affine[:3, 3] = -affine[:3, :3] @ ((np.array(shape) - 1) / 2) + np.array([3.0, -5.0, 10.0])
    ijk = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), -1)
    xyz = nib.affines.apply_affine(affine, ijk) - np.array([3.0, -5.0, 10.0])

    def inside(radii):
        return ((xyz / np.array(radii)) ** 2).sum(-1) < 1

    head, brain, wm = inside((70, 85, 75)), inside((30, 40, 30)), inside((20, 28, 12))
    t1w = np.where(head, 300.0, 5.0) + brain * 300.0 + wm * 250.0
    t1w += 5.0 * np.random.default_rng(0).standard_normal(shape)
    tensor = np.zeros(shape + (6,), np.float32)
    tensor[brain] = [GM_EVAL, 0, 0, GM_EVAL, 0, GM_EVAL]
    tensor[wm] = [WM_EVALS[0], 0, 0, WM_EVALS[1], 0, WM_EVALS[2]]
    maps = tensor_derivatives(tensor)
    for name in ("fa", "md", "ad", "rd", "v1", "colfa"):
        maps[name] = np.where(brain[..., None] if maps[name].ndim == 4 else brain, maps[name], 0)
    tdi = np.where(wm, 40.0, 0.0) + brain * 2.0
    dectdi = np.where(wm[..., None], [1.0, 0.1, 0.1], [0.4, 0.4, 0.4]) * brain[..., None]
    return {
        "affine": affine,
        "t1w": t1w.astype(np.float32),
        "mask": brain.astype(np.uint8),
        "wm": wm.astype(np.uint8),
        "diffusivity": tensor,
        "tdi": tdi,
        "dectdi": dectdi,
        **maps,
    }


#: Translator size of the tiny networks the tests train (``Translator(..., **TINY)``).
TINY = {"base": 4, "depth": 2}


@pytest.fixture
def one_torch_thread():
    """One torch thread and torch's seed 0 (the translator tests: ``pytest.mark.usefixtures``)."""
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)


def make_prep_dir(root: Path, kinds: tuple[str, ...] = ("ras", "oblique")) -> Path:
    """A fake ``m2m-train prepare`` output with one synthetic subject per ``kinds`` entry."""
    prep, columns = root / "prep", ("mask", "wm", "fa", "md", "ad", "rd", "diffusivity", "v1", "colfa", "tdi", "dectdi")
    rows = []
    for number, kind in enumerate(kinds, start=1):
        subject = f"sub-{number:02d}"
        maps = synthetic_head(kind)
        t1w_path = root / "bids" / subject / "anat" / f"{subject}_T1w.nii.gz"
        t1w_path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(maps["t1w"], maps["affine"]), t1w_path)
        row = {"subject": subject, "participant": f"{number:02d}", "session": "", "t1w": str(t1w_path), "status": "ok"}
        for column in columns:
            relative = Path(subject) / "dwi" / f"{subject}_{column}.nii.gz"
            (prep / relative).parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(np.asarray(maps[column], np.float32), maps["affine"]), prep / relative)
            row[column] = str(relative)
        rows.append(row)
    with (prep / "manifest.tsv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]) + ["mean_fa_wm"], delimiter="\t", restval="0.5")
        writer.writeheader()
        writer.writerows(rows)
    return prep
