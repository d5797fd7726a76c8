"""What each translator phase reads, predicts and learns; one :class:`PhaseSpec` per phase, with the
NumPy side of each phase: its network inputs, the fusion of the passes, the decoding of the raw
output and the passes' spread (uncertainty).

* ``phase1``: normalised T1w (2.5D) → 6 log-Euclidean tensor components
  ``logm(D / 1e-3 mm²/s)`` + a brain-mask logit.
* ``phase2``: FA, MD / 3e-3 mm²/s, colour FA (2.5D) → ``log1p(TDI / p99)`` + 3 DEC-TDI
  channels (sigmoid). TDI is divided by its 99th percentile inside the brain mask, so the
  model predicts a relative, streamline-count-free density.

Each phase also turns the disagreement of its six passes (three slice orientations × the
left-right mirror image) into per-voxel uncertainty maps (:attr:`PhaseSpec.spread`).

The target encoding is :mod:`m2m_app.models.encoding`, the losses :mod:`m2m_app.models.losses`,
and building training samples from a prep dir :mod:`m2m_app.training.samples`.

Volumes on the model grid are channel-first ``(C, X, Y, Z)``; network tensors are
``(N, C, H, W)`` slices.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy import ndimage

from m2m_app.errors import BadDataError, UsageError
from m2m_app.maths.grid import ConformedGrid, conform_t1w
from m2m_app.maths.metrics import angular_error_deg
from m2m_app.maths.tensor import components_to_matrix, compose_tensors, matrix_to_components, scalar_maps
from m2m_app.models.encoding import LOG_EIGENVALUE_RANGE, eigen_to_tensor, log_to_tensor
from m2m_app.models.losses import phase1_loss, phase2_loss

#: MD is divided by this (mm²/s) to bring it to ~[0, 1] as a phase-2 input.
MD_SCALE = 3e-3
#: Upper bound of the raw log1p relative track density before ``expm1``.
LOG_DENSITY_MAX = 10.0
#: Percentile of the in-mask TDI that is mapped to a relative density of 1.
TDI_PERCENTILE = 99.0
#: Model-grid voxels (2 mm each) by which the fused brain mask is grown before the phase-1
#: uncertainty is computed inside it; it is zero farther out, where no tensor map is written.
SPREAD_MARGIN_VOXELS = 2


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
    masked_outputs : outputs supervised only inside the sample's weight
        (:class:`~m2m_app.training.samples.Sample`).
    intensity_augment : whether the input is an MR intensity image (contrast curve, gamma, bias
        field, noise, thick slices, low resolution) rather than quantitative maps.
    tensor_outputs : indices of the six log-tensor output channels (``D11 D12 D13 D22 D23 D33``
        order), which an in-plane rotation of a training slice must rotate too.
    max_rotation_deg : largest in-plane rotation of the geometric augmentation. Zero where
        inputs or outputs hold sign-free directions (colour FA, DEC-TDI), which no rotation
        maps exactly.
    fuse : the raw outputs of the axial, coronal and sagittal passes (and of their mirrored
        twins), each ``(K, X, Y, Z)`` → one fused raw output ``(K, X, Y, Z)``.
    decode : raw network output on the model grid ``(K, X, Y, Z)`` → named maps.
    spread : ``(views, fused)`` (the passes' raw outputs as for ``fuse``, and the fused one)
        → named uncertainty maps ``(X, Y, Z)`` on the model grid, from the passes' disagreement.
    loss : ``(raw, target, weight) -> {term: scalar}`` on slices; ``"total"`` is optimised
        (:mod:`m2m_app.models.losses`).
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
        return {
            "name": self.name,
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
            "context": self.context,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
        }


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


def batch_slabs(volume: np.ndarray, axis: int, first: int, count: int, context: int) -> np.ndarray:
    """The network inputs of slices ``first .. first + count - 1`` along spatial ``axis`` of ``volume
    (C, X, Y, Z)``: ``(count, C * (2 context + 1), H, W)`` float32, each slice with its
    :func:`neighbours` (channel-major, as :func:`slab_along` stacks them), gathered at once."""
    size = volume.shape[1 + axis]
    planes = np.clip(np.arange(first, first + count)[:, None] + np.arange(-context, context + 1), 0, size - 1)
    gathered = np.moveaxis(np.take(volume, planes.ravel(), axis=1 + axis), 1 + axis, 1)  # (C, count * n, H, W)
    channels, _, height, width = gathered.shape
    slabs = gathered.reshape(channels, count, 2 * context + 1, height, width).transpose(1, 0, 2, 3, 4)
    return np.ascontiguousarray(slabs, dtype=np.float32).reshape(count, -1, height, width)


# ----------------------------------------------------------------------------- phase 1


def phase1_inputs(t1w_img, t1w_data: np.ndarray) -> tuple[np.ndarray, ConformedGrid]:
    """The phase-1 network input ``(1, X, Y, Z)`` (normalised conformed T1w) and its grid."""
    conformed, grid = conform_t1w(t1w_img, t1w_data)
    return conformed[None], grid


def mean_of_views(views: list[np.ndarray]) -> np.ndarray:
    """Voxel-wise mean of the views' raw outputs ``(K, X, Y, Z)``."""
    return (functools.reduce(np.add, views) / len(views)).astype(np.float32)


