"""A store under an ``s3://bucket/prefix``, through s3fs.

S3 has no atomic rename of a prefix: an output is uploaded first, under its attempt's own
prefix, and committed by a ``<rel>._COMMITTED.json`` marker (each file's path, size and
sha256, measured from the bytes as they were uploaded) written last with one conditional
PUT (``If-None-Match: *``). Readers treat an output under ``runs/`` without its marker as
absent. JSON records are one PUT (atomic); the lease's compare-and-swap uses ``If-Match``.
"""

from __future__ import annotations

import errno
import json
import os
import posixpath
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from algodock.errors import InfrastructureError, InvalidInput
from algodock.hashing import folder_digest, list_files
from algodock.store.base import Store, StoredFile, encode_json
from algodock.store.layout import MARKER_SUFFIX, _hidden, _s3_path
from algodock.store.transfer import Fetched, _bounded, _download, _etag, _infra, _put_all_hashed, fetch_input, op_timeout, s3_filesystem

if TYPE_CHECKING:
    import s3fs

__all__ = ["S3Store"]


class S3Store(Store):
    """An ``s3://bucket/prefix`` through s3fs (credentials and endpoint from the AWS environment)."""

    def __init__(self, uri: str, fs: s3fs.S3FileSystem | None = None) -> None:
        if not uri.startswith("s3://"):
            raise InvalidInput(f"{uri}: an S3 store URI starts with s3://")
        self.root = _s3_path(uri)
        self.fs = fs or s3_filesystem()

    def __repr__(self) -> str:
        return f"S3Store('s3://{self.root}')"

    def _key(self, *parts: str) -> str:
        rel = self._rel(*parts)
        return f"{self.root}/{rel}" if rel else self.root

    def uri(self, *parts: str) -> str:
        return f"s3://{self._key(*parts)}"

    def write_json(self, rel: str, obj: Any, *, durable: bool = True) -> None:
        """One PUT, abandoned after :func:`op_timeout` (an ``InfrastructureError``): callers that
        must not give up at once wrap it in :func:`retrying`; none waits for ever."""
        body = encode_json(obj)

        def put() -> None:
            with _infra(f"cannot write {self.uri(rel)}"):
                try:
                    self.fs.pipe_file(self._key(rel), body)
                except FileNotFoundError as exc:
                    raise InfrastructureError(f"cannot write {self.uri(rel)}: does the bucket exist? ({exc})") from exc

        _bounded(put, op_timeout(), f"cannot write {self.uri(rel)}")

    def read_json(self, rel: str) -> Any | None:
        """One GET, bounded like :meth:`write_json`."""

        def get() -> Any | None:
            with _infra(f"cannot read {self.uri(rel)}"):
                try:
                    return self.fs.cat_file(self._key(rel))
                except FileNotFoundError:
                    return None

        data = _bounded(get, op_timeout(), f"cannot read {self.uri(rel)}")
        return None if data is None else json.loads(data)

    def exists(self, rel: str) -> bool:
        with _infra(f"cannot look at {self.uri(rel)}"):
            return bool(self.fs.exists(self._key(rel)))

    def output_exists(self, rel: str) -> bool:
        return self.exists(rel + MARKER_SUFFIX)

    def list(self, rel_prefix: str) -> list[str]:
        with _infra(f"cannot list {self.uri(rel_prefix)}"):
            try:
                entries = self.fs.ls(self._key(rel_prefix), detail=False)
            except FileNotFoundError:
                return []
        names = {posixpath.basename(e.rstrip("/")) for e in entries}
        return sorted(n for n in names if n and not _hidden(n))

    def create_json(self, rel: str, obj: Any) -> str:
        with _infra(f"cannot write {self.uri(rel)}"):
            out = self.fs.pipe_file(self._key(rel), encode_json(obj), mode="create")  # If-None-Match: *
        return _etag(out)

    def read_json_versioned(self, rel: str) -> tuple[Any | None, str | None]:
        with _infra(f"cannot read {self.uri(rel)}"):
            try:
                etag = self.fs.info(self._key(rel))["ETag"]
                data = self.fs.cat_file(self._key(rel))
            except FileNotFoundError:
                return None, None
        # A record replaced between the two calls gives new data with the old ETag: the next
        # replace_json then fails its If-Match, which is the safe way round.
        return json.loads(data), etag

    def replace_json(self, rel: str, obj: Any, version: str) -> str:
        try:
            with _infra(f"cannot write {self.uri(rel)}"):
                out = self.fs.pipe_file(self._key(rel), encode_json(obj), IfMatch=version)
        except InfrastructureError as exc:
            cause = exc.__cause__
            if isinstance(cause, OSError) and cause.errno == errno.EINVAL or "PreconditionFailed" in str(exc) or "412" in str(exc):
                raise FileExistsError(f"{self.uri(rel)}: someone else changed the record") from exc
            raise
        return _etag(out)

    def walk(self, rel_prefix: str = "") -> list[StoredFile]:
        top = self._key(rel_prefix) if rel_prefix else self.root
        with _infra(f"cannot list {self.uri(rel_prefix)}"):
            try:
                found = self.fs.find(top, detail=True, withdirs=False)
            except FileNotFoundError:
                return []
        cut = len(self.root) + 1
        return [
            StoredFile(key[cut:], int(meta.get("size") or 0))
            for key, meta in sorted(found.items())
            if meta.get("type") != "directory" and key.startswith(self.root + "/")
        ]

    def remove(self, rels: list[str]) -> None:
        keys = [self._key(rel) for rel in rels]
        for start in range(0, len(keys), 1000):  # one DeleteObjects request per 1000 keys
            with _infra(f"cannot delete under {self.uri()}"):
                try:
                    self.fs.rm(keys[start : start + 1000])
                except FileNotFoundError:
                    pass

    def put_output(self, local_path: Path, rel: str, *, move: bool = False) -> str:
        src = Path(local_path)
        key, marker = self._key(rel), self._key(rel) + MARKER_SUFFIX
        if not os.path.lexists(src):
            raise FileNotFoundError(f"{src}: nothing to store")
        is_dir = src.is_dir() and not src.is_symlink()
        rels = list_files(src) if is_dir else [""]  # regular files only: links and special files never go up
        with _infra(f"cannot upload {src} to {self.uri(rel)}"):
            # Nothing is deleted or overwritten: ``rel`` is under this attempt's own prefix, and
            # the marker is one conditional PUT, so of two writers exactly one commits.
            if self.fs.exists(marker):
                if self._same_commit(marker, src, rels):  # an earlier try of this upload committed; its answer was lost
                    return self.uri(rel)
                raise FileExistsError(f"{self.uri(rel)}: an output is already committed there; outputs are never replaced")
            pairs = [(src / r if r else src, f"{key}/{r}" if r else key) for r in rels]
            try:
                measured = _put_all_hashed(self.fs, pairs)
            except FileNotFoundError as exc:
                raise InfrastructureError(f"cannot upload to {self.uri(rel)}: does the bucket exist? ({exc})") from exc
            files = [{"path": r, "size": n, "sha256": h} for r, (n, h) in zip(rels, measured)]
            record = {
                "uri": self.uri(rel),
                "kind": "folder" if is_dir else "file",
                "sha256": folder_digest((f["path"], f["sha256"]) for f in files) if is_dir else files[0]["sha256"],
                "files": files,
                "committed_at": datetime.now(timezone.utc).isoformat(),
            }
            try:
                self.fs.pipe_file(marker, encode_json(record), mode="create")  # If-None-Match: *
            except FileExistsError:
                # An earlier try of this same upload may have committed before its answer was lost.
                if not self._same_commit(marker, src, rels, files):
                    raise FileExistsError(f"{self.uri(rel)}: another writer committed different files there; outputs are never replaced") from None
        return self.uri(rel)

    def _same_commit(self, marker: str, src: Path, rels: list[str], files: list[dict[str, Any]] | None = None) -> bool:
        """True when the marker at ``marker`` lists exactly our files (paths and sizes; sha256 too when known).

        Only the writer of an attempt writes under its prefix, so that is this upload, retried.
        """
        try:
            earlier = json.loads(self.fs.cat_file(marker))
        except (FileNotFoundError, ValueError):
            return False
        listed = earlier.get("files") or []
        if files is not None:
            return [(f.get("path"), f.get("size"), f.get("sha256")) for f in listed] == [(f["path"], f["size"], f["sha256"]) for f in files]
        ours = [(r, (src / r if r else src).stat().st_size) for r in rels]
        return [(f.get("path"), f.get("size")) for f in listed] == ours

    def fetch_input(self, uri: str, dest: Path, *, expected_sha256: str | None = None) -> Fetched:
        """As :func:`fetch_input`; an output of this store's ``runs/`` must be committed, only the
        files its marker lists are downloaded, and each is checked against the sha256 the marker
        recorded (markers written before sha256 was recorded are checked by ``expected_sha256`` only)."""
        if not uri.startswith(f"s3://{self.root}/runs/"):
            return fetch_input(uri, dest, fs=self.fs if uri.startswith("s3://") else None, expected_sha256=expected_sha256)
        path = _s3_path(uri)
        marker = self.read_json(path[len(self.root) + 1 :] + MARKER_SUFFIX)
        if marker is None:
            raise InvalidInput(f"{uri}: not committed (no {MARKER_SUFFIX} marker); the step that wrote it did not finish")
        is_dir = marker.get("kind") == "folder"
        listed = marker.get("files", [])
        rels = [f["path"] for f in listed] if is_dir else []
        expected_files = {f["path"]: f["sha256"] for f in listed if isinstance(f.get("sha256"), str)}
        with _infra(f"cannot download {uri}"):
            try:
                return _download(self.fs, path, rels, is_dir, dest, expected_sha256=expected_sha256, expected_files=expected_files)
            except FileNotFoundError as exc:
                raise InvalidInput(f"{uri}: a committed file is missing: {exc}") from exc

    def fetch(self, uri: str, dest: Path, *, expected_sha256: str | None = None) -> Path:
        """As :meth:`fetch_input`, returning only the local path."""
        return self.fetch_input(uri, dest, expected_sha256=expected_sha256).path
