"""Where runs keep their data and records: a local folder or an S3 prefix.

Layout under the store's root (see the ``*_rel`` helpers)::

    runs/<run_id>/run.json
    runs/<run_id>/lineage.json
    runs/<run_id>/lease.json                      who writes the run now (see algodock.store.lease)
    runs/<run_id>/steps/<step_id>/attempts/<attempt_id>/outputs/<name>.<ext> | <name>/
    runs/<run_id>/steps/<step_id>/attempts/<attempt_id>/container.log
    cache/<key>.json
    cache/objects/<sha256>/<filename>.json        where bytes with this hash are already stored

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

import asyncio
import errno
import fcntl
import hashlib
import json
import logging
import os
import posixpath
import random
import shutil
import stat
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar
from urllib.parse import unquote, urlparse

from algodock.contract.manifest import safe_relative
from algodock.errors import InfrastructureError, InvalidInput, InvalidOutput
from algodock.hashing import folder_digest, list_files, sort_key

if TYPE_CHECKING:
    import s3fs

log = logging.getLogger("algodock.store")
T = TypeVar("T")

DEFAULT_STORE = Path(".algodock/store")
"""The store used when none is given, relative to the working directory."""

MARKER_SUFFIX = "._COMMITTED.json"
"""An S3 output ``rel`` is complete once ``rel + MARKER_SUFFIX`` exists."""

_CHUNK = 1024 * 1024
_DOWNLOADS = 16
"""Objects downloaded (and uploaded) at once."""

_TMP = ".tmp-"
_OLD = ".old-"
_LOCK = ".lock-"


# ---------------------------------------------------------------- layout


def run_rel(run_id: str) -> str:
    """``runs/<run_id>``."""
    return f"runs/{run_id}"


def run_json_rel(run_id: str) -> str:
    """``runs/<run_id>/run.json``: the run's summary."""
    return f"runs/{run_id}/run.json"


def lineage_rel(run_id: str) -> str:
    """``runs/<run_id>/lineage.json``."""
    return f"runs/{run_id}/lineage.json"


def step_rel(run_id: str, step_id: str) -> str:
    """``runs/<run_id>/steps/<step_id>``."""
    return f"runs/{run_id}/steps/{step_id}"


def attempt_rel(run_id: str, step_id: str, attempt_id: str) -> str:
    """``runs/<run_id>/steps/<step_id>/attempts/<attempt_id>``: everything one attempt wrote."""
    return f"runs/{run_id}/steps/{step_id}/attempts/{attempt_id}"


def new_attempt_id(attempt: int) -> str:
    """A fresh attempt id, ``<attempt>-<random>``: unique even when a run id is reused.

    >>> new_attempt_id(2).startswith("2-"), len(new_attempt_id(1))
    (True, 14)
    """
    return f"{attempt}-{uuid.uuid4().hex[:12]}"


def output_rel(run_id: str, step_id: str, filename: str, attempt_id: str | None = None) -> str:
    """Where an output goes: ``…/attempts/<attempt_id>/outputs/<filename>`` (``<name>.<ext>`` or a
    folder ``<name>``); without ``attempt_id`` the pre-0.2 ``runs/<run_id>/steps/<step_id>/outputs/<filename>``."""
    if attempt_id:
        return f"{attempt_rel(run_id, step_id, attempt_id)}/outputs/{filename}"
    return f"runs/{run_id}/steps/{step_id}/outputs/{filename}"


def log_rel(run_id: str, step_id: str, attempt_id: str | None = None) -> str:
    """The attempt's full container log, ``…/attempts/<attempt_id>/container.log``."""
    if attempt_id:
        return f"{attempt_rel(run_id, step_id, attempt_id)}/container.log"
    return f"runs/{run_id}/steps/{step_id}/container.log"


def lease_rel(run_id: str) -> str:
    """``runs/<run_id>/lease.json``: who holds the run (one writer per run)."""
    return f"runs/{run_id}/lease.json"


def object_rel(sha256: str, filename: str) -> str:
    """``cache/objects/<sha256>/<filename>.json``: where bytes with this hash and name are stored."""
    return f"cache/objects/{sha256}/{filename}.json"


