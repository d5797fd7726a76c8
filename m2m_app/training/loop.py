"""One adversarial training loop for any :class:`~m2m_app.models.phases.PhaseSpec`.

Generator: :class:`~m2m_app.models.translator.Translator`, trained with the phase's
reconstruction loss plus a small LSGAN term from two conditional discriminators (global
and PatchGAN). Everything is seeded; a checkpoint is written after every epoch and a
run restarts from the last one automatically. Under ``torchrun`` (``WORLD_SIZE > 1``) it
runs with DistributedDataParallel and only rank 0 writes files.

Files in ``model_out``: ``<phase>_losses.csv`` (one row per epoch: mean of each loss term
over rank 0's batches), ``checkpoints/<phase>_last.pt``, ``cache/`` (conformed subjects),
and at the end ``<phase>.safetensors`` (generator weights) with ``<phase>.json`` (metadata, recipe, SHA-256).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import datetime
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np
import torch
from safetensors.torch import save_file
from torch import distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from m2m_app import __version__
from m2m_app.data.weights import weight_files, weights_folder
from m2m_app.errors import UsageError
from m2m_app.inference.predict import load_translator, resolve_device
from m2m_app.io.files import atomic_write, file_sha256, save_json
from m2m_app.io.manifest import select_rows
from m2m_app.models.phases import PhaseSpec, get_phase
from m2m_app.models.translator import GlobalDiscriminator, PatchDiscriminator, Translator, parameter_count
from m2m_app.training.recipe import TrainingRecipe
from m2m_app.training.slices import SliceDataset, Source, cache_sample, training_sources, worker_threads

log = logging.getLogger(__name__)

#: Adam betas (pix2pix).
BETAS = (0.5, 0.999)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def training_datasets(prep_dirs: list[Path]) -> list[str]:
    """Names of the raw datasets behind ``prep_dirs`` (their ``SourceDatasets``), for the weights' recipe.

    Only the dataset folder names are kept, not this machine's paths; a prep dir without a
    readable ``dataset_description.json`` is named after its own folder.
    """
    names = []
    for prep in prep_dirs:
        try:
            sources = json.loads((prep / "dataset_description.json").read_text()).get("SourceDatasets", [])
            names += [Path(unquote(urlparse(source["URL"]).path)).name for source in sources]
        except (OSError, ValueError, KeyError, TypeError):
            names.append(prep.resolve().name)
    return sorted(set(names))


#: ``--init-weights`` value naming the weights shipped in the package.
PACKAGED = "packaged"


def initial_weights(spec: PhaseSpec, init_weights: str | os.PathLike) -> tuple[Translator, dict]:
    """The generator to fine-tune (``init_weights``: :data:`PACKAGED` or a folder of ``<phase>.safetensors``),
    checked against its recorded SHA-256, and what the new weights' recipe records of it: its
    origin (``packaged`` or the folder's name, not this machine's path), SHA-256, m2m version,
    architecture and the units it was trained on."""
    folder = weights_folder(None if str(init_weights) == PACKAGED else init_weights)
    generator, _ = load_translator(spec.name, folder)
    meta = json.loads(weight_files(spec.name, folder)[1].read_text())
    return generator, {
        "weights": PACKAGED if str(init_weights) == PACKAGED else Path(init_weights).resolve().name,
        "sha256": meta["sha256"],
        "m2m_version": meta.get("m2m_version"),
        "architecture": generator.config,
        "trained_on": meta.get("recipe", {}).get("subjects"),
    }


def _distributed_context() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the torchrun environment (0, 1, 0 when not distributed)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _cached_dataset(
    spec: PhaseSpec,
    sources: list[Source],
    cache_dir: Path,
    seed: int,
    rank: int,
    world: int,
    elastic_px: float,
    skull_strip_prob: float,
) -> SliceDataset:
    """Conform every source into ``cache_dir`` (rank 0 only; the other ranks wait, then read it)."""
    if rank == 0:
        files = [cache_sample(spec, s, cache_dir) for s in tqdm(sources, desc=f"{spec.name}: conform")]
    _barrier(world)
    if rank != 0:
        files = [cache_sample(spec, s, cache_dir) for s in sources]
    return SliceDataset(spec, files, augment=True, seed=seed, elastic_px=elastic_px, skull_strip_prob=skull_strip_prob)


class _Networks(nn.Module):
    """The generator, both discriminators and (with ``ema_decay``) the generator's moving
    average, as one module for checkpointing."""

    ema_generator: Translator | None
    ema_updates: torch.Tensor  # () int64 buffer: how many moving-average updates so far

    def __init__(self, spec: PhaseSpec, base: int, depth: int, disc_base: int, ema_decay: float = 0.0) -> None:
        super().__init__()
        self.generator = Translator(spec.in_channels, spec.out_channels, base=base, depth=depth)
        self.global_d = GlobalDiscriminator(spec.in_channels + spec.out_channels, base=disc_base)
        self.patch_d = PatchDiscriminator(spec.in_channels + spec.out_channels, base=disc_base)
        self.ema_decay = ema_decay
        self.ema_generator = None
        if ema_decay:
            self.ema_generator = copy.deepcopy(self.generator).requires_grad_(False)
            self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def start_from(self, generator: Translator) -> None:
        """Copy ``generator``'s weights (same architecture) into the generator and its moving average."""
        for target in (self.generator, self.ema_generator):
            if target is not None:
                target.load_state_dict(generator.state_dict())

    @torch.no_grad()
    def update_ema(self) -> None:
        """Move the averaged generator towards the current one (no-op without ``ema_decay``).

        The decay ramps up as ``min(ema_decay, (1 + n) / (10 + n))`` after ``n`` updates, so
        the random initial weights are forgotten quickly (as TensorFlow's ExponentialMovingAverage).
        """
        if self.ema_generator is None:
            return
        decay = min(self.ema_decay, (1.0 + float(self.ema_updates)) / (10.0 + float(self.ema_updates)))
        for average, current in zip(self.ema_generator.parameters(), self.generator.parameters()):
            average.lerp_(current.detach(), 1.0 - decay)
        for average_buffer, buffer in zip(self.ema_generator.buffers(), self.generator.buffers()):
            average_buffer.copy_(buffer)
        self.ema_updates += 1

    def exported(self) -> Translator:
        """The generator to ship: the moving average when there is one."""
        return self.ema_generator if self.ema_generator is not None else self.generator