@dataclass(frozen=True)
class Phase1Eigen:
    """Phase 1's passes decomposed once at the voxels of ``support`` (N of them), for fusion,
    decoding and uncertainty alike.

    ``pass_log_evals`` ``(P, N, 3)`` and ``pass_v1`` ``(P, N, 3)``: each pass's log-eigenvalues
    (ascending) and principal eigenvector; ``log_evals`` ``(N, 3)``: their mean (the fused
    shape); ``evecs`` ``(N, 3, 3)``: the eigenvectors (columns, ascending) of the passes'
    log-Euclidean mean (the fused orientation). The fused log-tensor is ``evecs diag(log_evals)
    evecsᵀ``, so its eigen-decomposition is these, with no second decomposition.
    """

    support: np.ndarray
    pass_log_evals: np.ndarray
    pass_v1: np.ndarray
    log_evals: np.ndarray
    evecs: np.ndarray

    def at(self, voxels: np.ndarray) -> Phase1Eigen:
        """The same at a subset of the support's voxels (``voxels``: ``(N,)`` bool or indices)."""
        return Phase1Eigen(
            self.support,
            self.pass_log_evals[:, voxels],
            self.pass_v1[:, voxels],
            self.log_evals[voxels],
            self.evecs[voxels],
        )

    def log_components(self) -> np.ndarray:
        """The fused log-tensor components ``(N, 6)``."""
        return matrix_to_components(compose_tensors(self.log_evals, self.evecs))

    def tensor(self) -> np.ndarray:
        """The fused tensor ``(N, 6)`` float32 in mm²/s, as :func:`~m2m_app.models.encoding.log_to_tensor`
        decodes the fused log-tensor (eigenvalues clamped to its range)."""
        return eigen_to_tensor(self.log_evals, self.evecs)

    def fa_sd(self) -> np.ndarray:
        """:func:`spread_sd` of the passes' FA ``(N,)``."""
        evals = np.exp(np.clip(self.pass_log_evals, *LOG_EIGENVALUE_RANGE))
        return spread_sd(scalar_maps(evals)["fa"])

    def v1_dispersion(self) -> np.ndarray:
        """:func:`axis_dispersion_deg` of the passes' V1 about the fused V1 ``(N,)``."""
        return axis_dispersion_deg(self.pass_v1, self.evecs[..., :, 2])


