"""The training loop (training/loop.py): resume, export, moving average, the shipped recipe as defaults, DDP on
CPU, CUDA — tiny and synthetic."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import TINY, make_prep_dir
from m2m_app.inference.predict import load_translator, predict_volume
from m2m_app.models.phases import PHASE2
from m2m_app.models.translator import Translator
from m2m_app.training.evaluate import evaluate_phase
from m2m_app.training.loop import export_generator, train_phase

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.slow
def test_training_resumes_and_exports(tmp_path, caplog):
    prep = make_prep_dir(tmp_path)
    out = tmp_path / "model"
    options = {
        "batch_size": 16,
        "device": "cpu",
        "seed": 3,
        "lr": 1e-3,
        "disc_base": 4,
        "subjects": ["01"],
        "elastic_px": 2.0,
        **TINY,
    }
    train_phase("phase1", prep, out, epochs=1, **options)
    first = list(csv.DictReader((out / "phase1_losses.csv").open()))
    assert [r["epoch"] for r in first] == ["1"]
    caplog.set_level("INFO")
    train_phase("phase1", prep, out, epochs=2, **options)
    assert "resuming" in caplog.text
    rows = list(csv.DictReader((out / "phase1_losses.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"] and rows[0] == first[0]
    meta = json.loads((out / "phase1.json").read_text())
    assert meta["recipe"]["epochs"] == 2 and meta["recipe"]["subjects"] == ["sub-01"]
    assert meta["recipe"]["elastic_px"] == 2.0
    assert meta["recipe"]["training_datasets"] == ["prep"] and str(tmp_path) not in json.dumps(meta)
    assert meta["architecture"] == {"in_channels": 5, "out_channels": 7, **TINY}
    scored = {"test_subjects": ["sub-02"], "device": "cpu", "baselines": ("intensity", "grid")}
    results = evaluate_phase("phase1", prep, out, out_tsv=out / "eval.tsv", **scored)
    assert {r["method"] for r in results} == {"m2m", "baseline_fa_from_t1w", "reference_teacher_via_grid"}
    reference = next(r for r in results if r["method"] == "reference_teacher_via_grid")
    # the teacher's own FA through the model grid: far closer to the teacher than a 2-epoch network
    assert reference["fa_r_brain"] > 0.5 and reference["fa_mae_brain"] < results[0]["fa_mae_brain"]
    assert np.isfinite(results[0]["fa_mae_brain"]) and (out / "eval.tsv").exists()
    stripped = evaluate_phase("phase1", prep, out, skull_strip=True, **scored)
    assert [r["method"] for r in stripped] == [r["method"] for r in results]
    assert np.isfinite(stripped[0]["fa_mae_brain"]) and stripped[0]["fa_mae_brain"] != results[0]["fa_mae_brain"]


@pytest.mark.slow
def test_training_exports_the_moving_average_of_the_generator(tmp_path):
    """With --ema-decay the exported weights are the checkpoint's averaged generator (not its last
    weights), the average resumes with the run, and a run without it cannot resume from it."""
    from safetensors.torch import load_file

    from m2m_app.errors import UsageError

    prep, out = make_prep_dir(tmp_path), tmp_path / "model"
    options = {"batch_size": 16, "device": "cpu", "seed": 3, "lr": 1e-3, "disc_base": 4, **TINY}
    train_phase("phase1", prep, out, epochs=1, ema_decay=0.9, **options)
    train_phase("phase1", prep, out, epochs=2, ema_decay=0.9, **options)
    state = torch.load(out / "checkpoints" / "phase1_last.pt", weights_only=True)["networks"]
    exported = load_file(out / "phase1.safetensors")
    batches = sum(int(row["batches"]) for row in csv.DictReader((out / "phase1_losses.csv").open()))
    assert int(state["ema_updates"]) == batches > 1
    for name, value in exported.items():
        torch.testing.assert_close(value, state[f"ema_generator.{name}"])
    assert any(not torch.allclose(value, state[f"generator.{name}"]) for name, value in exported.items())
    metadata = json.loads((out / "phase1.json").read_text())
    assert metadata["recipe"]["ema_decay"] == 0.9
    assert metadata["parameters"] == sum(value.numel() for value in exported.values())
    with pytest.raises(UsageError, match="different architecture"):
        train_phase("phase1", prep, out, epochs=3, ema_decay=0.0, **options)


def test_exported_weights_record_the_package_version_and_their_checksum(tmp_path):
    """Every weights JSON says which m2m wrote it (a shipped-weights change bumps the version; CONTRIBUTING.md)."""
    from m2m_app import __version__
    from m2m_app.io.files import file_sha256

    weights = export_generator(
        Translator(PHASE2.in_channels, PHASE2.out_channels, **TINY), PHASE2, tmp_path, {"epochs": 0}
    )
    meta = json.loads(weights.with_suffix(".json").read_text())
    assert meta["m2m_version"] == __version__ and __version__ != "0+unknown"
    assert meta["sha256"] == file_sha256(weights) and meta["architecture"]["base"] == TINY["base"]


@pytest.mark.parametrize("phase", ["phase1", "phase2"])
def test_training_defaults_are_the_shipped_recipe(phase):
    """Training without options (the CLI and the Python API) follows the recipe recorded in
    the shipped weights' JSON, the one the model card measured."""
    from m2m_app.cli.train import cli
    from m2m_app.inference.predict import verify_weights
    from m2m_app.training.recipe import TrainingRecipe

    _, meta, _ = verify_weights(phase)
    recipe = meta["recipe"]
    shipped = {
        "base": meta["architecture"]["base"],
        "depth": meta["architecture"]["depth"],
        **{k: recipe[k] for k in ("batch_size", "lr", "ema_decay", "elastic_px", "disc_base", "adversarial_weight")},
    }
    on_the_command_line = ["base", "batch_size", "lr", "ema_decay", "elastic_px"]
    if phase == "phase1":  # phase 2 ignores skull stripping (its recipe records 0)
        shipped["skull_strip_prob"] = recipe["skull_strip_prob"]
        on_the_command_line.append("skull_strip_prob")
    assert recipe["world_size"] == 1  # so the recorded batch size is the per-process one
    api = {name: getattr(TrainingRecipe(), name) for name in shipped}  # train_phase's recipe is TrainingRecipe()
    assert api == shipped
    options = {p.name: p.default for p in cli.commands[phase].params}
    assert {k: options[k] for k in on_the_command_line} == {k: shipped[k] for k in on_the_command_line}