def _lsgan(logits: torch.Tensor, real: bool) -> torch.Tensor:
    """Least-squares GAN loss towards 1 (real) or 0 (fake)."""
    return F.mse_loss(logits, torch.full_like(logits, 1.0 if real else 0.0))


def autocast_dtype(device: torch.device, mixed_precision: bool) -> torch.dtype | None:
    """The reduced precision of the networks' forward passes, None for float32 throughout.

    With ``mixed_precision`` on CUDA: bfloat16 where the GPU has it (Ampere and later; its
    range is float32's, so no gradient scaling), else float16 (with gradient scaling, see
    :class:`_Step`). On the CPU, float32: autocast there is slower than float32 for these networks.
    """
    if not mixed_precision or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class _Step:
    """One optimisation step on a batch: discriminators first, then the generator.

    With ``amp_dtype`` (:func:`autocast_dtype`) the networks run under ``torch.autocast`` in that
    precision; their outputs are cast back to float32 before any loss, so the losses (eigenvalues,
    FA, histograms) and the weights' updates stay in float32. float16 gradients are scaled
    (``torch.amp.GradScaler``, one scale for both optimisers) so that small ones do not vanish.
    """

    def __init__(
        self,
        spec: PhaseSpec,
        generator: nn.Module,
        discriminators: list[nn.Module],
        opt_g: torch.optim.Optimizer,
        opt_d: torch.optim.Optimizer,
        adversarial_weight: float,
        amp_dtype: torch.dtype | None = None,
    ) -> None:
        self.spec, self.generator, self.discriminators = spec, generator, discriminators
        self.opt_g, self.opt_d, self.adversarial_weight = opt_g, opt_d, adversarial_weight
        self.amp_dtype = amp_dtype
        device = next(generator.parameters()).device.type
        self.scaler = torch.amp.GradScaler(device, enabled=amp_dtype == torch.float16)

    def _autocast(self, x: torch.Tensor) -> torch.autocast:
        return torch.autocast(x.device.type, dtype=self.amp_dtype or torch.bfloat16, enabled=self.amp_dtype is not None)

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        x, target, weight = batch["input"], batch["target"], batch["weight"]
        masked = torch.tensor(self.spec.masked_outputs, device=x.device).view(1, -1, 1, 1)
        channel_weight = torch.where(masked, weight, torch.ones_like(weight))
        with self._autocast(x):
            raw = self.generator(x)
        raw = raw.float()
        fake, real = self.spec.activate(raw) * channel_weight, target * channel_weight

        loss_d = x.new_zeros(())
        for disc in self.discriminators:  # real and fake in one forward (one DDP pass)
            with self._autocast(x):
                logits = disc(torch.cat([x, x]), torch.cat([real, fake.detach()]))
            logits_real, logits_fake = logits.float().chunk(2)
            loss_d = loss_d + 0.5 * (_lsgan(logits_real, True) + _lsgan(logits_fake, False))
        self.opt_d.zero_grad()
        self.scaler.scale(loss_d).backward()
        self.scaler.step(self.opt_d)

        terms = self.spec.loss(raw, target, weight)
        with self._autocast(x):
            logits_fake = [disc(x, fake) for disc in self.discriminators]
        adversarial = torch.stack([_lsgan(logits.float(), True) for logits in logits_fake]).sum()
        self.opt_g.zero_grad()
        self.scaler.scale(terms["total"] + self.adversarial_weight * adversarial).backward()
        self.scaler.step(self.opt_g)
        self.scaler.update()
        return {**{k: v.item() for k, v in terms.items()}, "adv_g": adversarial.item(), "adv_d": loss_d.item()}


