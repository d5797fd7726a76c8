"""Odd but valid inputs, a full disk, and SIGTERM in the middle of a run.

The bad-input matrix (4D/2D T1w, NaN/Inf, all zeros, truncated gzip, unknown label,
unusable folders) is in ``test_app.py``; the real-data runs there read symlinked inputs
(``make_bids`` links ds-real's files), thick-slice 1×1×4.8 mm PSR T1w images included.
"""

from __future__ import annotations

import errno
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest

from conftest import make_bids, read_only_mount_prefix, run_cli, synthetic_head
from m2m_app.errors import OutputError
from m2m_app.io.nifti import save_nifti


def _image(kind: str, dtype=np.float32, shape=(40, 48, 40), zooms=(4.0, 4.0, 4.0), slope: float | None = None):
    head = synthetic_head(kind, shape=shape, zooms=zooms)
    data = head["t1w"]
    if np.issubdtype(dtype, np.integer):
        data = np.round(data / data.max() * np.iinfo(dtype).max * 0.9)
    img = nib.Nifti1Image(data.astype(dtype), head["affine"])
    img.set_data_dtype(dtype)
    if slope is not None:
        img.header.set_slope_inter(slope, 0.0)
    return img


#: Valid T1w images of unusual storage or geometry: each must run through phase 1.
ODD = {
    "int8": lambda: _image("ras", np.int8),
    "float64": lambda: _image("ras", np.float64),
    "scaled": lambda: _image("ras", np.int16, slope=0.25),
    "las": lambda: _image("las"),
    "psr": lambda: _image("psr"),
    "oblique": lambda: _image("oblique"),
    "thick": lambda: _image("ras", shape=(160, 192, 32), zooms=(1.0, 1.0, 5.0)),
    "hugefov": lambda: _image("ras", shape=(120, 120, 120), zooms=(4.0, 4.0, 4.0)),
}


@pytest.mark.slow
def test_odd_but_valid_t1w_images_run(tmp_path):
    files = {}
    for label, make in ODD.items():
        path = tmp_path / f"{label}.nii.gz"
        nib.save(make(), path)
        files[f"sub-{label}/anat/sub-{label}_T1w.nii.gz"] = path
    bids = make_bids(tmp_path / "bids", files)
    out = tmp_path / "out"
    result = run_cli(
        "run",
        bids,
        out,
        "participant",
        "-w",
        tmp_path / "work",
        "--skip-bids-validation",
        "--skip-phase2",
        "--nprocs",
        "2",
        "--omp-nthreads",
        "1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for label in ODD:
        source = nib.load(tmp_path / f"{label}.nii.gz")
        fa = nib.load(out / f"sub-{label}/dwi/sub-{label}_space-T1w_model-tensor_param-fa_dwimap.nii.gz")
        assert fa.shape == source.shape and np.allclose(fa.affine, source.affine, atol=1e-4), label
        mask = nib.load(out / f"sub-{label}/anat/sub-{label}_space-T1w_desc-brain_mask.nii.gz")
        values = fa.get_fdata()[mask.get_fdata() > 0]
        assert np.all(np.isfinite(values)) and np.all((values >= 0) & (values <= 1)), label


def test_full_disk_leaves_nothing_half_written(tmp_path, monkeypatch):
    """A write that fails with ENOSPC half-way: a clear error, the old file intact, no temporary left."""
    target = tmp_path / "map.nii.gz"
    save_nifti(np.ones((4, 4, 4)), np.eye(4), target)
    before = target.read_bytes()

    def full_disk(img, stream):  # the compressed stream gets part of the image, then the disk is full
        stream.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(nib.Nifti1Image, "to_stream", full_disk)
    with pytest.raises(OutputError, match="No space left on device"):
        save_nifti(np.zeros((4, 4, 4)), np.eye(4), target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["map.nii.gz"]


def _wait_for(path_glob, root, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if list(root.glob(path_glob)):
            return True
        time.sleep(0.5)
    return False


@pytest.mark.slow
def test_sigterm_mid_run_then_resume(tmp_path):
    """SIGTERM after phase 1: exit 143 with a resume hint; the re-run reuses phase 1 and completes."""
    t1w = tmp_path / "t1w.nii.gz"
    nib.save(_image("oblique"), t1w)
    bids = make_bids(tmp_path / "bids", {"sub-01/anat/sub-01_T1w.nii.gz": t1w})
    out, work = tmp_path / "out", tmp_path / "work"
    args = [bids, out, "participant", "-w", work, "--skip-bids-validation", "--nprocs", "2", "--omp-nthreads", "1"]
    process = subprocess.Popen(
        [sys.executable, "-m", "m2m_app.cli.run", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    phase1_result = "m2m_wf/sub_01_wf/phase1_wf/phase1/result_phase1.pklz"
    try:
        assert _wait_for(phase1_result, work, timeout=300), "phase 1 never finished"
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 143, stderr[-3000:]
    assert "re-run the same command to resume" in stderr and "Traceback" not in stderr
    assert not (out / "sub-01" / "sub-01_desc-m2m_qc.json").exists()
    # atomic_write's temporary files are hidden (".<name>.XXXX<suffix>"); .bidsignore is a BIDS file
    assert not [p for p in out.rglob(".*") if p.is_file() and p.name != ".bidsignore"], (
        "temporary files left in the output folder"
    )
    finished = (work / phase1_result).stat().st_mtime_ns

    result = run_cli("run", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (work / phase1_result).stat().st_mtime_ns == finished  # resumed, not recomputed
    assert (out / "sub-01/dwi/sub-01_space-T1w_tract-wholebrain_track-nerf_tractogram.trx").exists()
    assert "phase1" in (out / "sub-01.html").read_text()


@pytest.mark.slow
def test_runs_with_a_read_only_home(tmp_path):
    """As in the container run with --read-only: HOME is not writable, caches go to /tmp (Dockerfile's ENV)."""
    t1w = tmp_path / "t1w.nii.gz"
    nib.save(_image("las"), t1w)
    bids = make_bids(tmp_path / "bids", {"sub-01/anat/sub-01_T1w.nii.gz": t1w})
    home = tmp_path / "home"
    home.mkdir()
    environment = (
        "env",
        f"HOME={home}",
        f"MPLCONFIGDIR={tmp_path / 'caches' / 'mpl'}",
        f"TORCH_HOME={tmp_path / 'caches' / 'torch'}",
    )
    result = run_cli(
        "run",
        bids,
        tmp_path / "out",
        "participant",
        "-w",
        tmp_path / "work",
        "--skip-bids-validation",
        "--skip-phase2",
        prefix=read_only_mount_prefix(home) + environment,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out/sub-01/dwi/sub-01_space-T1w_model-tensor_param-fa_dwimap.nii.gz").exists()
