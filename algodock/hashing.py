"""Content hashes of files and folders, and parquet row counts.

A file's hash is the sha256 of its bytes (what ``sha256sum FILE`` prints).

A folder's hash is framed so that no file name can forge it (docs/contract.md §6): it is the
sha256 of one entry per regular file below the folder, sorted by the bytes of the relative
path (POSIX separators), each entry being::

    <hex sha256 of the file> <byte length of the path>:<path>\\n

The length prefix makes every entry self-delimiting: a path holding a newline, a space or
a fake hex digest cannot be read as two entries. Folders themselves, empty or not, and
symlinks (never followed) contribute nothing. This GNU shell line, run in the folder,
prints the same hash::

    find . -type f -printf '%P\\0' | LC_ALL=C sort -z | while IFS= read -r -d '' f; do printf '%s %d:%s\\n' "$(sha256sum < "$f" | cut -c1-64)" "$(printf %s "$f" | wc -c)" "$f"; done | sha256sum

(``tests/test_outputs.py`` runs it with bash and compares.) Until cache version 2 the
folder hash was the sha256 of ``sha256sum``'s unframed listing, which a file named
``"a\\n<sha256 of b>  b"`` could forge.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp()); _ = (d / "a.txt").write_bytes(b"hi")
>>> sha256_path(d / "a.txt")[:12]
'8f434346648f'
>>> folder_digest([("a.txt", sha256_path(d / "a.txt"))]) == sha256_path(d)
True
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable
from pathlib import Path

CHUNK = 1024 * 1024

_NOFOLLOW = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0)


class NotRegularFile(OSError):
    """What was opened for hashing turned out not to be a regular file (a symlink, FIFO, device…)."""


def sha256_file(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks (``hashlib.file_digest``); follows a symlink."""
    with open(path, "rb", buffering=0) as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def sha256_regular(path: str | Path) -> str:
    """sha256 of a regular file, opened without following a symlink and without blocking on a FIFO.

    Raises :class:`NotRegularFile` (an ``OSError``) when ``path`` is a symlink or special file:
    the file is never read then.
    """
    try:
        fd = os.open(path, _NOFOLLOW)
    except OSError as exc:
        if exc.errno == getattr(os, "ELOOP", 40):  # O_NOFOLLOW on a symlink
            raise NotRegularFile(exc.errno, "a symlink, not a regular file", str(path)) from None
        raise
    with os.fdopen(fd, "rb", buffering=0) as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(0, "not a regular file", str(path))
        return hashlib.file_digest(fh, "sha256").hexdigest()


def sort_key(rel: str) -> bytes:
    """Paths sort by their bytes (``LC_ALL=C sort``), also for names that are not UTF-8."""
    return os.fsencode(rel)


def list_files(folder: str | Path) -> list[str]:
    """Relative POSIX paths of the regular files below ``folder``, sorted by bytes; links not followed.

    A subfolder that cannot be listed raises ``OSError`` (never skipped: that would drop data silently).
    """
    folder = Path(folder)
    found: list[str] = []
    stack = [("", os.fspath(folder))]
    while stack:
        rel_dir, path = stack.pop()
        with os.scandir(path) as it:
            for entry in it:
                rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                if entry.is_dir(follow_symlinks=False):
                    stack.append((rel, entry.path))
                elif entry.is_file(follow_symlinks=False):
                    found.append(rel)
    return sorted(found, key=sort_key)


def folder_entry(rel: str, digest: str) -> bytes:
    """One framed entry of the folder hash: ``<hex> <byte length>:<path>\\n``."""
    raw = os.fsencode(rel)
    return b"%s %d:%s\n" % (digest.encode("ascii"), len(raw), raw)


def folder_digest(entries: Iterable[tuple[str, str]]) -> str:
    """The folder hash from ``(relative_path, file_sha256)`` pairs (see module docstring)."""
    h = hashlib.sha256()
    for rel, digest in sorted(entries, key=lambda e: sort_key(e[0])):
        h.update(folder_entry(rel, digest))
    return h.hexdigest()


def sha256_path(path: str | Path) -> str:
    """sha256 of a file, or the folder hash of a folder (files inside opened without following links)."""
    path = Path(path)
    if path.is_dir():
        return folder_digest([(rel, sha256_regular(path / rel)) for rel in list_files(path)])
    return sha256_file(path)


def parquet_rows(path: str | Path, files: Iterable[str] | None = None) -> int | None:
    """Row count of a parquet file or folder of parts from the footers only; None if not parquet.

    ``files`` (relative paths) spares a second listing of a folder already listed.
    """
    import pyarrow.parquet as pq

    path = Path(path)
    is_dir = path.is_dir()
    if is_dir:
        rels = list(files) if files is not None else list_files(path)
        targets = [path / rel for rel in rels if rel.endswith(".parquet")]
    else:
        targets = [path]
    total = 0
    for f in targets:
        try:
            # The parts of a folder are opened without following a link (the folder was listed with lstat).
            with open(os.open(f, _NOFOLLOW) if is_dir else os.open(f, os.O_RDONLY | os.O_CLOEXEC), "rb", closefd=True) as fh:
                if is_dir and not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                    return None
                total += pq.ParquetFile(fh).metadata.num_rows
        except Exception:
            return None
    return total
