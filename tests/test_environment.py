"""The environment m2m runs in: container detection (m2m_app.io.environment) on fake roots and
environments and what dataset_description.json records from it; the work folder's default
($M2M_WORK_DIR, which the image sets) and a read-only file system without a writable folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from m2m_app import __version__
from m2m_app.io.derivatives import dataset_description
from m2m_app.io.environment import container_description, container_image, container_type
from conftest import make_bids, read_only_mount_prefix, run_cli


def fake_root(tmp_path: Path, dockerenv: bool = False, containerenv: str | None = None) -> Path:
    """A folder standing for ``/``, with the engines' marker files asked for."""
    root = tmp_path / "root"
    (root / "run").mkdir(parents=True)
    if dockerenv:
        (root / ".dockerenv").touch()
    if containerenv is not None:
        (root / "run" / ".containerenv").write_text(containerenv)
    return root


PODMAN_CONTAINERENV = 'engine="podman-4.3.1"\nname="festive_m2m"\nid="0123abcd"\nimage="localhost/m2m:latest"\n'


@pytest.mark.parametrize(
    "environ, markers, expected",
    [
        ({}, {}, None),
        ({"APPTAINER_BINDPATH": "/data", "SINGULARITY_CACHEDIR": "/scratch"}, {}, None),  # host settings only
        ({"APPTAINER_CONTAINER": "/images/m2m.sif", "APPTAINER_NAME": "m2m.sif"}, {}, "Apptainer"),
        ({"APPTAINER_NAME": "m2m.sif", "SINGULARITY_NAME": "m2m.sif"}, {}, "Apptainer"),  # Apptainer sets both
        ({"SINGULARITY_CONTAINER": "/images/m2m.sif"}, {}, "Singularity"),
        ({"APPTAINER_CONTAINER": "/images/m2m.sif"}, {"dockerenv": True}, "Apptainer"),  # image made by docker export
        ({"container": "podman"}, {"containerenv": ""}, "Podman"),  # what Podman 4.3 gives an unprivileged container
        ({}, {"containerenv": PODMAN_CONTAINERENV}, "Podman"),  # --privileged: the file names the engine
        ({"container": "lxc"}, {}, None),
        ({}, {"dockerenv": True}, "Docker"),
        ({}, {"dockerenv": True, "containerenv": PODMAN_CONTAINERENV}, "Podman"),
        ({}, {"containerenv": ""}, "OCI"),  # CRI-O writes an empty /run/.containerenv
        ({"M2M_CONTAINER": "m2m"}, {}, "OCI"),  # m2m's image under an engine without markers
        ({"M2M_CONTAINER": ""}, {}, None),
    ],
)
def test_container_type(tmp_path, environ, markers, expected):
    assert container_type(environ, fake_root(tmp_path, **markers)) == expected


def test_container_type_defaults_to_this_process(tmp_path, monkeypatch):
    monkeypatch.setenv("SINGULARITY_NAME", "m2m.sif")
    monkeypatch.delenv("APPTAINER_NAME", raising=False)
    monkeypatch.delenv("APPTAINER_CONTAINER", raising=False)
    assert container_type() == "Singularity"


def test_container_description(tmp_path):
    podman = fake_root(tmp_path, containerenv=PODMAN_CONTAINERENV)
    assert container_image({"M2M_CONTAINER": "m2m"}) == f"m2m:{__version__}"
    assert container_image({}) is None
    assert container_description({"M2M_CONTAINER": "m2m"}, podman) == {"Type": "Podman", "Tag": f"m2m:{__version__}"}
    assert container_description({}, podman) == {"Type": "Podman"}  # m2m pip-installed in another image
    assert container_description({}, fake_root(tmp_path / "bare")) is None


def test_dataset_description_records_the_engine(tmp_path, monkeypatch):
    monkeypatch.setenv("APPTAINER_CONTAINER", "/images/m2m.sif")
    monkeypatch.setenv("M2M_CONTAINER", "m2m")
    generated = json.loads(dataset_description(tmp_path / "out", tmp_path / "bids").read_text())["GeneratedBy"][0]
    assert generated["Container"] == {"Type": "Apptainer", "Tag": f"m2m:{__version__}"}


@pytest.mark.slow
def test_work_dir_defaults_to_m2m_work_dir(tmp_path):
    bids = make_bids(tmp_path / "bids", {})
    run_cli(
        "run",
        bids,
        tmp_path / "out",
        "participant",
        "--skip-bids-validation",
        prefix=("env", f"M2M_WORK_DIR={tmp_path / 'scratch' / 'work'}"),
        timeout=300,
    )
    assert (tmp_path / "scratch" / "work").is_dir()
    assert not (tmp_path / "m2m_work").exists()  # OUTPUT_DIR/../m2m_work, the default without the variable


@pytest.mark.slow
def test_read_only_without_a_writable_folder_is_one_line(tmp_path):
    """As ``--read-only`` without a tmpfs: the work folder and matplotlib's cache cannot be
    made; m2m stops with its one-line error (exit 73), before matplotlib would raise."""
    bids = make_bids(tmp_path / "bids", {})
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    environment = (
        "env",
        f"TMPDIR={read_only}",
        f"MPLCONFIGDIR={read_only / 'matplotlib'}",
        f"M2M_WORK_DIR={read_only / 'work'}",
    )
    result = run_cli(
        "run",
        bids,
        tmp_path / "out",
        "participant",
        "--skip-bids-validation",
        prefix=read_only_mount_prefix(read_only) + environment,
        timeout=300,
    )
    assert result.returncode == 73, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"m2m: error: cannot create the work folder {read_only / 'work'}: Read-only file system"
    )
