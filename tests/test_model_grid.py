"""The model-grid pipeline: maps computed on the model grid and resampled once when written,
and ``--output-resolution``."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from conftest import make_bids, run_cli
from m2m_app.data.example import write_example_dataset
from m2m_app.inference.predict import predict_phase1_model, to_output
from m2m_app.io.derivatives import write_maps
from m2m_app.io.naming import Subject
from m2m_app.io.nifti import load_t1w
from m2m_app.maths.grid import ConformedGrid, GridResampler, model_grid, resample_scalar, resample_tensor
from m2m_app.maths.metrics import angular_error_deg
from m2m_app.maths.tensor import masked_tensor_maps

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.slow
def test_maps_from_the_model_grid_match_the_tensor_route(tmp_path):
    """Tensor maps computed on the model grid, then resampled onto the T1w grid, against the route
    before (the tensor resampled log-Euclidean onto the T1w grid, then its maps there).

    Measured on the example T1w (1 mm MNI152, 1.76 M brain voxels) with the packaged phase-1
    weights: the tensor, mask and V1 are identical (same resampled tensor; V1 mean 1e-4°,
    max 0.03°); FA MAE 0.0027, 95th percentile 0.0089, 99th 0.017; MD relative MAE 0.17 %,
    99th percentile 1.0 %; colour FA MAE 0.0013. The bounds below are about twice those.
    """
    t1w = next(write_example_dataset(tmp_path / "ds").rglob("*_T1w.nii*"))
    pred = predict_phase1_model(*load_t1w(t1w), device="cpu", batch_size=32)
    grid, mask = pred.pop("grid"), pred["mask"]
    before_tensor = resample_tensor(pred["tensor"], grid, to_model=False)
    before_mask = np.any(before_tensor != 0, axis=-1)
    before = masked_tensor_maps(before_tensor, before_mask)
    after = to_output(pred | masked_tensor_maps(pred["tensor"], mask), grid, mask)
    np.testing.assert_array_equal(after["mask"], before_mask)
    np.testing.assert_allclose(after["tensor"], before_tensor, rtol=1e-5, atol=1e-10)
    brain = before_mask
    fa_error = np.abs(after["fa"][brain] - before["fa"][brain])
    assert fa_error.mean() < 0.006 and np.percentile(fa_error, 99) < 0.035
    md_error = np.abs(after["md"][brain] / before["md"][brain] - 1.0)
    assert md_error.mean() < 0.004 and np.percentile(md_error, 99) < 0.02
    fibres = brain & (before["fa"] > 0.3)
    assert np.nanpercentile(angular_error_deg(after["v1"][fibres], before["v1"][fibres]), 99) < 0.5
    assert np.abs(after["colfa"][brain] - before["colfa"][brain]).mean() < 0.003


def _oblique_grid() -> ConformedGrid:
    """A 1 × 1.2 × 0.9 mm oblique T1w grid (60 × 70 × 64 voxels) and its model grid."""
    rotation = nib.eulerangles.euler2mat(0.3, -0.2, 0.1)
    affine = nib.affines.from_matvec(rotation @ np.diag([1.0, 1.2, 0.9]), [-30.0, -40.0, -25.0])
    centre = nib.affines.apply_affine(affine, np.array([60, 70, 64]) / 2)
    return model_grid((60, 70, 64), affine, centre)


def test_output_grid_is_isotropic_and_covers_the_t1w():
    grid = _oblique_grid()
    assert grid.output_grid(None)[0] == grid.source_shape
    np.testing.assert_array_equal(grid.output_grid(None)[1], grid.source_affine)
    shape, affine = grid.output_grid(2.0)
    np.testing.assert_allclose(nib.affines.voxel_sizes(affine), 2.0)
    assert nib.aff2axcodes(affine) == nib.aff2axcodes(grid.source_affine)
    corners = np.array(np.meshgrid(*[[-0.5, n - 0.5] for n in grid.source_shape])).reshape(3, -1).T
    inside = nib.affines.apply_affine(np.linalg.inv(affine) @ grid.source_affine, corners)
    assert (inside >= -0.5 - 1e-6).all() and (inside <= np.array(shape) - 0.5 + 1e-6).all()  # the whole FOV
    assert ((np.array(shape) - 1) * 2.0 < np.array(grid.source_shape) * [1.0, 1.2, 0.9]).all()  # and no more


def test_fill_puts_kept_voxel_values_in_place_and_zeros_elsewhere():
    support = np.zeros((6, 7, 8), bool)
    support[2:5, 1:4, 3:7] = True
    resampler = GridResampler(np.eye(4), support, (6, 7, 8), np.eye(4))  # same grid: kept == support
    np.testing.assert_array_equal(resampler.kept, support)
    values = np.arange(support.sum() * 3, dtype=np.float32).reshape(-1, 3)
    volume = resampler.fill(values)
    assert volume.shape == (6, 7, 8, 3) and not volume[~support].any()
    assert volume.flags.f_contiguous  # as NIfTI stores it: written without a reordering copy
    # kept order is Fortran order (the first axis fastest), as the transposed bool mask reads it
    np.testing.assert_array_equal(volume.transpose(2, 1, 0, 3)[support.T], values)
    np.testing.assert_array_equal(resampler.at_kept(volume[..., 1]), values[:, 1])
    assert resampler.fill(values[:, 0] > 5, dtype=bool).dtype == bool
    empty = GridResampler(np.eye(4), np.zeros((6, 7, 8), bool), (6, 7, 8), np.eye(4))
    assert not empty.fill(np.zeros((0, 6), np.float32)).any() and empty.fill(np.zeros(0)).shape == (6, 7, 8)


def test_threads_and_chunks_do_not_change_resampled_values():
    """Interpolation and eigendecompositions split over kept voxels and threads give the serial values, exactly."""
    rng = np.random.default_rng(3)
    support = ndimage.binary_erosion(np.ones((12, 13, 14), bool), iterations=2)
    evecs = np.linalg.qr(rng.normal(size=(12, 13, 14, 3, 3)))[0]
    evals = rng.uniform(2e-4, 2e-3, size=(12, 13, 14, 3))
    matrices = np.einsum("...ij,...j,...kj->...ik", evecs, evals, evecs)
    tensor = np.stack([matrices[..., i, j] for i, j in ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))], -1)
    tensor[~support] = 0.0
    fa = np.where(support, rng.uniform(0, 1, support.shape), 0.0)
    out_affine = np.array([[0.7, 0.1, 0, 1.3], [-0.1, 0.7, 0, 0.4], [0, 0, 0.5, 2.0], [0, 0, 0, 1]])  # oblique, finer
    serial = GridResampler(np.eye(4), support, (17, 18, 26), out_affine)
    threaded = GridResampler(np.eye(4), support, (17, 18, 26), out_affine, threads=3)
    shift = rng.uniform(-0.05, 0.05, serial.kept.sum()).astype(np.float32)
    np.testing.assert_array_equal(serial.values(fa), threaded.values(fa))
    for one, other in zip(serial.tensor_values(tensor, shift), threaded.tensor_values(tensor, shift, chunk=100)):
        np.testing.assert_array_equal(one, other)


def test_resample_scalar_slabs_give_the_same_values_in_any_number_of_threads():
    """Slabs of the output grid, in 1 or 3 threads: the same values; those of one unsliced SciPy call
    except where an output voxel lands on the input's outer boundary (rounding of the slab offsets)."""
    volume = np.random.default_rng(5).uniform(0, 100, (61, 70, 55)).astype(np.float32)
    # finer than the input: no anti-aliasing filter
    out_affine = np.array([[0.7, 0.1, 0, 2], [-0.1, 0.7, 0.05, 1], [0, 0, 0.9, -3], [0, 0, 0, 1]])
    for order in (0, 1):
        serial = resample_scalar(volume, np.eye(4), out_affine, (40, 50, 30), order)
        np.testing.assert_array_equal(serial, resample_scalar(volume, np.eye(4), out_affine, (40, 50, 30), order, 3))
    # serial is the order-1 result here
    whole = ndimage.affine_transform(volume, out_affine[:3, :3], out_affine[:3, 3], (40, 50, 30), order=1)
    points = out_affine[:3, :3] @ np.indices((40, 50, 30)).reshape(3, -1) + out_affine[:3, 3:]
    clear = ((points > 1e-6) & (points < np.array(volume.shape)[:, None] - 1 - 1e-6)).all(0).reshape(40, 50, 30)
    assert clear.mean() > 0.5
    np.testing.assert_allclose(serial[clear], whole[clear], rtol=1e-5, atol=1e-3)


