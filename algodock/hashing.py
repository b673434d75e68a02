"""Content hashes of files and folders, and parquet row counts.

A file's hash is the sha256 of its bytes. A folder's hash is defined over its files: the
sha256 of the text that ``sha256sum`` would print for them, one line per regular file,
``"<hex sha256>  <path relative to the folder, POSIX separators>\\n"``, sorted by path.
So ``(cd DIR && find . -type f | sed 's|^\\./||' | LC_ALL=C sort | xargs sha256sum | sha256sum)``
gives the same answer. Empty folders contribute nothing; symlinks are never followed.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp()); _ = (d / "a.txt").write_bytes(b"hi")
>>> sha256_path(d / "a.txt")[:12]
'8f434346648f'
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

CHUNK = 1024 * 1024


def sha256_file(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks (``hashlib.file_digest``)."""
    with open(path, "rb", buffering=0) as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def list_files(folder: str | Path) -> list[str]:
    """Relative POSIX paths of the regular files below ``folder``, sorted; links not followed."""
    folder = Path(folder)
    found: list[str] = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs.sort()
        rel_root = Path(root).relative_to(folder)
        for name in files:
            full = Path(root) / name
            if full.is_symlink() or not full.is_file():
                continue
            found.append((rel_root / name).as_posix())
    return sorted(found)


def folder_digest(entries: list[tuple[str, str]]) -> str:
    """The folder hash from ``(relative_path, file_sha256)`` pairs (see module docstring)."""
    h = hashlib.sha256()
    for rel, digest in sorted(entries):
        h.update(f"{digest}  {rel}\n".encode())
    return h.hexdigest()


def sha256_path(path: str | Path) -> str:
    """sha256 of a file, or the folder hash of a folder."""
    path = Path(path)
    if path.is_dir():
        return folder_digest([(rel, sha256_file(path / rel)) for rel in list_files(path)])
    return sha256_file(path)


def parquet_rows(path: str | Path) -> int | None:
    """Row count of a parquet file or folder of parts from the footers only; None if not parquet."""
    import pyarrow.parquet as pq

    path = Path(path)
    files = [path / rel for rel in list_files(path)] if path.is_dir() else [path]
    total = 0
    for f in files:
        if path.is_dir() and not f.name.endswith(".parquet"):
            continue
        try:
            total += pq.ParquetFile(f).metadata.num_rows
        except Exception:
            return None
    return total
