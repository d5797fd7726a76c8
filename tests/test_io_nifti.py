"""io/nifti: what m2m writes is plain NIfTI-1 in an ordinary gzip stream, read back exactly."""

from __future__ import annotations

import gzip
import time

import nibabel as nib
import numpy as np

from m2m_app.io.nifti import load_image, save_nifti


def test_written_nii_gz_is_a_standard_gzip_stream_of_the_nifti_bytes(tmp_path):
    data = np.random.default_rng(0).normal(size=(7, 8, 9, 3)).astype(np.float32)
    affine = np.array([[-0.5, 0, 0, 90], [0, 0.5, 0, -120], [0, 0, 1.0, -60], [0, 0, 0, 1]])
    path = save_nifti(data, affine, tmp_path / "map.nii.gz")
    expected = nib.Nifti1Image(data, affine)
    expected.set_data_dtype(np.float32)
    expected.header.set_qform(affine, code=1)
    expected.header.set_sform(affine, code=1)
    assert gzip.decompress(path.read_bytes()) == expected.to_bytes()  # what nibabel would store, deflated
    img, loaded = load_image(path)
    np.testing.assert_array_equal(loaded, data)
    np.testing.assert_array_equal(img.affine, affine)


def test_the_same_image_written_twice_gives_the_same_bytes(tmp_path):
    """No time stamp or temporary file name in the gzip header: re-runs leave outputs byte-identical."""
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    first = save_nifti(data, np.eye(4), tmp_path / "a.nii.gz").read_bytes()
    time.sleep(1.1)  # the gzip header's time stamp counts whole seconds
    second = save_nifti(data, np.eye(4), tmp_path / "b.nii.gz").read_bytes()
    assert first == second
    assert first[4:8] == b"\x00\x00\x00\x00" and not first[3] & 0x08  # MTIME 0, no FNAME field


def test_uncompressed_and_mask_outputs_keep_their_format(tmp_path):
    mask = np.zeros((5, 5, 5), bool)
    mask[1:4, 2:4, 0:2] = True
    plain = save_nifti(mask, np.eye(4), tmp_path / "mask.nii", dtype=np.uint8)
    assert plain.read_bytes()[344:348] == b"n+1\x00"  # NIfTI-1 single file, not compressed
    img = nib.load(plain)
    assert img.get_data_dtype() == np.uint8 and np.array_equal(np.asarray(img.dataobj) > 0, mask)