def test_write_maps_at_2mm_resamples_each_map_once(tmp_path):
    grid = _oblique_grid()
    brain = np.zeros(grid.shape, bool)
    centre = np.array(grid.shape) // 2
    brain[tuple(slice(c - 8, c + 8) for c in centre)] = True
    brain = ndimage.binary_dilation(brain, iterations=2)
    tensor = np.where(brain[..., None], [1.4e-3, 2e-4, 0, 5e-4, 0, 4e-4], 0.0).astype(np.float32)
    maps = masked_tensor_maps(tensor, brain) | {"diffusivity": tensor, "mask": brain, "tdi": brain * 2.0}
    files = {}
    for key, volume in maps.items():
        files[key] = str(tmp_path / f"{key}.nii.gz")
        nib.save(nib.Nifti1Image(np.asarray(volume, np.float32), grid.affine), files[key])
    weights = tmp_path / "weights"  # weights without a T1w detail transfer: the maps as resampled
    weights.mkdir()
    (weights / "phase1.json").write_text("{}")
    written = write_maps(
        tmp_path / "out",
        Subject("01"),
        "/bids/sub-01/anat/sub-01_T1w.nii.gz",
        files,
        str(weights),
        grid=grid,
        resolution_mm=2.0,
    )
    shape, affine = grid.output_grid(2.0)
    for key, path in written.items():
        img = nib.load(path)
        assert img.shape[:3] == shape and np.allclose(img.affine, affine, atol=1e-4), key
        np.asarray(img.dataobj)
    mask = np.asarray(nib.load(written["mask"]).dataobj) > 0
    assert mask.any() and nib.load(written["mask"]).get_data_dtype() == np.uint8
    fa = np.asarray(nib.load(written["fa"]).dataobj)
    np.testing.assert_allclose(fa[mask], masked_tensor_maps(tensor, brain)["fa"][brain].max(), rtol=1e-4)
    assert not fa[~mask].any() and np.asarray(nib.load(written["diffusivity"]).dataobj).shape == shape + (6,)


