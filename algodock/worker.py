"""``algodock worker``: a Dask worker bound to one Docker engine (one per Docker host).

The worker's Dask resources are the engine's CPUs (``cpu_millicore``), memory
(``memory_gb``) and GPUs (``gpu``), detected through ``docker info`` unless given. Steps that
Dask places on this worker run their containers on this worker's engine: the
:class:`EnginePlugin` holds the engine's client, its identity (``docker info``'s Name and
ID, recorded per step as ``engine``) and a resource pool of the worker's size, and on start
removes the containers a dead earlier worker left on the engine (the owner labels of
:func:`algodock.runtime.leftovers.sweep_orphans`).

Dask's resources are bookkeeping: the container still gets its hard CPU and memory limits.
No Prefect here (the engine never imports it); the flow side is ``algodock.flows.cluster``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from algodock.pipeline.capacity import Capacity, ResourcePool
from algodock.processes import process_start

if TYPE_CHECKING:
    import docker

log = logging.getLogger("algodock.worker")

PLUGIN_NAME = "algodock-engine"
"""The name of the :class:`EnginePlugin` on every algodock worker."""
SMALLEST_STEP_MILLICORES = 100
"""Threads are sized so that steps this small can fill the worker's CPUs."""


def engine_identity(client: docker.DockerClient) -> dict[str, str]:
    """``{"name": ..., "id": ...}`` of the engine, as ``docker info`` reports them."""
    info = client.info()
    return {"name": str(info.get("Name", "")), "id": str(info.get("ID", ""))}


def detect_resources(
    client: docker.DockerClient,
    cpu_millicore: int | None = None,
    memory_gb: float | None = None,
    gpu: int | None = None,
) -> dict[str, float]:
    """The engine's capacity (:meth:`Capacity.from_engine`: CPUs x 1000, memory in GB, the GPUs
    it can hand out) as Dask resources; each given value overrides what was detected."""
    cap = Capacity.from_engine(client)
    return {
        "cpu_millicore": int(cpu_millicore if cpu_millicore is not None else cap.cpu_millicore),
        "memory_gb": float(memory_gb if memory_gb is not None else round(cap.memory_gb, 3)),
        "gpu": int(gpu if gpu is not None else cap.gpu),
    }


SCRATCH_PREFIX = "algodock-worker-"
_SCRATCH = re.compile(rf"^{SCRATCH_PREFIX}(\d+)\.(\d*)-[a-z0-9_]{{8}}$")


def sweep_dead_scratch(tmp: Path | None = None) -> list[str]:
    """Remove the scratch folders of workers on this host whose process is gone (a killed worker
    never tears down); a folder named for a live process, or not made by a worker, is left alone."""
    removed = []
    for entry in (tmp or Path(tempfile.gettempdir())).glob(f"{SCRATCH_PREFIX}*"):
        m = _SCRATCH.match(entry.name)
        if m and entry.is_dir() and process_start(int(m.group(1))) != m.group(2):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(str(entry))
    return removed


class EnginePlugin:
    """The Dask worker plugin that binds a worker to its Docker engine.

    A ``distributed.WorkerPlugin`` by duck typing (``setup``/``teardown``), so this module
    imports without ``distributed``. Steps reach it with :func:`current_engine`.
    """

    name = PLUGIN_NAME

    def __init__(self, docker_host: str | None, resources: dict[str, float]) -> None:
        self.docker_host = docker_host
        self.resources = dict(resources)
        self.client: docker.DockerClient | None = None
        self.identity: dict[str, str] = {}
        self.pool = ResourcePool(Capacity(int(resources["cpu_millicore"]), float(resources["memory_gb"]), int(resources.get("gpu", 0))))
        self.scratch = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}.{process_start(os.getpid())}-"))
        self.swept: list[str] = []
        self._cancelled: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def setup(self, worker: Any = None) -> None:
        """Connect to the engine, point this process at it, sweep what a dead worker left."""
        from algodock.runtime.engine import docker_client
        from algodock.runtime.leftovers import sweep_orphans

        if self.docker_host:
            os.environ["DOCKER_HOST"] = self.docker_host  # anything in this process that connects by default
        self.client = docker_client(self.docker_host)
        self.identity = engine_identity(self.client)
        try:
            self.swept = sweep_orphans(self.client)
        except Exception as exc:  # a busy engine must not keep the worker from serving; the next start sweeps again
            log.warning("could not sweep leftovers on engine %s: %s", self.identity["id"], exc)
        self.swept += sweep_dead_scratch()
        if self.swept:
            log.warning("removed %d leftovers of a dead earlier worker on engine %s: %s", len(self.swept), self.identity["id"], ", ".join(self.swept))

    def teardown(self, worker: Any = None) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)

    def cancel_event(self, run_id: str) -> threading.Event:
        """The event set when ``run_id`` is cancelled (shared by the run's steps on this worker)."""
        with self._lock:
            return self._cancelled.setdefault(run_id, threading.Event())

    def cancel_run(self, run_id: str) -> list[str]:
        """Mark ``run_id`` cancelled here and kill its containers on this engine."""
        from algodock.runtime.leftovers import kill_run_containers

        event = self.cancel_event(run_id)
        event.set()
        self.pool.wake_all()
        assert self.client is not None
        return kill_run_containers(self.client, run_id)

    def forget_run(self, run_id: str) -> None:
        """Drop what this worker kept for ``run_id`` (its cancel event; the run's steps here made
        their scratch folder inside :attr:`scratch` and remove it when the run ends)."""
        with self._lock:
            self._cancelled.pop(run_id, None)


