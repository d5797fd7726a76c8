"""Writing any file atomically (through a writer, as JSON or as TSV) and hashing files.

Every output of m2m is written to a hidden temporary file beside its target and renamed onto
it, so a crash, a SIGTERM or a full disk never leaves a half-written file under its final name.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

from m2m_app.errors import OutputError


def _atomic_target(path: Path) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    return tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process's umask. Outputs are written from threads, and reading it with ``os.umask``
    sets it for a moment (to 0, for every thread): on Linux it is read from /proc instead."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    with _UMASK_LOCK:
        mask = os.umask(0)
        os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, writer: Callable[[str], Any]) -> Path:
    """Call ``writer(tmp_path)`` then rename the temporary file onto ``path``.

    A crash, a SIGTERM or a full disk therefore never leaves a half-written output
    under its final name.
    """
    path = Path(path)
    try:
        fd, tmp = _atomic_target(path)
    except OSError as err:
        raise OutputError(f"{path.parent}: cannot write here: {err.strerror}") from None
    os.close(fd)
    try:
        writer(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs follow the umask
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise OutputError(f"{path}: writing failed: {err.strerror or err}") from None
        raise
    return path


def save_bytes(data: bytes, path: str | os.PathLike) -> Path:
    """Write ``data`` (e.g. a figure) atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def copy_file(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Copy ``source`` onto ``target`` atomically (bytes only)."""
    return atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))


def save_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def save_tsv(rows: list[dict], path: str | os.PathLike, columns: list[str] | None = None, missing: str = "n/a") -> Path:
    """Write dict rows as a tab-separated table atomically.

    ``columns`` defaults to the union of the rows' keys in first-seen order; absent values
    read ``missing`` (BIDS uses ``n/a``), and so do NaN values.
    """
    columns = columns or list(dict.fromkeys(key for row in rows for key in row))
    nan = lambda v: isinstance(v, float) and math.isnan(v)  # noqa: E731
    cleaned = [{key: missing if nan(v) else v for key, v in row.items()} for row in rows]

    def writer(tmp: str) -> None:
        with open(tmp, "w", newline="") as handle:
            table = csv.DictWriter(handle, columns, delimiter="\t", restval=missing, extrasaction="ignore")
            table.writeheader()
            table.writerows(cleaned)

    return atomic_write(path, writer)


def read_tsv(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a tab-separated table with a header, as dicts of strings."""
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
