"""The run an algorithm call joins: :func:`algodock_run` (a context manager inside a flow), the
implicit run of a flow run, a one-step run outside any flow, a pipeline spec's run
(:func:`open_spec_run`), or, in another process than the run's (a Dask worker's), its part of
the run (:func:`guest_run`, from the call's :class:`RunTicket`). A :class:`RunHandle` holds the
engine's :class:`~algodock.pipeline.composed.ComposedRun` (lease, store, pool, cache, lineage)
and what the Prefect layer adds: the calls planned, their futures, the watchers."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import shutil
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from prefect.futures import PrefectFuture
from prefect.runtime import flow_run as runtime_flow_run

from algodock.contract.manifest import Manifest
from algodock.pipeline.capacity import Capacity
from algodock.pipeline.composed import ComposedRun
from algodock.pipeline.validate import Pipeline
from algodock.records import Failure, StepRecord
from algodock.runtime.images import DEFAULT_PULL_POLICY, PULL_POLICIES, RegistryAuth
from algodock.flows import heartbeats
from algodock.flows.watch import watch_run
from algodock.flows.results import AlgorithmFailed, InvalidCall, StepResult


log = logging.getLogger("algodock.flows.runs")

heartbeats.install()  # a flow run that runs algorithms ends when its work ends, not at the next second


DEFAULT_STORE = "./.algodock/store"
STORE_ENV = "ALGODOCK_STORE"


def default_run_id(flow_run_id: str | None = None) -> str:
    """A new run id; inside a flow run, one derived from it, so a retried flow run keeps its run id."""
    if flow_run_id:
        return f"{runtime_flow_run.name or 'run'}-{flow_run_id.replace('-', '')[:8]}"
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{os.urandom(4).hex()}"


def check_concurrency_limit(name: str) -> None:
    """Fail before any container starts when the named global concurrency limit does not exist."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            raise InvalidCall(
                f"concurrency_limit: no Prefect global concurrency limit named {name!r}; "
                f"create it with `prefect gcl create {name} --limit N`"
            ) from None


CURRENT_RUN: contextvars.ContextVar[RunHandle | None] = contextvars.ContextVar("algodock_run", default=None)
OPEN_RUNS: dict[str, RunHandle] = {}
"""Open runs by run id (a task body finds its run here, in whatever thread it runs)."""
_IMPLICIT: dict[str, RunHandle] = {}
"""The implicit run of each flow run that called an algorithm outside :func:`algodock_run`."""
_LOCK = threading.Lock()


@dataclass
class Planned:
    """What a call said about a step, kept from its submit to its task run."""

    algorithm: str
    manifest: Manifest
    sources: dict[str, str] = field(default_factory=dict)
    """Slot -> the task run id of the (non-algorithm) Prefect task whose value it receives."""


@dataclass(frozen=True)
class RunTicket:
    """What a step needs to join its run from another process (a Dask worker): the run's id,
    store and image settings. It travels with each call (the credentials too: over the Dask
    cluster's connections, as ``run --cluster`` sends them)."""

    run_id: str
    store: str
    use_cache: bool
    flow_run_id: str | None
    run_pull_policy: str
    registry_credentials: tuple[RegistryAuth, ...]
    concurrency_limit: str | None
    pull_policy: str | None
    """The step's own (None: the run's)."""
    credentials: tuple[RegistryAuth, ...]
    """The credentials of the step's algorithm block."""
    earlier: StepRecord | None = None
    """What an earlier attempt of the run left for the step (a resumed run id), as the run read it."""


_GUESTS: dict[str, RunHandle] = {}
"""The runs whose steps this process runs for another one (a Dask worker's), by run id."""


def guest_run(ticket: RunTicket) -> RunHandle:
    """This process's part of ``ticket``'s run: its steps run on this host's engine (an ``algodock
    worker``'s, with its resource pool and cancel event, else the local engine), stage from and
    store into the run's store, and return their records to the run's process, which writes the lineage."""
    from algodock.runtime.engine import docker_client
    from algodock.store.backends import open_store

    with _LOCK:
        run = _GUESTS.get(ticket.run_id)
        if run is not None:
            return run
        try:
            from algodock.worker import current_engine

            engine = current_engine()
            client, pool, cancel, scratch = engine.client, engine.pool, engine.cancel_event(ticket.run_id), engine.scratch
        except Exception:  # a plain Dask worker (a LocalCluster): the engine of this host
            client = docker_client()
            pool, cancel, scratch = None, None, None
        composed = ComposedRun(
            open_store(ticket.store), ticket.run_id, client, Capacity.from_engine(client) if pool is None else pool.capacity,
            use_cache=ticket.use_cache, flow_run_id=ticket.flow_run_id, pull_policy=ticket.run_pull_policy,
            registry_credentials=ticket.registry_credentials, guest=True, pool=pool, cancel=cancel, scratch_root=scratch,
        ).open()
        run = RunHandle(composed, ticket.concurrency_limit)
        _GUESTS[ticket.run_id] = run
        return run


