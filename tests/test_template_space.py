"""Derivatives in a template space through ANTs transforms of known effect, and the --output-spaces syntax."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from scipy.spatial.transform import Rotation

from m2m_app.cli.run import participant_main
from m2m_app.data.templates import OutputSpace, parse_output_spaces
from m2m_app.errors import UsageError
from m2m_app.io.naming import Subject, derivative_paths
from m2m_app.io.tractogram import load_streamlines, save_tractogram
from m2m_app.maths.tensor import eigen_decomposition, components_to_matrix
from m2m_app.registration.normalize import load_template
from m2m_app.registration.template_space import transform_paths, write_template_space

SPACE = OutputSpace("MNI152NLin2009aSym", 2)
LPS = np.diag([-1.0, -1.0, 1.0])


def test_output_spaces_follow_fmriprep_syntax():
    spaces = parse_output_spaces(["MNI152NLin2009aSym:res-2 T1w", "MNI152NLin2009aSym:res-2"])
    assert spaces == (SPACE, OutputSpace("T1w"))
    assert (
        spaces[0].entities == {"space": "MNI152NLin2009aSym", "res": "2"}
        and spaces[0].label == "MNI152NLin2009aSym:res-2"
    )
    assert parse_output_spaces([]) == (OutputSpace("T1w"),)
    for bad, words in (
        ("MNI152NLin6Asym", "not installed offline"),
        ("T1w:res-1", "--output-resolution"),
        ("MNI:res", "NAME:res-N"),
    ):
        with pytest.raises(UsageError, match=words):
            parse_output_spaces([bad])


def test_an_unknown_space_is_a_usage_error(tmp_path):
    (tmp_path / "bids").mkdir()
    (tmp_path / "bids" / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.10.0"}')
    result = CliRunner().invoke(
        participant_main, [str(tmp_path / "bids"), str(tmp_path / "out"), "participant", "--output-spaces", "MNI305"]
    )
    assert result.exit_code == 64 and "available: T1w, MNI152NLin2009aSym" in result.output


def _write_transform(path, matrix=np.eye(3), translation=(0.0, 0.0, 0.0)):
    """An ITK affine transform (fixed → moving points, LPS mm, centre 0) as ANTs writes it."""
    import ants

    transform = ants.create_ants_transform(
        transform_type="AffineTransform", dimension=3, matrix=np.asarray(matrix), translation=list(translation)
    )
    ants.write_transform(transform, str(path))
    return path


@pytest.fixture(scope="module")
def subject_in_t1w_space(tmp_path_factory):
    """A 'subject' that is the template itself on its 2 mm grid: T1w, brain mask, FA (the template's
    white-matter probability), a left-right tensor everywhere in the brain, and three streamlines."""
    root = tmp_path_factory.mktemp("space")
    template = load_template(SPACE.template(), 2.0)
    subject = Subject("01")
    paths = derivative_paths(root / "out", subject, "nerf")
    brain = template.brain

    def save(key, data):
        paths[key].parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.asarray(data, np.float32), template.affine), paths[key])

    save("mask", brain)
    save("fa", template.wm * brain)
    save("md", brain * 8e-4)
    save("diffusivity", brain[..., None] * np.array([1.7e-3, 0, 0, 0.3e-3, 0, 0.3e-3]))
    t1w = root / "t1w.nii.gz"
    nib.save(nib.Nifti1Image(template.t1w.astype(np.float32), template.affine), t1w)
    lines = [np.array([[x, y, 10.0] for x in np.linspace(-40, 40, 20)]) for y in (-20.0, 0.0, 20.0)]
    save_tractogram(lines, nib.load(paths["mask"]), paths["tractogram"])
    written = {key: paths[key] for key in ("mask", "fa", "md", "diffusivity", "tractogram")}
    return root, subject, t1w, written, lines


def _run(root, subject, t1w, written, forward, inverse):
    transforms = transform_paths(root / "out", subject, SPACE.name)
    _write_transform(transforms["forward"], *forward)
    _write_transform(transforms["inverse"], *inverse)
    return write_template_space(root / "out", subject, SPACE, t1w, written, transforms, threads=2)


@pytest.mark.slow
def test_identity_registration_keeps_everything_in_place(subject_in_t1w_space):
    root, subject, t1w, written, lines = subject_in_t1w_space
    out, qc = _run(root, subject, t1w, written, (np.eye(3),), (np.eye(3),))
    assert qc["dice"] > 0.99 and qc["correlation"] > 0.99 and not qc["flagged"]
    fa = nib.load(out["fa"]).get_fdata()
    np.testing.assert_allclose(fa, nib.load(written["fa"]).get_fdata(), atol=1e-5)
    assert "_space-MNI152NLin2009aSym_res-2_" in out["fa"].name
    sidecar = json.loads(out["fa"].with_name(out["fa"].name.replace(".nii.gz", ".json")).read_text())
    assert (
        sidecar["SpatialReference"] == "MNI152NLin2009aSym"
        and sidecar["Transform"] == "sub-01_from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.h5"
    )
    moved = load_streamlines(out["tractogram"], out["mask"])
    np.testing.assert_allclose(np.concatenate(moved), np.concatenate(lines), atol=1e-3)


@pytest.mark.slow
def test_a_rotation_turns_v1_and_a_shift_moves_the_streamlines(subject_in_t1w_space):
    root, subject, t1w, written, lines = subject_in_t1w_space
    turn = Rotation.from_euler("z", 20, degrees=True).as_matrix()  # template → subject points (LPS = RAS for z)
    out, qc = _run(root, subject, t1w, written, (turn,), (turn.T,))
    v1 = nib.load(out["v1"]).get_fdata()
    inside = nib.load(out["mask"]).get_fdata() > 0
    expected = turn.T @ [1.0, 0, 0]  # the subject's left-right fibre, seen in the template
    assert np.percentile(np.abs(v1[inside] @ expected), 5) > 0.999
    tensors = components_to_matrix(nib.load(out["diffusivity"]).get_fdata()[inside])
    np.testing.assert_allclose(eigen_decomposition(tensors)[0].mean(0), [1.7e-3, 0.3e-3, 0.3e-3], rtol=0.02)
    shift = np.array([12.0, -6.0, 4.0])  # LPS mm, template → subject
    out, qc = _run(root, subject, t1w, written, (np.eye(3), shift), (np.eye(3), -shift))
    assert qc["flagged"] and qc["dice"] < 0.9  # a 14 mm misregistration is flagged
    moved = np.concatenate(load_streamlines(out["tractogram"], out["mask"]))
    np.testing.assert_allclose(moved, np.concatenate(lines) - LPS @ shift, atol=1e-2)


def test_group_level_in_template_space(tmp_path):
    """Two participants in the template (FA 0.3 and 0.5 in the brain): the group mean and SD
    maps, the tissue table, and the group page showing both."""
    from m2m_app.reports.group import write_group_outputs
    from m2m_app.registration.group import write_group_template_outputs

    template = load_template(SPACE.template(), 2.0)
    for label, fa in (("01", 0.3), ("02", 0.5)):
        subject = Subject(label)
        paths = derivative_paths(tmp_path, subject, "nerf", space=SPACE.entities)
        volumes = {"mask": template.brain, "fa": template.brain * fa, "md": template.brain * 8e-4}
        volumes |= {"ad": template.brain * 1.2e-3, "rd": template.brain * 6e-4}
        for key, volume in volumes.items():
            paths[key].parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(volume.astype(np.float32), template.affine), paths[key])
        qc = tmp_path / subject.label / f"{subject.label}_desc-m2m_qc.json"
        qc.write_text(json.dumps({"subject": subject.label, "mean_fa": fa}))
    (group,) = write_group_template_outputs(tmp_path)
    assert group.space == SPACE and group.units == ["sub-01", "sub-02"]
    brain = template.brain
    np.testing.assert_allclose(nib.load(group.maps["mean"]).get_fdata()[brain], 0.4, atol=1e-6)
    np.testing.assert_allclose(nib.load(group.maps["sd"]).get_fdata()[brain], np.std([0.3, 0.5], ddof=1), atol=1e-6)
    assert not nib.load(group.maps["count"]).get_fdata()[~brain].any()
    lines = group.table.read_text().splitlines()
    assert group.table.name == "group_space-MNI152NLin2009aSym_res-2_tissue.tsv"
    header = lines[0].split("\t")
    first = dict(zip(header, lines[1].split("\t")))
    assert float(first["fa_wm"]) == pytest.approx(0.3) and float(first["md_gm"]) == pytest.approx(8e-4)
    assert int(first["voxels_wm"]) == int((brain & (template.wm > 0.5)).sum()) > 1000
    spaces = [{"space": SPACE.label, "maps": group.maps, "table": group.table, "rows": group.rows}]
    write_group_outputs(tmp_path, spaces)
    page = (tmp_path / "group.html").read_text()
    assert "MNI152NLin2009aSym:res-2: 2 units" in page and "group_MNI152NLin2009aSym_res-2_mean_FA.svg" in page


#: Registers a template shifted 6 mm twice (short SyN schedule, seed 3, one ITK thread) in a
#: fresh process (ITK reads its thread count once, when antspyx is first imported) and prints the
#: largest difference between the two transforms' fields and the field's x shift at the centre.
_REPEAT = """
import sys
from pathlib import Path
import numpy as np
from m2m_app.data.templates import OutputSpace
from m2m_app.registration import normalize
normalize.SYN_ITERATIONS = (5, 2, 0)
space, folder = OutputSpace("MNI152NLin2009aSym", 2), Path(sys.argv[1])
template = normalize.load_template(space.template(), 2.0)
shifted, brain = np.roll(template.t1w, 3, axis=0), np.roll(template.brain, 3, axis=0)
fields = []
for run in range(2):
    forward, inverse = folder / f"fwd{run}.h5", folder / f"inv{run}.h5"
    normalize.register_to_template(shifted, template.affine, brain, space.template(), forward, inverse, 3, 1)
    fields.append(normalize.coordinate_field(forward, (20, 22, 18), template.affine, shifted.shape, template.affine))
