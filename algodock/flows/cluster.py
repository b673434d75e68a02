"""Cluster mode: the steps of one run on a Dask cluster, one ``algodock worker`` per Docker engine.

``run_pipeline(..., cluster="tcp://scheduler:8786")`` (``algodock run --cluster``) opens a
:class:`ClusterSession`: a ``prefect_dask.DaskTaskRunner(address=...)`` started inside the
flow run (so the flow parameter works from a deployment too). Each step waits in the session
until a worker has room for its resource request (:class:`Placement`, from what the scheduler
has assigned), then goes to Dask as the task :func:`run_cluster_step` preferring that worker,
with its request as Dask resources (``cpu_millicore``, ``memory_gb``, ``gpu``); Docker still
sets the hard limits on the container.

What the steps of a run share (the pipeline, the store, the cache's view of an earlier
attempt, the flow run's Prefect context) travels once per worker as a Dask worker plugin
(:class:`RunPlugin`), not with every step. On the worker a step runs against that worker's own engine (:mod:`algodock.worker`),
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
import time
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
                 images: dict[str, Any] | None = None, prefect_context: dict[str, Any] | None = None) -> None:
        self.name = plugin_name(run_id)
        self.prefect_context = dict(prefect_context or {})
        """The flow run's serialized Prefect context (``prefect.context.serialize_context``): sent once, not with every step."""
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
        state.pop("_prefect", None)
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
        prefect = getattr(self, "_prefect", None)
        if prefect is not None:
            with contextlib.suppress(Exception):
                prefect.close()

    def prefect(self) -> _PrefectOnWorker:
        """The run's Prefect settings and API client on this worker, built once for all its steps here."""
        with self._lock:
            if getattr(self, "_prefect", None) is None:
                self._prefect = _PrefectOnWorker(self.prefect_context)
            return self._prefect

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


class _PrefectOnWorker:
    """What every step task of a run on one worker shares: the flow's Prefect settings (rebuilt
    once, not per step) and one API client (Prefect's task engine would otherwise build two per
    step, each with its own TLS context)."""

    def __init__(self, serialized: dict[str, Any]) -> None:
        from prefect.context import SettingsContext, SyncClientContext

        self.context = {k: v for k, v in serialized.items() if k != "settings_context"}
        settings = serialized.get("settings_context")
        self.settings = SettingsContext(**settings) if settings else None
        token = SettingsContext.__var__.set(self.settings) if self.settings is not None else None
        try:
            self.clients = SyncClientContext()  # built under the flow's settings (its API URL)
        finally:
            if token is not None:
                SettingsContext.__var__.reset(token)
        self.clients.client.__enter__()

    @contextlib.contextmanager
    def entered(self) -> Any:
        """The run's settings and client as this thread's current Prefect context (no copy per step)."""
        from prefect.context import SettingsContext, SyncClientContext

        tokens = [(SyncClientContext.__var__, SyncClientContext.__var__.set(self.clients))]
        if self.settings is not None:
            tokens.append((SettingsContext.__var__, SettingsContext.__var__.set(self.settings)))
        try:
            yield
        finally:
            for var, token in reversed(tokens):
                var.reset(token)

    def close(self) -> None:
        self.clients.client.__exit__(None, None, None)


