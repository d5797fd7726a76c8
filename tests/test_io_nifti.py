"""io/nifti: what m2m writes is plain NIfTI-1 in an ordinary gzip stream, read back exactly."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from m2m_app.errors import BadDataError
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


def test_gz_files_load_like_nibabel_scaled_with_their_header(tmp_path):
    """ISA-L inflation gives nib.load's scaled values, stored dtype and affine; NIfTI-2 stays NIfTI-2."""
    stored = np.arange(9 * 10 * 11, dtype=np.int16).reshape(9, 10, 11)
    affine = np.diag([1.5, 0.5, 0.5, 1.0])
    scaled = nib.Nifti1Image(stored, affine)
    scaled.header.set_slope_inter(0.25, -3.0)
    nib.save(scaled, tmp_path / "scaled.nii.gz")
    nib.save(nib.Nifti2Image(stored, affine), tmp_path / "two.nii.gz")
    for name, klass in (("scaled.nii.gz", nib.Nifti1Image), ("two.nii.gz", nib.Nifti2Image)):
        reference = nib.load(tmp_path / name)
        img, data = load_image(tmp_path / name)
        assert type(img) is klass and img.get_data_dtype() == np.int16
        np.testing.assert_array_equal(data, reference.get_fdata(dtype=np.float32))
        np.testing.assert_array_equal(np.asarray(img.dataobj), data)  # usable after the stream is closed
        np.testing.assert_array_equal(img.affine, reference.affine)
    assert load_image(tmp_path / "scaled.nii.gz")[1][1, 0, 0] == 110 * 0.25 - 3.0


@pytest.mark.parametrize("damage", ["deflate", "not_nifti"])
def test_corrupt_gz_files_fail_with_a_message_naming_them(tmp_path, damage):
    path = save_nifti(np.random.default_rng(1).random((30, 30, 30)), np.eye(4), tmp_path / "map.nii.gz")
    if damage == "deflate":
        raw = bytearray(path.read_bytes())
        raw[40:60] = bytes(range(200, 220))  # inside the first deflate block
        path.write_bytes(bytes(raw))
    else:
        path.write_bytes(gzip.compress(b"not an image " * 100))
    with pytest.raises(BadDataError, match="map.nii.gz: cannot be read as NIfTI"):
        load_image(path)
