"""Training samples from prep-dir files (training/samples.py)."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest

from conftest import make_prep_dir
from m2m_app.maths import grid as conform
from m2m_app.models.phases import PHASE2
from m2m_app.training import slices
from m2m_app.training.samples import build_sample

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_phase2_sample_from_predicted_inputs(tmp_path):
    prep = make_prep_dir(tmp_path, kinds=("las",))
    row = next(csv.DictReader((prep / "manifest.tsv").open(), delimiter="\t"))
    predicted = tmp_path / "predicted"
    for column in ("fa", "md", "colfa"):
        img = nib.load(prep / row[column])
        (predicted / row[column]).parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj) * 0.5, img.affine), predicted / row[column])
    sources = slices.training_sources([(row, prep)], predicted)
    assert [s.inputs_dir for s in sources] == [None, predicted]
    teacher, from_phase1 = (build_sample(PHASE2, s.row, s.prep_dir, s.inputs_dir) for s in sources)
    assert teacher.inputs.shape == (5,) + conform.MODEL_SHAPE and teacher.targets.shape == (4,) + conform.MODEL_SHAPE
    assert np.allclose(from_phase1.inputs, teacher.inputs * 0.5, atol=1e-5)
    assert np.array_equal(from_phase1.targets, teacher.targets)
    brain = teacher.weight > 0
    assert np.percentile(np.expm1(teacher.targets[0][brain]), 99) == pytest.approx(1.0, abs=0.3)
