"""Named-volume staging, for engines that cannot see this host's folders (a remote ``DOCKER_HOST``).

The step's work folder (``algo_input.json`` and ``input/``) is packed into a tar and put
into a fresh named volume through the engine's archive API, by way of a container that is
created and never started; a second volume, owned by the container's uid, is the output
folder. After the run the output volume is read back with the archive API and unpacked
into the local output folder as it streams in (:func:`extract_output_tar`), where the usual
output checks run. Both volumes carry the step's labels and are removed afterwards.

The extraction trusts nothing in the archive: only folders and regular files are written
(new files, ``O_EXCL | O_NOFOLLOW``, modes 0644/0755, owners ignored); a symlink, device
file or FIFO is ``invalid_output``; names are checked as in the output folder itself (no
absolute path, no ``..``, no control character, UTF-8). A hard link to a regular file
extracted earlier from the same archive becomes a hard link in the local folder: the same
thing the bind mode sees when an algorithm hardlinks one of its own files (two names, one
content, no link to follow); a hard link to anything else is ``invalid_output``. The bytes
and entries are bounded by the step's ``output_mb`` and ``output_files`` while streaming,
so a hostile archive cannot fill the host's disk.
"""

from __future__ import annotations

import errno
import io
import os
import posixpath
import tarfile
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from algodock.contract.manifest import safe_relative
from algodock.errors import FAILURE_KINDS, InfrastructureError, InvalidOutput, StepFailure
from algodock.runtime.outputs import bad_name_reason
from algodock.runtime.leftovers import REMOVE_ATTEMPTS, remove_container, remove_volume

if TYPE_CHECKING:
    import docker
    from docker.models.containers import Container

SPOOL_BYTES = 64 * 1024 * 1024
MiB = 1024 * 1024
DEFAULT_OUTPUT_MB = 10240
DEFAULT_OUTPUT_FILES = 100000


def staging_mode(client: docker.DockerClient) -> str:
    """``bind`` for a local engine, ``volume`` for a remote one; ``ALGODOCK_STAGING`` overrides."""
    mode = os.environ.get("ALGODOCK_STAGING", "auto")
    if mode in ("bind", "volume"):
        return mode
    # docker-py names a local socket http+docker://localhost; tcp:// becomes http(s)://.
    url = urlparse(str(getattr(client.api, "base_url", "")))
    remote = url.scheme in ("http", "https", "ssh") and url.hostname not in ("localhost", "127.0.0.1", "::1")
    return "volume" if remote else "bind"


class VolumeWorkspace:
    """Two named volumes for one step: ``work`` (read-only in the step) and ``output``."""

    def __init__(self, client: docker.DockerClient, labels: dict[str, str]) -> None:
        suffix = uuid.uuid4().hex[:10]
        self.client = client
        self.labels = labels
        self.work = client.volumes.create(name=f"algodock-work-{suffix}", labels=labels)
        self.output = client.volumes.create(name=f"algodock-out-{suffix}", labels=labels)

    def fill(self, image_id: str, work_dir: Path, uid: int, gid: int) -> None:
        """Put ``work_dir``'s files into the work volume and hand the output volume to ``uid``."""
        from docker.types import Mount

        loader = self.client.containers.create(
            image_id,
            command=["true"],
            network_mode="none",
            mounts=[Mount("/work", self.work.name, type="volume"), Mount("/work/output", self.output.name, type="volume")],
            labels={**self.labels, "io.algodock.role": "loader"},  # owner labels: the sweep can find it
        )
        try:
            with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as buf:
                with tarfile.open(fileobj=buf, mode="w") as tar:
                    for name in ("algo_input.json", "input"):
                        tar.add(str(work_dir / name), arcname=name, filter=_readable)
                    out = tarfile.TarInfo("output")
                    out.type, out.mode, out.uid, out.gid = tarfile.DIRTYPE, 0o755, uid, gid
                    tar.addfile(out)
                buf.seek(0)
                if not loader.put_archive("/work", buf):
                    raise InfrastructureError("the engine refused to fill the step's work volume")
        finally:
            remove_container(self.client, loader.id, attempts=REMOVE_ATTEMPTS)

    def export_output(self, container: Container, output_dir: Path, container_parameters: Any = None) -> None:
        """Unpack the (stopped) container's ``/work/output`` into ``output_dir``, streaming (see module docstring).

        ``container_parameters`` gives ``output_mb`` / ``output_files`` (defaults 10240 / 100000).
        """
        from docker.errors import APIError, NotFound
        from requests.exceptions import RequestException

        max_mb = getattr(container_parameters, "output_mb", None) or DEFAULT_OUTPUT_MB
        max_files = getattr(container_parameters, "output_files", None) or DEFAULT_OUTPUT_FILES
        try:
            stream, _ = container.get_archive("/work/output")
            extract_output_tar(stream, output_dir, max_bytes=int(max_mb * MiB), max_entries=int(max_files))
        except (NotFound, APIError, RequestException) as exc:
            raise InfrastructureError(f"the output folder could not be read back from the engine: {exc}") from exc

    def remove(self) -> None:
        for volume in (self.work, self.output):
            remove_volume(self.client, volume.name)  # never raises: what stays, the sweep gets later


