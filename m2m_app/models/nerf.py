"""A continuous 3D tractography field ("NeRF") fitted to 2D track-density slices.

The field maps a world point (RAS+ mm) to a track density and a sign-free fibre
orientation. It is a dense learned feature grid (``C`` channels at ``1/grid_factor`` of the
input resolution, read with trilinear ``grid_sample``) concatenated with a NeRF positional
encoding of the coordinates, followed by a small MLP with 4 outputs:

* ``softplus(out[0])``: density, in units of the input's robust maximum (``density_scale``);
* ``|out[1:4]|``: the directionally encoded colour, compared with the input's mean
  ``|fibre direction|`` per world axis (R=x, G=y, B=z). The input carries no signs, so the
  signs of ``out[1:4]`` are arbitrary and only the absolute components are meaningful.

Coordinates are normalised per voxel axis to ``[-1, 1]``: voxel index ``i`` of an axis with
``n`` voxels sits at ``2 i / (n - 1) - 1`` (``align_corners=True`` in torch terms).

Training data are the three stacks of slices (axial, coronal, sagittal) of the input
volume. All three stacks index the same voxel grid, so a batch of pixels drawn from random
slices of random axes is a batch of voxels; it is drawn that way, vectorised, with half of it
drawn among voxels that carry tracks so that thin bundles are learnt within the time budget.
Each pixel is jittered within its voxel and its target read trilinearly from the slices, so
the field is also fitted between voxel centres, where tracking and rendering query it
(fitted on voxel centres only, it was off by up to 40 % half-way between them).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from m2m_app.errors import BadDataError, MissingInputError
from m2m_app.io.files import atomic_write
from m2m_app.maths.metrics import psnr

LOGGER = logging.getLogger(__name__)

#: Version of the saved-field format (bumped when the architecture or metadata change).
FORMAT_VERSION = 1
#: Key of the JSON metadata inside the safetensors header.
METADATA_KEY = "m2m_field"
#: Percentile of the non-zero in-mask density used as the density unit.
DENSITY_PERCENTILE = 99.5


@dataclass(frozen=True)
class FieldConfig:
    """Architecture of the field; saved with the weights so that a file rebuilds its network."""

    grid_shape: tuple[int, int, int]
    channels: int = 12
    frequencies: int = 6
    hidden: int = 64

    @property
    def in_features(self) -> int:
        """Width of the MLP input: grid features, raw coordinates, sin and cos of each frequency."""
        return self.channels + 3 + 6 * self.frequencies


class FieldNet(torch.nn.Module):
    """Feature grid + positional encoding + MLP; ``forward`` maps ``(N, 3)`` normalised coordinates.

    Returns the raw ``(N, 4)`` output: density logit, then the signed orientation vector.
    """

    bands: torch.Tensor  # (frequencies,) angular frequencies of the positional encoding, a buffer

    def __init__(self, config: FieldConfig) -> None:
        super().__init__()
        self.config = config
        self.grid = torch.nn.Parameter(0.01 * torch.randn(1, config.channels, *config.grid_shape))
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(config.in_features, config.hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(config.hidden, config.hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(config.hidden, 4),
        )
        self.register_buffer(
            "bands", math.pi * 2.0 ** torch.arange(config.frequencies, dtype=torch.float32), persistent=False
        )

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        n = coords.shape[0]
        # grid_sample wants (x, y, z) = (last, middle, first) axis of the (X, Y, Z) grid.
        features = F.grid_sample(
            self.grid, coords.flip(-1).view(1, n, 1, 1, 3), mode="bilinear", padding_mode="border", align_corners=True
        )
        angles = (coords[:, :, None] * self.bands).flatten(1)
        x = torch.cat([features.view(self.config.channels, n).T, coords, torch.sin(angles), torch.cos(angles)], dim=1)
        return self.mlp(x)


def decode(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Density ``(N,)`` (softplus, >= 0) and colour ``(N, 3)`` (absolute orientation) from raw outputs."""
    return F.softplus(raw[:, 0]), raw[:, 1:].abs()