def _write_losses(path: Path, rows: list[dict]) -> None:
    """Rewrite the per-epoch loss table (atomic)."""

    def writer(tmp: str) -> None:
        with open(tmp, "w", newline="") as handle:
            table = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter=",")
            table.writeheader()
            table.writerows(rows)

    atomic_write(path, writer)


def _read_losses(path: Path, up_to_epoch: int) -> list[dict]:
    """Rows of an existing loss table for epochs ``<= up_to_epoch`` (what a resumed run keeps)."""
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        return [row for row in csv.DictReader(handle) if int(row["epoch"]) <= up_to_epoch]


def export_generator(generator: Translator, spec: PhaseSpec, model_out: Path, recipe: dict) -> Path:
    """Write ``<phase>.safetensors`` (generator state dict, float32) and ``<phase>.json``; returns the weights path.

    The JSON holds the phase metadata, the architecture kwargs (``Translator(**architecture)``),
    the training recipe, the m2m version and the SHA-256 of the weights file.
    """
    weights = Path(model_out) / f"{spec.name}.safetensors"
    state = {k: v.detach().float().cpu().contiguous() for k, v in generator.state_dict().items()}
    atomic_write(weights, lambda tmp: save_file(state, tmp, metadata={"phase": spec.name}))
    save_json(
        {
            "phase": spec.metadata(),
            "architecture": generator.config,
            "recipe": recipe,
            "parameters": parameter_count(generator),
            "m2m_version": __version__,
            "sha256": file_sha256(weights),
        },
        weights.with_suffix(".json"),
    )
    return weights


