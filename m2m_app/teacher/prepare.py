"""``m2m-train prepare``: turn one subject's T1w + DWI into m2m's training targets.

For each unit (participant or participant/session) this writes, on the T1w grid:
tensor maps (BEP016 names), the brain and white-matter masks, the b0→T1w transform,
a whole-brain tensor tractogram (``.trx``), its track-density and directional
track-density images, and a QC JSON. :func:`write_manifest` gathers the QC files into
``manifest.tsv``/``manifest.json``, the list of training pairs.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from dipy.tracking.streamline import transform_streamlines
from skimage.filters import threshold_multiotsu

from m2m_app import __version__
from m2m_app.errors import BadDataError
from m2m_app.io.naming import (TDI_PARAMS, TENSOR_PARAMS, Subject, bids_uri, derivative_path,
                               derivative_paths, sidecar_path)
from m2m_app.io.nifti import load_dwi, load_t1w, save_json, save_nifti, save_tsv
from m2m_app.io.tractogram import save_tractogram
from m2m_app.maths.streamlines import directional_density, track_density
from m2m_app.maths.tensor import masked_tensor_maps
from m2m_app.teacher import dwi as dwi_math
from m2m_app.teacher.register import (register_b0_to_t1w, resample_to_t1w, save_itk_transform,
                                      tensor_to_t1w)
from m2m_app.teacher.tracking import track_tensor

LOGGER = logging.getLogger(__name__)

#: Manifest columns holding paths (relative to the prep dir), in order.
PATH_COLUMNS = ("mask", "wm", "fa", "md", "ad", "rd", "diffusivity", "v1", "colfa", "tdi",
                "dectdi", "tractogram", "xfm")
#: Manifest columns holding QC numbers.
QC_COLUMNS = ("mean_fa_wm", "mean_fa_brain", "median_md", "n_streamlines", "registration_cost",
              "runtime_s")


def qc_path(prep_dir: Path, subject: Subject) -> Path:
    """Where a unit's QC JSON lives; its presence marks the unit as finished."""
    return derivative_path(prep_dir, subject, "", "qc", ".json", desc="prepare")


def load_dwi_runs(paths: list[Path]) -> tuple[nib.Nifti1Image, np.ndarray, np.ndarray, np.ndarray]:
    """Load and concatenate DWI runs on one grid; b-vectors come back in the voxel frame ``(N, 3)``."""
    runs = [load_dwi(p) for p in paths]
    ref = runs[0][0]
    for path, (img, data, *_) in zip(paths[1:], runs[1:]):
        if data.shape[:3] != ref.shape[:3] or not np.allclose(img.affine, ref.affine, atol=1e-3):
            raise BadDataError(f"{path}: DWI runs to concatenate must share one grid; "
                               f"{paths[0].name} is {ref.shape[:3]}, this one {data.shape[:3]}")
    data = np.concatenate([r[1] for r in runs], axis=-1)
    bvals = np.concatenate([r[2] for r in runs])
    bvecs = np.concatenate([dwi_math.fsl_bvecs_to_voxel(r[3], ref.affine) for r in runs])
    return ref, data, bvals, bvecs