def normalising_matrix(shape: tuple[int, ...]) -> np.ndarray:
    """``(4, 4)`` map from voxel indices to ``[-1, 1]`` per axis (index 0 → -1, index n-1 → +1)."""
    matrix = np.diag([*(2.0 / np.maximum(np.asarray(shape[:3], dtype=float) - 1, 1)), 1.0])
    matrix[:3, 3] = -1.0
    return matrix


def voxel_to_normalised(ijk: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Map voxel indices ``(N, 3)`` (fractional allowed) to normalised coordinates ``(N, 3)``."""
    matrix = normalising_matrix(shape)
    return np.asarray(ijk) @ matrix[:3, :3].T + matrix[:3, 3]


@dataclass
class FittedField:
    """A fitted field with the geometry of the volume it was fitted to.

    ``affine`` is the ``(4, 4)`` voxel-to-world (RAS+ mm) matrix of a grid of ``shape``;
    densities are returned in units of ``density_scale`` (the input's robust maximum, so
    ~1 in the densest bundles); ``info`` holds the fit report (PSNR in dB, steps, seconds).
    """

    net: FieldNet
    affine: np.ndarray
    shape: tuple[int, int, int]
    density_scale: float
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def bounds(self) -> np.ndarray:
        """``(2, 3)`` world bounding box (min, max corner, mm) of the voxel grid, voxel edges included."""
        edges = np.meshgrid(*[(-0.5, n - 0.5) for n in self.shape], indexing="ij")
        corners = np.stack(edges, axis=-1).reshape(-1, 3)
        world = corners @ self.affine[:3, :3].T + self.affine[:3, 3]
        return np.stack([world.min(0), world.max(0)])

    @cached_property
    def _world_to_normalised(self) -> torch.Tensor:
        """``(4, 4)`` float32 map from world mm to the ``[-1, 1]`` coordinates (built once: the tracker
        queries the field four times per step)."""
        return torch.as_tensor(normalising_matrix(self.shape) @ np.linalg.inv(self.affine), dtype=torch.float32)

    def normalised_coords(self, points_world: np.ndarray) -> torch.Tensor:
        """Map ``(N, 3)`` world points (mm) to the field's ``[-1, 1]`` coordinates, float32 ``(N, 3)``."""
        matrix = self._world_to_normalised
        points = torch.as_tensor(np.asarray(points_world).reshape(-1, 3), dtype=torch.float32)
        return torch.addmm(matrix[:3, 3], points, matrix[:3, :3].T)

    @torch.inference_mode()
    def _evaluate(self, coords: torch.Tensor, chunk: int = 1 << 14) -> tuple[np.ndarray, np.ndarray]:
        """Density ``(N,)`` and colour ``(N, 3)`` at normalised coordinates; 0 outside ``[-1, 1]³``.
        ``chunk`` points at a time: the MLP's ``(chunk, 55)`` input and ``(chunk, 64)`` activations
        then stay in the CPU's cache (the tracker 14 % faster than with 65 536 on sub-01)."""
        self.net.eval()
        device = self.net.grid.device
        densities, colours = [], []
        for start in range(0, coords.shape[0], chunk):
            part = coords[start : start + chunk].to(device)
            density, colour = decode(self.net(part))
            inside = (part.abs() <= 1.0).all(dim=1)
            densities.append((density * inside).cpu().numpy())
            colours.append((colour * inside[:, None]).cpu().numpy())
        if not densities:
            return np.zeros(0, np.float32), np.zeros((0, 3), np.float32)
        return np.concatenate(densities), np.concatenate(colours)

    def query(self, points_world_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Density ``(N,)`` (units of ``density_scale``) and orientation ``(N, 3)`` at world points.

        The orientation is sign-free: the absolute world components (R=x, G=y, B=z) of the
        fibre direction, i.e. the reconstructed directionally encoded colour; its norm drops
        below 1 where the input's directions disperse. Both are 0 outside the voxel grid.
        """
        return self._evaluate(self.normalised_coords(points_world_mm))

    def sample_volume(self, shape: tuple[int, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Evaluate the field on a regular grid spanning the input grid's voxel centres.

        ``shape`` defaults to the input's; another shape resamples the same extent (first and
        last voxel centres kept). Returns density ``shape`` and colour ``shape + (3,)``, float32.
        """
        grid_shape = tuple(self.shape if shape is None else shape)
        axes = [torch.linspace(-1.0, 1.0, n) for n in grid_shape]
        coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
        density, colour = self._evaluate(coords)
        return density.reshape(grid_shape), colour.reshape(grid_shape + (3,))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the weights and JSON metadata (geometry, normalisation, fit report) to a safetensors file."""
        metadata = {
            "version": FORMAT_VERSION,
            "config": asdict(self.net.config),
            "affine": np.asarray(self.affine).tolist(),
            "shape": list(self.shape),
            "density_scale": self.density_scale,
            "info": self.info,
        }
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        header = {METADATA_KEY: json.dumps(metadata)}
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu") -> FittedField:
        """Read a field written by :meth:`save`."""
        if not Path(path).exists():
            raise MissingInputError(f"{path}: field file not found")
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
        if METADATA_KEY not in header:
            raise BadDataError(f"{path}: not an m2m field (no '{METADATA_KEY}' metadata)")
        metadata = json.loads(header[METADATA_KEY])
        if metadata.get("version") != FORMAT_VERSION:
            raise BadDataError(
                f"{path}: field format version {metadata.get('version')}, this m2m reads version {FORMAT_VERSION}"
            )
        config = metadata["config"]
        net = FieldNet(FieldConfig(**{**config, "grid_shape": tuple(config["grid_shape"])}))
        net.load_state_dict(load_file(str(path)))
        return cls(
            net.to(device),
            np.asarray(metadata["affine"], dtype=float),
            tuple(metadata["shape"]),
            float(metadata["density_scale"]),
            metadata["info"],
        )


def _check_inputs(density: np.ndarray, direction: np.ndarray, mask: np.ndarray) -> None:
    if density.ndim != 3 or direction.shape != density.shape + (3,) or mask.shape != density.shape:
        raise BadDataError(
            f"field inputs disagree: density {density.shape}, direction {direction.shape}, "
            f"mask {mask.shape}; expected (X, Y, Z), (X, Y, Z, 3), (X, Y, Z)"
        )
    if not np.any(mask) or not np.any(density[mask] > 0):
        raise BadDataError("the track density is empty inside the mask; nothing to fit")


def _density_unit(density: np.ndarray, mask: np.ndarray) -> float:
    """Robust maximum of the in-mask track density (its ``DENSITY_PERCENTILE`` non-zero percentile)."""
    values = density[mask & (density > 0)]
    return float(np.percentile(values, DENSITY_PERCENTILE))


class _SliceSampler:
    """Vectorised random batches of pixels from random slices of the three stacks (see module doc).

    Pixels are jittered uniformly within their voxel (targets are then read trilinearly), so
    the field is fitted between voxel centres too and stays smooth where it is queried later.
    """

    def __init__(self, shape: tuple[int, int, int], foreground: np.ndarray, rng: np.random.Generator) -> None:
        self.shape = np.asarray(shape)
        self.foreground = np.argwhere(foreground)
        self.rng = rng

    def __call__(self, batch: int) -> np.ndarray:
        """Normalised coordinates ``(batch, 3)``: half uniform over slices and pixels, half in tracks."""
        n_uniform = batch - batch // 2
        axis = self.rng.integers(0, 3, n_uniform)
        ijk = (self.rng.random((n_uniform, 3)) * self.shape).astype(np.int64)  # pixel in the slice plane,
        ijk[np.arange(n_uniform), axis] = self.rng.integers(0, self.shape[axis])  # slice index along `axis`
        ijk = np.concatenate([ijk, self.foreground[self.rng.integers(0, len(self.foreground), batch // 2)]])
        jittered = np.clip(ijk + self.rng.uniform(-0.5, 0.5, ijk.shape), 0, self.shape - 1)
        return voxel_to_normalised(jittered, tuple(self.shape))


def _stalled(history: list[float], patience: int, min_rel_improvement: float) -> bool:
    """True when the best windowed loss of the last ``patience`` windows is no better than before."""
    if len(history) <= patience:
        return False
    best_before = min(history[:-patience])
    return min(history[-patience:]) > best_before * (1.0 - min_rel_improvement)


@dataclass(frozen=True)
class FieldFitSettings:
    """Tunables of :func:`fit_field`; the defaults are the app's (stored in the fit report).

    max_steps : Adam steps at most; the fit stops earlier when the loss, averaged over
        windows of ``check_every`` steps, improved by less than ``min_rel_improvement`` (a
        fraction, 0.01 = 1 %) over the last ``patience`` windows.
    batch_size : pixels (voxels of random slices) per Adam step.
    grid_factor : the feature grid has ``ceil(n / grid_factor)`` points per axis of ``n`` voxels.
    channels, frequencies, hidden : feature-grid channels, positional-encoding frequencies and
        MLP width (see :class:`FieldConfig`).
    learning_rate : Adam step size of the feature grid (the MLP's is half of it).
    psnr_slices : slices per axis, evenly spaced, on which the fit is scored.

    ``max_steps`` is 500: refitted with 500 to 3000 steps (and other grids and batches), the
    app's tractogram agreed with the teacher's equally well (within 0.012 on every measure) on
    a held-out person and on a training person, and the views look the same, while the slice
    PSNR still rises with the steps (docs/benchmarks.md, "What the tractogram needs from the fit").
    """

    max_steps: int = 500
    batch_size: int = 4096
    grid_factor: int = 3
    channels: int = 12
    frequencies: int = 6
    hidden: int = 64
    learning_rate: float = 1e-2
    check_every: int = 50
    patience: int = 4
    min_rel_improvement: float = 0.01
    psnr_slices: int = 8


def fit_field(
    density: np.ndarray,
    direction: np.ndarray,
    mask: np.ndarray,
    affine: np.ndarray,
    settings: FieldFitSettings = FieldFitSettings(),
    *,
    seed: int = 0,
    device: str = "cpu",
    num_threads: int = 1,
) -> FittedField:
    """Fit a field to track-density slices.

    Parameters
    ----------
    density : (X, Y, Z) track density >= 0, any unit (normalised by its robust maximum).
    direction : (X, Y, Z, 3) mean |fibre direction| per world axis, in [0, 1].
    mask : (X, Y, Z) bool brain mask (the PSNR is measured inside it).
    affine : (4, 4) voxel-to-world (RAS+ mm).
    settings : steps, batch, architecture and stopping rule (:class:`FieldFitSettings`).
    seed : seeds torch and the NumPy batch generator; on CPU two fits with the same seed and
        ``num_threads`` give bit-identical weights.
    num_threads : torch CPU threads during the fit (the caller's setting is restored after).
        A step is many small operations: on a 2-core machine shared with other jobs, 2 threads
        took 265 ms per step against 17-40 ms for 1 thread (each parallel region waits for a
        core), so 1 is the default.

    The loss is the mean squared error of the density (in units of the robust maximum) plus
    that of the colour ``|orientation|`` against ``direction``. ``info`` of the result holds
    ``psnr_density_db`` and ``psnr_direction_db`` of the reconstructed slices (their voxels in
    the mask, peak 1) against the inputs, ``steps``, ``seconds``, ``final_loss``, ``seed`` and
    ``settings`` (the :class:`FieldFitSettings` as a dict).
    """
    density = np.asarray(density, dtype=np.float32)
    direction = np.asarray(direction, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    _check_inputs(density, direction, mask)
    unit = _density_unit(density, mask)
    shape = density.shape
    started = time.perf_counter()
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    threads_before = torch.get_num_threads()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_num_threads(num_threads)
    try:
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        config = FieldConfig(
            tuple(math.ceil(n / settings.grid_factor) for n in shape),
            settings.channels,
            settings.frequencies,
            settings.hidden,
        )
        net = FieldNet(config).to(device)
        targets = torch.as_tensor(
            np.concatenate([(density / unit)[..., None], direction], axis=-1), device=device
        ).permute(3, 0, 1, 2)[None]
        steps, final_loss = _optimise(net, targets, _SliceSampler(shape, mask & (density > 0), rng), settings)
    finally:
        torch.use_deterministic_algorithms(deterministic_before)
        torch.set_num_threads(threads_before)
    fitted = FittedField(net, np.asarray(affine, dtype=float), tuple(shape), unit)
    fitted.info = {
        **_slice_psnr(fitted, density / unit, direction, mask, settings.psnr_slices),
        "steps": steps,
        "final_loss": final_loss,
        "seed": seed,
        "settings": asdict(settings),
        "seconds": time.perf_counter() - started,
    }
    LOGGER.info(
        "field fitted in %d steps, %.1f s: PSNR density %.1f dB, direction %.1f dB",
        steps,
        fitted.info["seconds"],
        fitted.info["psnr_density_db"],
        fitted.info["psnr_direction_db"],
    )
    return fitted


def _slice_psnr(
    fitted: FittedField, density: np.ndarray, direction: np.ndarray, mask: np.ndarray, per_axis: int
) -> dict[str, float]:
    """PSNR (dB) of the field on ``per_axis`` evenly spaced slices of each axis, inside the mask."""
    chosen = np.zeros(mask.shape, dtype=bool)
    for axis, n in enumerate(mask.shape):
        index: list[slice | np.ndarray] = [slice(None)] * 3
        index[axis] = np.unique(np.linspace(0, n - 1, per_axis).round().astype(int))
        chosen[tuple(index)] = True
    ijk = np.argwhere(chosen & mask)
    fit_density, fit_colour = fitted._evaluate(
        torch.as_tensor(voxel_to_normalised(ijk, mask.shape), dtype=torch.float32)
    )
    voxels = tuple(ijk.T)
    return {
        "psnr_density_db": psnr(fit_density, density[voxels]),
        "psnr_direction_db": psnr(fit_colour, direction[voxels]),
    }


def _optimise(
    net: FieldNet, targets: torch.Tensor, sampler: _SliceSampler, settings: FieldFitSettings
) -> tuple[int, float]:
    """Adam on random slice-pixel batches until ``settings.max_steps`` or a loss plateau.

    Returns the number of steps taken and the mean loss of the last window.

    ``targets`` is the ``(1, 4, X, Y, Z)`` volume of normalised density and direction.
    """
    optimiser = torch.optim.Adam(
        [
            {"params": [net.grid], "lr": settings.learning_rate},
            {"params": net.mlp.parameters(), "lr": settings.learning_rate / 2},
        ]
    )
    check_every = settings.check_every
    net.train()
    history: list[float] = []
    window = 0.0
    step = 0
    for step in range(1, settings.max_steps + 1):
        coords = torch.as_tensor(sampler(settings.batch_size), dtype=torch.float32, device=targets.device)
        target = (
            F.grid_sample(targets, coords.flip(-1).view(1, -1, 1, 1, 3), mode="bilinear", align_corners=True)
            .view(4, -1)
            .T
        )
        density, colour = decode(net(coords))
        loss = F.mse_loss(density, target[:, 0]) + F.mse_loss(colour, target[:, 1:])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        window += float(loss.detach())
        if step % check_every == 0:
            history.append(window / check_every)
            window = 0.0
            LOGGER.debug("field fit step %d: loss %.5f", step, history[-1])
            if _stalled(history, settings.patience, settings.min_rel_improvement):
                break
    return step, history[-1] if history else float("nan")
