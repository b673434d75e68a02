"""What is stored, by content: where a URI sits in a store, and the sha256 of stored data.

:func:`hash_uri` hashes a file or folder at a local path, ``file://`` or ``s3://`` URI as
:mod:`algodock.hashing` defines it (S3 objects streamed through the hash, never written to
disk); :func:`store_rel` gives a URI's path relative to a store's root. The cache, gc,
replay and ``lineage verify`` are built on them.

>>> from algodock.store.backends import open_store
>>> store_rel(open_store("/tmp/st"), "/tmp/st/runs/r/x"), store_rel(open_store("/tmp/st"), "/elsewhere")
('runs/r/x', None)
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from algodock.hashing import folder_digest, sha256_path
from algodock.store.base import Store
from algodock.store.layout import local_path_of
from algodock.store.s3 import S3Store
from algodock.store.transfer import s3_filesystem

if TYPE_CHECKING:
    import s3fs

S3_BLOCK = 16 * 1024 * 1024


def store_rel(store: Store, uri: str) -> str | None:
    """``uri`` relative to the store's root, or None when it lives elsewhere."""
    root = store.uri().rstrip("/")
    if uri.startswith(root + "/"):
        return uri[len(root) + 1 :]
    local = store.local_path()
    if local is not None and uri.startswith("file://"):
        path = local_path_of(uri)
        if path is not None and str(path).startswith(str(local) + "/"):
            return str(path)[len(str(local)) + 1 :]
    return None



# ---------------------------------------------------------------- hashing stored data


def _s3fs_for(store: Store | None) -> s3fs.S3FileSystem:
    return store.fs if isinstance(store, S3Store) else s3_filesystem()


def hash_uri(uri: str, store: Store | None = None) -> str:
    """sha256 of the file or folder at ``uri`` (local path, ``file://`` or ``s3://``), as :mod:`algodock.hashing` defines it.

    S3 objects are streamed through the hash, never written to disk. Raises
    :class:`FileNotFoundError` when nothing is there.
    """
    local = local_path_of(uri)
    if local is not None:
        if not local.exists():
            raise FileNotFoundError(uri)
        return sha256_path(local)
    fs = _s3fs_for(store)
    path = uri.removeprefix("s3://").rstrip("/")
    if not fs.exists(path):
        raise FileNotFoundError(uri)
    if fs.isdir(path):
        found = fs.find(path, detail=True)
        entries = []
        for key, meta in sorted(found.items()):
            if meta.get("type") == "directory" or not key.startswith(path + "/"):
                continue
            entries.append((key[len(path) + 1 :], _s3_file_sha256(fs, key)))
        return folder_digest(entries)
    return _s3_file_sha256(fs, path)


def _s3_file_sha256(fs: s3fs.S3FileSystem, key: str) -> str:
    h = hashlib.sha256()
    with fs.open(key, "rb", block_size=S3_BLOCK, cache_type="none") as fh:
        while chunk := fh.read(S3_BLOCK):
            h.update(chunk)
    return h.hexdigest()


__all__ = ["hash_uri", "store_rel"]
