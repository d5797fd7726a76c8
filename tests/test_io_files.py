"""io/files: atomic writing (no partial file under the final name, ever), JSON/TSV writers and hashing."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from m2m_app.errors import OutputError
from m2m_app.io.files import atomic_write, file_sha256, save_json, save_tsv


def test_atomic_write_follows_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        path = save_json({"a": 1}, tmp_path / "x.json")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644
    assert not list(tmp_path.glob(".x.json*"))  # no temporary file left behind


def test_a_failing_writer_leaves_the_old_file_and_no_partial_one(tmp_path):
    target = save_json({"complete": True}, tmp_path / "out" / "a.json")

    def half_then_crash(tmp: str) -> None:
        with open(tmp, "w") as handle:
            handle.write('{"compl')
        raise KeyboardInterrupt  # as a SIGINT mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half_then_crash)
    assert json.loads(target.read_text()) == {"complete": True}
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.json"]

    def disk_full(tmp: str) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OutputError, match="No space left on device"):
        atomic_write(tmp_path / "out" / "b.nii.gz", disk_full)
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.json"]


def test_an_unwritable_folder_is_an_output_error(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(OutputError, match="cannot write here"):
        save_json({}, tmp_path / "a_file" / "x.json")


def test_save_tsv_unions_the_columns_and_fills_missing_values(tmp_path):
    path = save_tsv([{"subject": "sub-01", "fa": 0.4}, {"subject": "sub-02", "md": 1e-3}], tmp_path / "t.tsv")
    assert path.read_text().splitlines() == ["subject\tfa\tmd", "sub-01\t0.4\tn/a", "sub-02\tn/a\t0.001"]
    path = save_tsv([{"a": 1, "b": 2}], tmp_path / "u.tsv", columns=["b"], missing="-")
    assert path.read_text().splitlines() == ["b", "2"]  # columns chosen, others ignored


def test_save_json_is_sorted_and_indented(tmp_path):
    text = save_json({"b": 1, "a": {"d": 2, "c": tmp_path}}, tmp_path / "x.json").read_text()
    assert text.index('"a"') < text.index('"b"') and text.endswith("}\n") and '\n  "a"' in text
    assert json.loads(text)["a"]["c"] == str(tmp_path)  # non-JSON values as strings


def test_file_sha256_hashes_the_bytes(tmp_path):
    data = os.urandom(3 << 20)  # more than one 1 MiB chunk
    (tmp_path / "w.bin").write_bytes(data)
    assert file_sha256(tmp_path / "w.bin") == hashlib.sha256(data).hexdigest()