def _never_ran(future: PrefectFuture[Any], exc: Exception) -> bool:
    """The step of ``future`` never started: an upstream step did not succeed (``NotReady``, or
    never sent to a worker) or the run was cancelled first; its record is then ``skipped``."""
    from prefect.exceptions import CancelledRun, UnfinishedRun

    from algodock.pipeline.placement import UpstreamNotDone

    return isinstance(exc, (UpstreamNotDone, CancelledRun, UnfinishedRun))


def forget_guest(run_id: str) -> None:
    """This process runs no more steps of ``run_id`` (its run ended): its part of the run goes."""
    with _LOCK:
        run = _GUESTS.pop(run_id, None)
    if run is not None:
        run.composed.ctx.close()
        shutil.rmtree(run.composed.ctx.scratch, ignore_errors=True)


class RunHandle:
    """An open run (``with algodock_run(...) as run``): ``run.run_id``, ``run.store`` (its URI)."""

    def __init__(self, composed: ComposedRun, concurrency_limit: str | None = None, runner: Any = None, watch: Any = None) -> None:
        self.composed = composed
        self.run_id = composed.run_id
        self.store = composed.store.uri()
        self.concurrency_limit = concurrency_limit
        self.runner = runner
        """The task runner the run's steps are submitted to (a pipeline's, sized by its capacity); None: the flow's own."""
        self.watch = watch
        """A :class:`~algodock.flows.watch.RunWatch`: whether Prefect's API went away, and who runs each step (a pipeline's)."""
        self.status: str | None = None
        self.stop_watching: threading.Event | None = None
        """Set when the run closes: its watchers of the flow run (see algodock.flows.watch) stop."""
        self._futures: list[PrefectFuture[Any]] = []
        self._planned: dict[str, Planned] = {}
        self._by_task_run: dict[str, str] = {}
        self._lock = threading.Lock()

    def plan(self, step_id: str, planned: Planned) -> None:
        with self._lock:
            self._planned[step_id] = planned

    def planned(self, step_id: str) -> Planned | None:
        return self._planned.get(step_id)

    def track(self, step_id: str, future: PrefectFuture[Any]) -> None:
        with self._lock:
            self._futures.append(future)
            self._by_task_run[str(future.task_run_id)] = step_id

    def manifest_of(self, future: PrefectFuture[Any]) -> Manifest | None:
        """The manifest of the algorithm task whose future this is; None for any other task."""
        step_id = self._by_task_run.get(str(getattr(future, "task_run_id", "")))
        planned = self._planned.get(step_id) if step_id else None
        return planned.manifest if planned else None

    def ticket(self, step_id: str, pull_policy: str | None, credentials: tuple[RegistryAuth, ...]) -> RunTicket:
        """What step ``step_id`` of this run needs to run in another process (see :func:`guest_run`)."""
        ctx = self.composed.ctx
        earlier = ctx.cache.earlier(step_id) if ctx.cache is not None else None
        return RunTicket(self.run_id, self.store, ctx.use_cache, ctx.flow_run_id, ctx.pull_policy, ctx.registry_credentials,
                         self.concurrency_limit, pull_policy, credentials, earlier)

    def settle(self) -> None:
        """Record the steps that ran in another process (a Dask worker's): their task returned
        (or raised) the record the lineage keeps; a step that never ran stays for ``skipped``."""
        for future in list(self._futures):
            self.settle_one(future)

    def settle_one(self, future: PrefectFuture[Any]) -> None:
        """Record what the ended step of ``future`` returned or raised, unless its record is already final."""
        ledger = self.composed.ledger
        step_id = self._by_task_run.get(str(future.task_run_id))
        with self._lock:
            known = ledger.record(step_id) if step_id else None
            if step_id is None or (known is not None and known.status not in ("pending", "running")):
                return
            try:
                value = future.result(raise_on_failure=True)
            except AlgorithmFailed as exc:
                if exc.record is not None:
                    ledger.update(exc.record)
                return
            except Exception as exc:
                if not _never_ran(future, exc) and not self.composed.ctx.cancel.is_set():  # its task itself failed (a worker lost for good)
                    ledger.update(StepRecord(id=step_id, status="failed", failure=Failure(kind="infrastructure", message=f"{type(exc).__name__}: {exc}")))
                return
            if isinstance(value, StepResult) and value.record is not None:
                ledger.update(value.record)

    def cancel(self) -> None:
        """The flow run was cancelled or crashed, or the process is ending: no step starts, no container of the run outlives it."""
        from algodock.runtime.leftovers import kill_run_containers

        ctx = self.composed.ctx
        ctx.cancel.set()
        ctx.pool.wake_all()
        with contextlib.suppress(Exception):
            kill_run_containers(ctx.client, self.run_id)

    def close(self) -> str:
        """Wait for the run's steps, write its final lineage, publish its artifacts, release its lease."""
        if self.status is not None:
            return self.status
        for future in list(self._futures):
            with contextlib.suppress(Exception):
                future.wait()
        self.settle()
        try:
            self.status = self.composed.finish()
        finally:
            OPEN_RUNS.pop(self.run_id, None)
            if self.stop_watching is not None:
                self.stop_watching.set()
        _publish(self)
        return self.status


