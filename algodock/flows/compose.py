"""Algorithm containers as Prefect tasks in the user's own flows.

>>> from prefect import flow, task
>>> from algodock.flows import algorithm, algodock_run, output
>>> visits = algorithm("examples/device-visits/manifest.json")
>>> stats = algorithm("examples/dwell-stats/manifest.json")
>>> @flow
... def daily(pings: str):
...     with algodock_run(store="/tmp/store") as run:
...         v = visits.submit(inputs={"pings": pings}, parameters={"look_back_time": 7200})
...         s = stats.submit(inputs={"visits": v})   # the future: an edge in the run graph
...         return s.result().read("stats").num_rows

:func:`algorithm` turns a manifest (or an algorithm block) into a Prefect ``Task``; each call
is one step of the current run (:func:`algodock_run`, or an implicit run per flow run, or a
one-step run outside any flow). The step runs through the engine's
:func:`~algodock.pipeline.execute.execute_step`, exactly as a pipeline's step does: sandbox,
staging, cache, lineage. What a call is given is checked when it is made (``submit``, ``map``
or a direct call), before any container starts: every error names the algorithm, the step
and the field.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import Task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run as runtime_flow_run
from prefect.states import Cancelled
from prefect.tasks import MaterializingTask

from algodock.contract.manifest import Manifest, load_manifest
from algodock.contract.params import resolve_parameters
from algodock.errors import InvalidInput, StepFailure
from algodock.pipeline.capacity import Capacity
from algodock.pipeline.composed import ComposedRun, put_combined, put_table
from algodock.pipeline.execute import execute_step
from algodock.pipeline.spec import Ref
from algodock.pipeline.validate import Pipeline
from algodock.records import OutputRecord, StepRecord, Usage
from algodock.runtime.images import DEFAULT_PULL_POLICY, PULL_POLICIES, RegistryAuth
from algodock.store.layout import local_path_of
from algodock.store.transfer import fetch_input
from algodock.flows.artifacts import MATERIALIZED_BY
from algodock.flows.watch import watch_run

log = logging.getLogger("algodock.flows.compose")

DEFAULT_STORE = "./.algodock/store"
STORE_ENV = "ALGODOCK_STORE"


# ---------------------------------------------------------------- one policy for every algorithm step (pipelines too)

INFRA_RETRIES = 2
"""How often an ``infrastructure`` failure is retried, whatever the step says."""
USER_RETRY_KINDS = {"exit_code", "timeout", "oom"}
"""Failure kinds retried only when the step sets ``retries``."""
RETRY_DELAYS_SECONDS = [2.0, 10.0]
"""Prefect's wait before each retry of a step (the last repeats): an engine or store that just
failed gets time to come back instead of all attempts being spent within a second."""
RETRY_JITTER_FACTOR = 0.5
"""Each delay is drawn at random around its nominal value, within this fraction (Prefect's jitter), so steps that failed together do not retry together."""


def retry_condition(max_user_retries: int) -> Any:
    """Prefect's retry condition: ``infrastructure`` always, ``exit_code``/``timeout``/``oom`` up to ``max_user_retries``, nothing else (the kind is the exception's own, never parsed from text)."""

    def should_retry(task: Any, task_run: Any, state: Any) -> bool:
        exc = state.result(raise_on_failure=False)
        kind = getattr(exc, "kind", "infrastructure")
        if kind == "infrastructure":
            return True
        return kind in USER_RETRY_KINDS and task_run.run_count <= max_user_retries

    return should_retry



def retry_options(user_retries: int) -> dict[str, Any]:
    """Prefect's retry settings of every algorithm step, a pipeline's or a Python flow's:
    ``infrastructure`` up to :data:`INFRA_RETRIES` times, the user kinds up to ``user_retries``,
    after :data:`RETRY_DELAYS_SECONDS` with :data:`RETRY_JITTER_FACTOR` (read at each call)."""
    return {
        "retries": max(user_retries, INFRA_RETRIES),
        "retry_delay_seconds": RETRY_DELAYS_SECONDS,
        "retry_jitter_factor": RETRY_JITTER_FACTOR,
        "retry_condition_fn": retry_condition(user_retries),
    }

_ENGINES: dict[int, dict[str, str]] = {}


def engine_identity_of(client: Any) -> dict[str, str] | None:
    """``docker info``'s Name and ID of the engine a step ran on (asked once per client)."""
    if id(client) not in _ENGINES:
        from algodock.worker import engine_identity

        try:
            _ENGINES[id(client)] = engine_identity(client)
        except Exception:  # the record matters more than naming its engine
            return None
    return _ENGINES[id(client)]


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


# ---------------------------------------------------------------- results and failures


class AlgorithmFailed(Exception):
    """An algorithm step failed: ``kind`` is one of the contract's failure kinds.

    Raised from a failed algorithm task's ``.result()`` (and inside the task, so that
    Prefect records the failure and retries ``infrastructure``).
    """

    def __init__(self, kind: str, step_id: str, message: str, log_tail: list[str] | None = None, record: StepRecord | None = None) -> None:
        self.kind = kind
        self.step_id = step_id
        self.message = message
        self.log_tail = list(log_tail or [])
        self.record = record
        """The step's record in the lineage, when it got that far."""
        tail = ("\n" + "\n".join(self.log_tail[-20:])) if self.log_tail else ""
        super().__init__(f"step {step_id} failed ({kind}): {message}{tail}")

    def __reduce__(self) -> tuple[Any, ...]:  # pickled back from a Dask worker
        return (type(self), (self.kind, self.step_id, self.message, self.log_tail, self.record))


class InvalidCall(InvalidInput, ValueError):
    """What an algorithm call was given cannot run (``invalid_input``), found when the call is made:
    the message names the algorithm, the step and the field. A ``ValueError`` too, as Python's
    own argument errors are."""


@dataclass
class StepResult:
    """What an algorithm task returns: the step as the lineage records it.

    ``outputs``: output name -> its record (``uri``, ``sha256``, ``format``, ``rows``);
    :meth:`read` gives one as a ``pyarrow.Table``.
    """

    step_id: str
    status: str
    """``succeeded``, or ``cached`` when no container ran (its outputs come from an earlier run)."""
    image_id: str | None
    repo_digest: str | None
    outputs: dict[str, OutputRecord]
    usage: Usage | None
    run_id: str
    cached_from: str | None = None
    record: StepRecord | None = field(default=None, repr=False, compare=False)

    @classmethod
    def of(cls, record: StepRecord, run_id: str, status: str | None = None) -> StepResult:
        return cls(
            step_id=record.id,
            status=status or record.status,
            image_id=record.image_id,
            repo_digest=record.repo_digest,
            outputs={o.name: o for o in record.outputs},
            usage=record.usage,
            run_id=run_id,
            cached_from=record.cached_from,
            record=record,
        )

    def read(self, name: str) -> Any:
        """Output ``name`` as a ``pyarrow.Table`` (a parquet file, or a folder of parquet files; any store)."""
        import pyarrow.dataset as ds
        import pyarrow.parquet as pq

        if name not in self.outputs:
            raise KeyError(f"step {self.step_id} has no output {name!r} (outputs: {', '.join(self.outputs) or 'none'})")
        uri = self.outputs[name].uri
        local = local_path_of(uri)
        if local is not None:
            return pq.read_table(local) if local.is_file() else ds.dataset(local, format="parquet").to_table()
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
        if fs.isdir(path):
            return ds.dataset(path, format="parquet", filesystem=fs).to_table()
        with fs.open(path, "rb") as fh:
            return pq.read_table(fh)


@dataclass(frozen=True)
class OutputRef:
    """One named output of an upstream algorithm step (see :func:`output`)."""

    source: Any
    """A :class:`StepResult`, or the future of an algorithm task (resolved by Prefect)."""
    name: str


def output(result: Any, name: str) -> OutputRef:
    """Output ``name`` of an upstream algorithm step (its future or its :class:`StepResult`),
    to give to a slot of another name: ``inputs={"visits": output(v, "visits")}``."""
    return OutputRef(result, name)


# ---------------------------------------------------------------- runs


_CURRENT: contextvars.ContextVar[RunHandle | None] = contextvars.ContextVar("algodock_run", default=None)
_RUNS: dict[str, RunHandle] = {}
"""Open runs by run id (a task body finds its run here, in whatever thread it runs)."""
_IMPLICIT: dict[str, RunHandle] = {}
"""The implicit run of each flow run that called an algorithm outside :func:`algodock_run`."""
_LOCK = threading.Lock()


@dataclass
class _Planned:
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


_GUESTS: dict[str, RunHandle] = {}
"""The runs whose steps this process runs for another one (a Dask worker's), by run id."""


def _guest_run(ticket: RunTicket) -> RunHandle:
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
            client, pool, cancel = engine.client, engine.pool, engine.cancel_event(ticket.run_id)
        except Exception:  # a plain Dask worker (a LocalCluster): the engine of this host
            client = docker_client()
            pool, cancel = None, None
        composed = ComposedRun(
            open_store(ticket.store), ticket.run_id, client, Capacity.from_engine(client) if pool is None else Capacity(cpu_millicore=1, memory_gb=1),
            use_cache=ticket.use_cache, flow_run_id=ticket.flow_run_id, pull_policy=ticket.run_pull_policy,
            registry_credentials=ticket.registry_credentials, guest=True, pool=pool, cancel=cancel,
        ).open()
        run = RunHandle(composed, ticket.concurrency_limit)
        _GUESTS[ticket.run_id] = run
        return run


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
        self._planned: dict[str, _Planned] = {}
        self._by_task_run: dict[str, str] = {}
        self._lock = threading.Lock()

    def plan(self, step_id: str, planned: _Planned) -> None:
        with self._lock:
            self._planned[step_id] = planned

    def planned(self, step_id: str) -> _Planned | None:
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

    def ticket(self, pull_policy: str | None, credentials: tuple[RegistryAuth, ...]) -> RunTicket:
        """What a step of this run needs to run in another process (see :func:`_guest_run`)."""
        ctx = self.composed.ctx
        return RunTicket(self.run_id, self.store, ctx.use_cache, ctx.flow_run_id, ctx.pull_policy, ctx.registry_credentials,
                         self.concurrency_limit, pull_policy, credentials)

    def settle(self) -> None:
        """Record the steps that ran in another process (a Dask worker's): their task returned
        (or raised) the record the lineage keeps; a step that never ran stays for ``skipped``."""
        ledger = self.composed.ledger
        for future in list(self._futures):
            step_id = self._by_task_run.get(str(future.task_run_id))
            known = ledger.record(step_id) if step_id else None
            if step_id is None or (known is not None and known.status not in ("pending", "running")):
                continue
            try:
                value = future.result(raise_on_failure=True)
            except AlgorithmFailed as exc:
                if exc.record is not None:
                    ledger.update(exc.record)
                continue
            except Exception:
                continue
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
            _RUNS.pop(self.run_id, None)
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


def _check_pull_policy(policy: str, where: str) -> None:
    if policy not in PULL_POLICIES:
        raise InvalidCall(f"{where}: pull_policy {policy!r} is not one of {', '.join(PULL_POLICIES)}")


def _open(
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

    _check_pull_policy(pull_policy, "algodock_run")
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
    _RUNS[run_id] = handle
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
    _RUNS[run_id] = handle
    return handle


@contextlib.contextmanager
def current_run(run: RunHandle) -> Iterator[RunHandle]:
    """Algorithm calls in the block join ``run``."""
    token = _CURRENT.set(run)
    try:
        yield run
    finally:
        _CURRENT.reset(token)


def forget_run(run: RunHandle) -> None:
    """``run`` is no longer open in this process (it was finished without :meth:`RunHandle.close`)."""
    _RUNS.pop(run.run_id, None)


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
    handle = _open(store, run_id, capacity, cache, concurrency_limit, engine, name, registry_credentials, pull_policy, require_digest)
    token = _CURRENT.set(handle)
    try:
        yield handle
    except Exception:
        raise  # the user's code failed: the steps already running end as they would
    except BaseException:  # the process is being ended (a cancellation's signal, Ctrl-C)
        handle.cancel()
        raise
    finally:
        _CURRENT.reset(token)
        handle.close()


def _implicit_run() -> RunHandle | None:
    """The run a call outside :func:`algodock_run` joins: the flow run's implicit run (None outside a flow)."""
    from prefect.context import FlowRunContext

    flow_ctx = FlowRunContext.get()
    if flow_ctx is None or flow_ctx.flow_run is None:
        return None
    key = str(flow_ctx.flow_run.id)
    with _LOCK:
        run = _IMPLICIT.get(key)
        if run is None:
            run = _open(None, None, None, True, None, None, flow_ctx.flow.name)
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


# ---------------------------------------------------------------- checks at submit


def _where(algorithm: str, step_id: str, field_name: str) -> str:
    return f"algorithm {algorithm}, step {step_id}: {field_name}"


def _unwrap(value: Any) -> Any:
    from prefect.utilities.annotations import BaseAnnotation

    while isinstance(value, BaseAnnotation):
        value = value.unwrap()
    return value


def _pick_output(outputs: list[str], slot: str, name: str | None, where: str, producer: str) -> str:
    """The upstream output a slot reads: ``name`` when given, else the one named like the slot, else the only one."""
    if name is not None:
        if name not in outputs:
            raise InvalidCall(f"{where}: {producer} has no output {name!r} (outputs: {', '.join(outputs) or 'none'})")
        return name
    if slot in outputs:
        return slot
    if len(outputs) == 1:
        return outputs[0]
    raise InvalidCall(f"{where}: {producer} has several outputs and none is named {slot!r}; pick one with output(..., NAME) (outputs: {', '.join(outputs)})")


def _check_location(value: str | os.PathLike[str], where: str) -> None:
    text = os.fspath(value)
    if text.startswith("s3://"):
        return
    local = local_path_of(text)
    if local is None:
        raise InvalidCall(f"{where}: {text!r} is neither a local path, a file:// nor an s3:// URI")
    if not local.exists():
        raise InvalidCall(f"{where}: {text} does not exist")


def _check_one(run: RunHandle, slot: str, value: Any, where: str, known_late: dict[str, str], key: str) -> None:
    import pyarrow as pa

    value = _unwrap(value)
    if isinstance(value, (str, os.PathLike)):
        _check_location(value, where)
    elif isinstance(value, pa.Table):
        return
    elif isinstance(value, StepResult):
        _pick_output(list(value.outputs), slot, None, where, f"step {value.step_id}")
    elif isinstance(value, OutputRef):
        source = _unwrap(value.source)
        if isinstance(source, StepResult):
            _pick_output(list(source.outputs), slot, value.name, where, f"step {source.step_id}")
        elif isinstance(source, PrefectFuture):
            manifest = run.manifest_of(source)
            if manifest is None:
                raise InvalidCall(f"{where}: output(...) takes an algorithm task's future or StepResult, not the future of task run {source.task_run_id}")
            _pick_output([o.name for o in manifest.outputs], slot, value.name, where, f"algorithm {manifest.name}")
        else:
            raise InvalidCall(f"{where}: output(...) takes an algorithm task's future or StepResult, got {type(source).__name__}")
    elif isinstance(value, PrefectFuture):
        manifest = run.manifest_of(value)
        if manifest is not None:
            _pick_output([o.name for o in manifest.outputs], slot, None, where, f"algorithm {manifest.name}")
        else:  # a Python task's value: checked when it is known, still before any container
            known_late[key] = str(value.task_run_id)
    else:
        raise InvalidCall(f"{where}: got {type(value).__name__}; expected a path, a file:// or s3:// URI, a pyarrow.Table, an algorithm's future or StepResult, or output(...)")


def check_call(run: RunHandle, manifest: Manifest, algorithm: str, step_id: str, inputs: Any, parameters: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """Check a call's inputs and parameters (raises :class:`InvalidInput` naming algorithm, step and
    field); returns the parameters after defaults and the slots fed by Python tasks' futures."""
    inputs = _unwrap(inputs)
    if not isinstance(inputs, Mapping):
        raise InvalidCall(f"{_where(algorithm, step_id, 'inputs')}: expected a dict of input slot -> value, got {type(inputs).__name__}")
    slots = {s.name: s for s in manifest.inputs}
    for name in inputs:
        if name not in slots:
            raise InvalidCall(f"{_where(algorithm, step_id, f'inputs.{name}')}: no such input slot (slots: {', '.join(slots) or 'none'})")
    for slot in slots.values():
        if slot.required and slot.name not in inputs:
            raise InvalidCall(f"{_where(algorithm, step_id, f'inputs.{slot.name}')}: required input missing")
    sources: dict[str, str] = {}
    for name, value in inputs.items():
        where = _where(algorithm, step_id, f"inputs.{name}")
        value = _unwrap(value)
        if isinstance(value, (list, tuple)):
            if not slots[name].multiple:
                raise InvalidCall(f"{where}: a list is only for a slot with multiple: true; {name!r} takes one file or folder")
            if not value:
                raise InvalidCall(f"{where}: an empty list")
            for i, item in enumerate(value):
                _check_one(run, name, item, f"{where}[{i}]", sources, f"{name}[{i}]")
        else:
            _check_one(run, name, value, where, sources, name)
    parameters = _unwrap(parameters)
    if parameters is None:
        parameters = {}
    if not isinstance(parameters, Mapping):
        raise InvalidCall(f"{_where(algorithm, step_id, 'parameters')}: expected a dict, got {type(parameters).__name__}")
    schema = manifest.parameters
    known = schema.get("properties")
    if isinstance(known, Mapping) and schema.get("additionalProperties", False) is False:
        for key in parameters:
            if key not in known:
                raise InvalidCall(f"{_where(algorithm, step_id, f'parameters.{key}')}: unknown parameter (parameters: {', '.join(known) or 'none'})")
    try:
        resolved = resolve_parameters(schema, parameters, source="parameters")
    except InvalidInput as exc:
        lines = [f"algorithm {algorithm}, step {step_id}: {line}" for line in exc.errors]
        raise InvalidCall("\n".join(lines), errors=lines) from None
    return resolved, sources


# ---------------------------------------------------------------- the task body


def _bind(run: RunHandle, step_id: str, planned: _Planned, inputs: Mapping[str, Any]) -> tuple[dict[str, Ref | str], dict[str, StepRecord], dict[str, dict[str, Any]]]:
    """Resolved input values -> the step's bindings, its upstream records, and what each table came from."""
    import pyarrow as pa

    bindings: dict[str, Ref | str] = {}
    upstream: dict[str, StepRecord] = {}
    tables: dict[str, dict[str, Any]] = {}
    scratch = run.composed.ctx.scratch / "tables"

    def one(slot: str, value: Any, where: str, key: str) -> Ref | str | Path:
        value = _unwrap(value)
        name = None
        if isinstance(value, OutputRef):
            value, name = _unwrap(value.source), value.name
        if isinstance(value, StepResult):
            assert value.record is not None
            out = _pick_output(list(value.outputs), slot, name, where, f"step {value.step_id}")
            upstream[value.step_id] = value.record
            return Ref("step", value.step_id, out)
        if isinstance(value, pa.Table):
            uri, digest, rows = put_table(run.composed.store, value, scratch)
            tables[slot] = {"sha256": digest, "rows": rows, "task_run_id": planned.sources.get(key)}
            return uri
        if isinstance(value, (str, os.PathLike)):
            _check_location(value, where)
            text = os.fspath(value)
            local = local_path_of(text)
            return text if local is None else str(local.absolute())
        what = f"the task run {planned.sources[key]} returned" if key in planned.sources else "got"
        raise InvalidCall(f"{where}: {what} {type(value).__name__}; expected a path, a file:// or s3:// URI, a pyarrow.Table or a StepResult")

    for slot, value in inputs.items():
        where = _where(planned.algorithm, step_id, f"inputs.{slot}")
        value = _unwrap(value)
        if not isinstance(value, (list, tuple)):
            bindings[slot] = one(slot, value, where, slot)  # type: ignore[assignment]
            continue
        parts: list[Path] = []
        for i, item in enumerate(value):
            bound = one(slot, item, f"{where}[{i}]", f"{slot}[{i}]")
            parts.append(_local_part(run, upstream, step_id, slot, i, bound))
        uri, _ = put_combined(run.composed.store, parts, run.composed.ctx.scratch / "combined")
        bindings[slot] = uri
    return bindings, upstream, tables


def _local_part(run: RunHandle, upstream: Mapping[str, StepRecord], step_id: str, slot: str, i: int, bound: Ref | str | Path) -> Path:
    """One element of a list, as a local file or folder (fetched when it lives in S3)."""
    if isinstance(bound, Ref):
        record = upstream[bound.name]
        uri = next(o.uri for o in record.outputs if o.name == bound.output)
    else:
        uri = str(bound)
    local = local_path_of(uri)
    if local is not None:
        return local
    return fetch_input(uri, run.composed.ctx.scratch / "parts" / f"{step_id}-{slot}-{i}").path


@dataclass
class TaskStep:
    """How a step ended inside its task (see :func:`execute_in_task`)."""

    record: StepRecord
    cancelled: bool = False
    """The flow run was cancelled while the step waited or ran (its failure kind is then ``cancelled``)."""
    reused: bool = False
    """No container ran: a cache hit, or outputs kept from an earlier attempt of this run."""


def execute_in_task(
    ctx: Any,
    step_id: str,
    upstream: Mapping[str, StepRecord],
    *,
    record: Any,
    concurrency_limit: str | None = None,
) -> TaskStep:
    """The one way a step runs inside a Prefect task, an algorithm call's or a pipeline step's:
    the engine's :func:`~algodock.pipeline.execute.execute_step` with the task run's attempt,
    its logs sent to Prefect in batches, the Prefect concurrency slot held only while the
    container runs; the record (engine named) is handed to ``record(r)`` before anything is
    raised or returned."""
    from prefect import get_run_logger
    from prefect.concurrency.sync import concurrency
    from prefect.runtime import task_run

    from algodock.flows.logs import LogBatches

    logger = get_run_logger()
    this_run = str(task_run.id) if task_run.id else None
    with LogBatches(logger.info) as on_log:
        done = execute_step(
            ctx,
            step_id,
            upstream,
            attempt=int(task_run.run_count or 1),
            on_log=on_log,
            task_run_id=this_run,
            around_container=(lambda: concurrency(concurrency_limit, occupy=1, strict=True)) if concurrency_limit else None,
        )
    done.engine = engine_identity_of(ctx.client)
    cancelled = done.status == "failed" and ctx.cancel.is_set()
    if cancelled:
        assert done.failure is not None
        done.failure.message = f"cancelled: the flow run was cancelled while the step ran ({done.failure.message})"
    record(done)
    if done.status == "failed":
        assert done.failure is not None
        logger.error("step %s failed (%s): %s", step_id, done.failure.kind, done.failure.message)
        return TaskStep(done, cancelled=cancelled)
    kept = done.status == "succeeded" and this_run is not None and done.task_run_id not in (None, this_run)
    if done.status == "cached" or kept:
        logger.info("step %s: %s, no container ran", step_id, "kept from an earlier attempt" if kept else f"cached from run {done.cached_from}")
        return TaskStep(done, reused=True)
    logger.info("step %s %s: %s", step_id, done.status, ", ".join(f"{o.name} {o.uri}" for o in done.outputs))
    return TaskStep(done)


def run_algorithm_step(algorithm: str, manifest: Manifest, inputs: Mapping[str, Any], parameters: dict[str, Any], step_id: str, run_id: str, ticket: RunTicket | None = None) -> Any:
    """The body of an algorithm task: bind the resolved inputs, run the step (:func:`execute_in_task`),
    return its :class:`StepResult` (a ``Cached`` state when no container ran) or raise :class:`AlgorithmFailed`."""
    run = _RUNS.get(run_id)
    if run is None and ticket is not None:  # the step runs in another process than its run (a Dask worker)
        run = _guest_run(ticket)
        run.composed.image_options(step_id, ticket.pull_policy, ticket.credentials)
    if run is None or run.composed.finished:
        raise AlgorithmFailed("infrastructure", step_id, f"run {run_id} is not open in this process (its algodock_run block has ended)")
    from algodock.flows.artifacts import add_output_metadata, cached_state

    if run.watch is not None and not run.watch.claim(step_id, "prefect"):  # it ran directly while Prefect's API did not answer
        return Cancelled(message=f"step {step_id} ran outside Prefect while its API did not answer; see the lineage")
    ctx = run.composed.ctx
    ledger = run.composed.ledger

    def ended(done: StepRecord) -> None:
        ledger.update(done)
        if run.watch is not None:
            run.watch.final[step_id] = done  # what the run uses if Prefect cannot be told

    if ctx.cancel.is_set():  # the flow run was cancelled before this step started: no container
        ended(StepRecord(id=step_id, status="skipped"))
        return Cancelled(message=f"step {step_id} did not start: the flow run was cancelled")
    planned = run.planned(step_id) or _Planned(algorithm, manifest)
    try:
        bindings, upstream, tables = _bind(run, step_id, planned, inputs)
    except StepFailure as exc:
        failed = StepRecord(id=step_id, status="failed", algorithm=manifest.name, failure=exc)
        ended(failed)
        raise AlgorithmFailed(exc.kind, step_id, exc.message, record=failed) from None
    if run.composed.spec is not None and step_id in run.composed.spec.steps:  # its bindings are the spec's; its upstream futures were its wait_for
        upstream = run.composed.upstream_of(step_id)
    run.composed.add_step(step_id, manifest, parameters, bindings)
    ledger.update(StepRecord(id=step_id, status="running", algorithm=manifest.name))

    def record(done: StepRecord) -> None:
        for inp in done.inputs:  # which Python task made each table
            made = tables.get(inp.name)
            if made is not None:
                inp.produced_by_task_run = made["task_run_id"]
        ended(done)

    step = execute_in_task(ctx, step_id, upstream, record=record, concurrency_limit=run.concurrency_limit)
    done = step.record
    if done.status == "failed":
        assert done.failure is not None
        raise AlgorithmFailed("cancelled" if step.cancelled else done.failure.kind, step_id, done.failure.message, done.log_tail, record=done)
    if step.reused:  # Prefect emits no asset event for a Cached state, as for its own cache hits
        return cached_state(done, run_id, data=StepResult.of(done, run_id, status="cached"))
    add_output_metadata(done, ctx)
    return StepResult.of(done, run_id)


# ---------------------------------------------------------------- the task


@dataclass(frozen=True)
class _Algorithm:
    manifest: Manifest
    name: str
    """The step name (``name``, ``name-2``, … in a run)."""
    pull_policy: str | None = None
    """The steps' own pull policy; None: the run's."""
    credentials: tuple[RegistryAuth, ...] = ()
    """The credentials of the algorithm block it came from, used before the run's own."""


class AlgorithmTask(MaterializingTask):  # type: ignore[type-arg]
    """A Prefect task that runs one algorithm container per call (see :func:`algorithm`).

    ``submit``, ``map`` and direct calls check what they are given first and give the step
    its id; everything else is Prefect's own task. Each step materializes its outputs as
    Prefect assets (their store URIs), with the external inputs it reads as asset dependencies.
    """

    _pull_policy: str | None = None
    """Set by ``with_options(pull_policy=…)``: this task's steps' pull policy, over the algorithm's."""

    @property
    def algorithm(self) -> _Algorithm:
        return self.fn.__algodock__  # type: ignore[no-any-return]

    @property
    def pull_policy(self) -> str | None:
        """The pull policy of this task's steps (None: the run's)."""
        return self._pull_policy or self.algorithm.pull_policy

    def with_options(self, *args: Any, pull_policy: str | None = None, **kwargs: Any) -> AlgorithmTask:
        """Prefect's ``with_options``, and ``pull_policy`` for the steps of the new task."""
        if pull_policy is not None:
            _check_pull_policy(pull_policy, f"algorithm {self.algorithm.name}")
        new = super().with_options(*args, **kwargs)
        new.__class__ = type(self)
        new._pull_policy = pull_policy or self._pull_policy  # type: ignore[attr-defined]
        return new  # type: ignore[return-value]

    def _call(self, run: RunHandle, inputs: Any, parameters: Any, step_id: str | None) -> dict[str, Any]:
        algo = self.algorithm
        spec = run.composed.spec
        if spec is not None and step_id in spec.steps:  # a step of the run's spec: validated when the spec was loaded
            assert step_id is not None
            run.plan(step_id, _Planned(algo.name, algo.manifest))
            return {"inputs": inputs, "parameters": spec.parameters[step_id], "step_id": step_id, "run_id": run.run_id, "ticket": run.ticket(self.pull_policy, algo.credentials)}
        label = run.composed.peek_step_id(algo.name, step_id)
        try:
            run.composed.check_fits(algo.manifest, f"algorithm {algo.name}, step {label}")
            run.composed.check_image(algo.manifest, f"algorithm {algo.name}, step {label}")
        except InvalidInput as exc:
            raise InvalidCall(exc.message) from None
        resolved, sources = check_call(run, algo.manifest, algo.name, label, inputs, parameters)
        step_id = run.composed.step_id(algo.name, step_id)
        run.composed.image_options(step_id, self.pull_policy, algo.credentials)
        run.plan(step_id, _Planned(algo.name, algo.manifest, sources))
        return {"inputs": inputs, "parameters": resolved, "step_id": step_id, "run_id": run.run_id, "ticket": run.ticket(self.pull_policy, algo.credentials)}

    def _for_step(self, run: RunHandle, call: dict[str, Any]) -> AlgorithmTask:
        """This task as the step's: its task run named by the step id, its assets the outputs it
        materializes, its asset dependencies the external inputs it reads."""
        from algodock.flows.artifacts import step_assets

        step_id = call["step_id"]
        spec = run.composed.spec
        if spec is not None and step_id in spec.steps:
            bindings = spec.bindings[step_id]
            externals = [spec.inputs.get(ref.name, "") for ref in bindings.values() if ref.kind == "input"]
        else:
            externals = [os.fspath(v) for v in _unwrap(call["inputs"] or {}).values() if isinstance(_unwrap(v), (str, os.PathLike))]
        options = step_assets(run.composed.ctx, step_id, self.algorithm.manifest, externals)
        # spelled out: a pipeline step whose upstream failed (NotReady, its wait_for) is named before it resolves anything
        return self.with_options(task_run_name=step_id, **options)

    def _submit_step(self, run: RunHandle, call: dict[str, Any], wait_for: Any, kwargs: dict[str, Any]) -> Any:
        task = self._for_step(run, call)
        with _dask_resources(self.algorithm.manifest):
            if run.runner is not None and not kwargs:
                future = run.runner.submit(task, parameters=call, wait_for=wait_for)
            else:
                future = Task.submit(task, **call, wait_for=wait_for, **kwargs)
        run.track(call["step_id"], future)
        return future

    def submit(self, inputs: Any = None, parameters: Any = None, step_id: str | None = None, run_id: str | None = None, ticket: Any = None, wait_for: Any = None, **kwargs: Any) -> Any:  # type: ignore[override]
        run = _run_for_call()
        if run is None:
            raise InvalidCall(f"algorithm {self.algorithm.name}: .submit() is for inside a flow; call the task directly to run one step")
        call = self._call(run, inputs, parameters, step_id)
        return self._submit_step(run, call, wait_for, kwargs)

    def map(self, inputs: Any = None, parameters: Any = None, step_id: Any = None, run_id: Any = None, ticket: Any = None, wait_for: Any = None, **kwargs: Any) -> Any:  # type: ignore[override]
        from prefect.futures import PrefectFutureList

        run = _run_for_call()
        if run is None:
            raise InvalidCall(f"algorithm {self.algorithm.name}: .map() is for inside a flow")
        raw_inputs, raw_params = _unwrap(inputs), _unwrap(parameters)
        mapped_inputs = isinstance(raw_inputs, (list, tuple))
        mapped_params = isinstance(raw_params, (list, tuple))
        sizes = {len(v) for v, m in ((raw_inputs, mapped_inputs), (raw_params, mapped_params)) if m}
        if len(sizes) != 1:
            raise InvalidCall(f"algorithm {self.algorithm.name}: .map() needs inputs and/or parameters as lists of one length (use unmapped(...) for a shared value)")
        n = sizes.pop()
        ids = list(step_id) if isinstance(step_id, (list, tuple)) else [None] * n
        futures = []
        for i in range(n):
            one_inputs = raw_inputs[i] if mapped_inputs else raw_inputs
            one_params = raw_params[i] if mapped_params else raw_params
            call = self._call(run, one_inputs, one_params, ids[i])
            futures.append(self._submit_step(run, call, wait_for, kwargs))
        return PrefectFutureList(futures)

    def __call__(self, inputs: Any = None, parameters: Any = None, step_id: str | None = None, run_id: str | None = None, ticket: Any = None, **kwargs: Any) -> Any:  # type: ignore[override]
        run = _run_for_call()
        if run is not None:
            call = self._call(run, inputs, parameters, step_id)
            return Task.__call__(self._for_step(run, call), **call, **kwargs)
        one = _open(None, None, None, True, None, None, self.algorithm.name)  # outside any flow: a one-step run
        try:
            call = self._call(one, inputs, parameters, step_id)
            return Task.__call__(self._for_step(one, call), **call, **kwargs)
        finally:
            one.close()


def _run_for_call() -> RunHandle | None:
    return _CURRENT.get() or _implicit_run()


@contextlib.contextmanager
def _dask_resources(manifest: Manifest) -> Iterator[None]:
    """Under a ``DaskTaskRunner``, the step's resource request as Dask resources (as ``run --cluster`` places steps)."""
    from prefect.context import FlowRunContext

    flow_ctx = FlowRunContext.get()
    runner = getattr(flow_ctx, "task_runner", None) if flow_ctx is not None else None
    if runner is None or type(runner).__name__ != "DaskTaskRunner":
        yield
        return
    import dask

    from algodock.flows.cluster import step_resources

    with dask.annotate(resources=step_resources(manifest.container_parameters.resource_request)):
        yield


def _manifest_of(source: Any) -> tuple[Manifest, tuple[RegistryAuth, ...]]:
    """The manifest of ``source``, and the registry credentials of its algorithm block (if any)."""
    from algodock.blocks import AlgorithmBlock, algorithm_block_auths, load_algorithm_block

    if isinstance(source, Manifest):
        return source, ()
    if isinstance(source, Path):
        return load_manifest(source), ()
    if isinstance(source, str) and (Path(source).is_file() or source.endswith(".json")):
        return load_manifest(Path(source)), ()
    if isinstance(source, str):
        block, name = load_algorithm_block(source), source
        return block.to_manifest(f"block {source}"), algorithm_block_auths(block, name)
    if isinstance(source, AlgorithmBlock):
        name = getattr(source, "_block_document_name", None) or source.manifest.name
        return source.to_manifest(), algorithm_block_auths(source, name)
    raise InvalidCall(f"algorithm({type(source).__name__}): expected a manifest file path, a Manifest, an AlgorithmBlock or a saved AlgorithmBlock's name")


def algorithm(source: Any, *, name: str | None = None, retries: int | None = None, pull_policy: str | None = None) -> AlgorithmTask:
    """An algorithm as a Prefect task: ``source`` a manifest file, a ``Manifest``, an
    ``AlgorithmBlock`` or a saved block's name.

    Call it like any Prefect task with ``inputs`` (slot -> a path, URI, ``pathlib.Path``, a
    list of them for a ``multiple`` slot, a ``pyarrow.Table``, an upstream algorithm's future
    or :class:`StepResult`, or :func:`output`) and ``parameters`` (checked against the
    manifest's schema, defaults filled); ``step_id`` names the step (default ``name``,
    ``name-2``, …). ``retries``: retries after ``exit_code``, ``timeout`` or ``oom``
    (``infrastructure`` is always retried, as in pipelines). ``pull_policy``: ``if_not_present``,
    ``always`` or ``never`` for this algorithm's steps (default: the run's; also
    ``.with_options(pull_policy=…)``). An algorithm block's ``registry_credentials`` are used
    for its image before the run's own.
    """
    manifest, credentials = _manifest_of(source)
    step_name = name or manifest.name
    if pull_policy is not None:
        _check_pull_policy(pull_policy, f"algorithm {step_name}")
    user_retries = int(retries or 0)

    def run_algorithm(inputs: dict[str, Any], parameters: dict[str, Any] | None = None, step_id: str | None = None, run_id: str | None = None, ticket: RunTicket | None = None) -> Any:
        assert step_id is not None and run_id is not None, "algorithm tasks are called through submit/map/__call__"
        return run_algorithm_step(step_name, manifest, inputs, dict(parameters or {}), step_id, run_id, ticket)

    run_algorithm.__name__ = run_algorithm.__qualname__ = step_name.replace("-", "_")
    run_algorithm.__algodock__ = _Algorithm(manifest, step_name, pull_policy, credentials)  # type: ignore[attr-defined]
    return AlgorithmTask(
        fn=run_algorithm,
        assets=[],  # each step's own, given at its call (see AlgorithmTask._for_step)
        materialized_by=MATERIALIZED_BY,
        name=step_name,
        task_run_name="{step_id}",
        cache_policy=NO_CACHE,
        persist_result=False,
        **retry_options(user_retries),
    )


__all__ = ["AlgorithmFailed", "AlgorithmTask", "InvalidCall", "OutputRef", "RunHandle", "StepResult", "algodock_run", "algorithm", "output"]
