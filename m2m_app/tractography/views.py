"""Rendered views of a fitted tractography field: four standard PNGs and a turntable animation.

The field is baked once onto a regular grid (at most ``bake_size`` points per axis,
:func:`bake_field`) and the renderer reads that grid trilinearly: a view then costs grid
lookups rather than one MLP evaluation per ray sample, and as the samples lie on planes of
the grid (:func:`m2m_app.maths.render.render_grid_view`), each lookup is a 2D one in a plane
resampled once per view. The four views and a 24-frame turntable take a few seconds on one
CPU core (``docs/benchmarks.md``). Bake once and pass the :class:`BakedField` to both writers when
writing the views and the turntable of one field (a bake is about 1 s for a 96³ grid).
Views are framed on the brain (the box where the density is above a small fraction of its
maximum), not on the whole T1w grid, so that it fills the picture, and rays are marched only
through that box.
Colours are the field's directionally encoded orientation (R=x, G=y, B=z) and the extinction
is proportional to its density.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
import torch.nn.functional as F

from m2m_app.io.files import atomic_write
from m2m_app.maths.render import PlaneLookup, camera_basis, render_grid_view
from m2m_app.models.nerf import FittedField, normalising_matrix

LOGGER = logging.getLogger(__name__)

#: Optical depth (sigma × path, unitless) of a straight path of density 1 across the mean grid extent.
OPTICAL_DEPTH = 8.0
#: View name → (azimuth, elevation) in degrees, see :mod:`m2m_app.maths.render` for the convention.
STANDARD_VIEWS: dict[str, tuple[float, float]] = {
    "left": (180.0, 0.0),
    "right": (0.0, 0.0),
    "top": (0.0, 90.0),
    "front": (90.0, 0.0),
}


#: Fraction of the baked density's maximum above which a point counts as inside the brain (framing only).
FRAME_THRESHOLD = 0.05
#: Empty border around the brain's projection, as a fraction of its half-width.
FRAME_MARGIN = 0.04
#: Largest number of baked grid points per axis.
BAKE_SIZE = 96


@dataclass(frozen=True)
class BakedField:
    """A field baked for rendering on a regular grid.

    ``values`` is ``(X, Y, Z, 4)`` float32: extinction (1/mm) and unit colour at the grid points,
    ``affine`` the grid's ``(4, 4)`` voxel-to-world matrix (mm), ``box`` the ``(2, 3)`` world box
    (mm) of the baked density above :data:`FRAME_THRESHOLD` of its maximum (the field's bounds
    if empty). Between grid points the field is trilinear, and 0 beyond the grid."""

    values: np.ndarray
    affine: np.ndarray
    box: np.ndarray

    @functools.cached_property
    def _stacks(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The grid as planes of each axis, contiguous: ``(A, 4, Q, P)`` for the axis ``A`` and the
        other two ``P < Q`` (grid_sample's ``x`` and ``y``)."""
        x, y, z = (np.ascontiguousarray(np.moveaxis(self.values, axis, 0).transpose(0, 3, 2, 1)) for axis in range(3))
        return x, y, z

    def query(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Extinction ``(N,)`` (1/mm) and colour ``(N, 3)`` at ``(N, 3)`` world points (mm): a :data:`QueryFn`."""
        to_grid = normalising_matrix(self.values.shape[:3]) @ np.linalg.inv(self.affine)
        coords = np.asarray(points, dtype=float) @ to_grid[:3, :3].T + to_grid[:3, 3]
        volume = torch.from_numpy(self.values).permute(3, 0, 1, 2)[None]  # (1, 4, X, Y, Z)
        sampled = F.grid_sample(  # grid_sample's points are (z, y, x)-ordered
            volume,
            torch.as_tensor(coords[:, ::-1].copy(), dtype=torch.float32).view(1, -1, 1, 1, 3),
            mode="bilinear",
            padding_mode="zeros",
            align_corners=True,
        )
        values = sampled[0, :, :, 0, 0].T.numpy()
        return values[:, 0], values[:, 1:]

    def planes(self, axis: int, coordinates: np.ndarray) -> PlaneLookup:
        """The field in the planes at voxel ``coordinates`` ``(S,)`` along grid ``axis``: a :data:`PlaneSampler`.

        The planes are interpolated linearly along ``axis`` (0 beyond the grid) once; the lookup
        then reads each plane bilinearly, which together is the trilinear field."""
        volume = self._stacks[axis]
        coordinates = np.asarray(coordinates, dtype=float)
        below = np.floor(coordinates).astype(np.int64)
        sheets = np.zeros((len(coordinates), *volume.shape[1:]), np.float32)  # (S, 4, Q, P)
        for index, weight in ((below, 1.0 - (coordinates - below)), (below + 1, coordinates - below)):
            inside = (index >= 0) & (index < len(volume))  # planes beyond the grid add nothing
            sheets += (
                volume[np.clip(index, 0, len(volume) - 1)] * (weight * inside).astype(np.float32)[:, None, None, None]
            )
        planes = torch.from_numpy(sheets)
        scale = np.array([2.0 / max(volume.shape[3] - 1, 1), 2.0 / max(volume.shape[2] - 1, 1)], np.float32)

        def lookup(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            grid = torch.from_numpy(np.asarray(points, dtype=np.float32) * scale - np.float32(1.0))  # in [-1, 1]
            sampled = F.grid_sample(planes, grid[:, :, None, :], padding_mode="zeros", align_corners=True)
            values = sampled[..., 0].numpy()  # (S, 4, R)
            return values[:, 0].T, values[:, 1:].transpose(2, 0, 1)

        return lookup


def bake_field(field: FittedField, bake_size: int = BAKE_SIZE) -> BakedField:
    """Evaluate ``field`` on a grid of at most ``bake_size`` points per axis spanning its voxel centres."""
    shape = tuple(min(n, bake_size) for n in field.shape)
    density, colour = field.sample_volume(shape)
    extent_mm = float(np.mean(field.bounds[1] - field.bounds[0]))
    sigma = density * (OPTICAL_DEPTH / extent_mm)
    colour = colour / np.maximum(np.linalg.norm(colour, axis=-1, keepdims=True), 1e-6)
    values = np.concatenate([sigma[..., None], colour], axis=-1).astype(np.float32)
    # baked index b of m points spans the input's voxel centres: voxel = b (n - 1) / (m - 1)
    step = (np.asarray(field.shape) - 1) / np.maximum(np.asarray(shape) - 1, 1)
    affine = field.affine @ np.diag([*step, 1.0])
    inside = np.argwhere(density > FRAME_THRESHOLD * density.max()) if density.max() > 0 else np.zeros((0, 3))
    if not len(inside):
        return BakedField(values, affine, field.bounds)
    corners = np.stack(np.meshgrid(*[(-0.5, 0.5)] * 3, indexing="ij"), -1).reshape(-1, 3)
    ijk = (np.concatenate([inside.min(0) + corners, inside.max(0) + corners])) * step
    world = ijk @ field.affine[:3, :3].T + field.affine[:3, 3]
    return BakedField(values, affine, np.stack([world.min(0), world.max(0)]))


def _baked(field: FittedField | BakedField, bake_size: int) -> BakedField:
    return field if isinstance(field, BakedField) else bake_field(field, bake_size)


def framing_half_extent(box: np.ndarray, views: list[tuple[float, float]]) -> float:
    """Half-width (mm) of a square orthographic screen that shows all of ``box`` ``(2, 3)`` in every
    ``(azimuth, elevation)`` view, plus :data:`FRAME_MARGIN`: the box then fills the frame."""
    centre = box.mean(axis=0)
    corners = np.stack(np.meshgrid(*box.T, indexing="ij"), -1).reshape(-1, 3) - centre
    extent = max(float(np.abs(corners @ np.stack(camera_basis(*view)[1:]).T).max()) for view in views)
    return extent * (1.0 + FRAME_MARGIN)


def _axis_letter(vector: np.ndarray) -> str:
    """The RAS+ direction a unit vector mostly points to: R/L, A/P or S/I."""
    axis = int(np.argmax(np.abs(vector)))
    return ("RAS" if vector[axis] > 0 else "LPI")[axis]


def view_orientation(name: str) -> dict[str, str]:
    """Anatomical direction at each edge of a standard view (keys ``left``, ``right``, ``top``, ``bottom``)."""
    _, right, up = camera_basis(*STANDARD_VIEWS[name])
    return {
        "left": _axis_letter(-right),
        "right": _axis_letter(right),
        "top": _axis_letter(up),
        "bottom": _axis_letter(-up),
    }


def _write_png(image: np.ndarray, path: str) -> None:
    """Write an RGB image ``(H, W, 3)`` in [0, 1] as an 8-bit PNG."""
    iio.imwrite(path, _to_uint8(image))


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)


def _with_triad(image: np.ndarray, azimuth_deg: float, elevation_deg: float) -> np.ndarray:
    """Draw the R (red), A (green) and S (blue) world axes as a small labelled triad in the lower-left corner."""
    from PIL import Image, ImageDraw, ImageFont

    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    size = image.shape[1]
    font = ImageFont.load_default(size=max(8, size // 22))
    _, right, up = camera_basis(azimuth_deg, elevation_deg)
    origin, length = np.array([0.12 * size, 0.88 * image.shape[0]]), 0.08 * size
    for axis, (letter, colour) in enumerate(zip("RAS", ((255, 70, 70), (70, 230, 70), (110, 150, 255)))):
        unit = np.eye(3)[axis]
        tip = origin + length * np.array([unit @ right, -(unit @ up)])
        draw.line([tuple(origin), tuple(tip)], fill=colour, width=max(1, size // 160))
        draw.text(tuple(origin + 1.35 * (tip - origin)), letter, fill=colour, font=font, anchor="mm")
    return np.asarray(canvas)


def write_standard_views(
    field: FittedField | BakedField,
    out: str | os.PathLike | dict[str, str | os.PathLike],
    *,
    size: int = 512,
    n_samples: int = 64,
    bake_size: int = BAKE_SIZE,
) -> dict[str, Path]:
    """Write the left, right, top and front views as ``size``-pixel square PNGs framing the brain.

    ``field`` is baked with ``bake_size`` unless it is already a :class:`BakedField`.
    ``out`` is either a folder (files ``left.png``, ``right.png``, ``top.png``, ``front.png``)
    or a mapping from those view names to paths. Every view uses the same scale (mm per
    pixel), set so that the brain's box fills the widest view; :func:`view_orientation`
    gives each view's edge labels. Returns view name → written path.
    """
    paths = (
        {name: Path(p) for name, p in out.items()}
        if isinstance(out, dict)
        else {name: Path(out) / f"{name}.png" for name in STANDARD_VIEWS}
    )
    unknown = set(paths) - set(STANDARD_VIEWS)
    if unknown:
        raise ValueError(f"unknown views {sorted(unknown)}; known: {sorted(STANDARD_VIEWS)}")
    baked = _baked(field, bake_size)
    half_extent = framing_half_extent(baked.box, list(STANDARD_VIEWS.values()))
    for name, path in paths.items():
        image = render_grid_view(
            baked.planes,
            baked.affine,
            baked.box,
            *STANDARD_VIEWS[name],
            size,
            n_samples=n_samples,
            half_extent_mm=half_extent,
        )
        atomic_write(path, functools.partial(_write_png, image))
        LOGGER.info("wrote the %s view %s", name, path)
    return paths


def write_turntable(
    field: FittedField | BakedField,
    path: str | os.PathLike,
    *,
    n_frames: int = 24,
    size: int = 256,
    elevation_deg: float = 20.0,
    n_samples: int = 48,
    bake_size: int = BAKE_SIZE,
    frame_ms: int = 100,
) -> Path:
    """Write an endlessly looping animated GIF of ``n_frames`` views
    turning once around the vertical axis, framed on the brain, each with an R/A/S axis triad.

    ``field`` is baked with ``bake_size`` unless it is already a :class:`BakedField`."""
    baked = _baked(field, bake_size)
    azimuths = np.linspace(0.0, 360.0, n_frames, endpoint=False)
    half_extent = framing_half_extent(baked.box, [(azimuth, elevation_deg) for azimuth in azimuths])
    frames = np.stack(
        [
            _with_triad(
                _to_uint8(
                    render_grid_view(
                        baked.planes,
                        baked.affine,
                        baked.box,
                        azimuth,
                        elevation_deg,
                        size,
                        n_samples=n_samples,
                        half_extent_mm=half_extent,
                    )
                ),
                azimuth,
                elevation_deg,
            )
            for azimuth in azimuths
        ]
    )
    written = atomic_write(path, lambda tmp: iio.imwrite(tmp, frames, duration=frame_ms, loop=0))
    LOGGER.info("wrote a %d-frame turntable %s", n_frames, written)
    return written
