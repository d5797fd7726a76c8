"""Time phase 3 (field fit, views, turntable, tracking, .trx) on a synthetic brain-sized volume.

Usage: ``python benchmarks/bench_nerf.py --threads 2 --size 128``. Prints one row per stage
with its wall time, its CPU time (user + system, all threads: a check on wall times taken
on a shared machine, whose load average is printed too) and its peak resident memory (the
kernel's high-water mark, reset before each stage where ``/proc/self/clear_refs`` allows it,
otherwise the process peak so far).

``--sweep`` fits the field only, once per grid factor and batch size (2/3/4 × 2048/4096/8192,
the other settings the app's), and prints steps to stop, PSNR and times as a Markdown table.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy.spatial import cKDTree

from m2m_app.io.tractogram import save_tractogram
from m2m_app.models.nerf import FieldFitSettings, fit_field
from m2m_app.tractography.streamlines import TrackingSettings, track_field
from m2m_app.tractography.views import bake_field, write_standard_views, write_turntable

SIGMA_MM = 3.0


def bundle_curves() -> list[np.ndarray]:
    """Seven smooth bundles (points ``(n, 3)`` in world mm): a callosal arch, cingula, CSTs, arcuates."""
    t = np.linspace(0.0, 1.0, 600)
    arch = np.stack([45 * np.cos(np.pi * t), np.zeros_like(t), 10 + 40 * np.sin(np.pi * t)], -1)
    cingula = [np.stack([np.full_like(t, x), -55 + 100 * t, 28 + 8 * np.sin(np.pi * t)], -1) for x in (-10, 10)]
    csts = [np.stack([x + 8 * np.sin(np.pi * t), np.full_like(t, -10), -55 + 100 * t], -1) for x in (-28, 28)]
    turn = 1.2 * np.pi * t
    arcuates = [np.stack([np.full_like(t, x), -10 + 35 * np.cos(turn), 5 + 30 * np.sin(turn)], -1) for x in (-42, 42)]
    return [arch, *cingula, *csts, *arcuates]


def synthetic_brain(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Density ``(n, n, n)``, direction ``(n, n, n, 3)``, ellipsoid mask and affine (160 mm field of view)."""
    zoom = 160.0 / size
    affine = np.diag([zoom, zoom, zoom, 1.0])
    affine[:3, 3] = -80.0 + zoom / 2
    ijk = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), -1).reshape(-1, 3)
    world = ijk * zoom + affine[:3, 3]
    mask = np.sum((world / [68.0, 78.0, 65.0]) ** 2, axis=1) < 1
    density = np.where(mask, 0.05, 0.0)
    weighted = np.where(mask[:, None], 0.05 * 0.5, 0.0) * np.ones(3)
    for curve in bundle_curves():
        tangent = np.gradient(curve, axis=0)
        tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
        distance, nearest = cKDTree(curve).query(world[mask], distance_upper_bound=4 * SIGMA_MM)
        near = np.isfinite(distance)
        voxels = np.flatnonzero(mask)[near]
        weight = np.exp(-(distance[near] ** 2) / (2 * SIGMA_MM**2))
        density[voxels] += weight
        weighted[voxels] += weight[:, None] * np.abs(tangent[nearest[near]])
    direction = np.divide(weighted, density[:, None], out=np.zeros_like(weighted), where=density[:, None] > 0)
    shape = (size,) * 3
    return (
        density.reshape(shape).astype(np.float32),
        direction.reshape(shape + (3,)).astype(np.float32),
        mask.reshape(shape),
        affine,
    )


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sweep(
    density: np.ndarray,
    direction: np.ndarray,
    mask: np.ndarray,
    affine: np.ndarray,
    settings: FieldFitSettings,
    args: argparse.Namespace,
) -> None:
    """Fit once per grid factor and batch size; print a Markdown table (steps, PSNR, wall and CPU s)."""
    print("| grid factor | batch | steps to stop | PSNR density dB | PSNR direction dB | wall s | CPU s |")
    print("|---|---|---|---|---|---|---|")
    for grid_factor in (2, 3, 4):
        for batch_size in (2048, 4096, 8192):
            started, cpu_started = time.perf_counter(), time.process_time()
            info = fit_field(
                density,
                direction,
                mask,
                affine,
                replace(settings, grid_factor=grid_factor, batch_size=batch_size),
                seed=0,
                num_threads=args.threads,
                device=args.device,
            ).info
            print(
                f"| {grid_factor} | {batch_size} | {info['steps']} | {info['psnr_density_db']:.1f} | "
                f"{info['psnr_direction_db']:.1f} | {time.perf_counter() - started:.1f} | "
                f"{time.process_time() - cpu_started:.1f} |",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads, all stages")
    parser.add_argument("--size", type=int, default=128, help="voxels per axis of the synthetic volume")
    parser.add_argument("--max-steps", type=int, default=1500, help="Adam steps at most for the fit")
    parser.add_argument("--n-seeds", type=int, default=5000, help="tracking seeds")
    parser.add_argument("--device", default="cpu", help="device of the fit: cpu or cuda (default cpu)")
    parser.add_argument("--out", type=Path, default=None, help="keep outputs here (default: a temporary dir)")
    parser.add_argument("--sweep", action="store_true", help="fit only: grid factors 2/3/4 x batches 2048/4096/8192")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_nerf_"))
    rows: list[tuple[str, float, float, float]] = []
    results: dict[str, object] = {}

    def stage(name, function):
        _reset_peak_rss()
        started, cpu_started = time.perf_counter(), time.process_time()
        results[name] = function()
        rows.append((name, time.perf_counter() - started, time.process_time() - cpu_started, _peak_rss_mb()))

    stage("synthetic volume", lambda: synthetic_brain(args.size))
    density, direction, mask, affine = results["synthetic volume"]
    settings = FieldFitSettings(max_steps=args.max_steps)
    if args.sweep:
        sweep(density, direction, mask, affine, settings, args)
        return
    stage(
        "fit field",
        lambda: fit_field(
            density, direction, mask, affine, settings, seed=0, num_threads=args.threads, device=args.device
        ),
    )
    field = results["fit field"]
    stage("bake the field for rendering", lambda: bake_field(field))
    baked = results["bake the field for rendering"]
    stage("render 4 views (512 px)", lambda: write_standard_views(baked, out))
    stage("turntable (24 x 256 px)", lambda: write_turntable(baked, out / "turntable.gif"))
    tracking = f"track ({args.n_seeds} seeds)"
    stage(tracking, lambda: track_field(field, mask, affine, TrackingSettings(n_seeds=args.n_seeds), seed=0))
    streamlines = results[tracking]
    reference = nib.Nifti1Image(np.zeros(density.shape, np.uint8), affine)
    stage("save .trx", lambda: save_tractogram(streamlines, reference, out / "tracks.trx"))

    info = field.info
    print(
        f"\nsize {args.size}^3, {args.threads} threads, fit on {args.device}, load average {os.getloadavg()[0]:.1f}, "
        f"outputs in {out}"
    )
    print(
        f"fit: {info['steps']} steps, PSNR density {info['psnr_density_db']:.1f} dB, "
        f"direction {info['psnr_direction_db']:.1f} dB; {len(streamlines)} streamlines"
    )
    print(f"{'stage':<30}{'wall s':>8}{'cpu s':>8}{'peak RSS MB':>13}")
    for name, seconds, cpu, rss in rows:
        print(f"{name:<30}{seconds:>8.2f}{cpu:>8.2f}{rss:>13.0f}")
    render = [row for row in rows if row[0].startswith(("bake", "render", "turntable"))]
    print(f"{'rendering, all (nerf_render)':<30}{sum(r[1] for r in render):>8.2f}{sum(r[2] for r in render):>8.2f}")


if __name__ == "__main__":
    main()
