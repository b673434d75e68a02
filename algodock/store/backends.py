"""Where runs keep their data and records: a local folder or an S3 prefix.

The store is in parts, and this module gathers them under one name (existing imports keep
working): :mod:`~algodock.store.layout` where things are (the ``*_rel`` helpers, the layout
under the root, URIs), :mod:`~algodock.store.transfer` moving bytes (retries, hashing while
streaming, conditional-write helpers), :mod:`~algodock.store.base` the :class:`Store`
interface, and the backends :mod:`~algodock.store.local` and :mod:`~algodock.store.s3`.
:func:`open_store` picks a backend by URI.

Stored outputs are immutable. Every attempt of a step writes under its own
``attempts/<attempt_id>/`` (the attempt number and a random suffix), so neither a retried
attempt nor a reused run id ever writes where a lineage document or cache entry points;
:meth:`Store.put_output` refuses to replace an output that is already committed.

A crash never leaves a half-written output that looks complete. The local store writes
into a hidden ``.tmp-…`` name beside the destination and renames it into place (atomic on
one filesystem). S3 has no atomic rename of a prefix, so :class:`S3Store` uploads the data
first, under the attempt's own prefix, and a ``<rel>._COMMITTED.json`` marker (each file's
path, size and sha256, measured from the bytes as they were uploaded) last, with one
conditional PUT (``If-None-Match: *``): of two writers only one can commit, and no writer
ever deletes or overwrites another's objects. Readers (:meth:`Store.output_exists`,
:meth:`Store.fetch`) treat an output under ``runs/`` without its marker as absent. JSON
records are one PUT on S3, which is atomic; :meth:`Store.create_json` and
:meth:`Store.replace_json` are the conditional writes the run lease is built on.

>>> import tempfile
>>> store = open_store(tempfile.mkdtemp())
>>> store.write_json(run_json_rel("r1"), {"status": "running"})
>>> store.read_json("runs/r1/run.json"), store.list("runs")
({'status': 'running'}, ['r1'])
"""

from __future__ import annotations

from algodock.store.base import Store, StoredFile
from algodock.store.layout import (
    DEFAULT_STORE,
    MARKER_SUFFIX,
    WORK_DIR,
    attempt_rel,
    cache_rel,
    lease_rel,
    lineage_rel,
    local_path_of,
    log_rel,
    new_attempt_id,
    object_rel,
    output_rel,
    run_json_rel,
    run_rel,
    step_rel,
)
from algodock.store.local import LocalStore
from algodock.store.s3 import S3Store
from algodock.store.transfer import Fetched, fetch_input, fetch_uri, retrying, s3_filesystem, store_timeout

__all__ = [
    "DEFAULT_STORE",
    "MARKER_SUFFIX",
    "WORK_DIR",
    "Fetched",
    "LocalStore",
    "S3Store",
    "Store",
    "StoredFile",
    "attempt_rel",
    "cache_rel",
    "fetch_input",
    "fetch_uri",
    "lease_rel",
    "lineage_rel",
    "local_path_of",
    "log_rel",
    "new_attempt_id",
    "object_rel",
    "open_store",
    "output_rel",
    "retrying",
    "run_json_rel",
    "run_rel",
    "s3_filesystem",
    "step_rel",
    "store_timeout",
]


def open_store(uri: str | None = None) -> Store:
    """The store at ``uri``: None for ``./.algodock/store``, a path or ``file://`` URI, or ``s3://bucket/prefix``.

    >>> open_store("file:///tmp/st"), open_store("s3://bucket/prefix").uri("runs")
    (LocalStore('/tmp/st'), 's3://bucket/prefix/runs')
    """
    if not uri:
        return LocalStore(DEFAULT_STORE)
    if uri.startswith("s3://"):
        return S3Store(uri)
    local = local_path_of(uri)
    assert local is not None
    return LocalStore(local)
