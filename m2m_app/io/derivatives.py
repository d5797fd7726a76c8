"""Writing one subject's BIDS-Derivatives (maps, tractogram, sidecars, QC) and the dataset description."""

from __future__ import annotations

import json
import logging
import os
import re
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from m2m_app import __version__
from m2m_app.data.weights import (
    UNCERTAINTY_SCALE_KEY,
    fa_detail_values,
    uncertainty_scales,
    weight_files,
    weights_folder,
)
from m2m_app.io.environment import container_description
from m2m_app.errors import BadDataError, MissingInputError
from m2m_app.io.files import atomic_write, copy_file, file_sha256, save_json
from m2m_app.io.naming import (
    TDI_PARAMS,
    TENSOR_PARAMS,
    UNCERTAINTY_MAPS,
    Subject,
    bids_uri,
    derivative_path,
    derivative_paths,
    sidecar_path,
)
from m2m_app.io.nifti import load_image, load_t1w, save_nifti
from m2m_app.maths.detail import FaDetail, fa_detail_from
from m2m_app.maths.grid import ConformedGrid, resample_outputs

LOGGER = logging.getLogger(__name__)

#: Maps compressed and written at the same time as the next one is resampled (ISA-L's deflate
#: releases the GIL, see :func:`~m2m_app.io.nifti.save_nifti`).
WRITER_THREADS = 2

#: What every sidecar says about where the values come from.
PREDICTED = (
    "predicted by m2m from the T1-weighted image alone (no diffusion data was acquired "
    "or used); a model estimate, not a measurement"
)


def source_link_name(output_dir: Path, bids_dir: Path) -> str:
    """The ``DatasetLinks`` key by which files in ``output_dir`` name files of ``bids_dir`` (BIDS URIs).

    ``raw`` unless ``output_dir`` already links another dataset as ``raw`` (a prep dir filled from
    several datasets); then the key it already has for ``bids_dir``, else ``bids_dir``'s folder
    name (letters, digits and ``-``), made unique.
    """
    links = _read_description(Path(output_dir)).get("DatasetLinks", {})
    uri = Path(bids_dir).resolve().as_uri()
    known = [key for key, value in links.items() if value == uri]
    if known:
        return known[0]
    if "raw" not in links:
        return "raw"
    stem = re.sub(r"[^A-Za-z0-9-]+", "-", Path(bids_dir).resolve().name).strip("-") or "source"
    key, n = stem, 2
    while key in links:
        key, n = f"{stem}-{n}", n + 1
    return key


def dataset_description(
    output_dir: Path,
    bids_dir: Path,
    name: str = "m2m derivatives",
    weights_dir: str | None = None,
    phases: tuple[str, ...] = (),
    link: str = "raw",
) -> Path:
    """Write ``dataset_description.json`` (DatasetType derivative, Authors, GeneratedBy, SourceDatasets).

    ``Authors`` are the input dataset's (the people whose data these derive from; m2m itself is
    credited in ``GeneratedBy``). ``GeneratedBy`` lists m2m (with its container, if any) and the
    translator weights of ``phases`` with their SHA-256. The input dataset is linked by a
    normalised absolute ``file://`` URI (symlinks and ``..`` resolved) under ``DatasetLinks[link]``
    (:func:`source_link_name`). A description already in ``output_dir`` keeps its other source
    datasets, their links and authors: a folder filled from two datasets names both.
    """
    container = container_description()
    generated: dict[str, Any] = {
        "Name": "m2m",
        "Version": __version__,
        "Description": "T1w -> DTI -> tractography translation",
        "CodeURL": "https://pypi.org/project/m2m-app/",
    }
    if container:
        generated["Container"] = container
    weights = weights_provenance(weights_dir)
    generated_by = [generated] + [
        {
            "Name": f"m2m {phase} translator weights",
            "Version": str(weights[phase]["m2m_version"] or "unrecorded"),
            "Description": f"{weights[phase]['file']} (SHA-256 {weights[phase]['sha256']}), trained on "
            f"{', '.join(weights[phase]['trained_on'] or []) or 'unrecorded subjects'}",
        }
        for phase in phases
        if phase in weights
    ]
    source = Path(bids_dir).resolve()
    earlier = _read_description(Path(output_dir))
    authors = list(dict.fromkeys([*earlier.get("Authors", []), *_read_description(source).get("Authors", [])]))
    sources = [s for s in earlier.get("SourceDatasets", []) if s.get("URL") != source.as_uri()]
    return save_json(
        {
            "Name": name,
            "BIDSVersion": "1.10.0",
            "DatasetType": "derivative",
            **({"Authors": authors} if authors else {}),
            "GeneratedBy": generated_by,
            "SourceDatasets": [*sources, {"URL": source.as_uri()}],
            "DatasetLinks": {**earlier.get("DatasetLinks", {}), link: source.as_uri()},
            "HowToAcknowledge": "Cite m2m and the methods in logs/CITATION.md.",
        },
        Path(output_dir) / "dataset_description.json",
    )


