"""The log-Euclidean encoding of the phase-1 tensor targets: their unit, the eigenvalue clamp, and
the conversions between tensors and the network's six log components.

Shared by the phase specs (decoding and uncertainty, :mod:`m2m_app.models.phases`), the losses
(FA of a log-tensor, :mod:`m2m_app.models.losses`) and the training samples (encoding the
teacher's tensors, :mod:`m2m_app.training.samples`).
"""

from __future__ import annotations

import numpy as np

from m2m_app.maths.tensor import (
    components_to_matrix,
    compose_tensors,
    eigen_decomposition,
    log_tensors,
    matrix_to_components,
)

#: Diffusivity unit of the log-Euclidean targets, mm²/s (D / DIFFUSIVITY_SCALE is ~0.1–3).
DIFFUSIVITY_SCALE = 1e-3
#: Predicted eigenvalues are clamped to this range, mm²/s (positive-definite and finite in float32).
EIGENVALUE_RANGE = (1e-6, 1e-2)
#: The same range for the eigenvalues of ``logm(D / DIFFUSIVITY_SCALE)``.
LOG_EIGENVALUE_RANGE: tuple[float, float] = (
    float(np.log(EIGENVALUE_RANGE[0] / DIFFUSIVITY_SCALE)),
    float(np.log(EIGENVALUE_RANGE[1] / DIFFUSIVITY_SCALE)),
)


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
    return eigen_to_tensor(*eigen_decomposition(components_to_matrix(log_components.astype(float))))


def eigen_to_tensor(log_evals: np.ndarray, evecs: np.ndarray) -> np.ndarray:
    """The tensors ``(..., 6)`` float32 in mm²/s of a log-tensor's eigenvalues ``(..., 3)`` and
    eigenvectors (columns, ``(..., 3, 3)``; any order, the same for both), eigenvalues clamped to
    :data:`EIGENVALUE_RANGE`: what :func:`log_to_tensor` gives once the log-tensor is decomposed."""
    evals = np.exp(np.clip(log_evals, *LOG_EIGENVALUE_RANGE)) * DIFFUSIVITY_SCALE
    return matrix_to_components(compose_tensors(evals, evecs)).astype(np.float32)
