"""Loading the shipped translators and running them over whole volumes (multi-view 2.5D).

The 2D network runs over every axial, coronal and sagittal slice of the model grid, and of
its left-right mirror image, and the six raw predictions are fused by the phase (multi-view
fusion: no stair-steps between slices) and decoded on the model grid, where the later stages
work; :func:`to_output` brings the maps onto the output grid (by default the T1w's own) once.
The six passes' disagreement gives per-voxel uncertainty maps (:attr:`PhaseSpec.spread`),
multiplied by the scale that ``m2m-train calibrate`` stored with the weights (1 without one).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from m2m_app.data.weights import fa_detail_values, weight_files
from m2m_app.errors import BadDataError, UsageError
from m2m_app.io.derivatives import checked_weight_files
from m2m_app.maths.detail import FaDetail, fa_detail_from
from m2m_app.maths.grid import ConformedGrid, resample_outputs
from m2m_app.maths.tensor import masked_tensor_maps
from m2m_app.models.phases import (
    PhaseSpec,
    batch_slabs,
    get_phase,
    mask_probability,
    mean_of_views,
    phase1_eigen,
    phase1_inputs,
    phase2_inputs,
    spread_support,
)
from m2m_app.models.translator import Translator

log = logging.getLogger(__name__)


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is a usage error."""
    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"device must be auto, cpu or cuda, not {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("device cuda was asked for but no CUDA GPU is available")
    if device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def verify_weights(phase_name: str, weights_dir: str | os.PathLike | None = None) -> tuple[PhaseSpec, dict, Path]:
    """Check the weights of ``phase_name`` in ``weights_dir`` (default: the packaged weights) without loading them.

    :func:`~m2m_app.data.weights.checked_weight_files` (files, metadata, SHA-256), and that the
    weights' channels match the phase. Touches no torch operation, so it is safe in a process
    that later forks workers. Returns the phase spec, the metadata and the weights path.
    """
    spec = get_phase(phase_name)
    meta, weights = checked_weight_files(spec.name, weights_dir)
    if meta["phase"] != spec.metadata():
        meta_path = weight_files(spec.name, weights_dir)[1]
        raise BadDataError(f"{meta_path}: weights were trained for {meta['phase']}, not for {spec.metadata()}")
    return spec, meta, weights


def load_translator(phase_name: str, weights_dir: str | os.PathLike | None = None) -> tuple[Translator, PhaseSpec]:
    """Load the generator of ``phase_name`` from ``weights_dir`` (default: the packaged weights).

    The files are checked first (:func:`verify_weights`). Returns the model in eval mode
    (CPU) and its spec.
    """
    spec, meta, weights = verify_weights(phase_name, weights_dir)
    model = Translator(**meta["architecture"])
    model.load_state_dict(load_file(weights))
    log.info("loaded %s (%s, sha256 %s…)", weights, meta["architecture"], meta["sha256"][:12])
    return model.eval(), spec


def predict_views(
    model: Translator,
    spec: PhaseSpec,
    inputs: np.ndarray,
    device: str = "auto",
    batch_size: int = 16,
    mirror: bool = True,
    axes: tuple[int, ...] = (0, 1, 2),
) -> list[np.ndarray]:
    """Run the 2D net over the slices of ``inputs (C, X, Y, Z)`` along each of ``axes`` (default
    all three: sagittal, coronal and axial slices of the RAS model grid).

    With ``mirror`` the volume is also run mirrored left-right (world x, the model grid's
    first axis) and those outputs are mirrored back, with the sign of each channel fixed by
    :attr:`PhaseSpec.x_flip_signs` (test-time augmentation: the network learnt both
    hemispheres' mirror images, and averaging them lowers its variance at twice the cost).
    Returns the passes' raw outputs, each ``(K, X, Y, Z)`` float32 (logits and log-domain
    values, before :attr:`PhaseSpec.decode`): one view per axis, then their mirrored twins.
    """
    torch_device = resolve_device(device)
    model = model.to(torch_device).eval()
    signs = np.asarray(spec.x_flip_signs, dtype=np.float32).reshape(-1, 1, 1, 1)
    views = []
    with torch.inference_mode():
        for mirrored in (False, True) if mirror else (False,):
            volume = np.ascontiguousarray(inputs[:, ::-1]) if mirrored else inputs
            for axis in axes:
                raw = np.zeros((spec.out_channels,) + inputs.shape[1:], dtype=np.float32)
                size = inputs.shape[1 + axis]
                for first in range(0, size, batch_size):
                    count = min(batch_size, size - first)
                    batch = torch.from_numpy(batch_slabs(volume, axis, first, count, spec.context))
                    out = model(batch.to(torch_device)).float().cpu().numpy()  # (B, K, H, W)
                    np.moveaxis(raw, 1 + axis, 0)[first : first + count] = out  # (size, K, H, W) view
                views.append(raw[:, ::-1] * signs if mirrored else raw)
    return views