@pytest.mark.slow
def test_output_resolution_2_gives_2mm_outputs_covering_the_t1w(tmp_path):
    t1w = next(write_example_dataset(tmp_path / "example").rglob("*_T1w.nii*"))
    bids = make_bids(tmp_path / "bids", {"sub-01/anat/sub-01_T1w.nii.gz": t1w})
    out = tmp_path / "out"
    result = run_cli(
        "run",
        bids,
        out,
        "participant",
        "-w",
        tmp_path / "work",
        "--skip-nerf",
        "--output-resolution",
        "2",
        "--nprocs",
        "2",
        "--omp-nthreads",
        "2",
        "--skip-bids-validation",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    source = nib.load(t1w)
    extent = np.array(source.shape[:3]) * nib.affines.voxel_sizes(source.affine)
    images = sorted((out / "sub-01" / "dwi").glob("*.nii.gz"))
    assert len(images) >= 10
    for path in images:
        img = nib.load(path)
        assert np.allclose(nib.affines.voxel_sizes(img.affine), 2.0), path.name
        assert np.all(np.array(img.shape[:3]) * 2.0 >= extent - 1e-3), path.name
        assert np.isfinite(np.asarray(img.dataobj)).all()
    assert (out / "sub-01.html").exists()


def test_output_resolution_reaches_the_writers(tmp_path, monkeypatch):
    from m2m_app.cli import run
    from m2m_app.workflows.base import init_m2m_wf, node_prefix

    seen = {}
    monkeypatch.setattr(run, "_run_participants", lambda config: seen.setdefault("config", config))
    with pytest.raises(SystemExit):
        run.main([str(tmp_path / "bids"), str(tmp_path / "out"), "participant", "--output-resolution", "2"])
    config = seen["config"]
    assert config.output_resolution == 2.0 and config.to_dict()["output_resolution"] == 2.0
    t1w = tmp_path / "sub-01_T1w.nii.gz"
    t1w.touch()
    unit = init_m2m_wf({Subject("01"): t1w}, config).get_node(node_prefix(Subject("01")))
    for name in ("ds_wf.write_maps", "ds_wf.write_report", "nerf_wf.nerf_track"):
        assert unit.get_node(name).inputs.output_resolution == 2.0
    assert "isotropic 2 mm grid" in unit.get_node("ds_wf.inputnode").inputs.boilerplate
