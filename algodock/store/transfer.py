"""Moving bytes in and out of a store: S3 connections, retries with bounded tries, local
renames and hardlinks, downloads and uploads hashed while they stream, and the helpers of
S3's conditional writes.

What is recorded about data is measured from the bytes as they pass: a download is hashed
chunk by chunk as it arrives and checked against its producer's record before it is put in
place; an upload hashes the very descriptor it sends (see :func:`_put_all_hashed`).

>>> store_timeout() > 0
True
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import posixpath
import random
import shutil
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from algodock.contract.manifest import safe_relative
from algodock.errors import InfrastructureError, InvalidInput, InvalidOutput
from algodock.hashing import folder_digest, sort_key
from algodock.store.layout import _OLD, _s3_path, _tmp_beside, local_path_of

if TYPE_CHECKING:
    import s3fs

__all__ = ["Fetched", "fetch_input", "fetch_uri", "op_timeout", "retrying", "s3_filesystem", "store_timeout"]

log = logging.getLogger("algodock.store")
T = TypeVar("T")

_CHUNK = 1024 * 1024
_DOWNLOADS = 16
"""Objects downloaded (and uploaded) at once."""



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


def op_timeout() -> float:
    """Seconds one store operation (a try: requests and s3fs's own retries) may take before it is
    abandoned (``ALGODOCK_STORE_OP_TIMEOUT``, default 4x :func:`store_timeout`): the request timeout
    alone does not end a stalled PUT."""
    return float(os.environ.get("ALGODOCK_STORE_OP_TIMEOUT", str(4 * store_timeout())))


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
    timeout = timeout or op_timeout()
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
        # One listing tells a prefix of parts (the usual input) from a single object: no info call first.
        try:
            found = fs.find(path, detail=True)
        except FileNotFoundError:
            found = {}
        rels = sorted(
            key[len(path) + 1 :]
            for key, meta in found.items()
            if meta.get("type") != "directory" and not key.endswith("/") and key.startswith(path + "/")
        )
        if rels:
            return _download(fs, path, rels, True, dest, expected_sha256=expected_sha256)
        try:
            info = found.get(path) or fs.info(path)
        except FileNotFoundError:
            raise InvalidInput(f"{uri}: no such S3 object or prefix") from None
        return _download(fs, path, [], info["type"] == "directory", dest, expected_sha256=expected_sha256)


async def _get_hashed(fs: s3fs.S3FileSystem, key: str, local: str) -> tuple[str, int]:
    """Stream one object to ``local``, hashing each chunk as it arrives; returns (sha256, size).

    Each chunk is hashed and written in a thread (hashlib releases the GIL) while the next one
    is read: the event loop only reads, and no stream waits for a hash between its reads.
    """
    bucket, name, version = fs.split_path(key)
    extra = {"VersionId": version} if version else {}
    resp = await fs._call_s3("get_object", Bucket=bucket, Key=name, **extra, **fs.req_kw)
    body = resp["Body"]
    h = hashlib.sha256()
    size = 0
    loop = asyncio.get_running_loop()
    try:
        with open(local, "wb") as fh:

            def take(chunk: bytes) -> None:
                h.update(chunk)
                fh.write(chunk)

            taking: asyncio.Future[None] | None = None
            try:
                while chunk := await body.read(_CHUNK):
                    if taking is not None:
                        await taking  # in order: the previous chunk is hashed and written first
                    taking = loop.run_in_executor(None, take, chunk)
                    size += len(chunk)
            finally:
                if taking is not None:  # never close the file under a write
                    await taking
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
                content_type = mimetypes.guess_type(local.name)[0]
                extra = {"ContentType": content_type} if content_type else {}
                # hashed in a thread while the same descriptor's bytes go up, not before
                measured, _ = await asyncio.gather(asyncio.to_thread(_hash_fd, fd), fs._put_file(f"/proc/self/fd/{fd}", key, **extra))
                return measured
            finally:
                os.close(fd)

    async def run() -> list[tuple[int, str]]:
        gate = asyncio.Semaphore(_DOWNLOADS)
        return list(await asyncio.gather(*(one(gate, local, key) for local, key in pairs)))

    return sync(fs.loop, run)



# ---------------------------------------------------------------- conditional writes


def _etag(response: Any) -> str:
    """The ETag of a put_object response (s3fs returns it from pipe_file)."""
    etag = (response or {}).get("ETag") if isinstance(response, dict) else None
    if not etag:
        raise InfrastructureError("the S3 endpoint returned no ETag for a conditional write")
    return str(etag)
