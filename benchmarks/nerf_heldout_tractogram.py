"""What the NeRF fit needs, measured on a held-out person's tractogram (issue 20, item 3).

The app is run first on a person its weights never saw (``m2m BIDS OUT participant -w WORK``,
e.g. ds-extra's sub-03 with weights trained on ds-real only); this script then reads, from that
work folder, the inputs of the unit's ``nerf_fit`` node (phase 2's track density and direction
and phase 1's brain mask, on the 2 mm model grid), fits the field again with each setting below,
traces it with the app's tracking rules and seed, and compares every tractogram with the
teacher's one of the same unit (``m2m-train prepare``'s, tracked on the DWI) by
:func:`~m2m_app.training.evaluate.tractogram_metrics`, the columns of ``m2m-train
evaluate-tractogram``. Prints a Markdown table: setting, steps run, fit and tracking seconds
(wall and CPU), slice PSNR, and the agreement with the teacher.

    python benchmarks/nerf_heldout_tractogram.py WORK PREP --subject sub-03_ses-1 [--threads 1]
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from m2m_app.io.naming import Subject

log = logging.getLogger("nerf_heldout_tractogram")

#: ``(label, changes to the app's FieldFitSettings)``; the first row is the app's setting.
VARIANTS: tuple[tuple[str, dict], ...] = (
    ("app default", {}),
    ("max 500 steps", {"max_steps": 500}),
    ("max 1000 steps", {"max_steps": 1000}),
    ("max 3000 steps", {"max_steps": 3000}),
    ("grid factor 4", {"grid_factor": 4}),
    ("grid factor 2", {"grid_factor": 2}),
    ("batch 2048", {"batch_size": 2048}),
)


def node_inputs(work: Path, subject: Subject) -> dict:
    """The inputs of ``subject``'s ``nerf_fit`` node in the app's work folder ``work``."""
    from nipype.utils.filemanip import loadpkl

    from m2m_app.workflows.base import node_prefix

    prefix = node_prefix(subject)
    found = sorted(work.glob(f"**/{prefix}/**/nerf_fit/_inputs.pklz"))
    if not found:
        raise SystemExit(f"no {prefix}/**/nerf_fit/_inputs.pklz under {work}: run the app with -w {work} first")
    return loadpkl(found[0])


def timed(function, *args, **kwargs):
    """``(result, wall s, CPU s)`` of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path, help="the app's work folder (-w) of a run on the held-out person")
    parser.add_argument("prep", type=Path, help="m2m-train prepare's folder holding the same unit")
    parser.add_argument("--subject", required=True, help="the unit, as in the prep manifest (sub-03_ses-1)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    import torch
    from dipy.io.streamline import load_tractogram

    from m2m_app.io.manifest import select_rows
    from m2m_app.io.nifti import load_image
    from m2m_app.models.nerf import FieldFitSettings, fit_field
    from m2m_app.tractography.streamlines import track_field
    from m2m_app.training.evaluate import tractogram_metrics

    torch.set_num_threads(args.threads)
    ((row, prep),) = select_rows([args.prep], [args.subject])
    inputs = node_inputs(args.work, Subject(row["participant"], row["session"] or None))
    grid_img, tdi = load_image(inputs["tdi"])
    dectdi = np.clip(load_image(inputs["dectdi"])[1], 0, 1)
    mask = load_image(inputs["mask"])[1] > 0
    reference, _ = load_image(row["t1w"])
    brain = load_image(prep / row["mask"])[1] > 0
    teacher = list(load_tractogram(str(prep / row["tractogram"]), reference, bbox_valid_check=False).streamlines)
    print(f"# NeRF settings against the teacher's tractogram, {args.subject} ({len(teacher)} teacher streamlines)\n")
    columns = ("tdi_r_brain", "visited_dice", "predicted_near_teacher", "teacher_near_predicted", "n_predicted")
    print("| setting | steps | fit wall s | fit CPU s | track wall s | PSNR density dB | " + " | ".join(columns) + " |")
    print("|---" * (6 + len(columns)) + "|")
    for label, changes in VARIANTS:
        settings = replace(FieldFitSettings(), **changes)
        log.info("fitting: %s", label)
        field, fit_wall, fit_cpu = timed(
            fit_field, np.clip(tdi, 0, None), dectdi, mask, grid_img.affine, settings, seed=0, num_threads=args.threads
        )
        streamlines, track_wall, _ = timed(track_field, field, mask, grid_img.affine, seed=0)
        metrics = tractogram_metrics(streamlines, teacher, reference.shape[:3], reference.affine, brain)
        cells = [f"{metrics[c]:.3f}" if c != "n_predicted" else f"{metrics[c]:d}" for c in columns]
        print(
            f"| {label} | {field.info['steps']} | {fit_wall:.1f} | {fit_cpu:.1f} | {track_wall:.1f} | "
            f"{field.info['psnr_density_db']:.1f} | " + " | ".join(cells) + " |",
            flush=True,
        )


if __name__ == "__main__":
    main()