def phase1_eigen(views: list[np.ndarray], support: np.ndarray) -> Phase1Eigen:
    """Decompose phase 1's passes (raw outputs ``(7, X, Y, Z)``) at the ``support`` ``(X, Y, Z)`` voxels:
    one eigen-decomposition per pass and one of their log-Euclidean mean (float64)."""
    log_matrices = [components_to_matrix(view[:6, support].T.astype(np.float64)) for view in views]
    pass_log_evals, pass_v1 = [], []
    for matrix in log_matrices:
        evals, evecs = np.linalg.eigh(matrix)  # ascending
        pass_log_evals.append(evals)
        pass_v1.append(evecs[..., :, 2])
    _, evecs = np.linalg.eigh(functools.reduce(np.add, log_matrices) / len(views))
    stacked = np.stack(pass_log_evals)
    return Phase1Eigen(support, stacked, np.stack(pass_v1), stacked.mean(axis=0), evecs)


def _fuse_phase1(views: list[np.ndarray]) -> np.ndarray:
    """Fuse the views' log-tensors keeping their shape: consensus orientation, mean eigenvalues.

    The log-Euclidean mean of tensors that disagree in orientation is less anisotropic than
    any of them. Here the eigenvectors come from the log-Euclidean mean and the eigenvalues
    are the mean of the views' sorted log-eigenvalues (shape and orientation averaged
    separately, as in Collard et al. 2014, "Anisotropy preserving DTI processing", IJCV).
    The mask logit is averaged. (:func:`phase1_eigen` over the whole grid.)
    """
    fused = mean_of_views(views)
    everywhere = np.ones(fused.shape[1:], bool)
    fused[:6] = np.moveaxis(phase1_eigen(views, everywhere).log_components(), -1, 0).reshape(fused[:6].shape)
    return fused


def mask_probability(logit: np.ndarray) -> np.ndarray:
    """Phase 1's brain-mask probability (float64) of its logit (any shape)."""
    return 1.0 / (1.0 + np.exp(-logit.astype(np.float64)))


def _decode_phase1(raw: np.ndarray) -> dict[str, np.ndarray]:
    """``tensor`` (X, Y, Z, 6) positive-definite mm²/s everywhere, ``mask`` probability (X, Y, Z)."""
    return {"tensor": log_to_tensor(np.moveaxis(raw[:6], 0, -1)), "mask": mask_probability(raw[6])}


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


def spread_support(mask_logit: np.ndarray) -> np.ndarray:
    """Where phase 1's uncertainty is computed: the fused brain mask (logit ≥ 0) grown by
    :data:`SPREAD_MARGIN_VOXELS`, ``(X, Y, Z)`` bool."""
    return ndimage.binary_dilation(mask_logit >= 0.0, iterations=SPREAD_MARGIN_VOXELS)


def _spread_phase1(views: list[np.ndarray], fused: np.ndarray) -> dict[str, np.ndarray]:
    """FA SD and V1 dispersion of the passes' log-tensors ``(7, X, Y, Z)``, each ``(X, Y, Z)`` float32.

    ``fa_sd``: :func:`spread_sd` of the FA of each pass's tensor (FA units). ``v1_dispersion``:
    :func:`axis_dispersion_deg` of each pass's principal eigenvector about the fused one
    (degrees). Both inside :func:`spread_support`, zero elsewhere.
    """
    inside = spread_support(fused[6])
    maps = {key: np.zeros(inside.shape, np.float32) for key in ("fa_sd", "v1_dispersion")}
    if inside.any():
        eigen = phase1_eigen(views, inside)
        maps["fa_sd"][inside] = eigen.fa_sd()
        maps["v1_dispersion"][inside] = eigen.v1_dispersion()
    return maps


PHASE1 = PhaseSpec(
    name="phase1",
    inputs=("t1w",),
    outputs=("logD11", "logD12", "logD13", "logD22", "logD23", "logD33", "brainmask"),
    context=2,
    x_flip_signs=(1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0),
    sigmoid_outputs=(False,) * 6 + (True,),
    masked_outputs=(True,) * 6 + (False,),
    intensity_augment=True,
    tensor_outputs=(0, 1, 2, 3, 4, 5),
    max_rotation_deg=12.0,
    fuse=_fuse_phase1,
    decode=_decode_phase1,
    loss=phase1_loss,
    spread=_spread_phase1,
)


