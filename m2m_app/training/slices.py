"""A torch Dataset of 2.5D slices along all three axes of conformed training subjects.

Each training source (a manifest row, with the folder its inputs come from) is conformed
once by :func:`~m2m_app.training.samples.build_sample` and cached on disk as one ``.npy`` array
``(C + K + 1, X, Y, Z)`` (inputs, targets, weight), memory-mapped afterwards.

Phase-2 inputs from phase-1 predictions
---------------------------------------
Give ``predicted_inputs``: a folder holding phase 1's predicted ``fa``, ``md`` and
``colfa`` for the training subjects under the *same relative paths* as in the prep dir's
``manifest.tsv`` (e.g. ``<predicted_inputs>/sub-01/dwi/sub-01_model-tensor_param-fa_dwimap.nii.gz``
when the manifest says ``sub-01/dwi/sub-01_model-tensor_param-fa_dwimap.nii.gz``).
Every subject that has all three predicted maps is then used twice: once with the
teacher's maps as input and once with the predicted ones; targets are always the teacher's.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset

from m2m_app.io.files import atomic_write
from m2m_app.maths.grid import MODEL_SHAPE, MODEL_VOXEL_MM, STRIPPED_MARGIN_MM, brain_extraction_mask, intensity_range
from m2m_app.maths.tensor import components_to_matrix, matrix_to_components, rotate_tensors
from m2m_app.models.phases import PhaseSpec, neighbours, slab_along
from m2m_app.training.samples import build_sample

log = logging.getLogger(__name__)

#: Slices are zero-padded to this square size so that all three views batch together.
SLICE_SIZE = max(MODEL_SHAPE)
#: A slice is used for training if its weight map has at least this many voxels.
MIN_SLICE_VOXELS = 16
#: Probabilities of each augmentation.
P_FLIP, P_GAMMA, P_BIAS, P_NOISE, P_THICK, P_LOWRES, P_AFFINE, P_REMAP = 0.5, 0.8, 0.5, 0.5, 0.3, 0.2, 0.6, 0.5
#: Inner knots of the random monotonic intensity curve (besides 0 → 0 and 1 → 1).
REMAP_KNOTS = 4
#: Standard deviation of the contrast curve's interior knots around the identity (normalised intensity).
REMAP_SD = 0.08
#: In-plane scale range and largest shift (pixels) of the geometric augmentation.
SCALE_RANGE, MAX_SHIFT = (0.9, 1.1), 4.0
#: Probability of an elastic deformation within a geometric augmentation (when enabled) and
#: the Gaussian sigma (pixels) that smooths its random displacement field.
P_ELASTIC, ELASTIC_SMOOTHING = 0.5, 8.0
#: Largest margin (mm) kept around the brain by the skull-stripping augmentation (drawn from
#: 0 to this, as tight and loose brain-extraction tools differ).
STRIP_MAX_MARGIN_MM = 6.0
#: Range of the Gaussian sigma (pixels) of the low-resolution augmentation.
LOWRES_SIGMA = (0.5, 1.5)
#: The two in-plane spatial axes (of X, Y, Z) of a slice taken along each axis.
IN_PLANE_AXES = {0: (1, 2), 1: (0, 2), 2: (0, 1)}


@dataclass(frozen=True)
class Source:
    """One training unit: a manifest row, its prep dir, and where its inputs come from (None: the prep dir)."""

    row: dict
    prep_dir: Path
    inputs_dir: Path | None = None

    @property
    def key(self) -> str:
        """A file-name-safe cache key, unique for the phase inputs' provenance."""
        provenance = json.dumps([str(self.prep_dir), str(self.inputs_dir), sorted(self.row.items())])
        tag = "predicted" if self.inputs_dir else "teacher"
        return f"{self.row['subject']}_{tag}_{hashlib.sha1(provenance.encode()).hexdigest()[:10]}"