def white_matter_mask(t1w: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """White matter of a T1w: the brightest of three Otsu classes inside the brain (skimage)."""
    values = t1w[brain]
    if values.size < 100:
        raise BadDataError("the brain mask on the T1w is nearly empty; registration failed?")
    thresholds = threshold_multiotsu(values, classes=3)
    return brain & (t1w > thresholds[-1])


def _sidecar(path: Path, description: str, sources: list[str], **extra) -> None:
    save_json({"Description": description, "Sources": sources,
               "GeneratedBy": [{"Name": "m2m-train prepare", "Version": __version__}], **extra},
              sidecar_path(path))


def prepare_subject(subject: Subject, t1w_path: Path, dwi_paths: list[Path], prep_dir: Path,
                    random_seed: int = 0) -> dict:
    """Run the teacher on one unit and write its outputs; returns the unit's QC record."""
    start = time.monotonic()
    stages: dict[str, float] = {}

    def lap(name: str) -> None:
        stages[name] = round(time.monotonic() - start - sum(stages.values()), 2)

    prep_dir = Path(prep_dir)
    t1w_img, t1w = load_t1w(t1w_path)
    dwi_img, data, bvals, bvecs = load_dwi_runs(dwi_paths)
    sources = [bids_uri(p) for p in [t1w_path, *dwi_paths]]
    LOGGER.info("%s: tensor fit on %s (%d volumes)", subject.label, dwi_img.shape[:3], data.shape[-1])
    dwi_mask = dwi_math.dwi_brain_mask(data, bvals)
    fit = dwi_math.fit_tensor(data, bvals, bvecs, dwi_mask)
    world = dwi_math.world_tensor_components(fit, dwi_img.affine)
    lap("load_and_tensor_fit")

    LOGGER.info("%s: rigid b0 → T1w registration", subject.label)
    reg = register_b0_to_t1w(dwi_math.mean_b0(data, bvals), dwi_img.affine, t1w, t1w_img.affine)
    lap("registration")
    shape, affine = t1w.shape, t1w_img.affine
    tensor = tensor_to_t1w(world, dwi_img.affine, reg, shape, affine)
    brain = resample_to_t1w(dwi_mask.astype(np.float32), dwi_img.affine, reg, shape, affine,
                            interpolation="nearest") > 0
    brain &= np.any(tensor != 0, axis=-1)
    tensor[~brain] = 0
    maps = masked_tensor_maps(tensor, brain)
    wm = white_matter_mask(t1w, brain)
    lap("to_t1w_grid_and_maps")

    LOGGER.info("%s: deterministic tensor tractography", subject.label)
    streamlines, track_params = track_tensor(fit.evecs[..., :, 0], np.nan_to_num(fit.fa),
                                             dwi_img.affine, random_seed=random_seed)
    streamlines = list(transform_streamlines(streamlines, reg.dwi_to_t1w))
    tdi = {"tdi": track_density(streamlines, shape, affine),
           "dectdi": directional_density(streamlines, shape, affine)}
    lap("tractography_and_tdi")

    paths = derivative_paths(prep_dir, subject, "tensordet")
    for param, (description, units) in TENSOR_PARAMS.items():
        image = tensor if param == "diffusivity" else maps[param]
        save_nifti(image, affine, paths[param], dtype=np.float32)
        _sidecar(paths[param], f"{description}, measured: WLS tensor fit (dipy) of the DWI, "
                 "brought to the T1w grid with log-Euclidean interpolation and tensor rotation",
                 sources, Units=units, Model="tensor")
    for param, description in TDI_PARAMS.items():
        save_nifti(tdi[param], affine, paths[param])
        _sidecar(paths[param], f"{description}, from the teacher tractogram", sources)
    save_nifti(brain, affine, paths["mask"], dtype=np.uint8)
    _sidecar(paths["mask"], "brain mask (DWI median_otsu mask brought to the T1w)", sources, Type="Brain")
    save_nifti(wm, affine, paths["wm"], dtype=np.uint8)
    _sidecar(paths["wm"], "white matter: brightest of 3 Otsu classes of the T1w in the brain", sources)
    paths["xfm"].parent.mkdir(parents=True, exist_ok=True)
    save_itk_transform(reg, paths["xfm"])
    save_tractogram(streamlines, t1w_img, paths["tractogram"])
    _sidecar(paths["tractogram"], "whole-brain deterministic tensor tractography of the DWI, "
             "streamlines in RASMM of the T1w", sources, **track_params)

    qc = {"subject": subject.label, "participant": subject.participant,
          "session": subject.session or "", "t1w": str(Path(t1w_path).resolve()), "status": "ok",
          **{k: str(p.relative_to(prep_dir)) for k, p in paths.items()},
          "mean_fa_wm": float(maps["fa"][wm].mean()) if wm.any() else float("nan"),
          "mean_fa_brain": float(maps["fa"][brain].mean()),
          "median_md": float(np.median(maps["md"][brain])), "n_streamlines": len(streamlines),
          "registration_cost": reg.cost, "runtime_s": round(time.monotonic() - start, 1),
          "version": __version__}
    lap("writing")
    qc["stage_seconds"] = stages
    save_json(qc, qc_path(prep_dir, subject))
    LOGGER.info("%s: done in %.0f s (%d streamlines)", subject.label, qc["runtime_s"], len(streamlines))
    return qc


def write_manifest(prep_dir: Path, failures: dict[str, str] | None = None) -> Path:
    """Collect every unit's QC JSON (and the failures) into ``manifest.tsv`` and ``manifest.json``."""
    prep_dir = Path(prep_dir)
    rows = [json.loads(p.read_text()) for p in sorted(prep_dir.glob("sub-*/**/*_desc-prepare_qc.json"))]
    done = {row["subject"] for row in rows}
    rows += [{"subject": label, "status": "failed", "error": message}
             for label, message in sorted((failures or {}).items()) if label not in done]
    columns = ["subject", "participant", "session", "t1w", "status", *PATH_COLUMNS, *QC_COLUMNS, "error"]
    tsv = save_tsv(rows, prep_dir / "manifest.tsv", columns, missing="")
    save_json({"pairs": rows}, prep_dir / "manifest.json")
    return tsv