class _ChunkReader(io.RawIOBase):
    """A readable file over an iterator of byte chunks (the engine's archive stream), never spooled."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks: Iterator[bytes] = iter(chunks)
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf:
            try:
                self._buf = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


def _limit_failure(message: str) -> StepFailure:
    """``disk_limit`` once that kind exists (contract 0.2), ``invalid_output`` until then."""
    return FAILURE_KINDS.get("disk_limit", InvalidOutput)(message)


def _member_rel(name: str) -> str | None:
    """The member's path below ``output/`` (the archive's root), checked; None for the root itself."""
    parts = name.split("/", 1)
    if parts[0] not in ("output", "./output") and name.strip("/") not in ("output",):
        raise InvalidOutput(f"output archive: unexpected entry {name!r} outside output/")
    if len(parts) == 1 or parts[1].strip("/") in ("", "."):
        return None
    rel = parts[1]
    reason = bad_name_reason(rel)
    if reason is not None:
        raise InvalidOutput(f"output folder: {rel!r} {reason} (docs/contract.md §3: such names are not allowed)")
    if not safe_relative(rel):
        raise InvalidOutput(f"output folder: {rel!r} would land outside the output folder")
    return posixpath.normpath(rel)


def extract_output_tar(chunks: Iterable[bytes], output_dir: Path, *, max_bytes: int, max_entries: int) -> None:
    """Extract the engine's tar stream of ``/work/output`` into ``output_dir``, trusting nothing in it.

    Only folders and regular files are written; see the module docstring for links, names
    and limits. Raises :class:`InvalidOutput` (or ``disk_limit``), never a ``tarfile`` error.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    files: set[str] = set()
    dirs: set[str] = set()
    total = entries = 0

    def make_dirs(rel: str) -> None:
        parts = rel.split("/")
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if sub in dirs:
                continue
            if sub in files:
                raise InvalidOutput(f"output folder: {rel!r} needs {sub!r} to be a folder, but it is a file")
            os.mkdir(output_dir / sub, 0o755)  # fails if anything is there: only we create entries
            dirs.add(sub)

    try:
        with tarfile.open(fileobj=io.BufferedReader(_ChunkReader(chunks), 1024 * 1024), mode="r|") as tar:
            for member in tar:
                rel = _member_rel(member.name)
                if rel is None:
                    continue
                entries += 1
                if entries > max_entries:
                    raise _limit_failure(f"the output folder holds more than output_files={max_entries} files and folders")
                if member.isdir():
                    make_dirs(rel)
                    continue
                parent = posixpath.dirname(rel)
                if rel in files or rel in dirs:
                    raise InvalidOutput(f"output folder: {rel!r} appears twice in the engine's archive")
                if member.islnk():
                    try:
                        target = _member_rel(member.linkname) if member.linkname else None
                    except InvalidOutput:  # a link leading out of output/: said below
                        target = None
                    if target is None or target not in files:
                        raise InvalidOutput(f"output folder: {rel} is a hard link to {member.linkname!r}, which is not a regular file of the output folder")
                    if parent:
                        make_dirs(parent)
                    os.link(output_dir / target, output_dir / rel, follow_symlinks=False)
                    files.add(rel)
                    continue
                if not member.isreg():
                    what = "a symlink" if member.issym() else "a device file" if (member.ischr() or member.isblk()) else "a FIFO" if member.isfifo() else "a special file"
                    raise InvalidOutput(f"output folder: {rel} is {what}, not a regular file; only regular files and folders count")
                total += member.size
                if total > max_bytes:
                    raise _limit_failure(f"the output folder holds more than output_mb={max_bytes // MiB} MiB")
                if parent:
                    make_dirs(parent)
                source = tar.extractfile(member)
                fd = os.open(output_dir / rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
                with os.fdopen(fd, "wb") as out:
                    if source is not None:
                        while chunk := source.read(1024 * 1024):
                            out.write(chunk)
                files.add(rel)
    except (tarfile.TarError, EOFError) as exc:
        raise InvalidOutput(f"the output folder could not be read back from the engine: {exc}") from exc
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EROFS, errno.ENOMEM):  # the host's disk, not the archive
            raise InfrastructureError(f"the output folder could not be unpacked into {output_dir}: {exc.strerror or exc}") from exc
        raise InvalidOutput(f"the output folder could not be unpacked: {exc.strerror or exc} ({exc.filename})") from exc


def _readable(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """Staged inputs are root-owned and world-readable inside the volume."""
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = (info.mode | 0o444 | (0o111 if info.isdir() else 0)) & 0o755
    return info


def read_only_mounts(work_volume: str, output_volume: str) -> list:
    """The step's mounts in volume mode: ``/work`` read-only, ``/work/output`` writable."""
    from docker.types import Mount

    return [Mount("/work", work_volume, type="volume", read_only=True), Mount("/work/output", output_volume, type="volume")]


__all__ = ["VolumeWorkspace", "extract_output_tar", "read_only_mounts", "staging_mode"]
