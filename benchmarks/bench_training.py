"""Training at cohort scale: slices per second and peak memory of training on 7 and on 70 units.

    python benchmarks/bench_training.py PREP_DIR WORK [--units 7 --units 70] [--steps 30]
        [--batch-size 8] [--phase phase1] [--device cpu|cuda] [--threads 2] [--workers 0] [--fp32]

PREP_DIR is a prep dir of real units (``m2m-train prepare``; ds-real and ds-extra give 7). Units
beyond its real ones are **augmented copies** of them: a real unit's conformed training array (the
``.npy`` cache that training memory-maps, ``(C + K + 1, 96, 112, 96)`` float32, 53 MB for phase 1)
shifted by a random whole number of voxels along each axis (up to 8, i.e. 16 mm; the volume wraps
around) and, for phase 1, its T1w intensities put through a random gamma (0.7 to 1.4). They are
written to ``WORK/cache`` (about 3.5 GB for 70 phase-1 units) and kept for the next run.

Each unit count runs in a fresh process, as training does: the slice index of that many units
is built (:class:`~m2m_app.training.slices.SliceDataset`, every volume memory-mapped), then the
training step of the shipped recipe (generator, both discriminators, moving average, mixed
precision on CUDA unless ``--fp32``: :mod:`m2m_app.training.loop`) runs ``--steps`` times after
3 warm-up steps, on shuffled batches drawn by a DataLoader with the recipe's augmentations.
Prints one row per unit count: units (real + augmented), slices in an epoch, slices per second,
the process's resident memory once the dataset is built and its peak over the run (MB;
memory-mapped pages that were read count while they stay mapped).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

#: Warm-up steps before the timed ones (first-call allocations, thread pools).
WARMUP_STEPS = 3
#: Largest shift (voxels of the 2 mm model grid) and gamma range of an augmented unit.
MAX_SHIFT, GAMMA_RANGE = 8, (0.7, 1.4)


def _rss_mb() -> float:
    """This process's resident memory now (MB), from ``/proc/self/status``."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def unit_caches(prep_dir: Path, cache_dir: Path, phase: str, units: int) -> tuple[list[Path], int]:
    """The cache files of ``units`` units (the real ones first, then augmented copies) and how many are real."""
    import numpy as np

    from m2m_app.io.manifest import select_rows
    from m2m_app.models.phases import get_phase
    from m2m_app.training.slices import cache_sample, training_sources

    spec = get_phase(phase)
    real = [cache_sample(spec, s, cache_dir) for s in training_sources(select_rows([prep_dir], None, True), None)]
    files = real[:units]
    for number in range(units - len(files)):
        base = real[number % len(real)]
        path = cache_dir / f"{phase}_augmented-{number:03d}_{base.stem.removeprefix(phase + '_')}.npy"
        if not path.exists():
            rng = np.random.default_rng(number)
            volume = np.load(base)
            shifted = np.roll(volume, tuple(rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, 3)), axis=(1, 2, 3))
            if spec.intensity_augment:  # the T1w channels, normalised to [0, 1]
                t1w = shifted[: len(spec.inputs)]
                t1w[:] = np.clip(t1w, 0.0, None) ** rng.uniform(*GAMMA_RANGE)
            np.save(path, shifted)
        files.append(path)
    return files, min(units, len(real))


def run_one(files: list[Path], real: int, args: argparse.Namespace) -> dict:
    """Build the dataset of ``files`` and time ``args.steps`` training steps; the row of the table."""
    import torch
    from torch.utils.data import DataLoader

    from m2m_app.models.phases import get_phase
    from m2m_app.training.loop import BETAS, _Networks, _Step, autocast_dtype, seed_everything
    from m2m_app.training.recipe import TrainingRecipe
    from m2m_app.training.slices import SliceDataset, worker_threads

    torch.set_num_threads(args.threads)
    recipe = TrainingRecipe(batch_size=args.batch_size, mixed_precision=not args.fp32)
    spec, device = get_phase(args.phase), torch.device(args.device)
    seed_everything(recipe.seed)
    dataset = SliceDataset(spec, files, True, recipe.seed, recipe.elastic_px, recipe.skull_strip_prob)
    built_mb = _rss_mb()
    loader = DataLoader(
        dataset,
        batch_size=recipe.batch_size,
        shuffle=True,
        num_workers=args.workers,
        worker_init_fn=worker_threads,
        generator=torch.Generator().manual_seed(recipe.seed),
    )
    networks = _Networks(spec, recipe.base, recipe.depth, recipe.disc_base, recipe.ema_decay).to(device)
    opt_g = torch.optim.Adam(networks.generator.parameters(), lr=recipe.lr, betas=BETAS)
    discriminators = list(networks.global_d.parameters()) + list(networks.patch_d.parameters())
    opt_d = torch.optim.Adam(discriminators, lr=recipe.lr, betas=BETAS)
    step = _Step(
        spec,
        networks.generator,
        [networks.global_d, networks.patch_d],
        opt_g,
        opt_d,
        recipe.adversarial_weight,
        autocast_dtype(device, recipe.mixed_precision),
    )
    batches = iter(loader)
    for number in range(WARMUP_STEPS + args.steps):
        if number == WARMUP_STEPS:
            if device.type == "cuda":
                torch.cuda.synchronize()
            began = time.perf_counter()
        step({key: value.to(device) for key, value in next(batches).items()})
        networks.update_ema()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    return {
        "units": f"{len(files)} ({real} real + {len(files) - real} augmented)",
        "slices_per_epoch": len(dataset),
        "slices_per_s": round(args.steps * recipe.batch_size / seconds, 2),
        "rss_dataset_mb": round(built_mb),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prep_dir", type=Path)
    parser.add_argument("work", type=Path, help="folder of the unit caches (real and augmented)")
    parser.add_argument("--units", type=int, action="append", help="unit counts (default: 7 and 70)")
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per unit count")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--phase", choices=["phase1", "phase2"], default="phase1")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--fp32", action="store_true", help="no mixed precision on CUDA (the CPU is always float32)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)  # one unit count, in its own process
    args = parser.parse_args()
    cache_dir = args.work / "cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    if args.child is not None:
        files, real = unit_caches(args.prep_dir, cache_dir, args.phase, args.child)
        print(json.dumps(run_one(files, real, args)))
        return
    rows = []
    for units in args.units or [7, 70]:
        unit_caches(args.prep_dir, cache_dir, args.phase, units)  # written once, outside the timed process
        command = [sys.executable, __file__, *sys.argv[1:], "--child", str(units)]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    precision = "float32" if args.fp32 or args.device == "cpu" else "mixed precision"
    print(
        f"# {args.phase} training, batch {args.batch_size}, {args.steps} steps, {args.device} ({precision}), "
        f"{args.threads} thread(s), {args.workers} DataLoader worker(s)"
    )
    print(" | ".join(rows[0]))
    for row in rows:
        print(" | ".join(str(value) for value in row.values()))


if __name__ == "__main__":
    sys.exit(main())