WORK_DIR = ".work"
"""Under a local store's root: the work folders of running steps (same filesystem, so inputs hardlink)."""


def cache_rel(key: str) -> str:
    """``cache/<key>.json``."""
    return f"cache/{key}.json"


# ---------------------------------------------------------------- URIs


def local_path_of(uri: str) -> Path | None:
    """The local path of a plain path or ``file://`` URI; None for ``s3://``.

    >>> local_path_of("file:///data/x.parquet"), local_path_of("s3://b/k")
    (PosixPath('/data/x.parquet'), None)
    """
    if uri.startswith("s3://"):
        return None
    if uri.startswith("file:"):
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise InvalidInput(f"{uri}: file:// URIs on another host are not supported")
        return Path(unquote(parsed.path))
    if "://" in uri:
        raise InvalidInput(f"{uri}: unsupported URI scheme (use a local path, file:// or s3://)")
    return Path(uri)


def _s3_path(uri: str) -> str:
    """``s3://bucket/key/`` to ``bucket/key``."""
    path = uri.removeprefix("s3://").strip("/")
    if not path:
        raise InvalidInput(f"{uri}: an s3:// URI needs a bucket")
    return path


def s3_filesystem(**kwargs: Any) -> s3fs.S3FileSystem:
    """An s3fs filesystem configured by the standard AWS environment, ``AWS_ENDPOINT_URL`` included.

    Listings are not cached: other processes write to the same store.
    """
    import s3fs

    client_kwargs = dict(kwargs.pop("client_kwargs", {}))
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        client_kwargs.setdefault("endpoint_url", endpoint)
    kwargs.setdefault("use_listings_cache", False)
    # A stalled endpoint must not hang a request for ever: bounded reads and few inner retries;
    # algodock's own retry loop (:func:`retrying`) backs off between whole operations.
    timeout = store_timeout()
    config = dict(kwargs.pop("config_kwargs", {}))
    config.setdefault("connect_timeout", min(timeout, 10.0))
    config.setdefault("read_timeout", timeout)
    config.setdefault("retries", {"max_attempts": 2, "mode": "standard"})
    fs = s3fs.S3FileSystem(client_kwargs=client_kwargs, config_kwargs=config, **kwargs)
    fs.retries = 2  # s3fs's own retry loop around each request (a class attribute, 5 by default)
    return fs


def store_timeout() -> float:
    """Seconds one store request may stall before it counts as failed (``ALGODOCK_STORE_TIMEOUT``, default 60)."""
    return float(os.environ.get("ALGODOCK_STORE_TIMEOUT", "60"))


def retrying(op: Callable[[], T], what: str, *, attempts: int | None = None, timeout: float | None = None, backoff: float | None = None, on_retry: Callable[[str], None] | None = None) -> T:
    """Run the store operation ``op`` until it succeeds, at most ``attempts`` times.

    Each try is bounded by ``timeout`` seconds (a stalled endpoint cannot hang the step; the
    stalled try is abandoned in its daemon thread), and tries are spaced by exponential
    backoff with jitter (``backoff``, ``2·backoff``, … capped at 30 s). Only
    :class:`InfrastructureError` and ``OSError`` are retried; the last one is raised as an
    :class:`InfrastructureError` naming ``what``. Defaults: ``ALGODOCK_STORE_ATTEMPTS`` (5),
    ``ALGODOCK_STORE_OP_TIMEOUT`` (4× the request timeout), ``ALGODOCK_STORE_BACKOFF`` (1 s).
    """
    attempts = attempts or int(os.environ.get("ALGODOCK_STORE_ATTEMPTS", "5"))
    timeout = timeout or float(os.environ.get("ALGODOCK_STORE_OP_TIMEOUT", str(4 * store_timeout())))
    backoff = backoff if backoff is not None else float(os.environ.get("ALGODOCK_STORE_BACKOFF", "1"))
    last: BaseException | None = None
    for n in range(1, attempts + 1):
        try:
            return _bounded(op, timeout, what)
        except (InfrastructureError, OSError) as exc:
            if isinstance(exc, (FileNotFoundError, FileExistsError)):
                raise
            last = exc
            if n == attempts:
                break
            delay = min(backoff * 2 ** (n - 1), 30.0) * (0.5 + random.random() / 2)
            message = f"{what} failed (try {n} of {attempts}): {exc}; retrying in {delay:.1f} s"
            log.warning("%s", message)
            if on_retry is not None:
                on_retry(message)
            time.sleep(delay)  # backoff between tries, not synchronization
    raise InfrastructureError(f"{what} failed {attempts} times; last error: {last}") from last


