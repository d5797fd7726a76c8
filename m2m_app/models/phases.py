"""What each translator phase reads, predicts and learns; one :class:`PhaseSpec` per phase.

* ``phase1``: normalised T1w (2.5D) → 6 log-Euclidean tensor components
  ``logm(D / 1e-3 mm²/s)`` + a brain-mask logit.
* ``phase2``: FA, MD / 3e-3 mm²/s, colour FA (2.5D) → ``log1p(TDI / p99)`` + 3 DEC-TDI
  channels (sigmoid). TDI is divided by its 99th percentile inside the brain mask, so the
  model predicts a relative, streamline-count-free density.

Each phase also turns the disagreement of its six passes (three slice orientations × the
left-right mirror image) into per-voxel uncertainty maps (:attr:`PhaseSpec.spread`).

Volumes on the model grid are channel-first ``(C, X, Y, Z)``; network tensors are
``(N, C, H, W)`` slices.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from scipy import ndimage
from torch.nn import functional as F

from m2m_app.errors import BadDataError, UsageError
from m2m_app.io.nifti import load_image, load_t1w
from m2m_app.maths.grid import ConformedGrid, conform_t1w, resample_tensor
from m2m_app.maths.metrics import angular_error_deg
from m2m_app.maths.tensor import (components_to_matrix, eigen_decomposition, log_tensors, matrix_to_components,
                                  scalar_maps)

#: Diffusivity unit of the log-Euclidean targets, mm²/s (D / DIFFUSIVITY_SCALE is ~0.1–3).
DIFFUSIVITY_SCALE = 1e-3
#: MD is divided by this (mm²/s) to bring it to ~[0, 1] as a phase-2 input.
MD_SCALE = 3e-3
#: Predicted eigenvalues are clamped to this range, mm²/s (positive-definite and finite in float32).
EIGENVALUE_RANGE = (1e-6, 1e-2)
#: The same range for the eigenvalues of ``logm(D / DIFFUSIVITY_SCALE)``.
LOG_EIGENVALUE_RANGE = tuple(float(np.log(v / DIFFUSIVITY_SCALE)) for v in EIGENVALUE_RANGE)
#: Upper bound of the raw log1p relative track density before ``expm1``.
LOG_DENSITY_MAX = 10.0
#: Weight of each log-tensor component in squared Frobenius norms: off-diagonals appear twice in the matrix.
TENSOR_COMPONENT_WEIGHTS = (1.0, 2.0, 2.0, 1.0, 2.0, 1.0)
#: Anisotropy (deviatoric log-tensor norm) below which a tensor counts as isotropic in the loss.
ANISOTROPY_EPS = 1e-3
#: Where the diagonal components sit in the ``D11 D12 D13 D22 D23 D33`` order.
_DIAGONAL = (1.0, 0.0, 0.0, 1.0, 0.0, 1.0)
#: Weight of the FA-distribution term (1D Wasserstein distance) in the phase-1 loss; 3 was
#: chosen on fold A (docs/training.md): 1 left white-matter FA almost as compressed.
FA_DISTRIBUTION_WEIGHT = 3.0
#: Percentile of the in-mask TDI that is mapped to a relative density of 1.
TDI_PERCENTILE = 99.0
#: Model-grid voxels (2 mm each) by which the fused brain mask is grown before the phase-1
#: uncertainty is computed inside it; it is zero farther out, where no tensor map is written.
SPREAD_MARGIN_VOXELS = 2


@dataclass
class Sample:
    """One subject on the model grid: ``inputs (C, X, Y, Z)``, ``targets (K, X, Y, Z)``, ``weight (X, Y, Z)``.

    ``weight`` is 1 where the masked outputs are supervised (the teacher's brain mask).
    """

    inputs: np.ndarray
    targets: np.ndarray
    weight: np.ndarray
    grid: ConformedGrid


@dataclass(frozen=True)
class PhaseSpec:
    """Everything the dataset, the training loop and inference need to know about one phase.

    Attributes
    ----------
    name : ``phase1`` or ``phase2``; also the stem of the weight files.
    inputs, outputs : channel names of one input slice (before 2.5D stacking) and of the output.
    context : neighbouring slices on each side (2.5D); the network sees
        ``len(inputs) * (2 * context + 1)`` channels, channel-major.
    x_flip_signs : sign of each output channel under a left-right (world x) flip.
    sigmoid_outputs : outputs that are logits (sigmoid gives the map in target space).
    masked_outputs : outputs supervised only inside ``Sample.weight``.
    intensity_augment : whether the input is an MR intensity image (contrast curve, gamma, bias
        field, noise, thick slices, low resolution) rather than quantitative maps.
    tensor_outputs : indices of the six log-tensor output channels (``D11 D12 D13 D22 D23 D33``
        order), which an in-plane rotation of a training slice must rotate too.
    max_rotation_deg : largest in-plane rotation of the geometric augmentation. Zero where
        inputs or outputs hold sign-free directions (colour FA, DEC-TDI), which no rotation
        maps exactly.
    build_sample : ``(row, prep_dir, inputs_dir) -> Sample`` for one manifest row.
    fuse : the raw outputs of the axial, coronal and sagittal passes (and of their mirrored
        twins), each ``(K, X, Y, Z)`` → one fused raw output ``(K, X, Y, Z)``.
    decode : raw network output on the model grid ``(K, X, Y, Z)`` → named maps.
    spread : ``(views, fused)`` (the passes' raw outputs as for ``fuse``, and the fused one)
        → named uncertainty maps ``(X, Y, Z)`` on the model grid, from the passes' disagreement.
    loss : ``(raw, target, weight) -> {term: scalar}`` on slices; ``"total"`` is optimised.
    """

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    context: int
    x_flip_signs: tuple[float, ...]
    sigmoid_outputs: tuple[bool, ...]
    masked_outputs: tuple[bool, ...]
    intensity_augment: bool
    tensor_outputs: tuple[int, ...]
    max_rotation_deg: float
    build_sample: Callable[[dict[str, str], Path, Path | None], Sample]
    fuse: Callable[[list[np.ndarray]], np.ndarray]
    decode: Callable[[np.ndarray], dict[str, np.ndarray]]
    loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]
    spread: Callable[[list[np.ndarray], np.ndarray], dict[str, np.ndarray]]

    @property
    def in_channels(self) -> int:
        """Channels of the network input: every input channel with its 2.5D neighbours."""
        return len(self.inputs) * (2 * self.context + 1)

    @property
    def out_channels(self) -> int:
        """Channels of the raw network output."""
        return len(self.outputs)

    def activate(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw output ``(N, K, H, W)`` → target space (sigmoid on the logit channels)."""
        flags = torch.tensor(self.sigmoid_outputs, device=raw.device).view(1, -1, 1, 1)
        return torch.where(flags, torch.sigmoid(raw), raw)

    def metadata(self) -> dict:
        """JSON-serialisable description stored beside the weights."""
        return {"name": self.name, "inputs": list(self.inputs), "outputs": list(self.outputs),
                "context": self.context, "in_channels": self.in_channels, "out_channels": self.out_channels}


def _load_map(folder: Path, row: dict[str, str], column: str) -> np.ndarray:
    """The image named by ``row[column]`` (relative to ``folder``), float32 data."""
    if not row.get(column):
        raise BadDataError(f"{folder}/manifest.tsv: subject {row.get('subject')} has no '{column}' file")
    return load_image(folder / row[column])[1]


def neighbours(index: int, size: int, context: int) -> np.ndarray:
    """Slice indices ``index - context .. index + context``, clamped to ``[0, size)``."""
    return np.clip(np.arange(index - context, index + context + 1), 0, size - 1)


def slab_along(volume: np.ndarray, axis: int, indices: np.ndarray, flip_x: bool = False) -> np.ndarray:
    """``volume (C, X, Y, Z)`` slices ``indices`` along spatial ``axis`` → ``(C, len(indices), H, W)``.

    ``(H, W)`` are the two other spatial axes in order. ``flip_x`` mirrors the world x
    (left-right) axis first; for sagittal slices that reverses the neighbour order, i.e.
    it yields the mirrored slice of the flipped volume.
    """
    slab = np.take(volume, indices, axis=1 + axis)
    if flip_x:
        slab = slab[:, ::-1]
    return np.moveaxis(slab, 1 + axis, 1)


def _masked_l1(prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean |prediction − target| over voxels with ``weight`` (N, 1, H, W) and channels."""
    error = (prediction - target).abs() * weight
    return error.sum() / (weight.sum() * prediction.shape[1]).clamp(min=1.0)


# ----------------------------------------------------------------------------- phase 1


def phase1_inputs(t1w_img, t1w_data: np.ndarray) -> tuple[np.ndarray, ConformedGrid]:
    """The phase-1 network input ``(1, X, Y, Z)`` (normalised conformed T1w) and its grid."""
    conformed, grid = conform_t1w(t1w_img, t1w_data)
    return conformed[None], grid


def tensor_to_log(components: np.ndarray) -> np.ndarray:
    """``(..., 6)`` tensors in mm²/s → ``(..., 6)`` components of ``logm(D / DIFFUSIVITY_SCALE)``; zeros stay zero."""
    out = np.zeros(components.shape, dtype=np.float32)
    support = np.any(components != 0, axis=-1)
    matrix = components_to_matrix(components[support].astype(float) / DIFFUSIVITY_SCALE)
    out[support] = matrix_to_components(log_tensors(matrix, floor=1e-6 / DIFFUSIVITY_SCALE))
    return out


def log_to_tensor(log_components: np.ndarray) -> np.ndarray:
    """``(..., 6)`` log components (any real values) → positive-definite tensors ``(..., 6)`` in mm²/s.

    The matrix exponential, with eigenvalues clamped to :data:`EIGENVALUE_RANGE`.
    """
    evals, evecs = eigen_decomposition(components_to_matrix(log_components.astype(float)))
    evals = np.exp(np.clip(evals, *LOG_EIGENVALUE_RANGE)) * DIFFUSIVITY_SCALE
    return matrix_to_components(np.einsum("...ij,...j,...kj->...ik", evecs, evals, evecs)).astype(np.float32)


def measured_region(prep_dir: Path, row: dict[str, str], mask: np.ndarray) -> np.ndarray:
    """``mask`` (T1w grid) limited to where the DWI was measured: the teacher's ``fov`` column.

    Prep dirs written before the teacher recorded its field of view have no such column;
    their targets were already zero outside it, so ``mask`` alone is returned.
    """
    return mask & (_load_map(prep_dir, row, "fov") > 0) if row.get("fov") else mask


def _build_phase1(row: dict[str, str], prep_dir: Path, inputs_dir: Path | None) -> Sample:
    inputs, grid = phase1_inputs(*load_t1w(row["t1w"]))
    brain = _load_map(prep_dir, row, "mask") > 0
    mask = grid.to_model(brain.astype(np.float32)) >= 0.5
    measured = grid.to_model(measured_region(prep_dir, row, brain).astype(np.float32)) >= 0.5
    logs = tensor_to_log(resample_tensor(_load_map(prep_dir, row, "diffusivity"), grid))
    # the tensor is taught where it was measured; the brain mask (from the T1w) everywhere
    weight = measured & np.any(logs != 0, axis=-1)
    targets = np.concatenate([np.moveaxis(logs, -1, 0), mask[None]], axis=0).astype(np.float32)
    return Sample(inputs, targets, weight.astype(np.float32), grid)


def mean_of_views(views: list[np.ndarray]) -> np.ndarray:
    """Voxel-wise mean of the views' raw outputs ``(K, X, Y, Z)``."""
    return (sum(views) / len(views)).astype(np.float32)


def _fuse_phase1(views: list[np.ndarray]) -> np.ndarray:
    """Fuse the views' log-tensors keeping their shape: consensus orientation, mean eigenvalues.

    The log-Euclidean mean of tensors that disagree in orientation is less anisotropic than
    any of them. Here the eigenvectors come from the log-Euclidean mean and the eigenvalues
    are the mean of the views' sorted log-eigenvalues (shape and orientation averaged
    separately, as in Collard et al. 2014, "Anisotropy preserving DTI processing", IJCV).
    The mask logit is averaged.
    """
    fused = mean_of_views(views)
    log_matrices = [components_to_matrix(np.moveaxis(v[:6], 0, -1).astype(np.float64)) for v in views]
    evals = sum(np.linalg.eigvalsh(m) for m in log_matrices) / len(views)  # ascending, (X, Y, Z, 3)
    _, evecs = np.linalg.eigh(components_to_matrix(np.moveaxis(fused[:6], 0, -1).astype(np.float64)))
    shaped = np.einsum("...ij,...j,...kj->...ik", evecs, evals, evecs)
    fused[:6] = np.moveaxis(matrix_to_components(shaped), -1, 0)
    return fused


def _decode_phase1(raw: np.ndarray) -> dict[str, np.ndarray]:
    """``tensor`` (X, Y, Z, 6) positive-definite mm²/s everywhere, ``mask`` probability (X, Y, Z)."""
    return {"tensor": log_to_tensor(np.moveaxis(raw[:6], 0, -1)),
            "mask": 1.0 / (1.0 + np.exp(-raw[6].astype(np.float64)))}


def spread_sd(values: np.ndarray) -> np.ndarray:
    """Standard deviation over the passes of ``values (P, ...)`` → ``(...)``, same unit as the values.

    The population SD (root-mean-square deviation from the passes' mean, divided by ``P``).
    """
    return np.std(values, axis=0)


def axis_dispersion_deg(axes: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Root-mean-square angle between each pass's axis and a reference axis, degrees in [0, 90].

    ``axes (P, ..., 3)`` and ``reference (..., 3)`` are non-zero vectors; the angle is sign-free
    (:func:`~m2m_app.maths.metrics.angular_error_deg`), as an eigenvector's sign carries no
    meaning. Returns ``(...)``.
    """
    return np.sqrt(np.mean(angular_error_deg(axes, reference[None]) ** 2, axis=0))


def _spread_phase1(views: list[np.ndarray], fused: np.ndarray) -> dict[str, np.ndarray]:
    """FA SD and V1 dispersion of the passes' log-tensors ``(7, X, Y, Z)``, each ``(X, Y, Z)`` float32.

    ``fa_sd``: :func:`spread_sd` of the FA of each pass's tensor (FA units). ``v1_dispersion``:
    :func:`axis_dispersion_deg` of each pass's principal eigenvector about the fused one
    (degrees). Both inside the fused brain mask grown by :data:`SPREAD_MARGIN_VOXELS`, zero
    elsewhere.
    """
    inside = ndimage.binary_dilation(fused[6] >= 0.0, iterations=SPREAD_MARGIN_VOXELS)
    maps = {key: np.zeros(inside.shape, np.float32) for key in ("fa_sd", "v1_dispersion")}
    if not inside.any():
        return maps

    def eigen(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # log-eigenvalues (M, 3), V1 (M, 3)
        evals, evecs = eigen_decomposition(components_to_matrix(raw[:6, inside].T.astype(np.float64)))
        return evals, evecs[..., 0]

    fas, axes = [], []
    for view in views:
        log_evals, v1 = eigen(view)
        fas.append(scalar_maps(np.exp(np.clip(log_evals, *LOG_EIGENVALUE_RANGE)))["fa"])
        axes.append(v1)
    maps["fa_sd"][inside] = spread_sd(np.stack(fas))
    maps["v1_dispersion"][inside] = axis_dispersion_deg(np.stack(axes), eigen(fused)[1])
    return maps


def _torch_matrix(components: torch.Tensor) -> torch.Tensor:
    """``(M, 6)`` → symmetric ``(M, 3, 3)``."""
    d11, d12, d13, d22, d23, d33 = components.unbind(-1)
    return torch.stack([torch.stack([d11, d12, d13], -1), torch.stack([d12, d22, d23], -1),
                        torch.stack([d13, d23, d33], -1)], -2)


def fa_from_log(log_components: torch.Tensor) -> torch.Tensor:
    """FA ``(M,)`` of ``exp`` of log-tensor components ``(M, 6)``: eigenvalues of the log, exponentiated."""
    evals = torch.linalg.eigvalsh(_torch_matrix(log_components.float())).clamp(*LOG_EIGENVALUE_RANGE).exp()
    deviation = evals - evals.mean(-1, keepdim=True)
    # the small offset keeps the gradient finite for isotropic tensors (FA error < 1e-6)
    return torch.sqrt(1.5 * deviation.pow(2).sum(-1) / evals.pow(2).sum(-1).clamp(min=1e-12) + 1e-12)


def tensor_norm(components: torch.Tensor, eps: float) -> torch.Tensor:
    """Frobenius norm ``(M,)`` of symmetric matrices given as ``(M, 6)`` components, smoothed by ``eps``
    (``sqrt(|A|² + eps²)``, differentiable at 0)."""
    weights = components.new_tensor(TENSOR_COMPONENT_WEIGHTS)
    return torch.sqrt((weights * components.pow(2)).sum(-1) + eps ** 2)


def log_tensor_parts(log_components: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split log-tensors ``(M, 6)`` into size, anisotropy and orientation.

    Returns the mean log-eigenvalue ``(M,)`` (log of the geometric-mean diffusivity), the
    Frobenius norm of the deviatoric part ``(M,)`` (0 for an isotropic tensor, grows with FA)
    and the deviatoric part divided by that norm ``(M, 6)`` (orientation and mode). Needs no
    eigen-decomposition, so its gradients stay finite for isotropic tensors.
    """
    size = (log_components[:, 0] + log_components[:, 3] + log_components[:, 5]) / 3.0
    deviatoric = log_components - size[:, None] * log_components.new_tensor(_DIAGONAL)
    anisotropy = tensor_norm(deviatoric, ANISOTROPY_EPS)
    return size, anisotropy, deviatoric / anisotropy[:, None]


def wasserstein_1d(sample: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """1-Wasserstein distance between two equal-size 1D samples, in their unit.

    ``sample`` and ``reference`` (N,): the mean absolute difference of their sorted values,
    i.e. the area between the two empirical distribution functions. It is zero for any
    permutation of the reference and grows as the sample's range shrinks or shifts.
    """
    return (torch.sort(sample).values - torch.sort(reference).values).abs().mean()


def _loss_phase1(raw: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Tensor size, anisotropy, orientation and FA losses inside the brain; BCE on the mask everywhere.

    Supervising the shape of the tensor apart from its orientation (as :func:`_fuse_phase1`
    fuses them apart) matters: one L1 on the six log components rewards an isotropic
    tensor wherever the orientation is uncertain, which shrinks FA everywhere. Here the
    orientation error (distance between unit deviatoric parts) is weighted by the teacher's
    anisotropy, and the size and anisotropy errors do not depend on the orientation.
    Voxel-wise losses still let the network shrink the FA range towards its mean where the
    T1w is ambiguous, so ``fa_distribution`` compares the batch's FA histogram with the
    teacher's (:func:`wasserstein_1d`, weight :data:`FA_DISTRIBUTION_WEIGHT`).
    """
    mask = F.binary_cross_entropy_with_logits(raw[:, 6], target[:, 6])
    inside = weight[:, 0] > 0
    if not inside.any():
        zero = raw.sum() * 0.0
        return {"size_l1": zero, "anisotropy_l1": zero, "orientation": zero, "fa_l1": zero,
                "fa_distribution": zero, "mask_bce": mask, "total": 0.5 * mask}
    voxels_pred = raw[:, :6].permute(0, 2, 3, 1)[inside]
    voxels_true = target[:, :6].permute(0, 2, 3, 1)[inside]
    size_pred, aniso_pred, unit_pred = log_tensor_parts(voxels_pred)
    size_true, aniso_true, unit_true = log_tensor_parts(voxels_true)
    direction_error = tensor_norm(unit_pred - unit_true, 1e-6)
    fa_pred, fa_true = fa_from_log(voxels_pred), fa_from_log(voxels_true)
    terms = {"size_l1": (size_pred - size_true).abs().mean(),
             "anisotropy_l1": (aniso_pred - aniso_true).abs().mean(),
             "orientation": (aniso_true * direction_error).mean() / aniso_true.mean().clamp(min=1e-6),
             "fa_l1": (fa_pred - fa_true).abs().mean()}
    distribution = wasserstein_1d(fa_pred, fa_true)
    return {**terms, "fa_distribution": distribution, "mask_bce": mask,
            "total": sum(terms.values()) + FA_DISTRIBUTION_WEIGHT * distribution + 0.5 * mask}


PHASE1 = PhaseSpec(
    name="phase1", inputs=("t1w",),
    outputs=("logD11", "logD12", "logD13", "logD22", "logD23", "logD33", "brainmask"), context=2,
    x_flip_signs=(1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0),
    sigmoid_outputs=(False,) * 6 + (True,), masked_outputs=(True,) * 6 + (False,),
    intensity_augment=True, tensor_outputs=(0, 1, 2, 3, 4, 5), max_rotation_deg=12.0,
    build_sample=_build_phase1, fuse=_fuse_phase1, decode=_decode_phase1, loss=_loss_phase1,
    spread=_spread_phase1)


# ----------------------------------------------------------------------------- phase 2


def phase2_inputs(fa: np.ndarray, md: np.ndarray, colfa: np.ndarray, grid: ConformedGrid) -> np.ndarray:
    """The phase-2 network input ``(5, X, Y, Z)`` on the model grid from source-grid maps.

    ``fa`` (X, Y, Z) in [0, 1], ``md`` (X, Y, Z) mm²/s, ``colfa`` (X, Y, Z, 3); channels are
    FA, MD / :data:`MD_SCALE` (clipped to [0, 2]), colour FA, each resampled linearly.
    """
    scaled = np.concatenate([np.clip(fa, 0, 1)[..., None], np.clip(md / MD_SCALE, 0, 2)[..., None],
                             np.clip(colfa, 0, 1)], axis=-1)
    return np.moveaxis(grid.to_model(scaled), -1, 0).astype(np.float32)


def relative_tdi(tdi: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Track density divided by its :data:`TDI_PERCENTILE` th percentile inside ``mask`` (unitless)."""
    reference = np.percentile(tdi[mask], TDI_PERCENTILE) if mask.any() else 0.0
    if reference <= 0:
        raise BadDataError("the track-density map is empty inside the brain mask")
    return (tdi / reference).astype(np.float32)


def _build_phase2(row: dict[str, str], prep_dir: Path, inputs_dir: Path | None) -> Sample:
    _, grid = phase1_inputs(*load_t1w(row["t1w"]))
    source = inputs_dir or prep_dir
    inputs = phase2_inputs(*(_load_map(source, row, c) for c in ("fa", "md", "colfa")), grid)
    mask = _load_map(prep_dir, row, "mask") > 0
    measured = measured_region(prep_dir, row, mask)
    tdi = relative_tdi(_load_map(prep_dir, row, "tdi"), measured)
    targets = grid.to_model(np.concatenate([np.log1p(tdi)[..., None], _load_map(prep_dir, row, "dectdi")], -1))
    weight = grid.to_model(measured.astype(np.float32)) >= 0.5
    return Sample(inputs, np.moveaxis(targets, -1, 0).astype(np.float32), weight.astype(np.float32), grid)


def _relative_density(log_density: np.ndarray) -> np.ndarray:
    """Raw ``log1p`` relative density → relative density (float32), clipped to ``[0, LOG_DENSITY_MAX]`` first."""
    return np.expm1(np.clip(log_density, 0.0, LOG_DENSITY_MAX)).astype(np.float32)


def _decode_phase2(raw: np.ndarray) -> dict[str, np.ndarray]:
    """``tdi`` (X, Y, Z) relative density (1 = the subject's 99th percentile), ``dectdi`` (X, Y, Z, 3)."""
    return {"tdi": _relative_density(raw[0]),
            "dectdi": (1.0 / (1.0 + np.exp(-np.moveaxis(raw[1:4], 0, -1).astype(np.float64)))).astype(np.float32)}


def _spread_phase2(views: list[np.ndarray], fused: np.ndarray) -> dict[str, np.ndarray]:
    """``tdi_sd`` ``(X, Y, Z)`` float32: :func:`spread_sd` of each pass's relative density (the TDI's unit)."""
    return {"tdi_sd": spread_sd(np.stack([_relative_density(view[0]) for view in views])).astype(np.float32)}


def _loss_phase2(raw: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """L1 on log1p relative density and on DEC-TDI (after sigmoid), inside the brain."""
    density = _masked_l1(raw[:, :1], target[:, :1], weight)
    direction = _masked_l1(torch.sigmoid(raw[:, 1:4]), target[:, 1:4], weight)
    return {"tdi_l1": density, "dec_l1": direction, "total": density + direction}


PHASE2 = PhaseSpec(
    name="phase2", inputs=("fa", "md", "colfa_r", "colfa_g", "colfa_b"),
    outputs=("log1p_tdi", "dec_x", "dec_y", "dec_z"), context=2, x_flip_signs=(1.0,) * 4,
    sigmoid_outputs=(False, True, True, True), masked_outputs=(True,) * 4,
    intensity_augment=False, tensor_outputs=(), max_rotation_deg=0.0,
    build_sample=_build_phase2, fuse=mean_of_views, decode=_decode_phase2, loss=_loss_phase2,
    spread=_spread_phase2)

#: All phases by name.
PHASES: dict[str, PhaseSpec] = {spec.name: spec for spec in (PHASE1, PHASE2)}


def get_phase(name: str) -> PhaseSpec:
    """The :class:`PhaseSpec` called ``name``; a clear error for unknown names."""
    if name not in PHASES:
        raise UsageError(f"unknown phase {name!r}; choose one of {', '.join(PHASES)}")
    return PHASES[name]
