"""Named-volume staging, for engines that cannot see this host's folders (a remote ``DOCKER_HOST``).

The step's work folder (``algo_input.json`` and ``input/``) is packed into a tar and put
into a fresh named volume through the engine's archive API, by way of a container that is
created and never started; a second volume, owned by the container's uid, is the output
folder. After the run the output volume is read back with the archive API and unpacked
into the local output folder with tarfile's ``data`` filter (no absolute paths, no ``..``,
no links leading out), where the usual output checks run. Both volumes carry the step's
labels and are removed afterwards.
"""

from __future__ import annotations

import os
import tarfile
import tempfile
import uuid
from pathlib import Path
from urllib.parse import urlparse
from typing import TYPE_CHECKING

from algodock.errors import InfrastructureError, InvalidOutput

if TYPE_CHECKING:
    import docker
    from docker.models.containers import Container

SPOOL_BYTES = 64 * 1024 * 1024


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
            loader.remove(force=True)

    def export_output(self, container: Container, output_dir: Path) -> None:
        """Unpack the (stopped) container's ``/work/output`` into ``output_dir``."""
        stream, _ = container.get_archive("/work/output")
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as buf:
            for chunk in stream:
                buf.write(chunk)
            buf.seek(0)
            try:
                with tarfile.open(fileobj=buf, mode="r|") as tar:
                    for member in tar:
                        # The archive is rooted at "output/"; strip that first part.
                        parts = Path(member.name).parts
                        if len(parts) <= 1:
                            continue
                        member.name = str(Path(*parts[1:]))
                        tar.extract(member, output_dir, filter="data")
            except (tarfile.TarError, OSError) as exc:
                raise InvalidOutput(f"the output folder could not be read back from the engine: {exc}") from exc

    def remove(self) -> None:
        for volume in (self.work, self.output):
            try:
                volume.remove(force=True)
            except Exception:  # already gone, or the engine went away: the sweep gets it later
                pass


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


__all__ = ["VolumeWorkspace", "read_only_mounts", "staging_mode"]