def predict_volume(
    model: Translator,
    spec: PhaseSpec,
    inputs: np.ndarray,
    device: str = "auto",
    batch_size: int = 16,
    mirror: bool = True,
) -> np.ndarray:
    """:func:`predict_views` fused by the phase (:attr:`PhaseSpec.fuse`): one raw output ``(K, X, Y, Z)``."""
    return spec.fuse(predict_views(model, spec, inputs, device, batch_size, mirror))


#: Upper bounds of the scaled uncertainty maps: a sign-free angle between two axes never
#: exceeds 90°, so a calibrated V1 dispersion (an expected angle error) is capped there.
SPREAD_CEILING: dict[str, float] = {"v1_dispersion": 90.0}


def spread_maps(
    views: list[np.ndarray],
    fused: np.ndarray,
    spec: PhaseSpec,
    mask: np.ndarray | None = None,
    scales: Mapping[str, float] | None = None,
) -> dict[str, np.ndarray]:
    """The phase's uncertainty maps (:attr:`PhaseSpec.spread`) on the model grid, ``(x, y, z)`` float32 each,
    scaled by :func:`scaled_spread`."""
    return scaled_spread(spec.spread(views, fused), mask, scales)


def scaled_spread(
    maps: Mapping[str, np.ndarray], mask: np.ndarray | None = None, scales: Mapping[str, float] | None = None
) -> dict[str, np.ndarray]:
    """Each uncertainty map clipped at 0, multiplied by ``scales[key]`` (1.0 for a key without a
    scale), capped at :data:`SPREAD_CEILING` and zeroed outside ``mask`` ``(x, y, z)`` when one is given."""
    scales = scales or {}
    out = {}
    for key, volume in maps.items():
        out[key] = np.clip(volume * scales.get(key, 1.0), 0.0, SPREAD_CEILING.get(key)).astype(np.float32)
        if mask is not None:
            out[key][~mask] = 0.0
    return out