def training_sources(rows: list[tuple[dict, Path]], predicted_inputs: Path | None) -> list[Source]:
    """Teacher-input sources for every ``(row, prep_dir)``, plus predicted-input ones where all maps exist."""
    sources = [Source(row, Path(prep)) for row, prep in rows]
    if predicted_inputs is None:
        return sources
    folder = Path(predicted_inputs)
    for row, prep in rows:
        if all(row.get(c) and (folder / row[c]).exists() for c in ("fa", "md", "colfa")):
            sources.append(Source(row, Path(prep), folder))
        else:
            log.warning("%s: no predicted fa/md/colfa under %s; teacher inputs only", row["subject"], folder)
    return sources


def cache_sample(spec: PhaseSpec, source: Source, cache_dir: Path) -> Path:
    """Conform ``source`` with :func:`~m2m_app.training.samples.build_sample` into ``cache_dir`` (once);
    returns the ``.npy`` path."""
    path = Path(cache_dir) / f"{spec.name}_{source.key}.npy"
    if not path.exists():
        sample = build_sample(spec, source.row, source.prep_dir, source.inputs_dir)
        stacked = np.concatenate([sample.inputs, sample.targets, sample.weight[None]]).astype(np.float32)
        atomic_write(path, lambda tmp: np.save(tmp, stacked))
    return path