def run_step_task(run_id: str, task: Any, task_run_id: Any, parameters: dict[str, Any], dependencies: dict[str, Any], asset_context: dict[str, Any]) -> Any:
    """What Dask runs for a step (submitted by :meth:`ClusterSession.submit`): the step's Prefect
    task through Prefect's own task engine, in the run's Prefect context.

    prefect-dask sends the flow's whole serialized context (its settings are hundreds of fields)
    with every task and rebuilds it on the worker; here it travels once per worker with the
    :class:`RunPlugin`, and only the step's own asset context comes with the task.
    """
    from distributed import get_worker
    from prefect.task_engine import run_task_sync

    plugin = get_worker().plugins.get(plugin_name(run_id))
    if plugin is None:
        raise InfrastructureError(f"run {run_id} is not registered on worker {get_worker().address}")
    prefect = plugin.prefect()
    with prefect.entered():
        return run_task_sync(task, task_run_id=task_run_id, parameters=parameters, wait_for=None, return_type="state",
                             dependencies=dependencies, context={**prefect.context, "asset_context": asset_context})


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


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def run_cluster_step(run_id: str, step_id: str, upstream: dict[str, StepRecord]) -> StepRecord:
    """The body of a step's task in cluster mode (see :func:`step_task`): run the step on this
    Dask worker's engine; raise ``StepFailed`` on failure (Prefect may retry)."""
    from distributed import get_worker
    from prefect.runtime import task_run

    from algodock.flows.artifacts import add_output_metadata, cached_state
    from algodock.pipeline.execute import execute_step
    from algodock.worker import current_engine

    began = _now()
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
    claimed = _now()
    logger.info("step %s attempt %d on engine %s (%s), worker %s", step_id, attempt, engine.identity.get("name"), engine.identity.get("id"), worker.address)
    from algodock.flows.logs import LogBatches

    with LogBatches(logger.info) as on_log:
        record = execute_step(ctx, step_id, upstream, attempt=attempt, on_log=on_log, task_run_id=str(task_run.id) if task_run.id else None)
    cancelled = record.status == "failed" and ctx.cancel.is_set()
    if cancelled:
        assert record.failure is not None
        record.failure.message = f"cancelled: the flow run was cancelled while the step ran ({record.failure.message})"
    record.engine = engine.identity
    timeline = {"dask_key": str(worker.get_current_task()), "task_started": began, "claimed": claimed, "executed": _now()}
    final = {**claim, "status": record.status, "finished_at": datetime.now(timezone.utc).isoformat(), "failure": record.failure.model_dump() if record.failure else None,
             "timeline": timeline}
    ctx.store.write_json(f"{_attempts_rel(run_id, step_id)}/{attempt}.json", final)
    # A first attempt is the whole history: no listing and reading back (two store round trips
    # before the step's task ends and its worker takes the next step)
    record.attempt_history = _attempt_history(ctx.store, run_id, step_id) if attempt > 1 else [final]
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


WORKERS_REFRESH_SECONDS = 1.0
"""How often a run with steps waiting for room looks for workers that joined."""


class Placement:
    """Which worker has room for a step now (pure bookkeeping, no Dask): each worker's resources
    less what the scheduler counts as taken there (the steps of every run it assigned to it),
    less the requests of the steps this run sent there that the scheduler has not assigned yet.

    A step goes to the worker with the most free ``cpu_millicore`` among those where every
    resource it asks for fits (then the most free memory, then the address), so the first
    steps spread over the workers and each later one takes the room the last one left.

    >>> p = Placement()
    >>> p.update({"a": {"cpu_millicore": 4000}, "b": {"cpu_millicore": 2000}})
    >>> [p.place(f"s{i}", {"cpu_millicore": 1000}) for i in range(7)]
    ['a', 'a', 'a', 'b', 'a', 'b', None]
    >>> p.release("s3"); p.place("s6", {"cpu_millicore": 1000})
    'b'
    """

    def __init__(self) -> None:
        self.workers: dict[str, dict[str, float]] = {}
        self.used: dict[str, dict[str, float]] = {}
        self.placed: dict[str, tuple[str, dict[str, float]]] = {}
        self.seen: set[str] = set()

    def update(self, workers: dict[str, dict[str, float]], used: dict[str, dict[str, float]] | None = None, seen: Any = ()) -> None:
        """The workers now in the cluster and their resources; ``used``: what the scheduler counts
        as taken on each; ``seen``: this run's steps the scheduler has assigned (counted in ``used``)."""
        self.workers = {addr: dict(res) for addr, res in workers.items()}
        self.used = {addr: dict(res) for addr, res in (used or {}).items()}
        self.seen = set(seen) & set(self.placed)

    def free(self, worker: str) -> dict[str, float]:
        left = dict(self.workers.get(worker, {}))
        for name, amount in self.used.get(worker, {}).items():
            left[name] = left.get(name, 0) - amount
        for step, (where, request) in self.placed.items():
            if where == worker and step not in self.seen:
                for name, amount in request.items():
                    left[name] = left.get(name, 0) - amount
        return left

    def place(self, step_id: str, request: dict[str, float]) -> str | None:
        """The worker ``step_id`` goes to (now charged with ``request``), or None while none has room."""
        best: tuple[float, float, str] | None = None
        for worker in self.workers:
            left = self.free(worker)
            if all(left.get(name, 0) >= amount for name, amount in request.items()):
                rank = (-left.get("cpu_millicore", 0), -left.get("memory_gb", 0), worker)
                best = rank if best is None or rank < best else best
        if best is None:
            return None
        self.placed[step_id] = (best[2], dict(request))
        return best[2]

    def release(self, step_id: str) -> None:
        """``step_id`` ended: its worker has its room back."""
        self.placed.pop(step_id, None)
        self.seen.discard(step_id)

    def orphans(self) -> list[str]:
        """The steps placed on workers that left (no longer counted: Dask runs them where it can)."""
        lost = [step for step, (where, _) in self.placed.items() if where not in self.workers]
        for step in lost:
            self.release(step)
        return lost


