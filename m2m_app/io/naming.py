"""BIDS-Derivatives file names shared by ``m2m-train prepare`` and the app.

Tensor maps follow BEP016 (``model-tensor_param-<p>_dwimap``), tractograms BEP046
(``tract-<t>_track-<method>_tractogram``), everything in the T1w space.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: Order of entities in a file name (BIDS entity table order, derivative entities last).
ENTITY_ORDER = (
    "sub",
    "ses",
    "acq",
    "run",
    "from",
    "to",
    "mode",
    "space",
    "seg",
    "res",
    "tract",
    "track",
    "model",
    "param",
    "stat",
    "label",
    "desc",
)

#: The tensor maps m2m writes: ``param`` value → (sidecar description, units).
TENSOR_PARAMS: dict[str, tuple[str, str]] = {
    "fa": ("fractional anisotropy", "arbitrary"),
    "md": ("mean diffusivity", "mm^2/s"),
    "ad": ("axial diffusivity (largest eigenvalue)", "mm^2/s"),
    "rd": ("radial diffusivity (mean of the two smaller eigenvalues)", "mm^2/s"),
    "diffusivity": ("diffusion tensor D11 D12 D13 D22 D23 D33 in the RAS+ world frame", "mm^2/s"),
    "v1": ("principal eigenvector (x, y, z) in the RAS+ world frame", "unitless"),
    "colfa": (
        "colour FA: |V1| * FA as red (left-right), green (anterior-posterior), blue (inferior-superior)",
        "arbitrary",
    ),
}

#: Track-density maps derived from a tractogram: ``param`` value → description.
TDI_PARAMS: dict[str, str] = {
    "tdi": "track density: number of streamlines visiting each voxel",
    "dectdi": "directionally encoded track density: mean |segment direction| (R=x, G=y, B=z) per voxel",
}

#: Per-voxel uncertainty maps the app writes beside the maps: key → (BIDS entities, sidecar
#: description, units). The entities name the map they qualify (BIDS-Derivatives ``desc``).
UNCERTAINTY_MAPS: dict[str, tuple[dict[str, str], str, str]] = {
    "fa_sd": (
        {"model": "tensor", "param": "fa", "desc": "sd"},
        "standard deviation of FA across the six phase-1 passes (axial, coronal and sagittal slices "
        "of the T1w and of its left-right mirror image): the population standard deviation (divided "
        "by 6) of the FA of each pass's tensor, times UncertaintyScale",
        "arbitrary",
    ),
    "v1_dispersion": (
        {"model": "tensor", "param": "v1", "desc": "dispersion"},
        "angular dispersion of the principal eigenvector across the six phase-1 passes: the "
        "root-mean-square of the sign-free angle arccos|V1_pass . V1| between each pass's V1 and "
        "the written (fused) V1, in degrees from 0 to 90, times UncertaintyScale, capped at 90 "
        "(no sign-free angle error exceeds it)",
        "deg",
    ),
    "tdi_sd": (
        {"tract": "wholebrain", "param": "tdi", "desc": "sd"},
        "standard deviation of the relative track density across the six phase-2 passes: the "
        "population standard deviation (divided by 6) of each pass's density, times UncertaintyScale",
        "arbitrary",
    ),
}


@dataclass(frozen=True)
class Subject:
    """One unit of processing: a participant, optionally one of its sessions."""

    participant: str
    session: str | None = None

    @property
    def entities(self) -> dict[str, str]:
        """The ``sub``/``ses`` entities of this unit."""
        return {"sub": self.participant, **({"ses": self.session} if self.session else {})}

    @property
    def label(self) -> str:
        """``sub-01`` or ``sub-01_ses-a``, used as a unique key in logs and tables."""
        return "_".join(f"{k}-{v}" for k, v in self.entities.items())

    @classmethod
    def from_label(cls, label: str) -> Subject:
        """The unit of a :attr:`label` (``sub-01_ses-a``)."""
        parts = dict(part.split("-", 1) for part in label.split("_"))
        return cls(parts["sub"], parts.get("ses"))

    def folder(self, root: Path, datatype: str) -> Path:
        """``root/sub-X[/ses-Y]/<datatype>``."""
        path = Path(root) / f"sub-{self.participant}"
        if self.session:
            path = path / f"ses-{self.session}"
        return path / datatype


def derivative_path(
    root: Path, subject: Subject, datatype: str, suffix: str, extension: str = ".nii.gz", **entities: str
) -> Path:
    """Build ``root/sub-X[/ses-Y]/<datatype>/sub-X[_ses-Y]_<entities>_<suffix><extension>``."""
    unknown = set(entities) - set(ENTITY_ORDER)
    if unknown:
        raise ValueError(f"unknown BIDS entities {sorted(unknown)}")
    all_entities = {**subject.entities, **entities}
    parts = [f"{key}-{all_entities[key]}" for key in ENTITY_ORDER if all_entities.get(key)]
    return subject.folder(root, datatype) / ("_".join(parts + [suffix]) + extension)


def bids_uri(path: str | Path, dataset: str = "raw") -> str:
    """``bids:raw:sub-01/anat/sub-01_T1w.nii.gz`` for a file inside a BIDS dataset (BIDS URI).

    The dataset root is the folder above the *nearest* ancestor named ``sub-<label>`` with the
    file name's own subject label, so folders above the dataset (``/data/sub-pilot/bids``) are
    never part of the URI. A file whose name has no subject gives ``bids:raw:<name>``.
    """
    path = Path(path)
    subject = path.name.split("_")[0]
    root = next((parent.parent for parent in path.parents if parent.name == subject), None)
    relative = path.relative_to(root).as_posix() if subject.startswith("sub-") and root else path.name
    return f"bids:{dataset}:{relative}"


def sidecar_path(path: Path) -> Path:
    """The JSON sidecar beside a derivative file."""
    name = path.name
    for ext in (".nii.gz", ".nii", ".trx", ".tck", ".trk", ".txt", ".h5"):
        if name.endswith(ext):
            return path.with_name(name[: -len(ext)] + ".json")
    return path.with_suffix(".json")


def derivative_paths(
    root: Path,
    subject: Subject,
    track_method: str,
    tractogram_format: str = "trx",
    space: dict[str, str] | None = None,
) -> dict[str, Path]:
    """The maps, masks, transform and tractogram of one unit, keyed like the prep manifest columns
    (and the app's uncertainty maps, keyed like :data:`UNCERTAINTY_MAPS`).

    ``m2m-train prepare`` (``track_method`` ``tensordet``) and the app (``nerf``) share these names.
    ``space``: the ``space`` (and ``res``) entities, ``{"space": "T1w"}`` by default.
    """
    space = space or {"space": "T1w"}
    paths = {
        param: derivative_path(root, subject, "dwi", "dwimap", **space, model="tensor", param=param)
        for param in TENSOR_PARAMS
    }
    paths |= {
        param: derivative_path(root, subject, "dwi", "dwimap", **space, tract="wholebrain", param=param)
        for param in TDI_PARAMS
    }
    paths |= {
        key: derivative_path(root, subject, "dwi", "dwimap", **space, **entities)
        for key, (entities, _, _) in UNCERTAINTY_MAPS.items()
    }
    paths["mask"] = derivative_path(root, subject, "anat", "mask", **space, desc="brain")
    paths["wm"] = derivative_path(root, subject, "anat", "mask", **space, label="WM")
    paths["tractogram"] = derivative_path(
        root, subject, "dwi", "tractogram", f".{tractogram_format}", **space, tract="wholebrain", track=track_method
    )
    paths["xfm"] = derivative_path(root, subject, "dwi", "xfm", ".txt", **{"from": "T1w", "to": "dwi", "mode": "image"})
    return paths
