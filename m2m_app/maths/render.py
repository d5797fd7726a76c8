"""Volume rendering of a density/colour field by ray marching (NeRF compositing), no file I/O.

Camera convention (RAS+ world, mm): the camera sits on the sphere bounding ``bounds``, in
the direction ``(cos el cos az, cos el sin az, sin el)`` from its centre, and looks at the
centre. So azimuth 0° views from the right (+x), 90° from the front (+y), 180° from the left,
elevation 90° from the top. The image's up is world +z (world +y, anterior, for views along z)
and row 0 is the top of the image.

Compositing along a ray sampled at ``t_i`` with spacing ``delta_i`` (mm):
``alpha_i = 1 - exp(-sigma_i delta_i)``, ``T_i = prod_{j<i} (1 - alpha_j)``,
``C = sum_i T_i alpha_i c_i + (1 - sum_i T_i alpha_i) background``.

A field given on a voxel grid is marched by :func:`render_grid_view`: its samples lie on planes
of one grid axis, so each is a 2D lookup in a plane resampled once per view (see there).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

#: ``(N, 3)`` world points (mm) → extinction ``sigma`` ``(N,)`` in 1/mm and colour ``(N, 3)`` in [0, 1].
QueryFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
#: ``(S, R, 2)`` voxel coordinates in ``S`` planes of one grid axis (the other two axes, in order)
#: → extinction ``(R, S)`` in 1/mm and colour ``(R, S, 3)`` in [0, 1].
PlaneLookup = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
#: ``(axis, plane_coordinates)``: the grid axis and the ``(S,)`` voxel coordinates of ``S`` planes
#: along it → the :data:`PlaneLookup` of the field in those planes.
PlaneSampler = Callable[[int, np.ndarray], PlaneLookup]


def camera_basis(azimuth_deg: float, elevation_deg: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit ``forward`` (viewing direction), ``right`` and ``up`` vectors of the camera, each ``(3,)``."""
    az, el = np.radians(azimuth_deg), np.radians(elevation_deg)
    forward = -np.array([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)])
    hint = np.array([0.0, 1.0, 0.0]) if abs(forward[2]) > 0.999 else np.array([0.0, 0.0, 1.0])
    right = np.cross(forward, hint)
    right /= np.linalg.norm(right)
    return forward, right, np.cross(right, forward)


