"""Cluster mode: the steps of one run on a Dask cluster, one ``algodock worker`` per Docker engine.

``run_pipeline(..., cluster="tcp://scheduler:8786")`` (``algodock run --cluster``) opens a
:class:`ClusterSession`: a ``prefect_dask.DaskTaskRunner(address=...)`` started inside the
flow run (so the flow parameter works from a deployment too). The pipeline's steps are the same
algorithm tasks as on one host (:func:`~algodock.flows.compose.algorithm`), submitted to the
session as to any task runner: it holds each until the steps it waits for ended and a worker has
room for its resource request (:class:`~algodock.pipeline.placement.Dispatcher`), then sends it
to Dask preferring that worker, with its request as Dask resources (``cpu_millicore``,
``memory_gb``, ``gpu``); Docker still sets the hard limits on the container.

On the worker the algorithm task joins its run as a guest (:func:`~algodock.flows.runs.guest_run`):
it runs against that worker's own engine (:mod:`algodock.worker`), stages its inputs from the
shared store, claims its attempt number in the store (an attempt lost with its worker, and Dask's
re-run of it elsewhere, are two attempts in the lineage: :mod:`algodock.pipeline.attempts`), and
returns its record to the flow, which writes the lineage. The flow run's Prefect context travels
once per worker as a Dask worker plugin (:class:`RunPlugin`), not with every step. Cancelling
reaches every worker through ``client.run``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import logging
import threading
import time
import uuid
from typing import Any

from algodock.errors import InfrastructureError
from algodock.flows.calls import unwrap
from algodock.pipeline.placement import Dispatcher, QueuedStep, UpstreamNotDone, step_resources

log = logging.getLogger("algodock.cluster")

CONNECT_TIMEOUT = "30s"
WORKER_WAIT = 30
"""Seconds a run waits for a first worker to join before it fails."""


# ---------------------------------------------------------------- the worker side


def _worker_plugin_base() -> type:
    from distributed import WorkerPlugin

    return WorkerPlugin


class RunPlugin(_worker_plugin_base()):  # type: ignore[misc]
    """One run's Prefect context on every worker (registered for the run, removed after it)."""

    def __init__(self, run_id: str, prefect_context: dict[str, Any] | None = None) -> None:
        self.name = plugin_name(run_id)
        self.run_id = run_id
        self.prefect_context = dict(prefect_context or {})
        """The flow run's serialized Prefect context (``prefect.context.serialize_context``): sent once, not with every step."""

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_lock", None)
        state.pop("_prefect", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def setup(self, worker: Any) -> None:
        self._lock = threading.Lock()

    def teardown(self, worker: Any) -> None:
        from algodock.flows.runs import forget_guest
        from algodock.worker import PLUGIN_NAME

        engine = worker.plugins.get(PLUGIN_NAME)
        if engine is not None:
            getattr(engine, "inner", engine).forget_run(self.run_id)
        forget_guest(self.run_id)
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


class ClusterFuture:
    """A step's future in cluster mode, as Prefect's futures are used: ``task_run_id``,
    :meth:`wait`, :meth:`result`, and ``wrapped_future`` (done when the step ended, or was
    skipped: it never went to a worker because a step it waits for did not succeed)."""

    def __init__(self, task: Any, parameters: dict[str, Any], upstream: list[ClusterFuture], resources: dict[str, float]) -> None:
        self.task, self.parameters, self.upstream = task, parameters, upstream
        self.task_run_id = uuid.uuid4()
        self.step = QueuedStep(unwrap(parameters["step_id"]), resources, [u.step for u in upstream])
        self.wrapped_future: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._dask: Any = None
        self._error: BaseException | None = None

    def wait(self, timeout: float | None = None) -> None:
        concurrent.futures.wait([self.wrapped_future], timeout=timeout)

    def result(self, timeout: float | None = None, raise_on_failure: bool = True) -> Any:
        """As ``PrefectDaskFuture.result``: the step task's return value (raises its failure)."""
        self.wrapped_future.result(timeout=timeout)
        if self._error is not None:
            raise self._error
        return self._dask.result(timeout=timeout, raise_on_failure=raise_on_failure)

    def edges(self) -> dict[str, list[Any]]:
        """Its upstream steps' task runs as Prefect's task inputs: the run graph's edges (under a
        key of the task's parameters, as Prefect requires)."""
        from prefect.client.schemas.objects import TaskRunResult

        return {"inputs": [TaskRunResult(id=u.task_run_id) for u in self.upstream]} if self.upstream else {}

    def _ended(self, error: BaseException | None = None) -> None:
        self._error = error
        self.wrapped_future.done() or self.wrapped_future.set_result(None)


class ClusterSession:
    """A run's connection to the Dask cluster, opened inside the flow run; the task runner its
    steps are submitted to (:meth:`submit`)."""

    def __init__(self, address: str) -> None:
        from prefect_dask import DaskTaskRunner

        self.address = address
        self.runner = DaskTaskRunner(address=address, client_kwargs={"timeout": CONNECT_TIMEOUT})
        self._stack = contextlib.ExitStack()
        self.run_id: str | None = None
        self.submitted: dict[str, float] = {}
        """Step id -> when it was submitted (unix time); with :attr:`returned`, the two ends of a step's timeline on the flow's side."""
        self.returned: dict[str, float] = {}
        self._futures: dict[str, ClusterFuture] = {}
        self.dispatcher: Dispatcher | None = None
        self._not_ready = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="algodock-cluster-not-ready")
        """Records the task runs of the steps never sent (one thread, started at the first: a skipped step before its dependents)."""
        self._flow_context = contextvars.copy_context()
        """The flow run's context (the session is opened inside it), where those task runs are recorded."""

    def __enter__(self) -> ClusterSession:
        try:
            self._stack.enter_context(self.runner)
            self.client = self.runner.client
        except OSError as exc:
            raise InfrastructureError(f"cluster: no Dask scheduler answers at {self.address}: {exc}. Start one with `dask scheduler` and `algodock worker --scheduler ...` per Docker host.") from exc
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """The run is over: nothing more is sent (what was never sent is skipped), the run's worker
        plugin is removed from the workers, the connection closed (again: nothing more)."""
        if self.dispatcher is not None:
            self.dispatcher.stop()
        self._not_ready.shutdown(wait=True)
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

    def start_run(self, run_id: str) -> None:
        """Send the flow run's Prefect context to every worker (and to workers that join later);
        steps may be submitted from now on."""
        from prefect.context import serialize_context

        self.run_id = run_id
        self.client.register_plugin(RunPlugin(run_id, prefect_context=serialize_context()), name=plugin_name(run_id))
        self.dispatcher = Dispatcher(self.client, self._send, self._skip)
        self.dispatcher.start()

    def submit(self, task: Any, parameters: dict[str, Any], wait_for: Any = None) -> ClusterFuture:
        """Hold an algorithm task's call (``parameters``) until the steps it waits for ended (the
        futures this method returned, in ``wait_for``: a pipeline step names every step it depends
        on there) and a worker has room for its resource request; then send it there (see
        :class:`~algodock.pipeline.placement.Dispatcher`).

        A step whose upstream did not succeed is never sent: its future raises
        :class:`~algodock.pipeline.placement.UpstreamNotDone` (the lineage says ``skipped``).
        """
        assert self.dispatcher is not None, "start_run first"
        upstream = list(wait_for or [])
        request = task.algorithm.manifest.container_parameters.resource_request
        future = ClusterFuture(task, parameters, upstream, step_resources(request))
        self._futures[future.step.step_id] = future
        self.submitted[future.step.step_id] = time.time()
        self.dispatcher.add(future.step)
        return future

    def _skip(self, step: QueuedStep, error: BaseException) -> None:
        """``step`` will never be sent. When a step it waits for did not succeed, its task run
        is recorded first (``NotReady``, see :func:`record_not_ready`), off the dispatcher's thread."""
        future = self._futures[step.step_id]
        if not (isinstance(error, UpstreamNotDone) and error.upstream):
            future._ended(error)
            return
        failed, context = self._futures[error.upstream], self._flow_context

        def record() -> None:
            try:
                context.copy().run(record_not_ready, future, failed)
            except Exception as exc:  # the step is skipped all the same; only its task run is missing
                log.warning("step %s: could not record its NotReady task run: %s", step.step_id, exc)
            finally:
                future._ended(error)

        self._not_ready.submit(record)

    def _send(self, step: QueuedStep, worker: str) -> None:
        """Submit ``step``'s task to Dask, preferring ``worker``, its upstream futures replaced by their results.

        As prefect-dask's ``DaskTaskRunner.submit`` does, but without serializing the flow's
        Prefect context for every step (the :class:`RunPlugin` took it to the workers once) and
        under a key of its own (no hashing of the task and its parameters).
        """
        from distributed import Client
        from prefect.context import AssetContext
        from prefect.utilities.collections import visit_collection
        from prefect_dask.task_runners import PrefectDaskFuture

        future = self._futures[step.step_id]
        # resolved and unquoted: Dask rebuilds a quote() (a namedtuple) as a plain tuple on the worker
        inputs = visit_collection(future.parameters["inputs"], lambda v: v.result() if isinstance(v, ClusterFuture) else v, return_data=True, remove_annotations=True)
        parameters = {**{key: unwrap(value) for key, value in future.parameters.items()}, "inputs": inputs}  # the graph's edges are the dependencies below
        dependencies = future.edges()
        assets = AssetContext.from_task_and_inputs(task=future.task, task_run_id=future.task_run_id, task_inputs=dependencies, copy_to_child_ctx=True).serialize()
        step.key = f"{step.step_id}-{future.task_run_id}"
        wrapped = Client.submit(self.client, run_step_task, self.run_id, future.task, future.task_run_id, parameters, dependencies, assets,
                                key=step.key, pure=False, resources=step.resources, workers=[worker], allow_other_workers=True)
        future._dask = PrefectDaskFuture(wrapped_future=wrapped, task_run_id=future.task_run_id)

        def finished(done: Any) -> None:
            self.returned[step.step_id] = time.time()
            ok = done.status == "finished" and getattr(done.result(), "is_completed", lambda: False)()
            assert self.dispatcher is not None
            self.dispatcher.ended(step, ok)  # before the future is done: its dependents may go now
            future._ended()

        wrapped.add_done_callback(finished)

    def cancel_everywhere(self) -> dict[str, Any]:
        """Send no more steps, and kill the run's containers on every worker's engine; ``{worker: [container names]}``."""
        from algodock.worker import cancel_run_here

        assert self.run_id is not None
        if self.dispatcher is not None:
            self.dispatcher.stop()
        return _broadcast(self.client, cancel_run_here, self.run_id)


def record_not_ready(future: ClusterFuture, failed: ClusterFuture) -> None:
    """The task run of ``future``'s step, never sent because ``failed``'s step did not succeed:
    Prefect's own engine, on the flow's side, ends it ``NotReady`` naming that task run, with the
    run graph's edges, as it does for a dependent of a failure on one host (its body never runs)."""
    from prefect.client.schemas.objects import StateDetails
    from prefect.states import Failed
    from prefect.task_engine import run_task_sync

    not_done = Failed(state_details=StateDetails(task_run_id=failed.task_run_id))
    run_task_sync(future.task, task_run_id=future.task_run_id, parameters=future.parameters, wait_for=[not_done],
                  return_type="state", dependencies=future.edges())


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
