"""Time the translators' inference on a 1 mm T1w, stage by stage (wall seconds, peak RSS).

    python benchmarks/bench_inference.py [--threads 2] [--weights-dir DIR] [--t1w PATH]

Uses ``../shared/data/ds-real/sub-01/anat/sub-01_T1w.nii.gz`` (beside the repository) when it exists, else
nilearn's 1 mm MNI152 template. Phases whose weights are missing run with randomly
initialised networks of the default architecture (same cost; marked ``random`` below).
The ``uncertainty`` rows are what the per-voxel uncertainty maps add (spread of the six
passes); the other rows are the prediction without them. Everything runs on the model grid;
the last row brings every map onto the T1w grid, as the app does when writing.
"""

from __future__ import annotations

import argparse
import logging
import resource
import time
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from m2m_app.errors import MissingInputError
from m2m_app.inference.predict import load_translator, predict_views, spread_maps, to_output
from m2m_app.io.nifti import load_t1w
from m2m_app.maths.tensor import masked_tensor_maps
from m2m_app.models.phases import get_phase, phase1_inputs, phase2_inputs
from m2m_app.models.translator import Translator, parameter_count

log = logging.getLogger("bench_inference")

REAL_T1W = Path(__file__).resolve().parents[2] / "shared" / "data" / "ds-real" / "sub-01" / "anat" / "sub-01_T1w.nii.gz"


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def stage(table: list[tuple[str, float, float]], name: str):
    """Append ``(name, wall seconds, peak RSS MiB)`` to ``table`` when the block ends."""
    began = time.perf_counter()
    yield
    table.append((name, time.perf_counter() - began, peak_rss_mib()))


def translator(phase: str, weights_dir: Path | None) -> tuple[Translator, str]:
    """The trained translator of ``phase``, or a random one of the default size when no weights exist."""
    try:
        return load_translator(phase, weights_dir)[0], "trained"
    except MissingInputError as err:
        log.warning("%s; timing a randomly initialised network", err)
        spec = get_phase(phase)
        return Translator(spec.in_channels, spec.out_channels).eval(), "random"


def t1w_image(path: Path | None) -> tuple[nib.Nifti1Image, np.ndarray, str]:
    """The benchmark T1w: ``path``, else the shared real subject, else the MNI152 template."""
    path = path or (REAL_T1W if REAL_T1W.exists() else None)
    if path is not None:
        return (*load_t1w(path), str(path))
    from nilearn.datasets import load_mni152_template

    img = load_mni152_template(resolution=1)
    return img, np.asarray(img.dataobj, dtype=np.float32), "MNI152 template (1 mm)"


def run(t1w_path: Path | None, weights_dir: Path | None, batch_size: int) -> list[tuple[str, float, float]]:
    """Run both phases stage by stage; returns the table rows."""
    table: list[tuple[str, float, float]] = []
    with stage(table, "load T1w"):
        img, data, source = t1w_image(t1w_path)
    log.info("T1w: %s, shape %s, zooms %s", source, data.shape, img.header.get_zooms()[:3])
    model1, kind1 = translator("phase1", weights_dir)
    model2, kind2 = translator("phase2", weights_dir)
    spec1, spec2 = get_phase("phase1"), get_phase("phase2")
    log.info(
        "phase1 %s (%d parameters), phase2 %s (%d parameters)",
        kind1,
        parameter_count(model1),
        kind2,
        parameter_count(model2),
    )
    began = time.perf_counter()
    with stage(table, "phase1: conform"):
        inputs, grid = phase1_inputs(img, data)
    with stage(table, f"phase1: network, 3 views × 2 mirrors ({kind1})"):
        views = predict_views(model1, spec1, inputs, "cpu", batch_size)
    with stage(table, "phase1: view fusion"):
        raw = spec1.fuse(views)
    with stage(table, "phase1: decode"):
        decoded = spec1.decode(raw)
        mask = decoded["mask"] >= 0.5
        tensor = np.where(mask[..., None], decoded["tensor"], 0.0).astype(np.float32)
    table.append(("phase1: total", time.perf_counter() - began, peak_rss_mib()))
    with stage(table, "phase1 uncertainty: FA SD + V1 dispersion"):
        spreads = spread_maps(views, raw, spec1, mask)
    began = time.perf_counter()
    with stage(table, "phase2: tensor maps on model grid"):
        full = masked_tensor_maps(tensor, mask)
    with stage(table, "phase2: inputs"):
        inputs2 = phase2_inputs(full["fa"], full["md"], full["colfa"], None)
    with stage(table, f"phase2: network, 3 views × 2 mirrors ({kind2})"):
        views2 = predict_views(model2, spec2, inputs2, "cpu", batch_size)
        raw2 = spec2.fuse(views2)
    with stage(table, "phase2: decode"):
        tracts = spec2.decode(raw2)
    table.append(("phase2: total", time.perf_counter() - began, peak_rss_mib()))
    with stage(table, "phase2 uncertainty: TDI SD"):
        spreads |= spread_maps(views2, raw2, spec2, mask)
    with stage(table, "outputs: every map onto the T1w grid"):
        to_output({"diffusivity": tensor, "mask": mask, **full, **tracts, **spreads}, grid, mask)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--weights-dir", type=Path, default=None, help="folder of <phase>.safetensors/.json")
    parser.add_argument("--t1w", type=Path, default=None, help="T1w to use instead of the default one")
    parser.add_argument("--batch-size", type=int, default=16, help="slices per forward pass")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    table = run(args.t1w, args.weights_dir, args.batch_size)
    width = max(len(name) for name, _, _ in table)
    print(f"\n{'stage':<{width}}  {'wall s':>7}  {'peak RSS MiB':>12}   (torch threads: {args.threads})")
    for name, seconds, rss in table:
        print(f"{name:<{width}}  {seconds:7.2f}  {rss:12.0f}")


if __name__ == "__main__":
    main()
