"""Which FA uncertainty ranks the held-out error best? Candidates scored on the leave-one-person-out folds.

The shipped FA uncertainty (``fa_sd``) is the standard deviation of phase 1's six passes
(3 slice orientations × the mirrored volume), computed on the 2 mm model grid and resampled to
the T1w grid. Two error sources it cannot see are written on the T1w grid after it:

* the T1w detail transfer (:mod:`m2m_app.maths.detail`) adds a high-pass FA shift taken from
  the T1w; where that shift is large, the FA is an intensity guess, so the shift's own size is
  a candidate error scale (FA units);
* at tissue boundaries a small misplacement between the T1w and the diffusion data moves a
  steep FA edge: ``δ × |∇FA|`` with ``δ`` in mm (the predicted FA's gradient, FA per mm).

For every fold (``WORK/loso-test-sub-XX`` of ``scripts/train_shipped_weights.sh``, with its
``fa_detail``) and each unit of the held-out person, phase 1 runs once the app's way
(:func:`~m2m_app.inference.predict.predict_phase1` with uncertainty and detail), and each
candidate is scored where ``m2m-train calibrate`` scores ``fa_sd`` (the evaluation protocol's
mask): the Spearman correlation with |FA error| (issue #17's bar: 0.3 on every fold). Terms add
in quadrature (independent errors). A learned candidate: the mean |FA error| of the *other*
folds' held-out voxels in the same cell of (predicted FA, SD, |shift|) quantile bins (an error
model fitted on people the fold's translator never saw, none of them its own test person).
The predicted FA itself is listed as a reference: an uncertainty should rank errors better
than "high FA, high error"; and the ceiling of the shipped SD, the Spearman it would reach
if it were exact (:func:`~m2m_app.training.calibration.ideal_spearman`). Prints a Markdown table
(fold means of their sessions), then the leave-one-fold-out choice among the candidates (the
best mean Spearman of the two other folds) and what it gives on the held-out fold.

Ensembles (issue #17's "a small ensemble of generators"): the spread of the exported
generator's six passes together with those of the last checkpoint's raw generator, or of
two earlier moving averages (``snapshots/``, copies of the checkpoint taken during training),
where the fold's folder has them. Usage:

    python benchmarks/ablate_uncertainty.py WORK [--threads 2]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger("ablate_uncertainty")
#: Misplacement scales (mm) of the edge term.
DELTAS_MM = (0.5, 1.0, 2.0)


def candidates(sd: np.ndarray, shift: np.ndarray, gradient: np.ndarray) -> dict[str, np.ndarray]:
    """``{name: uncertainty}`` from the six-pass SD, the detail shift (FA) and |∇FA| (FA/mm), same voxels."""
    out = {"six-pass SD (shipped)": sd, "|detail shift|": np.abs(shift)}
    out["SD ⊕ |shift|"] = np.hypot(sd, shift)
    for delta in DELTAS_MM:
        out[f"SD ⊕ {delta:g} mm·|∇FA|"] = np.hypot(sd, delta * gradient)
        out[f"SD ⊕ |shift| ⊕ {delta:g} mm·|∇FA|"] = np.sqrt(sd**2 + shift**2 + (delta * gradient) ** 2)
    return out


def ensemble_members(fold: Path) -> dict[str, list]:
    """Extra generators of a fold's training run, for the ensemble candidates (empty lists where missing).

    ``raw``: the last checkpoint's raw generator (the exported one is its moving average);
    ``snapshots``: the moving average of every third earlier epoch, from ``snapshots/phase1-*.pt``
    (copies of ``checkpoints/phase1_last.pt`` taken as the run went, sorted by time), at most two.
    """
    import torch

    from m2m_app.models.translator import Translator

    def generator(path: Path, prefix: str) -> Translator:
        state = torch.load(path, map_location="cpu", weights_only=True)
        architecture = {
            k: v for k, v in state["architecture"].items() if k in ("in_channels", "out_channels", "base", "depth")
        }
        model = Translator(**architecture)
        model.load_state_dict({k.removeprefix(prefix): v for k, v in state["networks"].items() if k.startswith(prefix)})
        return model.eval()

    last = fold / "checkpoints" / "phase1_last.pt"
    snapshots = sorted((fold / "snapshots").glob("phase1-*.pt"))[:-1][::-1][2::3][:2]
    return {
        "raw": [generator(last, "generator.")] if last.exists() else [],
        "snapshots": [generator(path, "ema_generator.") for path in snapshots],
    }


def fold_voxels(fold: Path, prep_dir: Path) -> list[dict[str, np.ndarray]]:
    """Per held-out unit of ``fold``, inside its evaluation mask (flat float arrays): ``fa`` (as
    written), ``sd`` (raw six-pass SD), ``shift`` (detail transfer), ``gradient`` (|∇FA|, FA/mm),
    ``error`` (|FA error|) and, where the fold's checkpoints allow, the ensembles' FA SD
    (``sd_raw``: the six passes of the exported and of the raw generator; ``sd_snapshots``: of
    the exported generator and two earlier moving averages), all on the output grid."""
    import json

    import nibabel as nib

    from m2m_app.inference.predict import (
        load_fa_detail,
        load_translator,
        phase1_from_views,
        phase1_to_output,
        predict_views,
        spread_maps,
        to_output,
    )
    from m2m_app.io.nifti import load_image, load_t1w
    from m2m_app.maths.tensor import tensor_derivatives
    from m2m_app.models.phases import get_phase, phase1_inputs
    from m2m_app.training.evaluate import evaluation_masks
    from m2m_app.training.folds import held_out_rows

    spec = get_phase("phase1")
    model, _ = load_translator("phase1", fold)
    members = ensemble_members(fold)
    detail = load_fa_detail(fold)
    trained_on = json.loads((fold / "phase1.json").read_text())["recipe"]["subjects"]
    units = []
    for row, prep in held_out_rows(prep_dir, trained_on):
        log.info("%s: %s", fold.name, row["subject"])
        img, data = load_t1w(row["t1w"])
        brain = evaluation_masks(prep, row)[0]
        inputs, grid = phase1_inputs(img, data)
        views = predict_views(model, spec, inputs, "cpu")
        pred = phase1_from_views(views, grid, mask_tensor=False, uncertainty=True)
        shape, affine = grid.output_grid()
        shift = detail.fa_shift_on(data, img.affine, shape, affine) if detail else np.zeros(shape, np.float32)
        out = phase1_to_output(pred, mask_tensor=False, fa_shift=shift if detail else None)
        gradient = np.linalg.norm(np.gradient(out["fa"], *nib.affines.voxel_sizes(affine)), axis=0)
        teacher_fa = tensor_derivatives(load_image(prep / row["diffusivity"])[1][brain])["fa"]
        volumes = {"fa": out["fa"], "sd": out["fa_sd"], "shift": shift, "gradient": gradient}
        fused = spec.fuse(views)
        for name, generators in members.items():
            if generators:
                passes = views + [v for g in generators for v in predict_views(g, spec, inputs, "cpu")]
                sd = spread_maps(passes, fused, spec)["fa_sd"]
                volumes[f"sd_{name}"] = to_output({"fa_sd": sd}, grid)["fa_sd"]
        unit = {key: volume[brain].astype(float) for key, volume in volumes.items()}
        units.append(unit | {"error": np.abs(unit["fa"] - teacher_fa)})
    return units


def binned_error_model(train: list[dict[str, np.ndarray]], bins: int = 8):
    """Mean |FA error| per cell of (predicted FA, six-pass SD, |shift|) quantile bins of ``train``'s
    voxels: a function of a unit's arrays giving its expected |error| (empty cells: the overall mean)."""
    features = ("fa", "sd", "shift")
    pooled = {key: np.concatenate([np.abs(u[key]) for u in train]) for key in (*features, "error")}
    edges = {key: np.quantile(pooled[key], np.linspace(0, 1, bins + 1)[1:-1]) for key in features}

    def cells(unit: dict[str, np.ndarray]) -> np.ndarray:
        index = [np.searchsorted(edges[key], np.abs(unit[key])) for key in features]
        return np.ravel_multi_index(index, (bins,) * len(features))

    where = cells(pooled)
    sums = np.bincount(where, weights=pooled["error"], minlength=bins ** len(features))
    counts = np.bincount(where, minlength=bins ** len(features))
    means = np.where(counts > 0, sums / np.maximum(counts, 1), pooled["error"].mean())
    return lambda unit: means[cells(unit)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path, help="the WORK folder of scripts/train_shipped_weights.sh")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    import torch

    from m2m_app.training.calibration import ideal_spearman, spearman

    torch.set_num_threads(args.threads)
    folds = sorted(path for path in args.work.glob("loso-test-sub-*") if (path / "phase1.safetensors").exists())
    if len(folds) < 2:
        raise SystemExit(f"need two folds or more: loso-test-sub-*/phase1.safetensors under {args.work}")
    voxels = {fold.name: fold_voxels(fold, args.work / "prep") for fold in folds}
    scores: dict[str, dict[str, float]] = {}
    for name, units in voxels.items():
        model = binned_error_model([u for other, us in voxels.items() if other != name for u in us])
        per_unit = []
        for unit in units:
            maps = candidates(unit["sd"], unit["shift"], unit["gradient"])
            maps["binned error model (other folds)"] = model(unit)
            if "sd_raw" in unit:
                maps["12-pass SD: exported + raw generator"] = unit["sd_raw"]
            if "sd_snapshots" in unit:
                maps["18-pass SD: exported + 2 earlier moving averages"] = unit["sd_snapshots"]
            maps["predicted FA (reference)"] = unit["fa"]
            per_unit.append({key: spearman(value, unit["error"]) for key, value in maps.items()})
            per_unit[-1]["six-pass SD, ideal (errors drawn from it)"] = ideal_spearman(unit["sd"])
        scores[name] = {key: float(np.mean([u[key] for u in per_unit])) for key in per_unit[0]}
    names = list(dict.fromkeys(name for table in scores.values() for name in table))
    print("# Spearman(FA uncertainty, |FA error|) on the held-out people (fold means of their sessions)\n")
    print("| candidate | " + " | ".join(scores) + " | mean |")
    print("|---" * (len(scores) + 2) + "|")
    for name in names:
        values = [table.get(name) for table in scores.values()]
        cells = ["—" if v is None else f"{v:.3f}" for v in values]
        mean = f"{np.mean(values):.3f}" if None not in values else "—"
        print(f"| {name} | " + " | ".join(cells) + f" | {mean} |")
    print("\n# Leave-one-fold-out choice (best mean Spearman of the other folds; reference and ceiling excluded)\n")
    print("| held-out fold | chosen | shipped SD → chosen |")
    print("|---|---|---|")
    choices = [n for n in names if "reference" not in n and "ideal" not in n and all(n in t for t in scores.values())]
    for fold, table in scores.items():
        others = [t for f, t in scores.items() if f != fold]
        chosen = max(choices, key=lambda n: np.mean([t[n] for t in others]))
        print(f"| {fold} | {chosen} | {table[choices[0]]:.3f} → {table[chosen]:.3f} |")


if __name__ == "__main__":
    main()