@pytest.mark.slow
def test_distributed_training_with_torchrun_on_cpu(tmp_path):
    """Two DDP processes (gloo on CPU) train one epoch; only rank 0 writes the loss table and the weights."""
    prep = make_prep_dir(tmp_path)
    out = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "m2m_app.cli.train",
        "phase1",
        str(prep),
        str(out),
        "--epochs",
        "1",
        "--width",
        "4",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--elastic-px",
        "2",
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    meta = json.loads((out / "phase1.json").read_text())
    assert meta["recipe"]["world_size"] == 2 and meta["recipe"]["batch_size"] == 8
    assert meta["recipe"]["elastic_px"] == 2.0
    assert [row["epoch"] for row in csv.DictReader((out / "phase1_losses.csv").open())] == ["1"]
    load_translator("phase1", out)


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on a machine with one)")
def test_cuda_training_and_inference_agree_with_cpu(tmp_path):
    """A tiny model trains on CUDA; its weights predict the same volume on CUDA as on the CPU."""
    prep, out = make_prep_dir(tmp_path), tmp_path / "model"
    train_phase(
        "phase1", prep, out, epochs=1, batch_size=16, device="cuda", seed=3, lr=1e-3, disc_base=4, ema_decay=0.9, **TINY
    )
    model, spec = load_translator("phase1", out)
    volume = np.random.default_rng(4).random((1, 24, 28, 24)).astype(np.float32)
    on_gpu = predict_volume(model, spec, volume, device="cuda")
    on_cpu = predict_volume(model, spec, volume, device="cpu")
    assert np.isfinite(on_gpu).all()
    np.testing.assert_allclose(on_gpu, on_cpu, atol=1e-3)


