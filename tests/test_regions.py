"""Region statistics, the end-point rule and the connectome on hand-made data, and the files of a parcellation."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from nibabel.affines import apply_affine

from m2m_app.data.atlases import ATLASES, parse_atlases
from m2m_app.errors import UsageError
from m2m_app.io.files import read_tsv
from m2m_app.io.naming import Subject, derivative_paths
from m2m_app.io.tractogram import save_tractogram
from m2m_app.maths.regions import (
    assign_end_points,
    connectome,
    region_means,
    region_medians,
    region_volumes,
    streamline_means,
)


def test_region_statistics_on_a_synthetic_volume():
    """Region 1 holds 0..26 (27 voxels), region 2 is a constant, region 3 is absent."""
    labels = np.zeros((6, 6, 6), np.int16)
    labels[:3, :3, :3] = 1
    labels[4:, 4:, 4:] = 2
    values = np.zeros(labels.shape)
    values[:3, :3, :3] = np.arange(27).reshape(3, 3, 3)
    values[4:, 4:, 4:] = 0.7
    indices = np.array([1, 2, 3])
    np.testing.assert_allclose(region_volumes(labels, indices, 8.0), [27 * 8.0, 8 * 8.0, 0.0])
    means, medians = region_means(values, labels, indices), region_medians(values, labels, indices)
    np.testing.assert_allclose(means[:2], [13.0, 0.7])
    np.testing.assert_allclose(medians[:2], [13.0, 0.7])
    assert np.isnan(means[2]) and np.isnan(medians[2])
    values[2, 2, 2] = 1000.0  # the largest value becomes an outlier: it moves the mean, not the median
    assert region_means(values, labels, indices)[0] > 40 and region_medians(values, labels, indices)[0] == 13.0


def test_end_points_follow_the_radial_search_rule():
    """1 mm voxels, region 1 at x ≤ 4, region 2 at x ≥ 15 (world = voxel + 100 mm): inside, 3 mm
    and 5 mm away from the nearest labelled voxel centre, with MRtrix3's 4 mm radius."""
    labels = np.zeros((20, 5, 5), np.int16)
    labels[:5] = 1
    labels[15:] = 2
    affine = np.eye(4)
    affine[:3, 3] = 100.0
    points = np.array([[102.2, 102, 102], [107.0, 102, 102], [109.2, 102, 102], [111.8, 102, 102], [116, 102, 102]])
    np.testing.assert_array_equal(assign_end_points(points, labels, affine), [1, 1, 0, 2, 2])
    np.testing.assert_array_equal(assign_end_points(points, labels, affine, radius_mm=6.0), [1, 1, 1, 2, 2])
    # anisotropic voxels: 3 mm along x, so the same labels reach three times as far in mm
    thick = np.diag([3.0, 1.0, 1.0, 1.0])
    assert assign_end_points(np.array([[3 * 4 + 3.5, 2, 2]]), labels, thick)[0] == 1


def test_connectome_counts_and_mean_fa():
    first = np.array([1, 2, 1, 3, 0, 2, 5])
    last = np.array([2, 1, 1, 3, 2, 9, 5])  # 0: unassigned, 9: not a region of the atlas
    fa = np.array([0.2, 0.4, 0.5, 0.6, 0.9, 0.9, 0.3])
    counts, mean_fa = connectome(first, last, np.array([1, 2, 3, 5]), fa)
    expected = np.zeros((4, 4))
    expected[0, 1] = expected[1, 0] = 2
    expected[0, 0] = expected[2, 2] = expected[3, 3] = 1
    np.testing.assert_array_equal(counts, expected)
    np.testing.assert_allclose([mean_fa[0, 1], mean_fa[1, 0]], 0.3)
    np.testing.assert_allclose(np.diag(mean_fa)[[0, 2, 3]], [0.5, 0.6, 0.3])
    assert np.isnan(mean_fa[1, 2]) and np.array_equal(mean_fa, mean_fa.T, equal_nan=True)
    lines = [np.zeros((3, 3)), np.zeros((0, 3)), np.zeros((2, 3))]
    means = streamline_means(lines, np.array([1.0, 2.0, 3.0, 10.0, 20.0]))
    np.testing.assert_allclose(means[[0, 2]], [2.0, 15.0])
    assert np.isnan(means[1])


def test_atlases_syntax_and_the_shipped_atlas():
    assert parse_atlases(["DesikanKilliany,DesikanKilliany"]) == ("DesikanKilliany",)
    with pytest.raises(UsageError, match="available: DesikanKilliany"):
        parse_atlases(["Schaefer400"])
    atlas = ATLASES["DesikanKilliany"]()
    regions = atlas.regions()
    assert len(regions) == 83 and [r.index for r in regions] == list(range(1, 84))
    assert sum(r.structure == "cortex" for r in regions) == 68 and regions[0].name == "L_bankssts"
    image = nib.load(atlas.image)
    assert set(np.unique(np.asarray(image.dataobj))) == set(range(84))