def camera_rays(
    bounds: np.ndarray,
    azimuth_deg: float,
    elevation_deg: float,
    size: tuple[int, int],
    *,
    perspective: bool = False,
    fov_deg: float = 30.0,
    half_extent_mm: float | None = None,
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Rays covering the sphere that bounds ``bounds`` (``(2, 3)`` min/max corners, mm).

    Returns origins and unit directions, each ``(H * W, 3)`` in row-major pixel order, and the
    ray parameter range ``(t_near, t_far)`` in mm that spans the bounding sphere. An orthographic
    screen spans ``±half_extent_mm`` about the centre (default: the sphere's radius, so a
    smaller value zooms in); perspective views always frame the whole sphere.
    """
    bounds = np.asarray(bounds, dtype=float)
    centre = bounds.mean(axis=0)
    radius = 0.5 * float(np.linalg.norm(bounds[1] - bounds[0]))
    forward, right, up = camera_basis(azimuth_deg, elevation_deg)
    height, width = size
    v = 1.0 - (2.0 * np.arange(height) + 1.0) / height  # +1 at the top row
    u = (2.0 * np.arange(width) + 1.0) / width - 1.0
    uu, vv = np.meshgrid(u, v)
    screen = uu.reshape(-1, 1) * right + vv.reshape(-1, 1) * up  # (H*W, 3), in [-1, 1] units
    if perspective:
        distance = radius / np.sin(np.radians(fov_deg) / 2)
        directions = forward + np.tan(np.radians(fov_deg) / 2) * screen
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        origins = np.broadcast_to(centre - distance * forward, directions.shape)
        return origins, directions, distance - radius, distance + radius
    origins = centre - radius * forward + (radius if half_extent_mm is None else half_extent_mm) * screen
    return origins, np.broadcast_to(forward, origins.shape), 0.0, 2.0 * radius


def composite(
    sigma: np.ndarray,
    colour: np.ndarray,
    delta: float | np.ndarray,
    background: np.ndarray | tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> tuple[np.ndarray, np.ndarray]:
    """NeRF compositing of ``(R, S)`` extinctions (1/mm) and ``(R, S, 3)`` colours along ``R`` rays.

    ``delta`` is the sample spacing in mm (scalar or ``(R, S)``). Returns the colour ``(R, 3)``
    and the opacity ``sum_i T_i alpha_i`` ``(R,)``. The transmittance is accumulated as
    ``exp(-sum_{j<i} sigma_j delta_j)``, the same product written without underflowing factors;
    the sum runs front to back over the samples, one ``(R,)`` column at a time (faster than
    ``cumsum`` for tens of samples, whichever the arrays' memory layout).
    """
    optical_depth = np.clip(sigma, 0.0, None) * delta
    alpha = 1.0 - np.exp(-optical_depth)
    in_front = np.empty_like(optical_depth)
    depth = np.zeros(len(optical_depth), dtype=optical_depth.dtype)
    for sample in range(optical_depth.shape[1]):
        in_front[:, sample] = depth
        depth += optical_depth[:, sample]
    transmittance = np.exp(-in_front)
    weights = transmittance * alpha
    opacity = weights.sum(axis=1)
    rgb = np.einsum("rs,rsc->rc", weights, colour) + (1.0 - opacity)[:, None] * np.asarray(background)
    return rgb, opacity


def box_span(origins: np.ndarray, directions: np.ndarray, bounds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where ``(R, 3)`` rays enter and leave the box ``bounds`` (``(2, 3)`` mm), by the slab method.

    Returns ``t_enter`` and ``t_exit`` ``(R,)`` in mm (``t_enter >= 0``); a ray misses the box
    where ``t_exit <= t_enter``.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        inverse = 1.0 / directions
        t0, t1 = (bounds[0] - origins) * inverse, (bounds[1] - origins) * inverse
        t_enter = np.nanmax(np.minimum(t0, t1), axis=1)
        t_exit = np.nanmin(np.maximum(t0, t1), axis=1)
    return np.maximum(t_enter, 0.0), t_exit


def render_view(
    query_fn: QueryFn,
    bounds: np.ndarray,
    azimuth_deg: float,
    elevation_deg: float,
    size: int | tuple[int, int],
    *,
    n_samples: int = 128,
    perspective: bool = False,
    fov_deg: float = 30.0,
    background: tuple[float, float, float] = (0.0, 0.0, 0.0),
    rays_per_chunk: int = 4096,
    half_extent_mm: float | None = None,
    clip_to_box: bool = False,
) -> np.ndarray:
    """Render an ``(H, W, 3)`` float image in [0, 1] of the field ``query_fn`` inside ``bounds``.

    ``size`` is ``H = W`` or ``(H, W)``; rays are marched with ``n_samples`` midpoint samples
    across the bounding sphere, in chunks of ``rays_per_chunk`` rays to bound memory;
    ``half_extent_mm`` is the orthographic screen's half-width (see :func:`camera_rays`).
    With ``clip_to_box`` the samples span only each ray's path through the box ``bounds``
    (:func:`box_span`) and rays missing it are background: the field is taken to be empty
    outside the box, and the same samples are spent where it is not.
    """
    height, width = (size, size) if isinstance(size, int) else size
    origins, directions, t_near, t_far = camera_rays(
        bounds,
        azimuth_deg,
        elevation_deg,
        (height, width),
        perspective=perspective,
        fov_deg=fov_deg,
        half_extent_mm=half_extent_mm,
    )
    if clip_to_box:
        t_start, t_stop = box_span(origins, directions, np.asarray(bounds, dtype=float))
    else:
        t_start, t_stop = np.full(len(origins), t_near), np.full(len(origins), t_far)
    image = np.broadcast_to(np.asarray(background, dtype=float), (height * width, 3)).copy()
    hits = np.flatnonzero(t_stop > t_start)
    fractions = (np.arange(n_samples) + 0.5) / n_samples
    for start in range(0, len(hits), rays_per_chunk):
        rays = hits[start : start + rays_per_chunk]
        span = (t_stop[rays] - t_start[rays])[:, None]
        t = t_start[rays][:, None] + fractions[None, :] * span  # (R, S) mm
        points = origins[rays, None, :] + t[..., None] * directions[rays, None, :]
        sigma, colour = query_fn(points.reshape(-1, 3))
        image[rays], _ = composite(
            np.asarray(sigma, float).reshape(len(rays), n_samples),
            np.asarray(colour, float).reshape(len(rays), n_samples, 3),
            span / n_samples,
            background,
        )
    return np.clip(image, 0.0, 1.0).reshape(height, width, 3)


def render_grid_view(
    planes: PlaneSampler,
    affine: np.ndarray,
    bounds: np.ndarray,
    azimuth_deg: float,
    elevation_deg: float,
    size: int | tuple[int, int],
    *,
    n_samples: int = 128,
    background: tuple[float, float, float] = (0.0, 0.0, 0.0),
    rays_per_chunk: int = 4096,
    half_extent_mm: float | None = None,
) -> np.ndarray:
    """Render an ``(H, W, 3)`` orthographic image in [0, 1] of a field on a voxel grid, inside the box ``bounds``.

    ``affine`` is the grid's ``(4, 4)`` voxel-to-world matrix (mm) and ``planes`` gives the field
    in planes of one grid axis (:data:`PlaneSampler`). The rays (:func:`camera_rays`) are sampled
    where they cross ``n_samples`` planes of the grid axis most nearly along the view, spread at
    midpoints over the box's extent along that axis; each sample stands for the ray's path between
    the mid-planes around it, clipped to the box (:func:`box_span`; the field is taken to be empty
    outside it). A sample on a grid plane is a bilinear lookup in that plane, and the planes are
    resampled along the axis once per view, so each sample costs a 2D lookup rather than a 3D one,
    with the same (trilinear) value. Seen along a grid axis, the samples are those of
    :func:`render_view` with ``clip_to_box``.
    """
    height, width = (size, size) if isinstance(size, int) else size
    bounds = np.asarray(bounds, dtype=float)
    origins, directions, _, _ = camera_rays(
        bounds, azimuth_deg, elevation_deg, (height, width), half_extent_mm=half_extent_mm
    )
    t_start, t_stop = box_span(origins, directions, bounds)
    to_voxel = np.linalg.inv(affine)
    voxel_origins = origins @ to_voxel[:3, :3].T + to_voxel[:3, 3]
    voxel_direction = to_voxel[:3, :3] @ directions[0]  # voxels per mm along each axis
    axis = int(np.argmax(np.abs(voxel_direction) / np.linalg.norm(to_voxel[:3, :3], axis=1)))
    in_plane = [a for a in range(3) if a != axis]
    corners = np.stack(np.meshgrid(*bounds.T, indexing="ij"), -1).reshape(-1, 3) @ to_voxel[:3, :3].T + to_voxel[:3, 3]
    low, high = corners[:, axis].min(), corners[:, axis].max()
    coordinates = low + (np.arange(n_samples) + 0.5) / n_samples * (high - low)
    if voxel_direction[axis] < 0:
        coordinates = coordinates[::-1]  # front to back along the rays
    half_step_mm = np.float32((high - low) / n_samples / abs(voxel_direction[axis]) / 2)
    # A ray meets plane s at t = t_plane[s] - t_zero (mm), at in-plane voxel coordinates crossing + shift[s].
    slope = voxel_direction[in_plane] / voxel_direction[axis]
    t_plane = (coordinates / voxel_direction[axis]).astype(np.float32)
    shift = np.outer(coordinates, slope).astype(np.float32)
    t_zero = (voxel_origins[:, axis] / voxel_direction[axis]).astype(np.float32)
    crossing = (voxel_origins[:, in_plane] - voxel_origins[:, [axis]] * slope).astype(np.float32)
    t_start, t_stop = t_start.astype(np.float32), t_stop.astype(np.float32)
    lookup = planes(axis, coordinates)
    image = np.broadcast_to(np.asarray(background, dtype=float), (height * width, 3)).copy()
    hits = np.flatnonzero(t_stop > t_start)
    for start in range(0, len(hits), rays_per_chunk):
        rays = hits[start : start + rays_per_chunk]
        t = t_plane[:, None] - t_zero[None, rays]  # (S, R)
        delta = np.minimum(t + half_step_mm, t_stop[None, rays])
        delta -= np.maximum(t - half_step_mm, t_start[None, rays])
        sigma, colour = lookup(crossing[None, rays] + shift[:, None])  # (S, R, 2) voxels
        image[rays], _ = composite(sigma, colour, np.clip(delta, 0.0, None, out=delta).T, background)
    return np.clip(image, 0.0, 1.0).reshape(height, width, 3)