def to_output(
    maps: Mapping[str, np.ndarray],
    grid: ConformedGrid,
    support: np.ndarray | None = None,
    resolution_mm: float | None = None,
    fa_shift: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Model-grid ``maps`` on the output grid (:meth:`ConformedGrid.output_grid`), as m2m writes them.

    ``support`` ``(x, y, z)`` bool is where the maps are defined (the brain mask; None: the
    whole model grid); each key is resampled by its rule in :func:`resample_outputs`, with
    ``fa_shift`` (the T1w detail transfer on the output grid) when given.
    """
    resampler = grid.output_resampler(np.ones(grid.shape, bool) if support is None else support, resolution_mm)
    return dict(resample_outputs(maps, resampler, fa_shift))


def predict_phase1_model(
    t1w_img,
    t1w_data: np.ndarray,
    model: Translator | None = None,
    weights_dir: str | os.PathLike | None = None,
    device: str = "auto",
    batch_size: int = 16,
    mask_tensor: bool = True,
    uncertainty: bool = False,
    scales: Mapping[str, float] | None = None,
) -> dict:
    """Diffusion tensors and brain mask predicted from a T1w, on its model grid (where m2m's later stages work).

    Parameters
    ----------
    t1w_img, t1w_data : the T1w image and its data ``(X, Y, Z)`` (see :func:`m2m_app.io.nifti.load_t1w`).
    model : a loaded phase-1 translator; loaded from ``weights_dir`` (default packaged) if None.
    mask_tensor : zero the tensor outside the predicted brain mask (False keeps the tensor
        head's prediction over the whole model grid, e.g. to score it inside another mask).
    uncertainty : also return ``fa_sd`` (SD of the six passes' FA, FA units) and
        ``v1_dispersion`` (RMS angle of the passes' V1 about the fused V1, degrees), ``(x, y, z)``
        float32, zero outside the mask when ``mask_tensor``.
    scales : multiply each uncertainty map by its calibration scale (see
        :func:`uncertainty_scales`); None: as computed.

    Returns ``tensor`` ``(x, y, z, 6)`` float32 (D11 D12 D13 D22 D23 D33, mm²/s, RAS+ world
    frame, positive-definite inside the mask), ``mask`` ``(x, y, z)`` bool (mask probability
    ≥ 0.5) and ``grid`` (the :class:`ConformedGrid`: its ``affine`` places the volumes, its
    source grid is the T1w's).
    """
    if model is None:
        model, _ = load_translator("phase1", weights_dir)
    spec = get_phase("phase1")
    inputs, grid = phase1_inputs(t1w_img, t1w_data)
    views = predict_views(model, spec, inputs, device, batch_size)
    return phase1_from_views(views, grid, mask_tensor, uncertainty, scales)


def phase1_from_views(
    views: list[np.ndarray],
    grid: ConformedGrid,
    mask_tensor: bool = True,
    uncertainty: bool = False,
    scales: Mapping[str, float] | None = None,
) -> dict:
    """Phase 1's passes (raw outputs of :func:`predict_views`, any number of them, each
    ``(7, x, y, z)``) fused and decoded: what :func:`predict_phase1_model` returns (same keys).

    The mask comes first (the mean of the passes' logits); the passes are then decomposed once
    (:func:`~m2m_app.models.phases.phase1_eigen`), only where something is written: inside the
    mask with ``mask_tensor``, grown by the uncertainty's margin with ``uncertainty``; the same
    values as :attr:`PhaseSpec.fuse`, ``decode`` and ``spread`` over the whole grid, within
    float32 rounding (tested).
    """
    mask_logit = mean_of_views([view[6:7] for view in views])[0]
    mask = mask_probability(mask_logit) >= 0.5
    spread_region = spread_support(mask_logit)
    if not mask_tensor:
        support = np.ones(mask.shape, bool)
    else:
        support = spread_region if uncertainty else mask
    eigen = phase1_eigen(views, support)
    tensor = np.zeros(mask.shape + (6,), np.float32)
    tensor[support] = eigen.tensor()
    if mask_tensor:
        tensor[~mask] = 0.0
    out = {"tensor": tensor, "mask": mask, "grid": grid}
    if uncertainty:
        maps = {key: np.zeros(mask.shape, np.float32) for key in ("fa_sd", "v1_dispersion")}
        spread = eigen.at(spread_region[support])  # the support's voxels inside the spread region
        maps["fa_sd"][spread_region] = spread.fa_sd()
        maps["v1_dispersion"][spread_region] = spread.v1_dispersion()
        out |= scaled_spread(maps, mask if mask_tensor else None, scales)
    return out


def predict_phase1(
    t1w_img,
    t1w_data: np.ndarray,
    model: Translator | None = None,
    weights_dir: str | os.PathLike | None = None,
    device: str = "auto",
    batch_size: int = 16,
    mask_tensor: bool = True,
    uncertainty: bool = False,
    scales: Mapping[str, float] | None = None,
    fa_detail: FaDetail | None = None,
) -> dict:
    """Phase 1's maps as m2m writes them, on the T1w's own grid (e.g. to score them).

    :func:`predict_phase1_model` (same parameters), the tensor maps computed on the model
    grid (:func:`~m2m_app.maths.tensor.masked_tensor_maps`, inside the mask, or everywhere
    without ``mask_tensor``), then everything brought to the T1w grid by :func:`to_output`:
    the route of the pipeline's outputs. ``fa_detail``: the T1w detail transfer stored with
    the weights (:func:`load_fa_detail`), as the app applies it; None: none.

    Returns ``tensor`` ``(X, Y, Z, 6)`` mm²/s, ``mask`` ``(X, Y, Z)`` bool, ``fa``, ``md``,
    ``ad``, ``rd`` ``(X, Y, Z)``, ``v1``, ``colfa`` ``(X, Y, Z, 3)``, with ``uncertainty``
    ``fa_sd`` and ``v1_dispersion``, all zero outside the kept voxels, and ``grid``.
    """
    pred = predict_phase1_model(
        t1w_img, t1w_data, model, weights_dir, device, batch_size, mask_tensor, uncertainty, scales
    )
    fa_shift = None
    if fa_detail is not None:
        fa_shift = fa_detail.fa_shift_on(t1w_data, t1w_img.affine, *pred["grid"].output_grid())
    return phase1_to_output(pred, mask_tensor, fa_shift)


def phase1_to_output(pred: dict, mask_tensor: bool = True, fa_shift: np.ndarray | None = None) -> dict:
    """:func:`predict_phase1_model`'s output with the tensor maps (computed on the model grid,
    inside the mask or everywhere without ``mask_tensor``), all on the T1w grid (:func:`to_output`,
    with ``fa_shift`` there), plus ``grid``."""
    pred = dict(pred)
    grid = pred.pop("grid")
    support = pred["mask"] if mask_tensor else np.ones(grid.shape, bool)
    maps = pred | masked_tensor_maps(pred["tensor"], support)
    return to_output(maps, grid, support, fa_shift=fa_shift) | {"grid": grid}


def load_fa_detail(weights_dir: str | os.PathLike | None = None) -> FaDetail | None:
    """The T1w detail transfer stored with the phase-1 weights (None: the weights have none)."""
    return fa_detail_from(fa_detail_values(weights_dir))


def predict_phase2(
    fa: np.ndarray,
    md: np.ndarray,
    colfa: np.ndarray,
    grid: ConformedGrid | None,
    mask: np.ndarray | None = None,
    model: Translator | None = None,
    weights_dir: str | os.PathLike | None = None,
    device: str = "auto",
    batch_size: int = 16,
    uncertainty: bool = False,
    scales: Mapping[str, float] | None = None,
) -> dict:
    """Track density and directional track density from tensor maps.

    Parameters
    ----------
    fa, md, colfa : ``(X, Y, Z)``, ``(X, Y, Z)`` mm²/s and ``(X, Y, Z, 3)``.
    grid : the T1w's :class:`ConformedGrid` when the maps are on the T1w grid (they are resampled
        onto the model grid, and the outputs back by :func:`to_output`); None when they are on
        the model grid already (the pipeline's route: outputs stay there).
    mask : optional brain mask on the maps' grid; every map is zero outside it.
    uncertainty : also return ``tdi_sd``, the SD of the six passes' relative density (the
        TDI's unit), times ``scales["tdi_sd"]`` when given.

    Returns ``tdi`` relative density (1 = the subject's 99th percentile inside the brain;
    multiply by a streamline budget for counts) and ``dectdi`` ``(..., 3)`` mean |direction|
    (x, y, z world axes) in [0, 1], on the maps' grid.
    """
    if model is None:
        model, _ = load_translator("phase2", weights_dir)
    spec = get_phase("phase2")
    views = predict_views(model, spec, phase2_inputs(fa, md, colfa, grid), device, batch_size)
    fused = spec.fuse(views)
    out = spec.decode(fused)
    if uncertainty:
        out |= spread_maps(views, fused, spec, None, scales)
    if grid is not None:
        out = to_output(out, grid)
    if mask is not None:
        for volume in out.values():
            volume[~mask] = 0.0
    return out
