"""Where m2m runs: the container engine, if any, and the image m2m came in.

Recorded in ``dataset_description.json`` (``GeneratedBy[].Container``) and in the report.
Only what the engines themselves create inside a container is read (marker files, runtime
environment variables), plus ``M2M_CONTAINER``, which m2m's own image sets (Dockerfile).
Variables a user may set on the host to configure an engine (``APPTAINER_BINDPATH``, ...)
are not looked at, so a run outside a container is never taken for one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from m2m_app import __version__

#: Set by m2m's image to the image's name (``m2m``); its tag is the package version.
IMAGE_VARIABLE = "M2M_CONTAINER"

#: Variables the Apptainer and Singularity runtimes set in every container they start
#: (``--cleanenv`` keeps them). Apptainer is looked at first: it may set both families.
RUNTIME_VARIABLES = (
    ("Apptainer", ("APPTAINER_CONTAINER", "APPTAINER_NAME")),
    ("Singularity", ("SINGULARITY_CONTAINER", "SINGULARITY_NAME")),
)


def container_type(environ: Mapping[str, str] | None = None, root: Path = Path("/")) -> str | None:
    """The container engine m2m runs under, or None outside a container.

    One of ``"Apptainer"``, ``"Singularity"`` (their runtime variables), ``"Podman"``
    (``container=podman``, which Podman sets in every container, or a ``/run/.containerenv``
    naming the engine, as with ``--privileged``), ``"Docker"`` (``/.dockerenv``), or ``"OCI"``:
    m2m's image (``M2M_CONTAINER``) under an engine that leaves none of these (containerd,
    Kubernetes; CRI-O writes an empty ``/run/.containerenv``).
    ``environ`` and ``root`` default to this process's environment and ``/``.
    """
    environ = os.environ if environ is None else environ
    for engine, variables in RUNTIME_VARIABLES:
        if any(environ.get(name) for name in variables):
            return engine
    containerenv = root / "run" / ".containerenv"
    named_podman = containerenv.is_file() and 'engine="podman' in _read_text(containerenv)
    if environ.get("container") == "podman" or named_podman:
        return "Podman"
    if (root / ".dockerenv").exists():
        return "Docker"
    if environ.get(IMAGE_VARIABLE) or containerenv.is_file():
        return "OCI"
    return None


def container_image(environ: Mapping[str, str] | None = None) -> str | None:
    """``NAME:VERSION`` of m2m's own image when running in it (``M2M_CONTAINER=NAME``), else None."""
    name = (os.environ if environ is None else environ).get(IMAGE_VARIABLE)
    return f"{name}:{__version__}" if name else None


def container_description(environ: Mapping[str, str] | None = None, root: Path = Path("/")) -> dict | None:
    """The BIDS ``GeneratedBy[].Container`` object, ``{"Type": engine, "Tag": image}``
    (``Tag`` only inside m2m's image), or None outside a container."""
    engine = container_type(environ, root)
    if engine is None:
        return None
    image = container_image(environ)
    return {"Type": engine, **({"Tag": image} if image else {})}


def _read_text(path: Path) -> str:
    """The file's text, or "" when it cannot be read."""
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""