def _publish(run: RunHandle) -> None:
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:
        return
    from algodock.flows.artifacts import publish_run_artifacts

    publish_run_artifacts(run.composed.ledger.doc, run.composed.pipeline)  # type: ignore[arg-type]


def check_pull_policy(policy: str, where: str) -> None:
    if policy not in PULL_POLICIES:
        raise InvalidCall(f"{where}: pull_policy {policy!r} is not one of {', '.join(PULL_POLICIES)}")


def open_run(
    store: Any,
    run_id: str | None,
    capacity: Any,
    cache: bool,
    concurrency_limit: str | None,
    engine: Any,
    name: str,
    registry_credentials: Any = None,
    pull_policy: str = DEFAULT_PULL_POLICY,
    require_digest: bool = False,
) -> RunHandle:
    from prefect.context import FlowRunContext

    from algodock.blocks import registry_auths, resolve_engine, resolve_store

    check_pull_policy(pull_policy, "algodock_run")
    auths = registry_auths(registry_credentials)  # an unknown block name fails here, before anything is opened
    flow_ctx = FlowRunContext.get()
    flow_run_id = str(flow_ctx.flow_run.id) if flow_ctx is not None and flow_ctx.flow_run is not None else None
    client = resolve_engine(engine)
    if capacity is None:
        cap = Capacity.from_engine(client)
    elif isinstance(capacity, Capacity):
        cap = capacity
    elif isinstance(capacity, Mapping):
        try:
            cap = Capacity(**capacity)
        except TypeError as exc:
            raise InvalidCall(f"capacity {dict(capacity)!r}: expected cpu_millicore, memory_gb and optionally gpu ({exc})") from None
    else:
        cap = Capacity.parse(str(capacity))
    if concurrency_limit:
        check_concurrency_limit(concurrency_limit)
    the_store = resolve_store(store if store is not None else os.environ.get(STORE_ENV) or DEFAULT_STORE)
    run_id = run_id or default_run_id(flow_run_id)
    composed = ComposedRun(
        the_store, run_id, client, cap, name=name, use_cache=cache, flow_run_id=flow_run_id,
        pull_policy=pull_policy, registry_credentials=auths, require_digest=require_digest,
    ).open()
    handle = RunHandle(composed, concurrency_limit)
    handle.stop_watching = watch_run(flow_run_id, composed.ctx)  # a cancellation from the UI removes the run's containers
    OPEN_RUNS[run_id] = handle
    return handle


def open_spec_run(
    pipeline: Pipeline,
    store: Any,
    run_id: str,
    client: Any,
    capacity: Capacity,
    *,
    use_cache: bool,
    flow_run_id: str | None,
    pull_policy: str,
    registry_credentials: tuple[RegistryAuth, ...],
    step_credentials: dict[str, tuple[RegistryAuth, ...]],
    concurrency_limit: str | None,
    runner: Any,
    watch: Any,
    on_change: Any = None,
) -> RunHandle:
    """The run of a pipeline spec, open (lease taken, a dead writer's leftovers cleaned, lineage
    started) and current: its steps are submitted as :func:`algorithm` tasks like any call
    (see ``algodock.flows.pipeline``); close it with :meth:`RunHandle.close`."""
    composed = ComposedRun(
        store, run_id, client, capacity, use_cache=use_cache, flow_run_id=flow_run_id, pull_policy=pull_policy,
        registry_credentials=registry_credentials, pipeline=pipeline, step_credentials=step_credentials, on_change=on_change,
    ).open()
    handle = RunHandle(composed, concurrency_limit, runner=runner, watch=watch)
    OPEN_RUNS[run_id] = handle
    return handle


