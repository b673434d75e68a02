"""Cluster mode: the steps of one run on a Dask cluster, one ``algodock worker`` per Docker engine.

``run_pipeline(..., cluster="tcp://scheduler:8786")`` (``algodock run --cluster``) opens a
:class:`ClusterSession`: a ``prefect_dask.DaskTaskRunner(address=...)`` started inside the
flow run (so the flow parameter works from a deployment too). Each step is submitted to it
as the task :func:`run_cluster_step` with its resource request as Dask resources
(``cpu_millicore``, ``memory_gb``, ``gpu``), so the scheduler places it only on a worker with
room; Docker still sets the hard limits on the container.

What the steps of a run share (the pipeline, the store, the cache's view of an earlier
attempt) travels once per worker as a Dask worker plugin (:class:`RunPlugin`), not with every
step. On the worker a step runs against that worker's own engine (:mod:`algodock.worker`),
stages its inputs from the shared store onto the worker's disk, and records which engine it
ran on. Every attempt claims a number in the store (``runs/<run>/cluster/<step>/<n>.json``)
before it starts, so an attempt lost with its worker, and Dask's re-run of it elsewhere, are
two attempts in the lineage, writing to two locations. Cancelling reaches every worker
through ``client.run``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.cache_policies import NO_CACHE

from algodock.errors import InfrastructureError
from algodock.pipeline.prepare import check_shared_store  # noqa: F401  (where it lived)
from algodock.records import Failure, StepRecord

log = logging.getLogger("algodock.cluster")

CONNECT_TIMEOUT = "30s"
WORKER_WAIT = 30
"""Seconds a run waits for a first worker to join before it fails."""


# ---------------------------------------------------------------- checks before any container


def step_resources(request: Any) -> dict[str, float]:
    """A manifest's ``resource_request`` as Dask resources (zero-valued ones left out)."""
    values = {
        "cpu_millicore": int(request.cpu_millicore),
        "memory_gb": float(request.memory_gb),
        "gpu": int(request.gpu),
    }
    return {k: v for k, v in values.items() if v}


# ---------------------------------------------------------------- the worker side


def _worker_plugin_base() -> type:
    from distributed import WorkerPlugin

    return WorkerPlugin


class _SlimPipeline:
    """What the steps of a run read from ``ctx.pipeline`` on a worker (no spec validation there)."""

    def __init__(self, pipeline: Any) -> None:
        self.spec = type("Spec", (), {"name": pipeline.spec.name})()
        self.manifests = dict(pipeline.manifests)
        self.parameters = dict(pipeline.parameters)
        self.bindings = dict(pipeline.bindings)
        self.pull_policies = dict(pipeline.pull_policies)
        self.inputs = dict(pipeline.inputs)
        self.spec_sha256 = pipeline.spec_sha256


class RunPlugin(_worker_plugin_base()):  # type: ignore[misc]
    """One run's shared state on every worker (registered for the run, removed after it)."""

    def __init__(self, run_id: str, pipeline: Any, store: str, cache: Any, use_cache: bool, flow_run_id: str | None, step_failed: type[Exception],
                 images: dict[str, Any] | None = None) -> None:
        self.name = plugin_name(run_id)
        self.images = dict(images or {})
        """The run's ``pull_policy``, ``registry_credentials`` and ``step_credentials`` (RunContext fields)."""
        self.run_id = run_id
        self.pipeline = _SlimPipeline(pipeline)
        self.store = store
        self.cache = cache
        self.use_cache = use_cache
        self.flow_run_id = flow_run_id
        self.step_failed = step_failed
        """The flow's ``StepFailed`` (pickled by name; this module does not import the flow)."""
        self._ctx: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_ctx"] = None
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def setup(self, worker: Any) -> None:
        self._lock = threading.Lock()

    def teardown(self, worker: Any) -> None:
        from algodock.worker import PLUGIN_NAME

        engine = worker.plugins.get(PLUGIN_NAME)
        if engine is not None:
            getattr(engine, "inner", engine).forget_run(self.run_id)

    def context(self) -> Any:
        """This run's :class:`~algodock.pipeline.execute.RunContext` on this worker, built once."""
        from algodock.lineage.openlineage import OpenLineageObserver
        from algodock.pipeline.execute import RunContext
        from algodock.store.backends import open_store
        from algodock.worker import current_engine

        with self._lock:
            if self._ctx is None:
                engine = current_engine()
                scratch = engine.scratch / self.run_id
                scratch.mkdir(parents=True, exist_ok=True)
                store = open_store(self.store)
                if self.cache is not None:
                    self.cache.store = store
                self._ctx = RunContext(
                    pipeline=self.pipeline,  # type: ignore[arg-type]
                    store=store,
                    run_id=self.run_id,
                    client=engine.client,  # type: ignore[arg-type]
                    pool=engine.pool,
                    scratch=scratch,
                    use_cache=self.use_cache,
                    cancel=engine.cancel_event(self.run_id),
                    cache=self.cache,
                    flow_run_id=self.flow_run_id,
                    observers=[OpenLineageObserver()],  # OpenLineage events from the host that ran the step
                    create_ahead=False,  # a dependent may run on another worker: nothing is created ahead here
                    **self.images,
                )
            return self._ctx