@pytest.mark.slow
def test_fine_tuning_starts_from_the_packaged_weights_and_records_their_checksum(tmp_path):
    """One short epoch from the packaged phase-1 weights on a tiny prep dir: the architecture is theirs, the
    learning rate the fine-tuning one, the exported JSON names their SHA-256, and the exported weights
    moved from them, but little (0.5 % of their norm here; a network trained from scratch lands 20 % away)."""
    from safetensors.torch import load_file

    from m2m_app.data.weights import PACKAGED_WEIGHTS
    from m2m_app.training.recipe import FINE_TUNE_LR

    prep, out = make_prep_dir(tmp_path, ("ras",)), tmp_path / "tuned"
    packaged = json.loads((PACKAGED_WEIGHTS / "phase1.json").read_text())
    train_phase("phase1", prep, out, init_weights="packaged", epochs=1, batch_size=16, device="cpu", disc_base=4)
    meta = json.loads((out / "phase1.json").read_text())
    start = meta["recipe"]["init_weights"]
    assert start["weights"] == "packaged" and start["sha256"] == packaged["sha256"]
    assert start["trained_on"] == packaged["recipe"]["subjects"]
    assert meta["architecture"] == packaged["architecture"] and meta["recipe"]["lr"] == FINE_TUNE_LR
    assert meta["sha256"] != packaged["sha256"] and meta["recipe"]["final_losses"]["batches"] > 0
    before, after = load_file(PACKAGED_WEIGHTS / "phase1.safetensors"), load_file(out / "phase1.safetensors")
    moved = torch.sqrt(sum(((after[k] - before[k]) ** 2).sum() for k in before))
    size = torch.sqrt(sum((before[k] ** 2).sum() for k in before))
    assert 0 < moved / size < 0.05, float(moved / size)


def test_fine_tuning_on_the_command_line_keeps_the_weights_architecture(tmp_path, monkeypatch):
    """``--init-weights`` lowers the default learning rate (an explicit ``--lr`` wins) and refuses ``--width``."""
    from click.testing import CliRunner

    from m2m_app.cli.train import cli
    from m2m_app.training import loop
    from m2m_app.training.recipe import FINE_TUNE_LR, TrainingRecipe

    calls = []
    monkeypatch.setattr(loop, "train_phase", lambda *args, **kwargs: calls.append((args, kwargs)) or tmp_path)
    prep = make_prep_dir(tmp_path, ("ras",))
    runner = CliRunner()
    for extra, lr in (([], FINE_TUNE_LR), (["--lr", "1e-3"], 1e-3)):
        result = runner.invoke(cli, ["phase1", str(prep), str(tmp_path / "out"), "--init-weights", "packaged", *extra])
        assert result.exit_code == 0, result.output
        recipe = calls[-1][0][3]
        assert isinstance(recipe, TrainingRecipe) and recipe.lr == lr and calls[-1][1]["init_weights"] == "packaged"
    result = runner.invoke(
        cli, ["phase1", str(prep), str(tmp_path / "out"), "--init-weights", "packaged", "--width", "8"]
    )
    assert result.exit_code != 0 and "--width cannot be given with --init-weights" in result.output


@pytest.mark.slow
def test_mixed_precision_training_keeps_losses_and_weights_in_float32(tmp_path, monkeypatch):
    """The training step under float16 autocast with gradient scaling, as on a CUDA GPU without bfloat16
    (run here on the CPU, where training stays in float32 unless told; bfloat16 takes the same path
    without the scaling): the networks' outputs are cast back before the losses, so every loss is
    finite, and the exported weights are float32."""
    import dataclasses

    from safetensors.torch import load_file

    from m2m_app.models import phases
    from m2m_app.training import loop

    scalers, loss_inputs = [], []
    original = loop._Step.__init__
    spec = phases.PHASES["phase1"]

    def loss(raw, target, weight):
        loss_inputs.append(raw.dtype)
        return spec.loss(raw, target, weight)

    monkeypatch.setitem(phases.PHASES, "phase1", dataclasses.replace(spec, loss=loss))

    def step_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        scalers.append(self.scaler.is_enabled())

    monkeypatch.setattr(loop, "autocast_dtype", lambda device, on: torch.float16 if on else None)
    monkeypatch.setattr(loop._Step, "__init__", step_init)
    prep, out = make_prep_dir(tmp_path, ("ras",)), tmp_path / "model"
    train_phase("phase1", prep, out, epochs=1, batch_size=16, device="cpu", lr=1e-3, disc_base=4, **TINY)
    meta = json.loads((out / "phase1.json").read_text())
    assert meta["recipe"]["mixed_precision"] is True and scalers == [True]
    assert loss_inputs and set(loss_inputs) == {torch.float32}
    losses = {k: v for k, v in meta["recipe"]["final_losses"].items() if k not in ("epoch", "seconds", "batches")}
    assert losses and all(np.isfinite(v) for v in losses.values()), losses
    assert all(value.dtype == torch.float32 for value in load_file(out / "phase1.safetensors").values())
