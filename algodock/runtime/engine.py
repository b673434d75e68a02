"""The Docker engine: connecting, resolving images to their immutable ids, labelling containers.

Every container algodock starts carries the labels of :func:`container_labels`; a container
whose owning process is gone (a crashed or killed earlier run on this host) is removed by
:func:`algodock.runtime.leftovers.sweep_orphans`.
"""

from __future__ import annotations

import logging
import os
import socket
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from algodock.errors import InfrastructureError
from algodock.processes import process_start
from algodock.runtime.images import resolve_image  # noqa: F401  (where the engine's callers have always found it)

if TYPE_CHECKING:
    import docker

log = logging.getLogger("algodock.runtime.engine")

LABEL = "io.algodock"
MANAGED_LABEL = f"{LABEL}.managed"
ENGINE_HINT = (
    "Start one (`make engine` in the algodock checkout, or `sudo systemctl start docker`), "
    "or point DOCKER_HOST at a running engine."
)


def docker_client(base_url: str | None = None, timeout: int = 120, *, client: docker.DockerClient | None = None) -> docker.DockerClient:
    """A client for ``base_url`` (default: ``DOCKER_HOST`` or the local socket) that answers ping.

    ``client``: an already configured client (e.g. from prefect-docker's ``DockerHost`` block,
    with its TLS settings) that is only checked; ``base_url`` and ``DOCKER_HOST`` are then unused.
    """
    import docker
    from docker.errors import DockerException

    try:
        if client is None:
            client = docker.DockerClient(base_url=base_url, timeout=timeout) if base_url else docker.from_env(timeout=timeout)
        _one_pool_per_socket(client)
        client.ping()
    except DockerException as exc:
        where = (client.api.base_url if client is not None else base_url) or os.environ.get("DOCKER_HOST") or "the local socket"
        raise InfrastructureError(f"No Docker engine answers at {where}: {exc}. {ENGINE_HINT}") from exc
    return client


SOCKET_POOL_SIZE = 64
"""Idle connections kept to a local engine's socket (steps that run at once each hold a few)."""
SHARED_POOL = "http+docker://localhost"


def _one_pool_per_socket(client: docker.DockerClient) -> None:
    """Reuse connections to a local engine's socket across requests.

    The docker SDK's unix-socket adapter keeps one connection pool per request URL, and each
    container has its own URLs: every call about a new container opened a new connection, and
    the 26th pool closed the oldest. With many steps at once that was a sixth of the
    orchestrator's CPU. Here the client gets one pool for its socket (an attach or exec request
    keeps a connection of its own: the engine turns it into the stream); requests also stops
    looking for proxies and a .netrc on every call (neither applies to a unix socket).
    """
    from docker.transport import UnixHTTPAdapter

    adapter = client.api.adapters.get("http+docker://")
    if type(adapter) is not UnixHTTPAdapter:  # TCP, TLS, SSH, npipe: the SDK's own pooling
        return

    class SocketPool(UnixHTTPAdapter):
        def get_connection(self, url: str, proxies: Any = None) -> Any:
            if "/attach" in url or "/exec/" in url:  # the engine takes the connection over as the stream: never share it
                return super().get_connection(url, proxies)
            return super().get_connection(SHARED_POOL, proxies)

    shared = SocketPool(f"http+unix://{adapter.socket_path}", timeout=adapter.timeout, max_pool_size=SOCKET_POOL_SIZE)
    client.api.mount("http+docker://", shared)
    # (the SDK's fallback adapter is only for URLs no mounted prefix matches: never the socket's)
    client.api.trust_env = False
    adapter.close()


@lru_cache(maxsize=1)
def _owner() -> tuple[str, str, str]:
    pid = os.getpid()
    return socket.gethostname(), str(pid), process_start(pid)


FLOW_RUN_LABEL = f"{LABEL}.flow_run_id"
"""The Prefect flow-run id a container runs for (set when there is one): what cancellation looks for."""


def container_labels(run_id: str, step_id: str, attempt: int, *, flow_run_id: str | None = None) -> dict[str, str]:
    """Labels stamped on every container: what it runs for, and which process owns it."""
    host, pid, start = _owner()
    labels = {
        MANAGED_LABEL: "true",
        f"{LABEL}.run_id": run_id,
        f"{LABEL}.step_id": step_id,
        f"{LABEL}.attempt": str(attempt),
        f"{LABEL}.host": host,
        f"{LABEL}.pid": pid,
        f"{LABEL}.pid_start": start,
    }
    if flow_run_id:
        labels[FLOW_RUN_LABEL] = flow_run_id
    return labels