def plugin_name(run_id: str) -> str:
    return f"algodock-run-{run_id}"


def _attempts_rel(run_id: str, step_id: str) -> str:
    return f"runs/{run_id}/cluster/{step_id}"


def _claim_attempt(store: Any, run_id: str, step_id: str, engine: dict[str, str], worker: str) -> tuple[int, dict[str, Any]]:
    """The next attempt number of a step (one at a time per step: Dask re-runs only a lost one)."""
    taken = [int(Path(n).stem) for n in store.list(_attempts_rel(run_id, step_id)) if Path(n).stem.isdigit()]
    n = max(taken, default=0) + 1
    doc = {"attempt": n, "engine": engine, "worker": worker, "status": "running", "started_at": datetime.now(timezone.utc).isoformat()}
    store.write_json(f"{_attempts_rel(run_id, step_id)}/{n}.json", doc)
    return n, doc


def _attempt_history(store: Any, run_id: str, step_id: str) -> list[dict[str, Any]]:
    """Every attempt of a step; one still ``running`` after the step ended was lost with its worker."""
    out = []
    for name in store.list(_attempts_rel(run_id, step_id)):
        doc = store.read_json(f"{_attempts_rel(run_id, step_id)}/{name}")
        if doc:
            out.append(doc)
    out.sort(key=lambda d: d["attempt"])
    for doc in out[:-1]:
        if doc.get("status") == "running":
            doc["status"] = "lost"
    return out


def run_cluster_step(run_id: str, step_id: str, upstream: dict[str, StepRecord]) -> StepRecord:
    """The body of a step's task in cluster mode (see :func:`step_task`): run the step on this
    Dask worker's engine; raise ``StepFailed`` on failure (Prefect may retry)."""
    from distributed import get_worker
    from prefect.runtime import task_run

    from algodock.flows.artifacts import add_output_metadata, cached_state
    from algodock.pipeline.execute import execute_step
    from algodock.worker import current_engine

    logger = get_run_logger()
    worker = get_worker()
    engine = current_engine()
    plugin = worker.plugins.get(plugin_name(run_id))
    if plugin is None:
        raise InfrastructureError(f"run {run_id} is not registered on worker {worker.address}")
    ctx = plugin.context()
    StepFailed = plugin.step_failed
    if ctx.cancel.is_set():
        record = StepRecord(id=step_id, status="failed", engine=engine.identity, failure=Failure(kind="infrastructure", message="cancelled: the flow run was cancelled"))
        raise StepFailed(record, cancelled=True)
    attempt, claim = _claim_attempt(ctx.store, run_id, step_id, engine.identity, worker.address)
    logger.info("step %s attempt %d on engine %s (%s), worker %s", step_id, attempt, engine.identity.get("name"), engine.identity.get("id"), worker.address)
    from algodock.flows.logs import LogBatches

    with LogBatches(logger.info) as on_log:
        record = execute_step(ctx, step_id, upstream, attempt=attempt, on_log=on_log, task_run_id=str(task_run.id) if task_run.id else None)
    cancelled = record.status == "failed" and ctx.cancel.is_set()
    if cancelled:
        assert record.failure is not None
        record.failure.message = f"cancelled: the flow run was cancelled while the step ran ({record.failure.message})"
    record.engine = engine.identity
    ctx.store.write_json(
        f"{_attempts_rel(run_id, step_id)}/{attempt}.json",
        {**claim, "status": record.status, "finished_at": datetime.now(timezone.utc).isoformat(), "failure": record.failure.model_dump() if record.failure else None},
    )
    record.attempt_history = _attempt_history(ctx.store, run_id, step_id)
    if record.status == "failed":
        assert record.failure is not None
        logger.error("step %s failed (%s): %s", step_id, record.failure.kind, record.failure.message)
        raise StepFailed(record, cancelled=cancelled)
    if record.status == "cached":
        return cached_state(record, run_id)  # no asset event for a cache hit, as on one host
    add_output_metadata(record, ctx)  # the asset events come from the worker that ran the step
    return record


def step_task(ctx: Any, step_id: str, **options: Any) -> Any:
    """The Prefect task of ``step_id`` in cluster mode: :func:`run_cluster_step` as a
    materializing task of the step's outputs (as on one host), with ``options``."""
    from algodock.flows.artifacts import materializing

    return materializing(run_cluster_step, ctx, step_id, cache_policy=NO_CACHE, persist_result=False, **options)


# ---------------------------------------------------------------- the flow side


