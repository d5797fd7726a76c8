"""The translators' training losses (torch), one per phase: ``(raw, target, weight) -> {term: scalar}``
on slices ``(N, K, H, W)``, ``weight (N, 1, H, W)``; the ``"total"`` term is optimised.

Phase 1 supervises the size, anisotropy and orientation of the log-tensor apart, its FA and the
FA distribution of the batch, and the brain mask; phase 2 the relative track density and the
DEC-TDI. :class:`~m2m_app.models.phases.PhaseSpec` holds each phase's loss.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from m2m_app.models.encoding import LOG_EIGENVALUE_RANGE

#: Weight of each log-tensor component in squared Frobenius norms: off-diagonals appear twice in the matrix.
TENSOR_COMPONENT_WEIGHTS = (1.0, 2.0, 2.0, 1.0, 2.0, 1.0)
#: Anisotropy (deviatoric log-tensor norm) below which a tensor counts as isotropic in the loss.
ANISOTROPY_EPS = 1e-3
#: Where the diagonal components sit in the ``D11 D12 D13 D22 D23 D33`` order.
_DIAGONAL = (1.0, 0.0, 0.0, 1.0, 0.0, 1.0)
#: Weight of the FA-distribution term (1D Wasserstein distance) in the phase-1 loss; 3 was
#: chosen on fold A (docs/training.md): 1 left white-matter FA almost as compressed.
FA_DISTRIBUTION_WEIGHT = 3.0


def _masked_l1(prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean |prediction − target| over voxels with ``weight`` (N, 1, H, W) and channels."""
    error = (prediction - target).abs() * weight
    return error.sum() / (weight.sum() * prediction.shape[1]).clamp(min=1.0)


def _torch_matrix(components: torch.Tensor) -> torch.Tensor:
    """``(M, 6)`` → symmetric ``(M, 3, 3)``."""
    d11, d12, d13, d22, d23, d33 = components.unbind(-1)
    return torch.stack(
        [torch.stack([d11, d12, d13], -1), torch.stack([d12, d22, d23], -1), torch.stack([d13, d23, d33], -1)], -2
    )


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
    return torch.sqrt((weights * components.pow(2)).sum(-1) + eps**2)


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


def phase1_loss(raw: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Tensor size, anisotropy, orientation and FA losses inside the brain; BCE on the mask everywhere.

    Supervising the shape of the tensor apart from its orientation (as the phase-1 view fusion
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
        return {
            "size_l1": zero,
            "anisotropy_l1": zero,
            "orientation": zero,
            "fa_l1": zero,
            "fa_distribution": zero,
            "mask_bce": mask,
            "total": 0.5 * mask,
        }
    voxels_pred = raw[:, :6].permute(0, 2, 3, 1)[inside]
    voxels_true = target[:, :6].permute(0, 2, 3, 1)[inside]
    size_pred, aniso_pred, unit_pred = log_tensor_parts(voxels_pred)
    size_true, aniso_true, unit_true = log_tensor_parts(voxels_true)
    direction_error = tensor_norm(unit_pred - unit_true, 1e-6)
    fa_pred, fa_true = fa_from_log(voxels_pred), fa_from_log(voxels_true)
    terms = {
        "size_l1": (size_pred - size_true).abs().mean(),
        "anisotropy_l1": (aniso_pred - aniso_true).abs().mean(),
        "orientation": (aniso_true * direction_error).mean() / aniso_true.mean().clamp(min=1e-6),
        "fa_l1": (fa_pred - fa_true).abs().mean(),
    }
    distribution = wasserstein_1d(fa_pred, fa_true)
    return {
        **terms,
        "fa_distribution": distribution,
        "mask_bce": mask,
        "total": sum(terms.values()) + FA_DISTRIBUTION_WEIGHT * distribution + 0.5 * mask,
    }


def phase2_loss(raw: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """L1 on log1p relative density and on DEC-TDI (after sigmoid), inside the brain."""
    density = _masked_l1(raw[:, :1], target[:, :1], weight)
    direction = _masked_l1(torch.sigmoid(raw[:, 1:4]), target[:, 1:4], weight)
    return {"tdi_l1": density, "dec_l1": direction, "total": density + direction}
