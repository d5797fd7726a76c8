"""Writing one subject's BIDS-Derivatives (maps, tractogram, sidecars, QC) and the dataset description."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np

from m2m_app import __version__
from m2m_app.io.environment import container_description
from m2m_app.io.naming import (TDI_PARAMS, TENSOR_PARAMS, Subject, bids_uri, derivative_path,
                               derivative_paths, sidecar_path)
from m2m_app.io.nifti import atomic_write, save_json

LOGGER = logging.getLogger(__name__)

#: What every sidecar says about where the values come from.
PREDICTED = ("predicted by m2m from the T1-weighted image alone (no diffusion data was acquired "
             "or used); a model estimate, not a measurement")


def dataset_description(output_dir: Path, bids_dir: Path, name: str = "m2m derivatives") -> Path:
    """Write ``dataset_description.json`` (DatasetType derivative, GeneratedBy, SourceDatasets)."""
    container = container_description()
    generated = {"Name": "m2m", "Version": __version__,
                 "Description": "T1w -> DTI -> tractography translation",
                 "CodeURL": "https://pypi.org/project/m2m-app/"}
    if container:
        generated["Container"] = container
    return save_json({"Name": name, "BIDSVersion": "1.10.0", "DatasetType": "derivative",
                      "GeneratedBy": [generated], "SourceDatasets": [{"URL": Path(bids_dir).absolute().as_uri()}],
                      "DatasetLinks": {"raw": Path(bids_dir).absolute().as_uri()},
                      "HowToAcknowledge": "Cite m2m and the methods in CITATION.md."},
                     Path(output_dir) / "dataset_description.json")


def weights_provenance(weights_dir: str | None) -> dict:
    """Version and SHA-256 of the translator weights used (packaged ones when ``weights_dir`` is None)."""
    from m2m_app.inference.predict import PACKAGED_WEIGHTS

    folder = Path(weights_dir) if weights_dir else PACKAGED_WEIGHTS
    out = {}
    for phase in ("phase1", "phase2"):
        meta_path = folder / f"{phase}.json"
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            out[phase] = {"file": f"{phase}.safetensors", "sha256": meta.get("sha256"),
                          "trained_on": meta.get("recipe", {}).get("subjects"),
                          "m2m_version": meta.get("m2m_version", meta.get("version"))}
    return out


def _copy(source: str | Path, target: Path) -> Path:
    return atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))


def _common_sidecar(t1w: str, weights_dir: str | None, timings: dict[str, float]) -> dict:
    """Keys of every sidecar: sources, software, weights and the wall time of the stages run so far."""
    return {"Sources": [bids_uri(t1w)], "GeneratedBy": [{"Name": "m2m", "Version": __version__}],
            "Weights": weights_provenance(weights_dir), "StageWallTimeSeconds": timings}


def write_maps(output_dir: Path, subject: Subject, t1w: str, maps: dict[str, str],
               weights_dir: str | None, timings: dict[str, float] | None = None) -> dict[str, Path]:
    """Copy the phase-1/2 maps under their BIDS-Derivatives names, each with a JSON sidecar.

    ``maps`` holds work-dir NIfTI files keyed like :func:`derivative_paths` (``fa``, ``md``,
    ``ad``, ``rd``, ``diffusivity``, ``v1``, ``colfa``, ``mask`` and, with phase 2, ``tdi``,
    ``dectdi``). ``timings`` ({stage: seconds}) goes into every sidecar. Returns the written paths by key.
    """
    paths = derivative_paths(Path(output_dir), subject, "nerf")
    common = _common_sidecar(t1w, weights_dir, timings or {})
    written = {}
    for key, source in maps.items():
        if key in TENSOR_PARAMS:
            description, units = TENSOR_PARAMS[key]
            extra = {"Model": "tensor", "Units": units}
        elif key in TDI_PARAMS:
            description = TDI_PARAMS[key] + " (relative: 1 = the subject's 99th percentile in the brain)"
            extra = {}
        else:
            description, extra = "brain mask", {"Type": "Brain"}
        written[key] = _copy(source, paths[key])
        save_json({"Description": f"{description}; {PREDICTED}", **extra, **common}, sidecar_path(paths[key]))
    return written


def write_nerf(output_dir: Path, subject: Subject, t1w: str, tractogram: str, tracking: dict, field: str,
               figures: dict[str, str], weights_dir: str | None,
               timings: dict[str, float] | None = None) -> dict[str, Path]:
    """Copy phase 3's tractogram (BEP046 sidecar), fitted field and rendered figures into place."""
    output_dir = Path(output_dir)
    target = derivative_paths(output_dir, subject, "nerf", Path(tractogram).suffix.lstrip("."))["tractogram"]
    written = {"tractogram": _copy(tractogram, target)}
    save_json({**tracking, "Description": f"{tracking.get('Description', '')} Streamlines {PREDICTED}.",
               **_common_sidecar(t1w, weights_dir, timings or {})}, sidecar_path(target))
    written["field"] = _copy(field, derivative_path(output_dir, subject, "dwi", "model", ".safetensors",
                                                    space="T1w", tract="wholebrain", desc="nerf"))
    for name, source in figures.items():
        written[f"figure_{name}"] = _copy(source, derivative_path(output_dir, subject, "figures", "nerf",
                                                                  Path(source).suffix, desc=name))
    return written


def qc_path(output_dir: Path, subject: Subject) -> Path:
    """The subject's QC JSON; written last, its presence marks the subject complete."""
    return derivative_path(Path(output_dir), subject, "", "qc", ".json", desc="m2m")


def subject_qc(subject: Subject, written: dict[str, Path], nerf_report: dict) -> dict:
    """One row of the group QC table: brain volume, mean FA, median MD, streamlines, NeRF PSNR."""
    mask_img = nib.load(written["mask"])
    mask = np.asarray(mask_img.dataobj) > 0
    voxel_ml = float(np.prod(mask_img.header.get_zooms()[:3])) / 1000
    fa = np.asarray(nib.load(written["fa"]).dataobj)
    md = np.asarray(nib.load(written["md"]).dataobj)
    tracking = json.loads(sidecar_path(written["tractogram"]).read_text()) if "tractogram" in written else {}
    return {"subject": subject.label, "brain_volume_ml": round(float(mask.sum()) * voxel_ml, 1),
            "mean_fa": float(fa[mask].mean()) if mask.any() else float("nan"),
            "median_md": float(np.median(md[mask])) if mask.any() else float("nan"),
            "n_streamlines": tracking.get("Count"), "nerf_psnr_density_db": nerf_report.get("psnr_density_db"),
            "m2m_version": __version__}