@contextlib.contextmanager
def current_run(run: RunHandle) -> Iterator[RunHandle]:
    """Algorithm calls in the block join ``run``."""
    token = CURRENT_RUN.set(run)
    try:
        yield run
    finally:
        CURRENT_RUN.reset(token)


def forget_run(run: RunHandle) -> None:
    """``run`` is no longer open in this process (it was finished without :meth:`RunHandle.close`)."""
    OPEN_RUNS.pop(run.run_id, None)


@contextlib.contextmanager
def algodock_run(
    store: Any = None,
    run_id: str | None = None,
    capacity: Any = None,
    cache: bool = True,
    concurrency_limit: str | None = None,
    engine: Any = None,
    registry_credentials: Any = None,
    pull_policy: str = DEFAULT_PULL_POLICY,
    require_digest: bool = False,
) -> Iterator[RunHandle]:
    """One algodock run around the algorithm calls in the block (inside a flow).

    ``store``: a local folder, ``s3://bucket/prefix``, a store block or its name (default
    ``ALGODOCK_STORE``, else ``./.algodock/store``); ``run_id``: default one derived from the
    flow run; ``capacity``: a dict or ``"cpu_millicore=N,memory_gb=M,gpu=G"`` (default: the
    engine's) that the running containers share: a step waits inside its task until its
    request fits; ``cache``: reuse identical earlier steps; ``concurrency_limit``: a Prefect
    global concurrency limit each container holds a slot of; ``engine``: a Docker engine URL,
    a ``DockerHost`` block or its name.

    Images: ``registry_credentials``: prefect-docker ``DockerRegistryCredentials`` blocks or
    their saved names (default: the engine host's docker config); ``pull_policy``:
    ``if_not_present``, ``always`` or ``never`` for steps whose algorithm sets none;
    ``require_digest``: a call whose image is not pinned by digest (``repo@sha256:…``) is
    refused when it is made, before any container.

    It holds the run's lease; on exit, success or not, it waits for the run's steps, writes
    the run's ``lineage.json`` and ``run.json``, publishes the run artifacts and releases the lease.
    """
    from prefect.context import FlowRunContext

    flow_ctx = FlowRunContext.get()
    name = flow_ctx.flow.name if flow_ctx is not None else "composed"
    handle = open_run(store, run_id, capacity, cache, concurrency_limit, engine, name, registry_credentials, pull_policy, require_digest)
    token = CURRENT_RUN.set(handle)
    try:
        yield handle
    except Exception:
        raise  # the user's code failed: the steps already running end as they would
    except BaseException:  # the process is being ended (a cancellation's signal, Ctrl-C)
        handle.cancel()
        raise
    finally:
        CURRENT_RUN.reset(token)
        handle.close()


def implicit_run() -> RunHandle | None:
    """The run a call outside :func:`algodock_run` joins: the flow run's implicit run (None outside a flow)."""
    from prefect.context import FlowRunContext

    flow_ctx = FlowRunContext.get()
    if flow_ctx is None or flow_ctx.flow_run is None:
        return None
    key = str(flow_ctx.flow_run.id)
    with _LOCK:
        run = _IMPLICIT.get(key)
        if run is None:
            run = open_run(None, None, None, True, None, None, flow_ctx.flow.name)
            _IMPLICIT[key] = run
            _finish_with_the_flow(flow_ctx.flow)
    return run


def _finish_implicit(flow: Any, flow_run: Any, state: Any) -> None:
    """Flow hook: the implicit run of ``flow_run`` ends with it."""
    run = _IMPLICIT.pop(str(flow_run.id), None)
    if run is not None:
        try:
            if state.is_cancelled() or state.is_cancelling() or state.is_crashed():
                run.cancel()
            run.close()
        except Exception as exc:  # a hook must not mask the flow's own state
            log.warning("could not finish run %s: %s", run.run_id, exc)


def _finish_with_the_flow(flow: Any) -> None:
    for hooks in (flow.on_completion_hooks, flow.on_failure_hooks, flow.on_crashed_hooks, flow.on_cancellation_hooks):
        if _finish_implicit not in hooks:
            hooks.append(_finish_implicit)
