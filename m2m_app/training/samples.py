"""Training samples from a prep dir: one manifest row's files read and put on the model grid.

:func:`build_sample` turns a row of ``manifest.tsv`` (see :mod:`m2m_app.io.manifest`) into a
:class:`Sample` of its phase: the network inputs, the targets and the supervision weight. It is
file I/O of training data, so it lives in ``training``, not beside the phase specs in ``models``
(which may not import ``training``): each phase's builder is found by the phase's name in
:data:`BUILDERS`, and :class:`~m2m_app.models.phases.PhaseSpec` says only what a phase reads and
predicts (channels), not where its training files come from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from m2m_app.errors import BadDataError
from m2m_app.io.nifti import load_image, load_t1w
from m2m_app.maths.grid import ConformedGrid, resample_tensor
from m2m_app.models.encoding import tensor_to_log
from m2m_app.models.phases import PhaseSpec, phase1_inputs, phase2_inputs, relative_tdi


@dataclass
class Sample:
    """One subject on the model grid: ``inputs (C, X, Y, Z)``, ``targets (K, X, Y, Z)``, ``weight (X, Y, Z)``.

    ``weight`` is 1 where the masked outputs are supervised (the teacher's brain mask).
    """

    inputs: np.ndarray
    targets: np.ndarray
    weight: np.ndarray
    grid: ConformedGrid


def load_map(folder: Path, row: dict[str, str], column: str) -> np.ndarray:
    """The image named by ``row[column]`` (relative to ``folder``), float32 data."""
    if not row.get(column):
        raise BadDataError(f"{folder}/manifest.tsv: subject {row.get('subject')} has no '{column}' file")
    return load_image(folder / row[column])[1]


def measured_region(prep_dir: Path, row: dict[str, str], mask: np.ndarray) -> np.ndarray:
    """``mask`` (T1w grid) limited to where the DWI was measured: the teacher's ``fov`` column.

    Prep dirs written before the teacher recorded its field of view have no such column;
    their targets were already zero outside it, so ``mask`` alone is returned.
    """
    return mask & (load_map(prep_dir, row, "fov") > 0) if row.get("fov") else mask


def build_phase1(row: dict[str, str], prep_dir: Path, inputs_dir: Path | None) -> Sample:
    """Phase 1's sample of one manifest row: the conformed T1w ``(1, X, Y, Z)``; targets the teacher's
    log-tensor (6 channels) and brain mask; weight where the DWI measured a tensor."""
    inputs, grid = phase1_inputs(*load_t1w(row["t1w"]))
    brain = load_map(prep_dir, row, "mask") > 0
    mask = grid.to_model(brain.astype(np.float32)) >= 0.5
    measured = grid.to_model(measured_region(prep_dir, row, brain).astype(np.float32)) >= 0.5
    logs = tensor_to_log(resample_tensor(load_map(prep_dir, row, "diffusivity"), grid))
    # the tensor is taught where it was measured; the brain mask (from the T1w) everywhere
    weight = measured & np.any(logs != 0, axis=-1)
    targets = np.concatenate([np.moveaxis(logs, -1, 0), mask[None]], axis=0).astype(np.float32)
    return Sample(inputs, targets, weight.astype(np.float32), grid)


def build_phase2(row: dict[str, str], prep_dir: Path, inputs_dir: Path | None) -> Sample:
    """Phase 2's sample of one manifest row: FA, MD and colour FA ``(5, X, Y, Z)`` from ``inputs_dir``
    (phase-1 predictions) or the prep dir; targets ``log1p`` relative TDI and DEC-TDI; weight the
    measured brain."""
    _, grid = phase1_inputs(*load_t1w(row["t1w"]))
    source = inputs_dir or prep_dir
    fa, md, colfa = (load_map(source, row, c) for c in ("fa", "md", "colfa"))
    inputs = phase2_inputs(fa, md, colfa, grid)
    mask = load_map(prep_dir, row, "mask") > 0
    measured = measured_region(prep_dir, row, mask)
    tdi = relative_tdi(load_map(prep_dir, row, "tdi"), measured)
    targets = grid.to_model(np.concatenate([np.log1p(tdi)[..., None], load_map(prep_dir, row, "dectdi")], -1))
    weight = grid.to_model(measured.astype(np.float32)) >= 0.5
    return Sample(inputs, np.moveaxis(targets, -1, 0).astype(np.float32), weight.astype(np.float32), grid)


#: The sample builder of each phase, by :attr:`PhaseSpec.name`: ``(row, prep_dir, inputs_dir) -> Sample``.
BUILDERS: dict[str, Callable[[dict[str, str], Path, Path | None], Sample]] = {
    "phase1": build_phase1,
    "phase2": build_phase2,
}


def build_sample(spec: PhaseSpec, row: dict[str, str], prep_dir: Path, inputs_dir: Path | None = None) -> Sample:
    """The :class:`Sample` of ``spec``'s phase for one manifest ``row`` of ``prep_dir``.

    ``inputs_dir`` replaces the prep dir as the source of the input maps (phase 2 trained on
    phase-1 predictions); None reads them from the prep dir.
    """
    return BUILDERS[spec.name](row, prep_dir, inputs_dir)