def _owner_alive(labels: dict[str, str]) -> bool:
    host, _, _ = _owner()
    if labels.get(f"{LABEL}.host") != host:
        return True  # another host's container: not ours to judge
    try:
        pid = int(labels.get(f"{LABEL}.pid", ""))
    except ValueError:
        return False
    start = process_start(pid)
    return bool(start) and start == labels.get(f"{LABEL}.pid_start", start)


def _is_local(client: Any) -> bool:
    """True when ``client`` talks to an engine on this host (a unix socket, or localhost)."""
    from urllib.parse import urlparse

    base = str(getattr(getattr(client, "api", None), "base_url", "") or "")
    if not base:
        return True
    url = urlparse(base)
    return url.scheme in ("http+unix", "http+docker", "unix", "npipe") or url.hostname in ("localhost", "127.0.0.1", "::1")


def _nvidia_toolkit(info: dict[str, Any]) -> bool:
    """The engine can hand GPUs to containers: an ``nvidia`` runtime (or one whose path says so)."""
    runtimes = info.get("Runtimes") or {}
    return info.get("DefaultRuntime") == "nvidia" or any(
        "nvidia" in name or "nvidia" in str((spec or {}).get("path", "")) for name, spec in runtimes.items()
    )


def _generic_gpus(info: dict[str, Any]) -> int:
    """GPUs the engine advertises as generic resources (``dockerd --node-generic-resource NVIDIA-GPU=...``)."""
    count = 0
    for res in info.get("GenericResources") or []:
        discrete = res.get("DiscreteResourceSpec") or {}
        named = res.get("NamedResourceSpec") or {}
        if "GPU" in str(discrete.get("Kind", "")).upper():
            count += int(discrete.get("Value", 0) or 0)
        elif "GPU" in str(named.get("Kind", "")).upper():
            count += 1
    return count


def _local_gpus(dev: Path, nvidia_smi: str | None) -> int:
    """NVIDIA GPUs on this host: ``/dev/nvidiaN`` devices, else the lines of ``nvidia-smi -L``."""
    import re
    import subprocess

    try:
        devices = sum(1 for p in dev.iterdir() if re.fullmatch(r"nvidia\d+", p.name))
    except OSError:
        devices = 0
    if devices or not nvidia_smi:
        return devices
    try:
        out = subprocess.run([nvidia_smi, "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def engine_gpus(
    info: dict[str, Any],
    *,
    local: bool,
    dev: Path = Path("/dev"),
    nvidia_smi: str | None = None,
    hook: str | None = None,
) -> int:
    """How many GPUs the engine of ``info`` (``docker info``) can give containers.

    Advertised generic resources count first. Otherwise the engine needs NVIDIA support (an
    ``nvidia`` runtime, or on a local engine the toolkit's ``nvidia-container-runtime-hook``
    that Docker's ``--gpus`` calls) and, on a local engine, the GPUs are counted from
    ``/dev/nvidiaN`` or ``nvidia-smi -L``. A remote engine's GPUs cannot be counted from here:
    0, and ``--capacity ...,gpu=N`` says how many.

    >>> engine_gpus({"Runtimes": {"runc": {"path": "runc"}}}, local=True, dev=Path("/nonexistent"))
    0
    >>> engine_gpus({"GenericResources": [{"DiscreteResourceSpec": {"Kind": "NVIDIA-GPU", "Value": 2}}]}, local=False)
    2
    """
    generic = _generic_gpus(info)
    if generic:
        return generic
    if not local:
        return 0
    if not (_nvidia_toolkit(info) or hook):
        return 0
    return _local_gpus(dev, nvidia_smi)


def detect_gpus(client: Any, info: dict[str, Any] | None = None) -> int:
    """:func:`engine_gpus` for a docker client (looks at this host when the engine is local)."""
    import shutil

    info = info if info is not None else client.info()
    return engine_gpus(
        info,
        local=_is_local(client),
        nvidia_smi=shutil.which("nvidia-smi"),
        hook=shutil.which("nvidia-container-runtime-hook"),
    )

