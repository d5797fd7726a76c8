"""Atomic output writing."""
from __future__ import annotations

import os

from m2m_app.io.files import save_json


def test_atomic_write_follows_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        path = save_json({"a": 1}, tmp_path / "x.json")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644
    assert not list(tmp_path.glob(".x.json*"))  # no temporary file left behind