centre = fields[0][10, 11, 9] - (template.affine[:3, :3] @ [10, 11, 9] + template.affine[:3, 3])
print(np.abs(fields[0] - fields[1]).max(), centre[0])
"""


@pytest.mark.slow
def test_registration_is_seeded_and_repeatable(tmp_path):
    """Two registrations of the same images with the same seed and one ITK thread give the same
    transform, bit for bit (a short SyN schedule: the repeatability, not the accuracy, is tested)."""
    result = subprocess.run([sys.executable, "-c", _REPEAT, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    difference, shift = map(float, result.stdout.split())
    assert difference == 0.0
    assert abs(shift - 6.0) < 1.5  # template → subject: 6 mm along x


def test_too_little_brain_is_a_clear_error(tmp_path):
    from m2m_app.errors import BadDataError
    from m2m_app.registration.normalize import register_to_template

    brain = np.zeros((30, 30, 30), bool)
    brain[10:15, 10:15, 10:15] = True
    with pytest.raises(BadDataError, match=r"holds 0 ml .* too little brain to register to MNI152NLin2009aSym"):
        register_to_template(
            np.ones((30, 30, 30)), np.eye(4), brain, SPACE.template(), tmp_path / "f.h5", tmp_path / "i.h5"
        )


@pytest.mark.slow
def test_the_template_grid_finer_than_the_registration_grid(subject_in_t1w_space):
    """At the template's own 1 mm grid the forward field is interpolated from the registration's
    2 mm grid: with the identity, the maps are the 2 mm maps resampled trilinearly onto 1 mm."""
    from m2m_app.maths.grid import resample_scalar

    root, subject, t1w, written, _ = subject_in_t1w_space
    transforms = transform_paths(root / "out", subject, SPACE.name)
    _write_transform(transforms["forward"])
    _write_transform(transforms["inverse"])
    fine = OutputSpace(SPACE.name)
    out, qc = write_template_space(root / "out", subject, fine, t1w, written, transforms, threads=2)
    assert "_res-" not in out["fa"].name and qc["dice"] > 0.98
    img = nib.load(out["fa"])
    source = nib.load(written["fa"])
    expected = resample_scalar(source.get_fdata(), source.affine, img.affine, img.shape)
    inside = nib.load(out["mask"]).get_fdata() > 0
    np.testing.assert_allclose(img.get_fdata()[inside], expected[inside], atol=1e-4)