def train_phase(
    spec_name: str,
    prep_dir: str | os.PathLike,
    model_out: str | os.PathLike,
    recipe: TrainingRecipe | None = None,
    *,
    device: str = "auto",
    subjects: list[str] | None = None,
    extra_prep_dirs: list[str | os.PathLike] | None = None,
    predicted_inputs: str | os.PathLike | None = None,
    workers: int | None = None,
    include_flagged: bool = False,
    init_weights: str | os.PathLike | None = None,
    **changes: Any,
) -> Path:
    """Train (or resume training) the translator of phase ``spec_name`` and export its generator.

    Parameters
    ----------
    spec_name : ``phase1`` or ``phase2``.
    prep_dir : folder written by ``m2m-train prepare`` (``manifest.tsv`` + teacher maps).
    model_out : output folder (losses CSV, checkpoints, cache, exported weights).
    recipe : the training settings (:class:`~m2m_app.training.recipe.TrainingRecipe`; its
        defaults, the shipped weights' recipe, if None).
    device : ``auto``, ``cpu`` or ``cuda``.
    subjects : subject labels to train on (``sub-01``, ``01`` or ``sub-01_ses-a``); all ``ok`` rows if None.
    extra_prep_dirs : more prep dirs whose subjects are pooled with ``prep_dir``'s.
    predicted_inputs : phase 2 only: folder of phase-1 predicted maps laid out like the prep
        dir (see :mod:`m2m_app.training.slices`); those subjects are used with both inputs.
    workers : DataLoader worker processes (default: 0 on CPU, 4 on CUDA).
    include_flagged : also train on units the teacher's QC flagged (see :func:`~m2m_app.io.manifest.select_rows`).
    init_weights : fine-tune: start the generator from these weights (``packaged`` or a folder
        with ``<phase>.safetensors``; :func:`initial_weights`), whose architecture (``base``,
        ``depth``) replaces the recipe's; the default recipe is then
        :meth:`TrainingRecipe.fine_tuning` (smaller learning rate). The discriminators start afresh.
    changes : recipe fields to change, e.g. ``epochs=2, lr=1e-3`` (``dataclasses.replace``).

    The exported JSON's ``recipe`` is the recipe as it ran (phase 2 ignores skull stripping:
    its ``skull_strip_prob`` is 0; ``batch_size`` is summed over the DDP processes), with the
    run's facts: phase, world size, training datasets and subjects, slices per epoch, date
    and the last epoch's losses; with ``init_weights``, ``init_weights`` records their origin
    and SHA-256.

    Returns the path of the exported ``<phase>.safetensors``.
    """
    spec = get_phase(spec_name)
    default = TrainingRecipe.fine_tuning() if init_weights is not None else TrainingRecipe()
    recipe = dataclasses.replace(recipe or default, **changes)
    start_from: dict[str, Any] = {}
    if init_weights is not None:
        initial, start_from = initial_weights(spec, init_weights)
        base, depth = initial.config["base"], initial.config["depth"]
        if (base, depth) != (recipe.base, recipe.depth):
            log.info(
                "%s: the initial weights' architecture (base %d, depth %d) replaces the recipe's",
                spec.name,
                base,
                depth,
            )
        recipe = dataclasses.replace(recipe, base=base, depth=depth)
    if predicted_inputs is not None and spec.name != "phase2":
        raise UsageError("predicted_inputs only applies to phase2 (its inputs are phase-1 maps)")
    model_out = Path(model_out)
    rank, world, local_rank = _distributed_context()
    owns_group = world > 1 and not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl" if torch.cuda.is_available() and device != "cpu" else "gloo")
    torch_device = resolve_device(device, local_rank)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    seed_everything(recipe.seed)

    prep_dirs = [Path(prep_dir)] + [Path(p) for p in extra_prep_dirs or []]
    rows = select_rows(prep_dirs, subjects, include_flagged)
    sources = training_sources(rows, Path(predicted_inputs) if predicted_inputs else None)
    dataset = _cached_dataset(
        spec, sources, model_out / "cache", recipe.seed, rank, world, recipe.elastic_px, recipe.skull_strip_prob
    )
    recipe = dataclasses.replace(recipe, skull_strip_prob=dataset.skull_strip_prob)  # as it runs (phase 2: 0)
    sampler: DistributedSampler[int] = DistributedSampler(
        dataset, num_replicas=world, rank=rank, shuffle=True, seed=recipe.seed
    )
    workers = (4 if torch_device.type == "cuda" else 0) if workers is None else workers
    loader = DataLoader(
        dataset,
        batch_size=recipe.batch_size,
        sampler=sampler,
        num_workers=workers,
        worker_init_fn=worker_threads,
        pin_memory=torch_device.type == "cuda",
    )

    networks = _Networks(spec, recipe.base, recipe.depth, recipe.disc_base, recipe.ema_decay)
    if init_weights is not None:
        networks.start_from(initial)
        log.info("%s: fine-tuning from %s (sha256 %s)", spec.name, start_from["weights"], start_from["sha256"])
    networks = networks.to(torch_device)
    opt_g = torch.optim.Adam(networks.generator.parameters(), lr=recipe.lr, betas=BETAS)
    opt_d = torch.optim.Adam(
        list(networks.global_d.parameters()) + list(networks.patch_d.parameters()), lr=recipe.lr, betas=BETAS
    )
    record = {
        **dataclasses.asdict(recipe),
        "batch_size": recipe.batch_size * world,
        "phase": spec.name,
        "world_size": world,
        "training_datasets": training_datasets(prep_dirs),
        "predicted_inputs": Path(predicted_inputs).name if predicted_inputs else "",
        "subjects": sorted({row["subject"] for row, _ in rows}),
        "slices_per_epoch": len(dataset),
        **({"init_weights": start_from} if start_from else {}),
    }
    checkpoint = model_out / "checkpoints" / f"{spec.name}_last.pt"
    architecture: dict[str, Any] = {**networks.generator.config, "disc_base": recipe.disc_base}
    if recipe.ema_decay:  # a checkpoint with or without the moving average resumes only as such
        architecture["ema_decay"] = recipe.ema_decay
    if start_from:  # nor does a fine-tuning run from other initial weights
        architecture["init_sha256"] = start_from["sha256"]
    start = _resume(checkpoint, networks, opt_g, opt_d, architecture, torch_device)

    def wrap(module: nn.Module) -> nn.Module:
        if world == 1:
            return module
        return DistributedDataParallel(module, device_ids=[local_rank] if torch_device.type == "cuda" else None)

    step = _Step(
        spec,
        wrap(networks.generator),
        [wrap(networks.global_d), wrap(networks.patch_d)],
        opt_g,
        opt_d,
        recipe.adversarial_weight,
        autocast_dtype(torch_device, recipe.mixed_precision),
    )
    losses_csv = model_out / f"{spec.name}_losses.csv"
    history = _read_losses(losses_csv, start) if rank == 0 else []
    for epoch in range(start + 1, recipe.epochs + 1):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        networks.train()
        began, batches = time.monotonic(), 0
        sums: dict[str, float] = {}
        for batch in tqdm(loader, desc=f"{spec.name} epoch {epoch}/{recipe.epochs}", disable=rank != 0, leave=False):
            values = step({k: v.to(torch_device, non_blocking=True) for k, v in batch.items()})
            networks.update_ema()
            sums = {k: sums.get(k, 0.0) + v for k, v in values.items()}
            batches += 1
        if rank == 0:
            row = {
                "epoch": epoch,
                **{k: v / max(batches, 1) for k, v in sums.items()},
                "seconds": round(time.monotonic() - began, 1),
                "batches": batches,
            }
            history.append(row)
            _write_losses(losses_csv, history)
            _save_checkpoint(checkpoint, epoch, networks, opt_g, opt_d, architecture)
            log.info(
                "%s epoch %d/%d: %s",
                spec.name,
                epoch,
                recipe.epochs,
                ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch"),
            )
        _barrier(world)
    weights = model_out / f"{spec.name}.safetensors"
    if rank == 0:
        record["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        record["final_losses"] = history[-1] if history else {}
        export_generator(networks.exported(), spec, model_out, record)
    if owns_group:
        _barrier(world)
        dist.destroy_process_group()
    return weights


def _save_checkpoint(
    path: Path,
    epoch: int,
    networks: nn.Module,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    architecture: dict,
) -> None:
    """Atomically write the state after ``epoch`` completed epochs."""
    state = {
        "epoch": epoch,
        "networks": networks.state_dict(),
        "opt_g": opt_g.state_dict(),
        "opt_d": opt_d.state_dict(),
        "architecture": architecture,
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def _resume(
    path: Path,
    networks: nn.Module,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    architecture: dict,
    device: torch.device,
) -> int:
    """Load the last checkpoint if there is one; returns the number of epochs already done."""
    if not path.exists():
        return 0
    state = torch.load(path, map_location=device, weights_only=True)
    if state["architecture"] != architecture:
        raise UsageError(
            f"{path}: checkpoint of a different architecture {state['architecture']} "
            f"(now {architecture}); use another output folder or delete it"
        )
    networks.load_state_dict(state["networks"])
    opt_g.load_state_dict(state["opt_g"])
    opt_d.load_state_dict(state["opt_d"])
    log.info("resuming %s after epoch %d", path, state["epoch"])
    return int(state["epoch"])