def _read_description(folder: Path) -> dict:
    """A dataset's ``dataset_description.json`` ({} when absent or unreadable)."""
    try:
        description = json.loads((folder / "dataset_description.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return description if isinstance(description, dict) else {}


#: Files m2m writes beside the BIDS-Derivatives that no BIDS specification or proposal names
#: (reports, figures, logs, each unit's run settings and crash files, QC tables, the NeRF field), as
#: ``.bidsignore`` patterns.
NOT_BIDS = ("*.html", "figures/", "logs/", "log/", "*_qc.json", "group_*", "*_model.safetensors")


def write_readme(output_dir: Path, weights_dir: str | None = None) -> Path:
    """Write the derivatives' ``README`` (what m2m is and where its methods and model card are) and
    the ``.bidsignore`` that keeps validators off the files in :data:`NOT_BIDS`; returns the README."""
    card = weights_folder(weights_dir) / "README.md"
    card_line = card.as_posix() if card.exists() else f"none found (no README.md in {card.parent.as_posix()})"
    text = f"""# m2m derivatives

Written by m2m {__version__}, a BIDS-App that predicts diffusion-tensor maps (FA, MD, AD, RD,
principal eigenvector, colour FA, the full tensor), track-density maps, a continuous NeRF
tractography field and a whole-brain tractogram from a T1-weighted MRI.

Every map, mask and streamline here is {PREDICTED}.
Each file's JSON sidecar says so in its Description and names the T1w it was predicted from
(Sources) and the SHA-256 of the network weights used (Weights).

- Methods text for a paper: logs/CITATION.md
- Model card (training data, held-out accuracy, limits) of the weights used: {card_line}
- One visual report per subject: sub-<label>[_ses-<label>].html; group QC: group_qc.tsv, group.html;
  in each template space, group FA mean/SD maps and a tissue table: group_space-<template>_*
- File names: tensor maps follow BIDS extension proposal BEP016 (model-tensor_param-<p>_dwimap),
  tractograms BEP046 (tract-<t>_track-<method>_tractogram); both are proposals, not yet in a
  released BIDS specification. .bidsignore lists the m2m files that no BIDS document names.
"""
    output_dir = Path(output_dir)
    atomic_write(output_dir / ".bidsignore", lambda tmp: Path(tmp).write_text("\n".join(NOT_BIDS) + "\n"))
    return atomic_write(output_dir / "README", lambda tmp: Path(tmp).write_text(text))


def checked_weight_files(phase_name: str, weights_dir: str | os.PathLike | None = None) -> tuple[dict, Path]:
    """The metadata and the weights file of ``phase_name``, checked without torch (cheap enough for
    the main process, before any work): both files exist, the metadata holds ``sha256``, ``phase``
    and an ``architecture``, and the file's SHA-256 is the recorded one."""
    weights, meta_path = weight_files(phase_name, weights_dir)
    for path in (weights, meta_path):
        if not path.exists():
            raise MissingInputError(f"{path}: translator weights not found")
    try:
        meta = json.loads(meta_path.read_text())
        recorded = meta["sha256"]
        meta["phase"]
    except (ValueError, KeyError, TypeError) as err:
        raise BadDataError(f"{meta_path}: unreadable weights metadata: {err}") from None
    if not isinstance(meta.get("architecture"), dict):
        raise BadDataError(f"{meta_path}: unreadable weights metadata: no 'architecture'")
    if file_sha256(weights) != recorded:
        raise BadDataError(
            f"{weights}: SHA-256 checksum does not match the one recorded in "
            f"{meta_path.name}; the weight file is corrupted or was replaced"
        )
    return meta, weights


def weights_provenance(weights_dir: str | None) -> dict:
    """Version and SHA-256 of the translator weights used (packaged ones when ``weights_dir`` is None)."""
    out = {}
    for phase in ("phase1", "phase2"):
        meta_path = weight_files(phase, weights_dir)[1]
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            out[phase] = {
                "file": f"{phase}.safetensors",
                "sha256": meta.get("sha256"),
                "trained_on": meta.get("recipe", {}).get("subjects"),
                "m2m_version": meta.get("m2m_version", meta.get("version")),
            }
    return out


def _common_sidecar(t1w: str, weights_dir: str | None, timings: dict[str, float]) -> dict:
    """Keys of every sidecar: sources, software, weights and the wall time of the stages run so far."""
    return {
        "Sources": [bids_uri(t1w)],
        "GeneratedBy": [{"Name": "m2m", "Version": __version__}],
        "Weights": weights_provenance(weights_dir),
        "StageWallTimeSeconds": timings,
    }


#: Phase whose passes each uncertainty map comes from (its scale is stored in ``<phase>.json``).
UNCERTAINTY_PHASE = {"fa_sd": "phase1", "v1_dispersion": "phase1", "tdi_sd": "phase2"}


def _uncertainty_sidecar(key: str, weights_dir: str | None) -> tuple[str, dict]:
    """Description and extra sidecar keys of uncertainty map ``key`` (units, the calibration scale applied)."""
    entities, description, units = UNCERTAINTY_MAPS[key]
    phase = UNCERTAINTY_PHASE[key]
    stored = uncertainty_scales(phase, weights_dir)
    scale_note = (
        f"'{UNCERTAINTY_SCALE_KEY}' of {phase}.json, fitted by 'm2m-train calibrate' on held-out subjects"
        if key in stored
        else f"1.0: the weights' {phase}.json stores no '{UNCERTAINTY_SCALE_KEY}', so this is the raw, "
        "uncalibrated spread of the passes"
    )
    extra = {
        "Units": units,
        "UncertaintyScale": stored.get(key, 1.0),
        "UncertaintyScaleSource": scale_note,
        **({"Model": "tensor"} if entities.get("model") == "tensor" else {}),
    }
    return f"{description} (uncertainty from the disagreement of the network's passes)", extra


def write_maps(
    output_dir: Path,
    subject: Subject,
    t1w: str,
    maps: dict[str, str],
    weights_dir: str | None,
    timings: dict[str, float] | None = None,
    *,
    grid: ConformedGrid,
    resolution_mm: float | None = None,
    threads: int = 1,
) -> dict[str, Path]:
    """Write the phase-1/2 maps onto the output grid under their BIDS-Derivatives names, each with a JSON sidecar.

    ``maps`` holds work-dir NIfTI files on the model grid of ``grid``, keyed like
    :func:`derivative_paths` (``fa``, ``md``, ``ad``, ``rd``, ``diffusivity``, ``v1``,
    ``colfa``, ``mask``, the uncertainty maps ``fa_sd`` and ``v1_dispersion`` and, with
    phase 2, ``tdi``, ``dectdi``, ``tdi_sd``); ``mask`` is where they are defined. Each map is
    resampled once onto :meth:`ConformedGrid.output_grid` of ``resolution_mm`` (None: the
    T1w's own grid) by its rule in :func:`~m2m_app.maths.grid.resample_outputs` and written
    at once. When the phase-1 weights store a T1w detail transfer (:mod:`m2m_app.maths.detail`),
    its FA shift, computed from the T1w on the output grid, sharpens FA, the tensor, AD, RD and
    colour FA (MD and V1 unchanged), and their sidecars say so. ``timings`` ({stage: seconds})
    goes into every sidecar. ``threads``: the resampling's threads (:class:`GridResampler`; the
    files are written in :data:`WRITER_THREADS` more). Returns the written paths by key.
    """
    paths = derivative_paths(Path(output_dir), subject, "nerf")
    common = _common_sidecar(t1w, weights_dir, timings or {})
    volumes = {key: load_image(source)[1] for key, source in maps.items()}
    resampler = grid.output_resampler(volumes["mask"] > 0, resolution_mm, threads)
    detail = fa_detail_from(fa_detail_values(weights_dir)) if "fa" in maps else None
    fa_shift = None
    if detail is not None:
        t1w_img, t1w_data = load_t1w(t1w)
        fa_shift = detail.fa_shift_on(
            t1w_data, t1w_img.affine, resampler.out_shape, resampler.out_affine, where=resampler.kept, threads=threads
        )
        del t1w_data

    def write(key: str, volume: np.ndarray, sidecar: dict) -> Path:
        dtype = np.uint8 if volume.dtype == bool else np.float32
        path = save_nifti(volume, resampler.out_affine, paths[key], dtype=dtype)
        save_json(sidecar, sidecar_path(path))
        return path

    written: dict[str, Future[Path]] = {}
    with ThreadPoolExecutor(max_workers=WRITER_THREADS) as pool:
        for key, volume in resample_outputs(volumes, resampler, fa_shift):
            pending = [f for f in written.values() if not f.done()]
            if len(pending) >= WRITER_THREADS:  # at most WRITER_THREADS maps in memory besides this one
                futures.wait(pending, return_when=futures.FIRST_COMPLETED)
            description, extra = _map_description(key, weights_dir)
            if detail is not None and key in SHARPENED_MAPS:
                extra = extra | {"T1wDetailTransfer": _detail_sidecar(detail)}
            sidecar = {"Description": f"{description}; {PREDICTED}", **extra, **common}
            written[key] = pool.submit(write, key, volume, sidecar)
            del volume
    return {key: written[key].result() for key in maps}


#: The maps the T1w detail transfer changes (MD, V1 and the uncertainty maps stay as predicted).
SHARPENED_MAPS = frozenset({"fa", "ad", "rd", "colfa", "diffusivity"})


def _detail_sidecar(detail: FaDetail) -> dict[str, Any]:
    """What a sharpened map's sidecar says about the T1w detail transfer."""
    return {
        "Description": "FA sharpened below the 2 mm model grid with the T1w: the high-pass (Gaussian sigma "
        f"{detail.sigma_mm} mm) of FA looked up from the normalised T1w intensity (mean teacher FA per "
        f"intensity bin, fitted on the training subjects), times {detail.weight}, added to the predicted "
        "FA; the tensor's eigenvalues are rescaled about their mean to match (MD and V1 unchanged)",
        "SigmaMm": detail.sigma_mm,
        "Weight": detail.weight,
    }


def _map_description(key: str, weights_dir: str | None) -> tuple[str, dict[str, Any]]:
    """What the map ``key`` holds, and its sidecar fields beyond the common ones."""
    if key in TENSOR_PARAMS:
        description, units = TENSOR_PARAMS[key]
        return description, {"Model": "tensor", "Units": units}
    if key in UNCERTAINTY_MAPS:
        return _uncertainty_sidecar(key, weights_dir)
    if key in TDI_PARAMS:
        return TDI_PARAMS[key] + " (relative: 1 = the subject's 99th percentile in the brain)", {}
    return "brain mask", {"Type": "Brain"}


def write_nerf(
    output_dir: Path,
    subject: Subject,
    t1w: str,
    tractogram: str,
    tracking: dict,
    field: str,
    figures: dict[str, str],
    weights_dir: str | None,
    timings: dict[str, float] | None = None,
) -> dict[str, Path]:
    """Copy phase 3's tractogram (BEP046 sidecar), fitted field and rendered figures into place."""
    output_dir = Path(output_dir)
    target = derivative_paths(output_dir, subject, "nerf", Path(tractogram).suffix.lstrip("."))["tractogram"]
    written = {"tractogram": copy_file(tractogram, target)}
    save_json(
        {
            **tracking,
            "Description": f"{tracking.get('Description', '')} Streamlines {PREDICTED}.",
            **_common_sidecar(t1w, weights_dir, timings or {}),
        },
        sidecar_path(target),
    )
    written["field"] = copy_file(
        field,
        derivative_path(
            output_dir, subject, "dwi", "model", ".safetensors", space="T1w", tract="wholebrain", desc="nerf"
        ),
    )
    for name, source in figures.items():
        written[f"figure_{name}"] = copy_file(
            source, derivative_path(output_dir, subject, "figures", "nerf", Path(source).suffix, desc=name)
        )
    return written


def qc_path(output_dir: Path, subject: Subject) -> Path:
    """The subject's QC JSON; written last, its presence marks the subject complete."""
    return derivative_path(Path(output_dir), subject, "", "qc", ".json", desc="m2m")


#: The QC row's white matter: voxels of the predicted brain mask whose predicted FA exceeds this.
QC_WM_FA = 0.2


def _voxels(path: Path) -> np.ndarray:
    """The voxel values of a NIfTI file, float32."""
    return load_image(path)[1]


def subject_qc(subject: Subject, written: dict[str, Path], nerf_report: dict) -> dict:
    """One row of the group QC table: brain volume, mean FA, median MD, median WM FA SD, streamlines, NeRF PSNR.

    ``median_fa_sd_wm`` is the median of the FA uncertainty map in white matter (predicted
    brain mask and predicted FA > :data:`QC_WM_FA`; NaN without either): an input far from the
    training data (another contrast, heavy artefacts) makes the passes disagree and raises it.
    """
    mask_img, mask_values = load_image(written["mask"])
    mask = mask_values > 0
    voxel_ml = float(np.prod(mask_img.header.get_zooms()[:3])) / 1000
    fa, md = _voxels(written["fa"]), _voxels(written["md"])
    wm = mask & (fa > QC_WM_FA)
    fa_sd = _voxels(written["fa_sd"]) if "fa_sd" in written else None
    tracking = json.loads(sidecar_path(written["tractogram"]).read_text()) if "tractogram" in written else {}
    return {
        "subject": subject.label,
        "brain_volume_ml": round(float(mask.sum()) * voxel_ml, 1),
        "mean_fa": float(fa[mask].mean()) if mask.any() else float("nan"),
        "median_md": float(np.median(md[mask])) if mask.any() else float("nan"),
        "median_fa_sd_wm": float(np.median(fa_sd[wm])) if fa_sd is not None and wm.any() else float("nan"),
        "n_streamlines": tracking.get("Count"),
        "nerf_psnr_density_db": nerf_report.get("psnr_density_db"),
        "m2m_version": __version__,
    }