def _thick_slices(slab: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Simulate thick or anisotropic slices along one random axis of ``slab (C, D, H, W)``."""
    axis = int(rng.integers(1, 4))
    factor = int(rng.integers(2, 4))
    if axis == 1:
        return ndimage.uniform_filter1d(slab, 3, axis=1, mode="nearest")
    blurred = ndimage.uniform_filter1d(slab, factor, axis=axis, mode="nearest")
    size = slab.shape[axis]
    return np.take(blurred, np.minimum((np.arange(size) // factor) * factor + factor // 2, size - 1), axis=axis)


def _bias_field(shape: tuple[int, int], rng: np.random.Generator, strength: float = 0.25) -> np.ndarray:
    """A smooth multiplicative field ``(H, W)`` around 1 (a 4×4 random grid, cubic-upsampled, exponentiated)."""
    coarse = rng.normal(0.0, strength, (4, 4))
    return np.exp(ndimage.zoom(coarse, (shape[0] / 4, shape[1] / 4), order=3, mode="nearest"))[: shape[0], : shape[1]]


def random_monotonic_curve(slab: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Map [0, 1] intensities through a random increasing piecewise-linear curve near the identity.

    The T1 ordering of tissues is kept while their relative contrast changes, as between
    sequences (MPRAGE, FLASH, SPGR) and scanners: domain randomisation in the spirit of
    SynthSeg (Billot et al. 2023), restricted to monotonic curves whose interior knots move
    by :data:`REMAP_SD` (a normalised intensity still roughly means the same tissue; fully
    random curves erased what transfers between T1w sequences).
    """
    knots = np.linspace(0.0, 1.0, REMAP_KNOTS + 2)
    interior = np.sort(np.clip(knots[1:-1] + rng.normal(0.0, REMAP_SD, REMAP_KNOTS), 0.0, 1.0))
    return np.interp(slab, knots, np.concatenate([[0.0], interior, [1.0]])).astype(slab.dtype)


def stripped_intensity_ranges(inputs: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """``(C, 2)``: per channel of normalised ``inputs (C, X, Y, Z)``, the intensities that
    :func:`~m2m_app.maths.grid.normalise_intensity` would map to 0 and 1 had the volume
    been skull-stripped (zeroed outside ``brain (X, Y, Z)`` grown by
    :data:`~m2m_app.maths.grid.STRIPPED_MARGIN_MM`)."""
    keep = brain_extraction_mask(brain, STRIPPED_MARGIN_MM, (MODEL_VOXEL_MM,) * 3)
    return np.array([intensity_range(np.where(keep, channel, 0.0)) for channel in inputs], dtype=np.float32)


def skull_strip(slab: np.ndarray, brain: np.ndarray, margin_mm: float, ranges: np.ndarray) -> np.ndarray:
    """Simulate a brain-extracted image on a [0, 1] MR slab ``(C, D, H, W)``.

    Each plane is zeroed outside its ``brain (D, H, W)`` mask grown by ``margin_mm`` (holes
    filled), and each channel's intensities are re-mapped from ``ranges (C, 2)`` (see
    :func:`stripped_intensity_ranges`) to [0, 1]: the normalisation a stripped input gets at
    inference, where the scalp's bright fat no longer sets the top of the range.
    """
    keep = np.stack([brain_extraction_mask(plane, margin_mm, (MODEL_VOXEL_MM,) * 2) for plane in brain])
    low, high = (ranges[:, i, None, None, None] for i in (0, 1))
    remapped = np.clip((slab - low) / np.maximum(high - low, 1e-6), 0.0, 1.0)
    return np.where(keep, remapped, 0.0).astype(slab.dtype)


def augment_intensity(slab: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Thick-slice and low-resolution degradation, random contrast curve, bias field, gamma and
    Gaussian noise on a [0, 1] MR slab ``(C, D, H, W)``."""
    if rng.random() < P_REMAP:
        slab = random_monotonic_curve(np.clip(slab, 0.0, 1.0), rng)
    if rng.random() < P_THICK:
        slab = _thick_slices(slab, rng)
    if rng.random() < P_LOWRES:
        slab = ndimage.gaussian_filter(slab, (0, 0) + (rng.uniform(*LOWRES_SIGMA),) * 2, mode="nearest")
    if rng.random() < P_BIAS:
        slab = slab * _bias_field(slab.shape[-2:], rng)
    if rng.random() < P_GAMMA:
        slab = np.clip(slab, 0.0, None) ** np.exp(rng.normal(0.0, 0.25))
    if rng.random() < P_NOISE:
        slab = slab + rng.normal(0.0, rng.uniform(0.0, 0.03), slab.shape)
    return np.clip(slab, 0.0, 1.5)


def _warp(
    planes: np.ndarray, order: int, matrix: np.ndarray, offset: np.ndarray, coordinates: np.ndarray | None = None
) -> np.ndarray:
    """Resample every ``(H, W)`` plane of ``planes (..., H, W)`` (zero outside).

    Output pixel ``p`` reads input ``matrix p + offset``, or ``coordinates[:, p]`` (``(2, H, W)``) if given.
    """
    flat = planes.reshape((-1,) + planes.shape[-2:])
    if coordinates is None:
        warped = [
            ndimage.affine_transform(plane, matrix, offset, order=order, mode="constant", cval=0.0) for plane in flat
        ]
    else:
        warped = [ndimage.map_coordinates(plane, coordinates, order=order, mode="constant", cval=0.0) for plane in flat]
    return np.stack(warped).reshape(planes.shape)


def elastic_displacement(shape: tuple[int, int], amplitude: float, rng: np.random.Generator) -> np.ndarray:
    """A smooth random displacement field ``(2, H, W)`` in pixels whose largest length is ``amplitude``.

    White noise smoothed by a Gaussian of :data:`ELASTIC_SMOOTHING` pixels: with amplitudes of a
    few pixels its gradients stay far below 1, so the deformation never folds.
    """
    field = np.stack(
        [ndimage.gaussian_filter(rng.standard_normal(shape), ELASTIC_SMOOTHING, mode="reflect") for _ in range(2)]
    )
    peak = np.sqrt((field**2).sum(axis=0)).max()
    return field * (amplitude / peak) if peak > 0 else field


def content_rotation_angles(displacement: np.ndarray) -> np.ndarray:
    """Angle (radians, ``(H, W)``) by which the image content turns at each pixel when output
    pixel ``p`` reads input ``p + displacement[:, p]``.

    The warp's Jacobian (input w.r.t. output) is ``A = I + ∇d``; the content moves by ``A⁻¹``,
    whose rotation (polar decomposition) is the inverse of ``A``'s, and the rotation of a 2×2
    matrix ``[[a, b], [c, d]]`` (positive determinant) has angle ``atan2(c − b, a + d)``.
    """
    (d00, d01), (d10, d11) = (np.gradient(component) for component in displacement)
    return -np.arctan2(d10 - d01, 2.0 + d00 + d11)


def rotate_log_tensors(target: np.ndarray, channels: tuple[int, ...], rotation: np.ndarray) -> np.ndarray:
    """Rotate the log-tensor channels ``channels`` of ``target (K, H, W)`` by ``rotation``: ``R L Rᵀ``.

    ``rotation``: one ``(3, 3)`` rotation, or one per pixel ``(H, W, 3, 3)``. The matrix
    logarithm commutes with rotations, so rotating ``log D`` is rotating ``D``.
    """
    out = target.copy()
    logs = np.moveaxis(target[list(channels)], 0, -1)
    out[list(channels)] = np.moveaxis(matrix_to_components(rotate_tensors(components_to_matrix(logs), rotation)), -1, 0)
    return out


def in_plane_rotations(angle: float | np.ndarray, axis: int) -> np.ndarray:
    """Rotations ``(..., 3, 3)`` by ``angle`` (radians, scalar or any shape) in the slice plane
    of a slice taken along ``axis``, i.e. about world axis ``axis`` of the RAS+ model grid."""
    angle = np.asarray(angle, dtype=np.float64)
    rotation = np.broadcast_to(np.eye(3), angle.shape + (3, 3)).copy()
    first, second = IN_PLANE_AXES[axis]
    rotation[..., first, first], rotation[..., first, second] = np.cos(angle), -np.sin(angle)
    rotation[..., second, first], rotation[..., second, second] = np.sin(angle), np.cos(angle)
    return rotation


def augment_geometry(
    slab: np.ndarray,
    target: np.ndarray,
    weight: np.ndarray,
    axis: int,
    spec: PhaseSpec,
    rng: np.random.Generator,
    elastic_px: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A random in-plane scale, shift, (up to ``spec.max_rotation_deg``) rotation and, with
    ``elastic_px`` > 0, sometimes a smooth elastic deformation of one training slice.

    ``slab (C, D, H, W)`` and ``target (K, H, W)`` are resampled linearly, ``weight (1, H, W)``
    by nearest neighbour, once for both deformations. The content rotates by ``θ`` in the
    ``(H, W)`` plane, i.e. about world axis ``axis`` of the RAS+ model grid, and the phase's
    log-tensor outputs rotate with it; under the elastic deformation each pixel's tensor
    turns with the local rotation of the content (largest displacement up to ``elastic_px`` pixels).
    """
    theta = np.radians(rng.uniform(-spec.max_rotation_deg, spec.max_rotation_deg))
    content = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    matrix = np.linalg.inv(content) / rng.uniform(*SCALE_RANGE)  # output pixel -> input pixel
    centre = (np.array(slab.shape[-2:]) - 1) / 2.0
    offset = centre - matrix @ centre + rng.uniform(-MAX_SHIFT, MAX_SHIFT, 2)
    coordinates, angle = None, theta
    if elastic_px > 0 and rng.random() < P_ELASTIC:
        displacement = elastic_displacement(slab.shape[-2:], rng.uniform(0.0, elastic_px), rng)
        pixels = np.indices(slab.shape[-2:], dtype=np.float64) + displacement
        coordinates = np.einsum("ij,j...->i...", matrix, pixels) + offset[:, None, None]
        angle = theta + content_rotation_angles(displacement)
    slab, target = (_warp(planes, 1, matrix, offset, coordinates) for planes in (slab, target))
    weight = _warp(weight, 0, matrix, offset, coordinates)
    if spec.tensor_outputs and np.any(angle):
        target = rotate_log_tensors(target, spec.tensor_outputs, in_plane_rotations(angle, axis))
    return slab, target, weight


def _pad(array: np.ndarray) -> np.ndarray:
    """Zero-pad the last two axes to ``SLICE_SIZE``."""
    pad = [(0, 0)] * (array.ndim - 2) + [(0, SLICE_SIZE - array.shape[-2]), (0, SLICE_SIZE - array.shape[-1])]
    return np.pad(array, pad)


class SliceDataset(Dataset):
    """2.5D slices along the three axes of every cached source, with their targets and weights.

    Item: ``{"input": (spec.in_channels, S, S), "target": (K, S, S), "weight": (1, S, S)}``
    float32 tensors, ``S`` = :data:`SLICE_SIZE`. Augmentations are drawn from a generator
    seeded by (seed, epoch, index), so an epoch is reproducible and resumable.
    With ``skull_strip_prob`` > 0 (MR-intensity inputs only), that fraction of slices is
    skull-stripped (:func:`skull_strip`, with the weight map as the brain mask); 0 draws
    nothing more, so the other augmentations stay as they were.
    """

    def __init__(
        self,
        spec: PhaseSpec,
        cache_files: list[Path],
        augment: bool = True,
        seed: int = 0,
        elastic_px: float = 0.0,
        skull_strip_prob: float = 0.0,
    ) -> None:
        self.spec, self.files, self.augment, self.seed = spec, list(cache_files), augment, seed
        self.elastic_px = elastic_px
        self.skull_strip_prob = skull_strip_prob if augment and spec.intensity_augment else 0.0
        self.epoch = 0
        self.index: list[tuple[int, int, int]] = []
        self.stripped_ranges: list[np.ndarray] = []
        n_in = len(spec.inputs)
        for number in range(len(self.files)):
            volume = self._volume(number)
            weight = volume[-1]
            if self.skull_strip_prob:
                self.stripped_ranges.append(stripped_intensity_ranges(volume[:n_in], weight > 0))
            for axis in range(3):
                counts = (weight > 0).sum(axis=tuple(a for a in range(3) if a != axis))
                self.index += [(number, axis, int(k)) for k in np.flatnonzero(counts >= MIN_SLICE_VOXELS)]
        log.info("%s: %d slices from %d sources", spec.name, len(self.index), len(self.files))

    def _volume(self, number: int) -> np.ndarray:
        return np.load(self.files[number], mmap_mode="r")

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        number, axis, k = self.index[item]
        rng = np.random.default_rng([self.seed, self.epoch, item])
        volume = self._volume(number)
        n_in, n_out = len(self.spec.inputs), self.spec.out_channels
        flip = self.augment and rng.random() < P_FLIP
        planes = neighbours(k, volume.shape[1 + axis], self.spec.context)
        slab = slab_along(volume[:n_in], axis, planes, flip)
        if self.skull_strip_prob and rng.random() < self.skull_strip_prob:
            brain = slab_along(volume[-1:], axis, planes, flip)[0] > 0
            slab = skull_strip(slab, brain, rng.uniform(0.0, STRIP_MAX_MARGIN_MM), self.stripped_ranges[number])
        if self.augment and self.spec.intensity_augment:
            slab = augment_intensity(slab, rng)
        centre = slab_along(volume[n_in:], axis, np.array([k]), flip)[:, 0]
        target, weight = centre[:n_out], centre[n_out:]
        if flip:
            target = target * np.array(self.spec.x_flip_signs, dtype=np.float32)[:, None, None]
        if self.augment and rng.random() < P_AFFINE:
            slab, target, weight = augment_geometry(slab, target, weight, axis, self.spec, rng, self.elastic_px)
        arrays = {"input": slab.reshape((-1,) + slab.shape[2:]), "target": target, "weight": weight}
        return {name: torch.from_numpy(np.ascontiguousarray(_pad(a), dtype=np.float32)) for name, a in arrays.items()}


def worker_threads(_: int) -> None:
    """DataLoader ``worker_init_fn``: one torch thread per worker (the main process owns the cores)."""
    torch.set_num_threads(1)
