"""What every store answers: :class:`Store` (the interface the engine writes runs through)
and :class:`StoredFile` (one file of a listing). The backends are :class:`~algodock.store.local.LocalStore`
and :class:`~algodock.store.s3.S3Store`; :func:`algodock.store.backends.open_store` picks one by URI.
"""

from __future__ import annotations

import json
import posixpath
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, NamedTuple

from algodock.contract.manifest import safe_relative
from algodock.store.transfer import Fetched, fetch_input

__all__ = ["Store", "StoredFile", "encode_json"]


def encode_json(obj: Any) -> bytes:
    """A store record as bytes: one field of a JSON object a line, and one item of a list field a
    line (a lineage document is a step a line), each encoded by the ``json`` module's C encoder.

    ``indent=2`` would send the whole document through the pure-Python encoder: 38 ms for a
    300-step lineage document against 2 ms, paid at every write of a growing run's records.
    Anything else (keys that are not strings, a top level that is not an object) is one line.
    """
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        return json.dumps(obj, default=str).encode()
    fields = []
    for key, value in obj.items():
        name = json.dumps(key)
        if isinstance(value, list) and value:
            items = ",\n    ".join(json.dumps(item, default=str) for item in value)
            fields.append(f"  {name}: [\n    {items}\n  ]")
        else:
            fields.append(f"  {name}: {json.dumps(value, default=str)}")
    return ("{\n" + ",\n".join(fields) + "\n}\n" if fields else "{}\n").encode()


class StoredFile(NamedTuple):
    """One file of a store, as a listing sees it."""

    rel: str
    """Its path relative to the store's root (POSIX)."""
    size: int
    """Its size in bytes."""



class Store(ABC):
    """Where a run keeps its outputs, logs and records. ``rel`` paths are POSIX, relative to the root."""

    is_local: bool = False
    """True when the store is a folder on this host (outputs can be mounted without copying)."""

    @abstractmethod
    def uri(self, *parts: str) -> str:
        """Where ``parts`` lives: an absolute local path, or ``s3://bucket/prefix/…``."""

    def local_path(self, *parts: str) -> Path | None:
        """The local path of ``parts`` (local store only; None otherwise)."""
        return None

    @abstractmethod
    def write_json(self, rel: str, obj: Any, *, durable: bool = True) -> None:
        """Write a JSON record atomically: readers see the old record or the new one, never half.

        ``durable=False``: a courtesy record (a step's cache key document) that need not survive
        a crash of this host, so a local store does not wait for the disk (an fsync, 2 ms of a step)."""

    @abstractmethod
    def read_json(self, rel: str) -> Any | None:
        """The JSON record at ``rel``, or None when there is none."""

    @abstractmethod
    def exists(self, rel: str) -> bool:
        """True when anything (a file or a folder) is at ``rel``."""

    @abstractmethod
    def list(self, rel_prefix: str) -> list[str]:
        """Names of the entries directly under ``rel_prefix``, sorted; temporaries and markers hidden."""

    @abstractmethod
    def put_output(self, local_path: Path, rel: str, *, move: bool = False) -> str:
        """Store a local file or folder at ``rel``, committed only once complete; return its URI.

        ``move=True`` lets a local store rename the source into place instead of hardlinking
        or copying it (the source is gone afterwards); S3 always uploads and leaves it.
        """

    @abstractmethod
    def output_exists(self, rel: str) -> bool:
        """True when a complete (committed) output is at ``rel``."""

    @abstractmethod
    def create_json(self, rel: str, obj: Any) -> str:
        """Write a JSON record only if nothing is at ``rel`` (one atomic step); return its version.

        Raises :class:`FileExistsError` when a record is already there: of two writers racing
        for ``rel``, exactly one wins.
        """

    @abstractmethod
    def read_json_versioned(self, rel: str) -> tuple[Any | None, str | None]:
        """The JSON record at ``rel`` and its version (an opaque token), or ``(None, None)``."""

    @abstractmethod
    def replace_json(self, rel: str, obj: Any, version: str) -> str:
        """Replace the record at ``rel`` only if it still has ``version``; return the new version.

        Raises :class:`FileExistsError` when someone else changed it in between.
        """

    @abstractmethod
    def walk(self, rel_prefix: str = "") -> list[StoredFile]:
        """Every file under ``rel_prefix`` (temporaries and markers included), in one listing; [] when nothing is there."""

    @abstractmethod
    def remove(self, rels: list[str]) -> None:
        """Delete the files ``rels`` (absent ones are fine); empty local folders left behind go too."""

    def fetch(self, uri: str, dest: Path, *, expected_sha256: str | None = None) -> Path:
        """Make data at ``uri`` (local path, file:// or s3://) available locally; see :func:`fetch_uri`."""
        return self.fetch_input(uri, dest, expected_sha256=expected_sha256).path

    def fetch_input(self, uri: str, dest: Path, *, expected_sha256: str | None = None) -> Fetched:
        """As :meth:`fetch`, with the sha256 measured while downloading (see :func:`fetch_input`)."""
        return fetch_input(uri, dest, expected_sha256=expected_sha256)

    def _rel(self, *parts: str) -> str:
        rel = posixpath.join(*parts) if parts else ""
        if rel and not safe_relative(rel):
            raise ValueError(f"store path {rel!r} must be relative without '..'")
        return rel