def _broadcast(client: Any, fn: Any, *args: Any) -> dict[str, Any]:
    try:
        results = client.run(fn, *args, on_error="return")
    except Exception as exc:  # a worker that left meanwhile must not stop the others
        log.warning("could not reach every worker: %s", exc)
        return {}
    for worker, result in results.items():
        if isinstance(result, BaseException):
            log.warning("worker %s: %s", worker, result)
    return results


class ClusterSession:
    """A run's connection to the Dask cluster, opened inside the flow run."""

    def __init__(self, address: str) -> None:
        from prefect_dask import DaskTaskRunner

        self.address = address
        self.runner = DaskTaskRunner(address=address, client_kwargs={"timeout": CONNECT_TIMEOUT})
        self._stack = contextlib.ExitStack()
        self.run_id: str | None = None

    def __enter__(self) -> ClusterSession:
        try:
            self._stack.enter_context(self.runner)
            self.client = self.runner.client
        except OSError as exc:
            raise InfrastructureError(f"cluster: no Dask scheduler answers at {self.address}: {exc}. Start one with `dask scheduler` and `algodock worker --scheduler ...` per Docker host.") from exc
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if self.run_id:
                with contextlib.suppress(Exception):
                    self.client.unregister_worker_plugin(plugin_name(self.run_id))
        finally:
            self._stack.close()

    def workers(self) -> dict[str, dict[str, float]]:
        """``{worker address: its resources}`` of the algodock workers now in the cluster."""
        info = self.client.scheduler_info(n_workers=-1) if "n_workers" in _params(self.client.scheduler_info) else self.client.scheduler_info()
        return {addr: dict(w.get("resources") or {}) for addr, w in info["workers"].items()}

    def largest_worker(self) -> Any:
        """The :class:`~algodock.pipeline.capacity.Capacity` of the biggest worker (what a step may ask for)."""
        from algodock.pipeline.capacity import Capacity

        workers = {a: r for a, r in self.workers().items() if "cpu_millicore" in r}
        if not workers:  # workers may still be joining (a cluster just started)
            with contextlib.suppress(Exception):
                self.client.wait_for_workers(1, timeout=WORKER_WAIT)
            workers = {a: r for a, r in self.workers().items() if "cpu_millicore" in r}
        if not workers:
            raise InfrastructureError(f"cluster {self.address}: no algodock worker is connected; start `algodock worker --scheduler {self.address}` on each Docker host")
        return Capacity(
            cpu_millicore=int(max(r["cpu_millicore"] for r in workers.values())),
            memory_gb=float(max(r.get("memory_gb", 0) for r in workers.values())),
            gpu=int(max(r.get("gpu", 0) for r in workers.values())),
        )

    def start_run(self, run_id: str, pipeline: Any, store: Any, cache: Any, use_cache: bool, flow_run_id: str | None, step_failed: type[Exception],
                  images: dict[str, Any] | None = None) -> None:
        """Send the run's shared state to every worker (and to workers that join later).

        ``step_failed``: the exception class a failed step raises (the flow's ``StepFailed``);
        ``images``: how the workers resolve images (``pull_policy``, ``registry_credentials``,
        ``step_credentials``; the credentials travel to the workers over the cluster's connections).
        """
        self.run_id = run_id
        self.client.register_plugin(RunPlugin(run_id, pipeline, store.uri(), cache, use_cache, flow_run_id, step_failed, images), name=plugin_name(run_id))

    def submit(self, task_fn: Any, step_id: str, upstream: dict[str, StepRecord], request: Any) -> tuple[Any, concurrent.futures.Future]:
        """Submit a step with its resources; returns the Prefect future and a future that is done with it."""
        assert self.run_id is not None
        with _resources(step_resources(request)):
            # no quote(): Dask rebuilds that namedtuple as a plain tuple on the worker
            fut = self.runner.submit(task_fn, parameters={"run_id": self.run_id, "step_id": step_id, "upstream": upstream})
        done: concurrent.futures.Future = concurrent.futures.Future()
        fut.wrapped_future.add_done_callback(lambda _f: done.done() or done.set_result(None))
        return fut, done

    def cancel_everywhere(self) -> dict[str, Any]:
        """Kill the run's containers on every worker's engine; ``{worker: [container names]}``."""
        from algodock.worker import cancel_run_here

        assert self.run_id is not None
        return _broadcast(self.client, cancel_run_here, self.run_id)


@contextlib.contextmanager
def _resources(resources: dict[str, float]) -> Any:
    """Annotate the Dask tasks submitted in the block with ``resources`` (the task runner's submit has no such argument)."""
    import dask

    with dask.annotate(resources=resources):
        yield


def _params(fn: Any) -> set[str]:
    import inspect

    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def cancel_on_cluster(address: str, run_id: str) -> dict[str, Any]:
    """Kill ``run_id``'s containers on every worker of the cluster at ``address`` (flow hooks)."""
    from distributed import Client

    from algodock.worker import cancel_run_here

    with Client(address, timeout=CONNECT_TIMEOUT) as client:
        return _broadcast(client, cancel_run_here, run_id)