def _bounded(op: Callable[[], T], timeout: float, what: str) -> T:
    """``op()`` in a daemon thread, waited for at most ``timeout`` seconds."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = op()
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="algodock-store-op", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise InfrastructureError(f"{what}: no answer within {timeout:g} s (ALGODOCK_STORE_OP_TIMEOUT)")
    if "error" in box:
        raise box["error"]
    return box["value"]


@contextmanager
def _infra(what: str) -> Iterator[None]:
    """Turn S3/network failures into :class:`InfrastructureError` (retryable); FileNotFoundError and FileExistsError pass."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (FileNotFoundError, FileExistsError):
        raise
    except (OSError, BotoCoreError, ClientError, asyncio.TimeoutError) as exc:
        raise InfrastructureError(f"{what}: {type(exc).__name__}: {exc}") from exc


# ---------------------------------------------------------------- local file helpers


def _link_or_copy_file(src: str, dst: str) -> None:
    """Hardlink (no bytes copied) when the filesystem allows it, else copy."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EACCES, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        shutil.copy2(src, dst, follow_symlinks=False)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def _replace(tmp: Path, dest: Path) -> None:
    """Move ``tmp`` to ``dest`` by rename; a folder already at ``dest`` is set aside first."""
    if (dest.is_dir() and not dest.is_symlink()) or (tmp.is_dir() and os.path.lexists(dest)):
        old = dest.with_name(f"{_OLD}{dest.name}-{uuid.uuid4().hex}")
        os.rename(dest, old)
        os.rename(tmp, dest)
        _remove(old)
    else:
        os.replace(tmp, dest)


def _tmp_beside(dest: Path) -> Path:
    return dest.with_name(f"{_TMP}{dest.name}-{uuid.uuid4().hex}")


def _hidden(name: str) -> bool:
    return name.startswith((_TMP, _OLD, _LOCK)) or name.endswith(MARKER_SUFFIX)


# ---------------------------------------------------------------- fetching


class Fetched(NamedTuple):
    """Data made available locally for staging, with what was measured on the way in."""

    path: Path
    """The local file or folder."""
    sha256: str | None
    """The sha256 of the bytes as they streamed in (folder hash for a prefix); None for local data, not read."""
    files: tuple[str, ...] | None
    """The relative files of a downloaded folder, in hash order; None for a file or local data."""


def fetch_uri(uri: str, dest: Path, fs: s3fs.S3FileSystem | None = None, *, expected_sha256: str | None = None) -> Path:
    """Make the file or folder at ``uri`` available locally, for staging (see :func:`fetch_input`)."""
    return fetch_input(uri, dest, fs, expected_sha256=expected_sha256).path


def fetch_input(uri: str, dest: Path, fs: s3fs.S3FileSystem | None = None, *, expected_sha256: str | None = None) -> Fetched:
    """Make the file or folder at ``uri`` available locally, for staging.

    A local path or ``file://`` URI is returned as is (no copy at all, nothing read). An
    ``s3://`` file or prefix is downloaded, its files concurrently, to ``dest/<base name>``
    (replaced whole, via a temporary name) and hashed as it streams in; when
    ``expected_sha256`` is given (the producer's record) a mismatch is an
    :class:`InfrastructureError` naming the object. Missing data raises
    :class:`InvalidInput`; S3 failures :class:`InfrastructureError`.
    """
    local = local_path_of(uri)
    if local is not None:
        if not local.exists():
            raise InvalidInput(f"{uri}: no such file or folder")
        return Fetched(local, None, None)
    fs = fs or s3_filesystem()
    path = _s3_path(uri)
    with _infra(f"cannot download {uri}"):
        try:
            info = fs.info(path)
        except FileNotFoundError:
            raise InvalidInput(f"{uri}: no such S3 object or prefix") from None
        if info["type"] == "directory":
            found = fs.find(path, detail=True)
            rels = sorted(
                key[len(path) + 1 :]
                for key, meta in found.items()
                if meta.get("type") != "directory" and not key.endswith("/") and key.startswith(path + "/")
            )
        else:
            rels = []
        return _download(fs, path, rels, info["type"] == "directory", dest, expected_sha256=expected_sha256)


async def _get_hashed(fs: s3fs.S3FileSystem, key: str, local: str) -> tuple[str, int]:
    """Stream one object to ``local``, hashing each chunk as it arrives; returns (sha256, size)."""
    bucket, name, version = fs.split_path(key)
    extra = {"VersionId": version} if version else {}
    resp = await fs._call_s3("get_object", Bucket=bucket, Key=name, **extra, **fs.req_kw)
    body = resp["Body"]
    h = hashlib.sha256()
    size = 0
    try:
        with open(local, "wb") as fh:
            while chunk := await body.read(_CHUNK):
                h.update(chunk)
                fh.write(chunk)
                size += len(chunk)
    finally:
        body.close()
    return h.hexdigest(), size


def _get_all_hashed(fs: s3fs.S3FileSystem, pairs: list[tuple[str, str]]) -> list[tuple[str, int]]:
    """:func:`_get_hashed` for every ``(key, local)`` pair, at most ``_DOWNLOADS`` at a time."""
    from fsspec.asyn import sync

    async def run() -> list[tuple[str, int]]:
        gate = asyncio.Semaphore(_DOWNLOADS)

        async def one(key: str, local: str) -> tuple[str, int]:
            async with gate:
                return await _get_hashed(fs, key, local)

        return list(await asyncio.gather(*(one(k, p) for k, p in pairs)))

    return sync(fs.loop, run)


def _mismatch(what: str, got: str, expected: str) -> InfrastructureError:
    return InfrastructureError(
        f"{what}: the downloaded bytes have sha256 {got} but its producer recorded {expected}; "
        "the stored object changed after it was written, or the download was corrupted"
    )


def _download(
    fs: s3fs.S3FileSystem,
    path: str,
    rels: list[str],
    is_dir: bool,
    dest: Path,
    *,
    expected_sha256: str | None = None,
    expected_files: dict[str, str] | None = None,
) -> Fetched:
    """Download ``path`` (a key, or a prefix with the files ``rels``) to ``dest/<base name>``, hashing as it streams.

    ``expected_files`` (relative path -> sha256, from a commit marker) and ``expected_sha256``
    (the whole file or folder) are checked before the download is put in place.
    """
    for rel in rels:
        if not safe_relative(rel):
            raise InvalidInput(f"s3://{path}: key {rel!r} would land outside the staging folder")
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / posixpath.basename(path)
    tmp = _tmp_beside(target)
    try:
        if is_dir:
            tmp.mkdir()
            for rel in rels:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            got = _get_all_hashed(fs, [(f"{path}/{r}", str(tmp / r)) for r in rels])
            digests = {rel: digest for rel, (digest, _) in zip(rels, got)}
            for rel, digest in digests.items():
                want = (expected_files or {}).get(rel)
                if want is not None and want != digest:
                    raise _mismatch(f"s3://{path}/{rel}", digest, want)
            total = folder_digest(digests.items())
        else:
            [(total, _)] = _get_all_hashed(fs, [(path, str(tmp))])
            want = (expected_files or {}).get("")
            if want is not None and want != total:
                raise _mismatch(f"s3://{path}", total, want)
        if expected_sha256 is not None and expected_sha256 != total:
            raise _mismatch(f"s3://{path}", total, expected_sha256)
        _replace(tmp, target)
    finally:
        _remove(tmp)
    return Fetched(target, total, tuple(sorted(rels, key=sort_key)) if is_dir else None)


def _open_regular(local: Path) -> int:
    """A descriptor of the regular file ``local``; a symlink or special file is refused, never followed."""
    try:
        fd = os.open(local, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InvalidOutput(f"{local}: a symlink is never uploaded (only regular files and folders count)") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InvalidOutput(f"{local}: not a regular file; it is never uploaded")
    return fd


def _hash_fd(fd: int) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    while chunk := os.pread(fd, _CHUNK, size):
        h.update(chunk)
        size += len(chunk)
    return size, h.hexdigest()


def _put_all_hashed(fs: s3fs.S3FileSystem, pairs: list[tuple[Path, str]]) -> list[tuple[int, str]]:
    """Upload every ``(local, key)``, at most ``_DOWNLOADS`` at a time; returns each file's (size, sha256).

    Each file is opened once with ``O_NOFOLLOW`` (:func:`_open_regular`); that descriptor is
    hashed and uploaded (s3fs reads it as ``/proc/self/fd/N``: the same open inode, so the
    bytes recorded are the bytes sent, and no link is followed).
    """
    import mimetypes

    from fsspec.asyn import sync

    async def one(gate: asyncio.Semaphore, local: Path, key: str) -> tuple[int, str]:
        async with gate:
            fd = _open_regular(local)
            try:
                measured = await asyncio.to_thread(_hash_fd, fd)
                content_type = mimetypes.guess_type(local.name)[0]
                extra = {"ContentType": content_type} if content_type else {}
                await fs._put_file(f"/proc/self/fd/{fd}", key, **extra)
                return measured
            finally:
                os.close(fd)

    async def run() -> list[tuple[int, str]]:
        gate = asyncio.Semaphore(_DOWNLOADS)
        return list(await asyncio.gather(*(one(gate, local, key) for local, key in pairs)))

    return sync(fs.loop, run)


# ---------------------------------------------------------------- stores


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
    def write_json(self, rel: str, obj: Any) -> None:
        """Write a JSON record atomically: readers see the old record or the new one, never half."""

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


class LocalStore(Store):
    """A folder on this host (default ``./.algodock/store``)."""

    is_local = True

    def __init__(self, root: str | Path = DEFAULT_STORE) -> None:
        self.root = Path(root).expanduser().absolute()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def local_path(self, *parts: str) -> Path:
        rel = self._rel(*parts)
        return self.root / rel if rel else self.root

    def uri(self, *parts: str) -> str:
        return str(self.local_path(*parts))

    def write_json(self, rel: str, obj: Any) -> None:
        dest = self.local_path(rel)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_beside(dest)
        try:
            with open(tmp, "w") as fh:
                json.dump(obj, fh, indent=2, default=str)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def read_json(self, rel: str) -> Any | None:
        try:
            return json.loads(self.local_path(rel).read_text())
        except FileNotFoundError:
            return None

    def exists(self, rel: str) -> bool:
        return os.path.lexists(self.local_path(rel))

    def output_exists(self, rel: str) -> bool:
        return self.exists(rel)  # the rename is the commit

    def list(self, rel_prefix: str) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self.local_path(rel_prefix)) if not _hidden(n))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def create_json(self, rel: str, obj: Any) -> str:
        dest = self.local_path(rel)
        dest.parent.mkdir(parents=True, exist_ok=True)
        data = json.dumps(obj, indent=2, default=str).encode()
        tmp = _tmp_beside(dest)
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.link(tmp, dest)  # fails with EEXIST when a record is there: atomic, unlike exists()+write
        finally:
            tmp.unlink(missing_ok=True)
        return hashlib.sha256(data).hexdigest()

    def read_json_versioned(self, rel: str) -> tuple[Any | None, str | None]:
        try:
            data = self.local_path(rel).read_bytes()
        except FileNotFoundError:
            return None, None
        return json.loads(data), hashlib.sha256(data).hexdigest()

    def replace_json(self, rel: str, obj: Any, version: str) -> str:
        dest = self.local_path(rel)
        dest.parent.mkdir(parents=True, exist_ok=True)
        data = json.dumps(obj, indent=2, default=str).encode()
        # Compare-and-swap under an exclusive lock of a file beside the record (released by the
        # kernel if this process dies); create_json needs no lock, it only writes where nothing is.
        with open(dest.with_name(f"{_LOCK}{dest.name}"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                current = dest.read_bytes()
            except FileNotFoundError:
                raise FileExistsError(f"{dest}: the record is gone; someone else changed it") from None
            if hashlib.sha256(current).hexdigest() != version:
                raise FileExistsError(f"{dest}: someone else changed the record")
            tmp = _tmp_beside(dest)
            try:
                tmp.write_bytes(data)
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
        return hashlib.sha256(data).hexdigest()

    def walk(self, rel_prefix: str = "") -> list[StoredFile]:
        top = self.local_path(rel_prefix) if rel_prefix else self.root
        found: list[StoredFile] = []
        for dirpath, _, filenames in os.walk(top):  # symlinks are listed, never followed
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                try:
                    size = os.lstat(os.path.join(dirpath, name)).st_size
                except FileNotFoundError:
                    continue
                found.append(StoredFile(name if rel_dir == "." else f"{rel_dir}/{name}", size))
        return found

    def remove(self, rels: list[str]) -> None:
        parents: set[Path] = set()
        for rel in rels:
            path = self.local_path(rel)
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except IsADirectoryError:
                shutil.rmtree(path, ignore_errors=True)
            parents.add(path.parent)
        for folder in sorted(parents, key=lambda p: len(p.parts), reverse=True):  # deepest first
            while folder != self.root and self.root in folder.parents:
                try:
                    folder.rmdir()
                except OSError:  # not empty (or gone): stop climbing
                    break
                folder = folder.parent

    def put_output(self, local_path: Path, rel: str, *, move: bool = False) -> str:
        src = Path(local_path)
        dest = self.local_path(rel)
        if not os.path.lexists(src):
            raise FileNotFoundError(f"{src}: nothing to store")
        if src.absolute() == dest or (dest.exists() and os.path.samefile(src, dest)):
            return str(dest)
        if os.path.lexists(dest):  # stored outputs are immutable: a lineage document may point here
            raise FileExistsError(f"{dest}: an output is already stored there; outputs are never replaced")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_beside(dest)
        try:
            if move:
                try:
                    os.rename(src, tmp)
                except OSError as exc:
                    if exc.errno != errno.EXDEV:
                        raise
                    move = False
            if not move:
                if src.is_dir():
                    shutil.copytree(src, tmp, symlinks=True, copy_function=_link_or_copy_file)
                else:
                    _link_or_copy_file(str(src), str(tmp))
            _replace(tmp, dest)
        finally:
            _remove(tmp)
        return str(dest)


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

    def write_json(self, rel: str, obj: Any) -> None:
        with _infra(f"cannot write {self.uri(rel)}"):
            try:
                self.fs.pipe_file(self._key(rel), json.dumps(obj, indent=2, default=str).encode())
            except FileNotFoundError as exc:
                raise InfrastructureError(f"cannot write {self.uri(rel)}: does the bucket exist? ({exc})") from exc

    def read_json(self, rel: str) -> Any | None:
        with _infra(f"cannot read {self.uri(rel)}"):
            try:
                return json.loads(self.fs.cat_file(self._key(rel)))
            except FileNotFoundError:
                return None

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
            out = self.fs.pipe_file(self._key(rel), json.dumps(obj, indent=2, default=str).encode(), mode="create")  # If-None-Match: *
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
                out = self.fs.pipe_file(self._key(rel), json.dumps(obj, indent=2, default=str).encode(), IfMatch=version)
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
                self.fs.pipe_file(marker, json.dumps(record, indent=2).encode(), mode="create")  # If-None-Match: *
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


def _etag(response: Any) -> str:
    """The ETag of a put_object response (s3fs returns it from pipe_file)."""
    etag = (response or {}).get("ETag") if isinstance(response, dict) else None
    if not etag:
        raise InfrastructureError("the S3 endpoint returned no ETag for a conditional write")
    return str(etag)


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