def current_engine(dask_worker: Any = None) -> EnginePlugin:
    """The :class:`EnginePlugin` of the Dask worker this code runs on (``dask_worker``: that
    worker, as ``client.run`` passes it, where ``get_worker()`` does not work)."""
    from distributed import get_worker

    try:
        plugin = (dask_worker or get_worker()).plugins[PLUGIN_NAME]
    except (ValueError, KeyError):
        from algodock.errors import InfrastructureError

        raise InfrastructureError(
            "this step runs on a Dask worker without an algodock engine: start workers with `algodock worker`, not `dask worker`"
        ) from None
    return getattr(plugin, "inner", plugin)  # type: ignore[no-any-return]


def cancel_run_here(run_id: str, dask_worker: Any = None) -> list[str]:
    """For ``client.run``: cancel ``run_id`` on this worker's engine; the names of killed containers."""
    return current_engine(dask_worker).cancel_run(run_id)


async def serve(
    scheduler: str,
    *,
    docker_host: str | None,
    resources: dict[str, float],
    nthreads: int,
    host: str | None,
    name: str | None,
) -> None:
    """Run a Dask worker with the :class:`EnginePlugin` until it is closed or signalled."""
    from distributed import Worker

    plugin = EnginePlugin(docker_host, resources)
    plugin.setup()  # before joining: fail fast on a dead engine, sweep before any step lands here
    worker = Worker(
        scheduler,
        host=host,
        nthreads=nthreads,
        resources=resources,
        name=name,
        memory_limit=0,  # steps run in containers with their own limits; the worker itself is small
        plugins=[_as_worker_plugin(plugin)],
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(worker.close(reason="signal")))
    try:
        async with worker:
            click.echo(
                f"algodock worker {worker.address} on engine {plugin.identity['name']} {plugin.identity['id']} "
                f"({plugin.docker_host or os.environ.get('DOCKER_HOST') or 'local socket'}): resources {resources}, {nthreads} threads",
                err=True,
            )
            await worker.finished()
    finally:
        plugin.teardown()


def _as_worker_plugin(plugin: EnginePlugin) -> Any:
    """Wrap the plugin in a real ``distributed.WorkerPlugin`` (setup already ran)."""
    from distributed import WorkerPlugin

    class _Plugin(WorkerPlugin):
        name = PLUGIN_NAME

        def __init__(self) -> None:
            self.inner = plugin

        def teardown(self, worker: Any) -> None:
            pass

    return _Plugin()


@click.command("worker")
@click.option("--scheduler", required=True, metavar="ADDR", help="The Dask scheduler, e.g. tcp://10.0.0.5:8786.")
@click.option("--docker-host", metavar="URL", help="The engine this worker runs steps on [default: DOCKER_HOST, else the local socket].")
@click.option("--cpu-millicore", type=int, help="CPU the steps may use together [default: the engine's CPUs x 1000].")
@click.option("--memory-gb", type=float, help="Memory the steps may use together [default: the engine's memory].")
@click.option("--gpu", type=int, help="GPUs [default: detected].")
@click.option("--nthreads", type=int, help=f"Steps this worker runs at once at most [default: cpu_millicore / {SMALLEST_STEP_MILLICORES}].")
@click.option("--host", metavar="IP", help="Address the worker listens on [default: Dask's choice; 127.0.0.1 for one machine].")
@click.option("--name", help="Worker name shown by the scheduler [default: its address].")
def worker_cli(
    scheduler: str,
    docker_host: str | None,
    cpu_millicore: int | None,
    memory_gb: float | None,
    gpu: int | None,
    nthreads: int | None,
    host: str | None,
    name: str | None,
) -> None:
    """Run a Dask worker that runs pipeline steps on one Docker engine (one per Docker host).

    \b
    Example:
      algodock worker --scheduler tcp://scheduler:8786 --docker-host unix:///var/run/docker.sock

    Its Dask resources are the engine's CPUs, memory and GPUs; `algodock run --cluster`
    places each step on a worker with room for the step's resource request. On start it
    removes containers a dead earlier worker left on the engine.
    """
    from algodock.runtime.engine import docker_client
    from algodock.errors import AlgodockError

    try:
        client = docker_client(docker_host)
        resources = detect_resources(client, cpu_millicore, memory_gb, gpu)
        client.close()
    except AlgodockError as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(1) from exc
    threads = nthreads or max(2, int(resources["cpu_millicore"]) // SMALLEST_STEP_MILLICORES)
    asyncio.run(serve(scheduler, docker_host=docker_host, resources=resources, nthreads=threads, host=host, name=name))