@pytest.mark.slow
def test_parcellation_region_table_and_relmat_files(tmp_path):
    """A 'subject' that is the template on its 2 mm grid, with identity transforms: the dseg is the
    atlas itself, the region table reads the FA written per region, and streamlines drawn between
    two regions' centres land on their edge of the count matrix, in the BIDS/XCP-D layout."""
    from m2m_app.registration.normalize import load_template
    from m2m_app.registration.parcellation import write_regions
    from m2m_app.registration.template_space import transform_paths
    from tests.test_template_space import SPACE, _write_transform

    atlas = ATLASES["DesikanKilliany"]()
    template = load_template(SPACE.template(), 2.0)
    atlas_img = nib.load(atlas.image)
    from nibabel.processing import resample_from_to

    expected = np.asarray(resample_from_to(atlas_img, (template.shape, template.affine), order=0).dataobj)
    subject, out = Subject("01"), tmp_path / "out"
    paths = derivative_paths(out, subject, "nerf")
    mask = expected > 0
    fa = np.where(mask, 0.1 + 0.005 * expected, 0.0)  # region k has FA 0.1 + k/200
    for key, volume in {"mask": mask, "fa": fa, "md": mask * 8e-4, "ad": mask * 1.2e-3, "rd": mask * 6e-4}.items():
        paths[key].parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(volume.astype(np.float32), template.affine), paths[key])
    regions = atlas.regions()
    centre = {r.name: apply_affine(template.affine, np.argwhere(expected == r.index).mean(0)) for r in regions}
    a, b = centre["L_superiorfrontal"], centre["R_superiorfrontal"]
    lines = [np.linspace(a, b, 30) + offset for offset in np.linspace(-0.3, 0.3, 7)[:, None]]
    lines += [np.linspace(centre["L_precentral"], centre["L_precentral"] + [0, 0, 0.5], 3)]
    save_tractogram(lines, nib.load(paths["mask"]), paths["tractogram"])
    inverse = transform_paths(out, subject, SPACE.name)["inverse"]
    _write_transform(inverse)
    written = {key: paths[key] for key in ("mask", "fa", "md", "ad", "rd", "tractogram")}
    files, summary = write_regions(out, subject, atlas, written, inverse, "nerf", threads=2)

    dseg = np.asarray(nib.load(files["dseg"]).dataobj)
    assert np.mean(dseg[mask] == expected[mask]) > 0.999 and not dseg[~mask].any()
    assert files["dseg"].name == "sub-01_space-T1w_seg-DesikanKilliany_dseg.nii.gz"
    labels = read_tsv(files["labels"])
    assert [row["name"] for row in labels] == [r.name for r in regions] and labels[0]["index"] == "1"
    table = read_tsv(files["regions"])
    for row in table[:5] + table[-3:]:
        assert abs(float(row["fa_mean"]) - (0.1 + 0.005 * int(row["index"]))) < 1e-4
        assert float(row["volume_mm3"]) == pytest.approx(8.0 * np.count_nonzero(expected == int(row["index"])))
    sidecar = json.loads(files["regions"].with_suffix("").with_suffix(".json").read_text())
    assert set(table[0]) <= set(sidecar) and sidecar["md_mean"]["Units"] == "mm^2/s"

    count = read_tsv(files["count"])
    names = [r.name for r in regions]
    assert list(count[0]) == ["Node", *names] and [row["Node"] for row in count] == names
    matrix = np.array([[float(row[n]) for n in names] for row in count])
    i, j, k = names.index("L_superiorfrontal"), names.index("R_superiorfrontal"), names.index("L_precentral")
    assert matrix[i, j] == matrix[j, i] == 7 and matrix[k, k] == 1 and matrix.sum() == 7 * 2 + 1
    assert summary["assigned"] == summary["streamlines"] == 8
    mean_fa = read_tsv(files["mean_fa"])
    assert mean_fa[j][names[i]] != "n/a" and mean_fa[0][names[1]] == "n/a"
    relmat = json.loads(files["count"].with_name(files["count"].name.replace(".tsv", ".json")).read_text())
    assert relmat["NodeFile"].endswith("_seg-DesikanKilliany_dseg.tsv")
    assert "radial search" in relmat["EndpointAssignment"]
    assert relmat["Atlas"] == "DesikanKilliany" and relmat["StreamlinesAssigned"] == 8
    assert files["figure"].exists()


def mrtrix_count_correlation(
    unit_dir, atlas: str = "DesikanKilliany", tmp=None
) -> tuple[float, np.ndarray, np.ndarray]:
    """MRtrix3 ``tck2connectome`` (default radial search, ``-symmetric``) on a unit's own tractogram
    and dseg: Pearson r with m2m's count matrix over the upper triangle, and both matrices (skip
    where MRtrix3 is not installed)."""
    import glob
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    from nibabel.streamlines import Tractogram, save

    from m2m_app.io.tractogram import load_streamlines

    if not shutil.which("tck2connectome"):
        pytest.skip("MRtrix3's tck2connectome is not installed (Debian package mrtrix3)")
    found = glob.glob(f"{unit_dir}/dwi/*_space-T1w_tract-wholebrain_track-nerf_tractogram.*")
    tractogram = next(path for path in found if not path.endswith(".json"))
    mask = glob.glob(f"{unit_dir}/anat/*_space-T1w_desc-brain_mask.nii.gz")[0]
    dseg = glob.glob(f"{unit_dir}/anat/*_space-T1w_seg-{atlas}_dseg.nii.gz")[0]
    rows = read_tsv(glob.glob(f"{unit_dir}/dwi/*_seg-{atlas}_track-nerf_stat-count_relmat.tsv")[0])
    ours = np.array([[float(row[r["Node"]]) for r in rows] for row in rows])
    folder = Path(tmp or tempfile.mkdtemp())
    save(Tractogram(load_streamlines(tractogram, mask), affine_to_rasmm=np.eye(4)), str(folder / "m2m.tck"))
    command = [
        "tck2connectome",
        "-quiet",
        "-force",
        "-symmetric",
        str(folder / "m2m.tck"),
        dseg,
        str(folder / "mr.csv"),
    ]
    subprocess.run(command, check=True)
    theirs = np.loadtxt(folder / "mr.csv", delimiter=",")
    upper = np.triu_indices(len(ours), 1)
    return float(np.corrcoef(ours[upper], theirs[upper])[0, 1]), ours, theirs