class UpstreamNotDone(Exception):
    """A step was never sent: a step it depends on did not succeed (its record says ``skipped``)."""


class _QueuedStep:
    """A step submitted to the session: its Prefect future once it is sent to Dask.

    ``upstream``: the steps it depends on, as their records or as their own queued steps; it is
    sent only when those ended, with their records (see :meth:`upstream_records`).
    """

    def __init__(self, step_id: str, task_fn: Any, upstream: dict[str, Any], resources: dict[str, float]) -> None:
        import uuid

        self.step_id, self.task_fn, self.upstream, self.resources = step_id, task_fn, upstream, resources
        self.task_run_id = str(uuid.uuid4())
        self.done: concurrent.futures.Future = concurrent.futures.Future()
        self._future: Any = None
        self._error: BaseException | None = None
        self._ready = threading.Event()

    def waiting(self) -> bool:
        """True while a step it depends on has not ended."""
        return any(isinstance(u, _QueuedStep) and not u.done.done() for u in self.upstream.values())

    def upstream_records(self) -> dict[str, StepRecord]:
        """The records of the steps it depends on, all ended; raises :class:`UpstreamNotDone` when one did not succeed."""
        records = {}
        for name, up in self.upstream.items():
            try:
                record = up.result(raise_on_failure=True) if isinstance(up, _QueuedStep) else up
            except Exception as exc:
                raise UpstreamNotDone(f"step {self.step_id} did not run: step {name} did not succeed") from exc
            if not isinstance(record, StepRecord) or record.status not in ("succeeded", "cached"):
                raise UpstreamNotDone(f"step {self.step_id} did not run: step {name} did not succeed")
            records[name] = record
        return records

    def sent(self, future: Any) -> None:
        self._future = future
        self._ready.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._ready.set()
        self.done.done() or self.done.set_result(None)

    def result(self, timeout: float | None = None, raise_on_failure: bool = True) -> Any:
        """As ``PrefectDaskFuture.result``: the step task's return value (raises its failure)."""
        if not self._ready.wait(timeout):
            raise TimeoutError(f"step {self.step_id} was not sent to a worker within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._future.result(timeout=timeout, raise_on_failure=raise_on_failure)


class ClusterSession:
    """A run's connection to the Dask cluster, opened inside the flow run."""

    def __init__(self, address: str) -> None:
        from prefect_dask import DaskTaskRunner

        self.address = address
        self.runner = DaskTaskRunner(address=address, client_kwargs={"timeout": CONNECT_TIMEOUT})
        self._stack = contextlib.ExitStack()
        self.run_id: str | None = None
        self.submitted: dict[str, float] = {}
        """Step id -> when it was submitted (unix time); with :attr:`returned`, the two ends of a step's timeline on the flow's side."""
        self.returned: dict[str, float] = {}
        self.placement = Placement()
        self._queue: list[_QueuedStep] = []
        self._keys: dict[str, str] = {}
        self._changed = threading.Condition()
        self._look = True
        self._stopping = False
        self._dispatcher = threading.Thread(target=self._dispatch, name="algodock-cluster-dispatch", daemon=True)

    def __enter__(self) -> ClusterSession:
        try:
            self._stack.enter_context(self.runner)
            self.client = self.runner.client
        except OSError as exc:
            raise InfrastructureError(f"cluster: no Dask scheduler answers at {self.address}: {exc}. Start one with `dask scheduler` and `algodock worker --scheduler ...` per Docker host.") from exc
        return self

    def __exit__(self, *exc: Any) -> None:
        with self._changed:
            self._stopping = True
            self._changed.notify()
            for step in self._queue:  # never sent: the run is over
                step.fail(InfrastructureError(f"step {step.step_id} was never placed: the run ended first"))
            self._queue.clear()
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
        from prefect.context import serialize_context

        self.run_id = run_id
        context = serialize_context()  # once per run: the flow run, its tags and settings
        self.client.register_plugin(RunPlugin(run_id, pipeline, store.uri(), cache, use_cache, flow_run_id, step_failed, images, prefect_context=context),
                                    name=plugin_name(run_id))
        self._dispatcher.start()

    def submit(self, task_fn: Any, step_id: str, upstream: dict[str, Any], request: Any) -> tuple[Any, concurrent.futures.Future]:
        """Queue a step with its resources; returns its Prefect future and a future that is done with it.

        ``upstream``: the steps it depends on, by id: their records, or what this method returned
        for them; it waits in the queue until they ended, and is failed with
        :class:`UpstreamNotDone` when one did not succeed.

        The step goes to Dask when a worker has room for it (:class:`Placement`), named as its
        preferred worker: Dask alone places every step as it arrives, by its guess of the steps'
        durations per thread, and a step queued behind a busy worker stays there while another
        worker idles. A step whose worker leaves still runs elsewhere (the preference is loose).
        """
        assert self.run_id is not None
        step = _QueuedStep(step_id, task_fn, upstream, step_resources(request))
        self.submitted[step_id] = time.time()
        with self._changed:
            self._queue.append(step)
            self._look = True
            self._changed.notify()
        return step, step.done

    def _dispatch(self) -> None:
        """The dispatcher thread: send queued steps to workers with room, as room appears."""
        refreshed = float("-inf")
        while True:
            with self._changed:
                while not self._stopping and not (self._queue and self._look):
                    busy = bool(self._queue or self.placement.placed)
                    self._changed.wait(WORKERS_REFRESH_SECONDS if busy else None)
                    if busy and time.monotonic() - refreshed >= WORKERS_REFRESH_SECONDS:
                        break  # a worker may have joined or left: look again
                if self._stopping:
                    return
                self._look = False
            try:
                with self._changed:
                    keys = {self._keys[step]: step for step in self.placement.placed if step in self._keys}
                workers, used, seen = self.client.run_on_scheduler(_cluster_view, list(keys))
                refreshed = time.monotonic()
                with self._changed:
                    self.placement.update(workers, used, {keys[k] for k in seen})
                    lost = self.placement.orphans()
                if lost:  # Dask would hold them for their worker: any worker with the resources may run them now
                    self.client.run_on_scheduler(_unpin, [self._keys[s] for s in lost if s in self._keys])
            except Exception as exc:  # the scheduler is away: keep what we knew
                log.warning("cluster: could not read the workers' resources from the scheduler: %s", exc)
            with self._changed:
                for step in list(self._queue):
                    if step.waiting():
                        continue
                    try:
                        step.upstream = step.upstream_records()
                    except UpstreamNotDone as exc:  # its dependents may now be decided too
                        self._queue.remove(step)
                        step.fail(exc)
                        self._look = True
                        continue
                    where = self.placement.place(step.step_id, step.resources)
                    if where is None:
                        continue
                    self._queue.remove(step)
                    try:
                        self._send(step, where)
                    except BaseException as exc:  # the step ends failed; the run goes on
                        self.placement.release(step.step_id)
                        step.fail(exc)

    def _send(self, step: _QueuedStep, worker: str) -> None:
        """Submit ``step`` to Dask, preferring ``worker``.

        As prefect-dask's ``DaskTaskRunner.submit`` does, but without serializing the flow's
        Prefect context for every step (the :class:`RunPlugin` took it to the workers once) and
        under a key of its own (no hashing of the task and its parameters).
        """
        import uuid

        from distributed import Client, Future
        from prefect.context import AssetContext
        from prefect.utilities.engine import collect_task_run_inputs_sync
        from prefect_dask.task_runners import PrefectDaskFuture

        # no quote(): Dask rebuilds that namedtuple as a plain tuple on the worker
        parameters = {"run_id": self.run_id, "step_id": step.step_id, "upstream": step.upstream}
        dependencies = {k: collect_task_run_inputs_sync(v, future_cls=Future) for k, v in parameters.items()}
        task_run_id = uuid.UUID(step.task_run_id)
        assets = AssetContext.from_task_and_inputs(task=step.task_fn, task_run_id=task_run_id, task_inputs=dependencies, copy_to_child_ctx=True).serialize()
        key = f"{step.step_id}-{task_run_id}"
        self._keys[step.step_id] = key
        wrapped = Client.submit(self.client, run_step_task, self.run_id, step.task_fn, task_run_id, parameters, dependencies, assets,
                                key=key, pure=False, resources=step.resources, workers=[worker], allow_other_workers=True)

        def finished(_f: Any) -> None:
            self.returned[step.step_id] = time.time()
            step.done.done() or step.done.set_result(None)  # before the dispatcher looks: its dependents may go now
            with self._changed:
                self.placement.release(step.step_id)
                self._look = True
                self._changed.notify()

        step.sent(PrefectDaskFuture(wrapped_future=wrapped, task_run_id=task_run_id))
        wrapped.add_done_callback(finished)

    def cancel_everywhere(self) -> dict[str, Any]:
        """Kill the run's containers on every worker's engine; ``{worker: [container names]}``."""
        from algodock.worker import cancel_run_here

        assert self.run_id is not None
        return _broadcast(self.client, cancel_run_here, self.run_id)


def _cluster_view(keys: list[str], dask_scheduler: Any = None) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]], list[str]]:
    """On the scheduler (``client.run_on_scheduler``): each algodock worker's resources, what is
    taken of them (the tasks assigned there, of every run), and which of ``keys`` are counted so."""
    workers = {addr: dict(ws.resources) for addr, ws in dask_scheduler.workers.items() if "cpu_millicore" in ws.resources}
    used = {addr: dict(dask_scheduler.workers[addr].used_resources) for addr in workers}
    seen = [k for k in keys if k in dask_scheduler.tasks and (dask_scheduler.tasks[k].processing_on is not None or dask_scheduler.tasks[k].state in ("memory", "erred", "released"))]
    return workers, used, seen


def _unpin(keys: list[str], dask_scheduler: Any = None) -> list[str]:
    """On the scheduler (``client.run_on_scheduler``): drop the preferred worker of ``keys``, whose
    worker left, and send those waiting for a worker to any worker with their resources.

    A loose worker restriction alone is not enough: Dask re-runs a lost task on another worker,
    but holds it (``no-worker``) when none is up at that moment, and a worker that joins later
    takes only the tasks that named it.
    """
    tasks = [dask_scheduler.tasks[k] for k in keys if k in dask_scheduler.tasks]
    dask_scheduler.set_restrictions({ts.key: None for ts in tasks})
    stuck = {ts.key: "processing" for ts in tasks if ts.state == "no-worker"}
    if stuck:
        dask_scheduler.transitions(stuck, stimulus_id=f"algodock-unpin-{time.time()}")
    return list(stuck)


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