# ----------------------------------------------------------------------------- phase 2


def phase2_inputs(fa: np.ndarray, md: np.ndarray, colfa: np.ndarray, grid: ConformedGrid | None) -> np.ndarray:
    """The phase-2 network input ``(5, X, Y, Z)`` on the model grid.

    ``fa`` (X, Y, Z) in [0, 1], ``md`` (X, Y, Z) mm²/s, ``colfa`` (X, Y, Z, 3); channels are
    FA, MD / :data:`MD_SCALE` (clipped to [0, 2]), colour FA, each resampled linearly from the
    source grid of ``grid``, or taken as they are with ``grid=None`` (maps on the model grid).
    """
    scaled = np.concatenate(
        [np.clip(fa, 0, 1)[..., None], np.clip(md / MD_SCALE, 0, 2)[..., None], np.clip(colfa, 0, 1)], axis=-1
    )
    return np.moveaxis(scaled if grid is None else grid.to_model(scaled), -1, 0).astype(np.float32)


def relative_tdi(tdi: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Track density divided by its :data:`TDI_PERCENTILE` th percentile inside ``mask`` (unitless)."""
    reference = np.percentile(tdi[mask], TDI_PERCENTILE) if mask.any() else 0.0
    if reference <= 0:
        raise BadDataError("the track-density map is empty inside the brain mask")
    return (tdi / reference).astype(np.float32)


def _relative_density(log_density: np.ndarray) -> np.ndarray:
    """Raw ``log1p`` relative density → relative density (float32), clipped to ``[0, LOG_DENSITY_MAX]`` first."""
    return np.expm1(np.clip(log_density, 0.0, LOG_DENSITY_MAX)).astype(np.float32)


def _decode_phase2(raw: np.ndarray) -> dict[str, np.ndarray]:
    """``tdi`` (X, Y, Z) relative density (1 = the subject's 99th percentile), ``dectdi`` (X, Y, Z, 3)."""
    return {
        "tdi": _relative_density(raw[0]),
        "dectdi": (1.0 / (1.0 + np.exp(-np.moveaxis(raw[1:4], 0, -1).astype(np.float64)))).astype(np.float32),
    }


def _spread_phase2(views: list[np.ndarray], fused: np.ndarray) -> dict[str, np.ndarray]:
    """``tdi_sd`` ``(X, Y, Z)`` float32: :func:`spread_sd` of each pass's relative density (the TDI's unit)."""
    return {"tdi_sd": spread_sd(np.stack([_relative_density(view[0]) for view in views])).astype(np.float32)}


PHASE2 = PhaseSpec(
    name="phase2",
    inputs=("fa", "md", "colfa_r", "colfa_g", "colfa_b"),
    outputs=("log1p_tdi", "dec_x", "dec_y", "dec_z"),
    context=2,
    x_flip_signs=(1.0,) * 4,
    sigmoid_outputs=(False, True, True, True),
    masked_outputs=(True,) * 4,
    intensity_augment=False,
    tensor_outputs=(),
    max_rotation_deg=0.0,
    fuse=mean_of_views,
    decode=_decode_phase2,
    loss=phase2_loss,
    spread=_spread_phase2,
)

#: All phases by name.
PHASES: dict[str, PhaseSpec] = {spec.name: spec for spec in (PHASE1, PHASE2)}


def get_phase(name: str) -> PhaseSpec:
    """The :class:`PhaseSpec` called ``name``; a clear error for unknown names."""
    if name not in PHASES:
        raise UsageError(f"unknown phase {name!r}; choose one of {', '.join(PHASES)}")
    return PHASES[name]
