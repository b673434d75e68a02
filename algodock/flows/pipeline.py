"""The Prefect flow that runs a pipeline: one task per step, named after the step.

A step is submitted as soon as every step it depends on succeeded (or was cached); it then
waits in the engine's :class:`~algodock.pipeline.capacity.ResourcePool` until its resource request
fits, so independent steps run concurrently and the host is packed tightly. A failed step's
dependents are ``skipped`` while independent branches finish; the flow run fails when any
step failed. The lineage document in the store is rewritten as each step ends.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import logging
import os
import shutil
import tempfile
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency
from prefect.context import get_run_context
from prefect.runtime import flow_run as runtime_flow_run
from prefect.states import Failed
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from algodock.lineage.cache import StoreCache
from algodock.pipeline.capacity import Capacity, ResourcePool
from algodock.runtime.engine import docker_client, kill_run_containers
from algodock.errors import StepFailure
from algodock.lineage.openlineage import OpenLineageObserver
from algodock.pipeline.execute import RunContext, execute_step, recover_run
from algodock.store.lease import RunLease
from algodock.pipeline import Pipeline, load_pipeline, build_pipeline
from algodock.records import Failure, LineageDocument, StepRecord
from algodock.store.backends import Store, lineage_rel, open_store, run_json_rel
from algodock.flows.artifacts import emit_step_assets, publish_run_artifacts

INFRA_RETRIES = 2
"""How often an ``infrastructure`` failure is retried, whatever the step says."""
USER_RETRY_KINDS = {"exit_code", "timeout", "oom"}
"""Failure kinds retried only when the step sets ``retries``."""
CANCEL_WATCH_SECONDS = 2.0


LISTENERS: list[Any] = []
"""Callables ``(record: StepRecord) -> None`` told of every step change (the CLI's live view)."""


def _notify(record: StepRecord) -> None:
    for listener in list(LISTENERS):
        try:
            listener(record)
        except Exception:  # a broken view must not break the run
            pass


class StepFailed(Exception):
    """Raised by a step task so that Prefect records the failure (and may retry it)."""

    def __init__(self, record: StepRecord) -> None:
        failure = record.failure or Failure(kind="infrastructure", message="unknown failure")
        super().__init__(f"step {record.id} failed ({failure.kind}): {failure.message}")
        self.record = record
        self.kind = "cancelled" if failure.message.startswith("cancelled:") else failure.kind

    def __reduce__(self) -> tuple[Any, ...]:  # pickled back from a Dask worker (cluster mode)
        return (type(self), (self.record,))


def _retry_condition(max_user_retries: int):
    def should_retry(task: Any, task_run: Any, state: Any) -> bool:
        exc = state.result(raise_on_failure=False)
        kind = getattr(exc, "kind", "infrastructure")
        if kind == "infrastructure":
            return True
        return kind in USER_RETRY_KINDS and task_run.run_count <= max_user_retries

    return should_retry


@task(cache_policy=NO_CACHE, persist_result=False)
def run_step_task(ctx: RunContext, step_id: str, upstream: dict[str, StepRecord], ledger: Ledger, concurrency_limit: str | None = None) -> StepRecord:
    """Run one step; raise :class:`StepFailed` on failure so Prefect can retry it."""
    from prefect.runtime import task_run

    logger = get_run_logger()
    attempt = int(task_run.run_count or 1)
    with concurrency(concurrency_limit, occupy=1, strict=True) if concurrency_limit else contextlib.nullcontext():
        record = execute_step(
            ctx,
            step_id,
            upstream,
            attempt=attempt,
            on_log=logger.info,
            task_run_id=str(task_run.id) if task_run.id else None,
        )
    record.engine = _engine_identity(ctx.client)
    if record.status == "failed" and ctx.cancel.is_set():
        assert record.failure is not None
        record.failure.message = f"cancelled: the flow run was cancelled while the step ran ({record.failure.message})"
    ledger.update(record)
    emit_step_assets(record, ctx.run_id)  # Prefect asset materializations of a succeeded step's outputs
    if record.status == "failed":
        assert record.failure is not None
        logger.error("step %s failed (%s): %s", step_id, record.failure.kind, record.failure.message)
        raise StepFailed(record)
    logger.info("step %s %s: %s", step_id, record.status, ", ".join(f"{o.name} {o.uri}" for o in record.outputs))
    return record


_ENGINES: dict[int, dict[str, str]] = {}


def _engine_identity(client: Any) -> dict[str, str] | None:
    """``docker info``'s Name and ID of the engine a step ran on (asked once per client)."""
    if id(client) not in _ENGINES:
        from algodock.worker import engine_identity

        try:
            _ENGINES[id(client)] = engine_identity(client)
        except Exception:  # the record matters more than naming its engine
            return None
    return _ENGINES[id(client)]


class Ledger:
    """The run's lineage document, rewritten in the store whenever a step changes.

    After :meth:`start`, a writer thread writes the latest document whenever it changed
    (a burst of changes is one write), so recording a step never delays the next step;
    :meth:`finish` stops it and writes the final document itself. Writes are at least
    ``max(LEDGER_MIN_INTERVAL, LEDGER_INTERVAL_PER_STEP x steps)`` apart: the document grows
    with the steps, so a 1000-step run writes about every 10 s instead of on every change
    (bytes written per run grow with the run's duration, not with steps x changes).
    """

    LEDGER_MIN_INTERVAL = 0.5
    LEDGER_INTERVAL_PER_STEP = 0.01

    def __init__(self, doc: LineageDocument, store: Store, on_change: Any = None) -> None:
        self.doc = doc
        self.store = store
        self.on_change = on_change
        self._lock = threading.Lock()
        self._changed = threading.Event()
        self._closing = False
        self._stop = threading.Event()
        self._writer: threading.Thread | None = None
        self._index = {s.id: i for i, s in enumerate(doc.steps)}
        self.interval = max(self.LEDGER_MIN_INTERVAL, self.LEDGER_INTERVAL_PER_STEP * len(doc.steps))

    def update(self, record: StepRecord) -> None:
        with self._lock:
            self.doc.steps[self._index[record.id]] = record  # O(1): a 1000-step run updates thousands of times
            if self._writer is None or self._closing:
                self._write()
        self._changed.set()
        if self.on_change:
            self.on_change(record)

    def start(self) -> None:
        with self._lock:
            self._write()
        self._writer = threading.Thread(target=self._write_behind, name="algodock-ledger", daemon=True)
        self._writer.start()
        for s in self.doc.steps:
            self.on_change and self.on_change(s)

    def finish(self, status: str) -> None:
        if self._writer is not None:
            self._closing = True
            self._stop.set()
            self._changed.set()
            self._writer.join()
        with self._lock:
            self.doc.status = status  # type: ignore[assignment]
            self.doc.finished_at = datetime.now(timezone.utc)
            self._write()

    def _write_behind(self) -> None:
        while True:
            self._changed.wait()
            if self._closing:
                return  # finish() writes the final document
            self._changed.clear()
            with self._lock:  # a consistent snapshot; the I/O is done without the lock
                snapshot = (self.doc.model_dump(mode="json"), self.summary())
            try:
                self._write(snapshot)
            except Exception as exc:  # the next change or finish() tries again
                logging.getLogger("algodock").warning("could not write the lineage of run %s: %s", self.doc.run_id, exc)
            if self._stop.wait(self.interval):  # batch the changes of the next interval into one write
                return

    def summary(self) -> dict[str, Any]:
        return {
            "run_id": self.doc.run_id,
            "status": self.doc.status,
            "flow_run_id": self.doc.flow_run_id,
            "lineage_uri": self.store.uri(lineage_rel(self.doc.run_id)),
            "steps": [s.summary() for s in self.doc.steps],
        }

    def _write(self, snapshot: tuple[dict[str, Any], dict[str, Any]] | None = None) -> None:
        lineage, summary = snapshot or (self.doc.model_dump(mode="json"), self.summary())
        self.store.write_json(lineage_rel(self.doc.run_id), lineage)
        self.store.write_json(run_json_rel(self.doc.run_id), summary)


def _load(spec: str | dict[str, Any], overrides: dict[str, dict[str, Any]] | None, capacity: Capacity) -> Pipeline:
    from algodock.blocks import manifest_from_block

    if isinstance(spec, dict):
        return build_pipeline(spec, overrides=overrides, capacity=capacity, resolve_block=manifest_from_block)
    return load_pipeline(Path(spec), overrides=overrides, capacity=capacity, resolve_block=manifest_from_block)


def default_run_id(flow_run_id: str | None = None) -> str:
    """A new run id; inside a flow run, one derived from it, so a retried flow run keeps its run id."""
    if flow_run_id:
        return f"{runtime_flow_run.name or 'run'}-{flow_run_id.replace('-', '')[:8]}"
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{os.urandom(4).hex()}"


def _kill_on_cancel(flow: Any, flow_run: Any, state: Any) -> None:
    """Flow hook: when a worker cancels or crashes the run, remove its containers by label."""
    run_id = (flow_run.parameters or {}).get("run_id") or flow_run.id
    try:
        if (flow_run.parameters or {}).get("cluster"):
            from algodock.flows.cluster import cancel_on_cluster

            cancel_on_cluster(flow_run.parameters["cluster"], str(run_id))
            return
        kill_run_containers(docker_client(), str(run_id))
    except Exception as exc:  # the hook must not mask the cancellation itself
        logging.getLogger("algodock").warning("could not remove containers of run %s: %s", run_id, exc)


def _watch_cancellation(flow_run_id: str, ctx: RunContext, stop: threading.Event, kill: Any = None) -> None:
    """Cancelling a local run from the UI changes only its state; this makes it kill containers."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        while not stop.wait(CANCEL_WATCH_SECONDS):
            try:
                state = client.read_flow_run(flow_run_id).state
            except Exception:
                continue
            if state is not None and (state.is_cancelling() or state.is_cancelled()):
                ctx.cancel.set()
                ctx.pool.wake_all()
                kill() if kill else kill_run_containers(ctx.client, ctx.run_id)  # kill: every host's (cluster mode)
                return


@flow(
    name="algodock-pipeline",
    task_runner=ThreadPoolTaskRunner(max_workers=64),
    on_cancellation=[_kill_on_cancel],
    on_crashed=[_kill_on_cancel],
    validate_parameters=True,
)
def run_pipeline(
    spec: str | dict[str, Any],
    store: str | None = None,
    run_id: str | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    capacity: str | None = None,
    no_cache: bool = False,
    concurrency_limit: str | None = None,
    cluster: str | None = None,
    shared_store: bool = False,
) -> dict[str, Any]:
    """Run the pipeline ``spec`` (a YAML path, or the spec as a dict) and return the run summary.

    ``store``: local folder or ``s3://bucket/prefix`` (default ``./.algodock/store``);
    ``overrides``: ``{step_id: {param: value}}``; ``capacity``: ``cpu_millicore=N,memory_gb=M``
    (default: the engine's CPUs and memory); ``no_cache``: run every step;
    ``concurrency_limit``: the name of a Prefect global concurrency limit that every step also
    holds one slot of while it runs: a limit shared by all hosts and runs (the capacity packs
    this host; Prefect's limits poll, so they are no tool for packing).
    ``cluster``: a Dask scheduler address (``tcp://HOST:8786``): steps run on its
    ``algodock worker``s, placed by their resource requests (see algodock.flows.cluster); the store must
    then be S3, or a path every host mounts, declared with ``shared_store``.
    """
    logger = get_run_logger()
    flow_run_id = str(runtime_flow_run.id) if runtime_flow_run.id else None
    session = None
    if cluster:  # refuse a host-local store before anything starts
        from algodock.flows.cluster import ClusterSession, check_shared_store

        check_shared_store(store, shared_store)
        session = ClusterSession(cluster).__enter__()
    client = docker_client() if session is None else None
    cap = Capacity.parse(capacity) if capacity else (session.largest_worker() if session else Capacity.from_engine(client))
    pipeline = _load(spec, overrides, cap)
    if concurrency_limit:
        _check_limit(concurrency_limit)
    the_store = open_store(store)
    run_id = run_id or default_run_id(flow_run_id)
    # --- [store] run lease and resume (issue 7 item 8) ---
    lease = RunLease(the_store, run_id).acquire()  # one writer per run: RunBusy names the holder
    recover_run(the_store, run_id, client)  # containers, .tmp-outputs-* and work folders of a dead earlier writer
    # --- [store] end ---
    scratch = Path(tempfile.mkdtemp(prefix=f"algodock-{run_id}-"))
    ctx = RunContext(pipeline=pipeline, store=the_store, run_id=run_id, client=client, pool=ResourcePool(cap), scratch=scratch, use_cache=not no_cache, flow_run_id=flow_run_id, observers=[OpenLineageObserver()])
    ctx.cache = StoreCache(the_store, run_id=run_id)  # reads an earlier attempt's lineage before the Ledger rewrites it
    if session is not None:
        session.start_run(run_id, pipeline, the_store, ctx.cache, not no_cache, flow_run_id, StepFailed)
    order = pipeline.topological_order()
    doc = LineageDocument(
        run_id=run_id,
        pipeline=pipeline.spec.name,
        spec_sha256=pipeline.spec_sha256,
        flow_run_id=flow_run_id,
        started_at=datetime.now(timezone.utc),
        store=the_store.uri(),
        steps=[StepRecord(id=s) for s in order],
    )
    ledger = Ledger(doc, the_store, on_change=_notify)
    ledger.start()
    logger.info("run %s of pipeline %s: %d steps, capacity %s, store %s", run_id, pipeline.spec.name, len(order), cap, the_store.uri())

    stop_watch = threading.Event()
    if flow_run_id:
        # In a copy of this context, so the watcher talks to the same Prefect API (settings set in code included).
        watch = contextvars.copy_context()
        kill = session.cancel_everywhere if session is not None else None
        threading.Thread(target=watch.run, args=(_watch_cancellation, flow_run_id, ctx, stop_watch, kill), daemon=True).start()
    try:
        status = _schedule(ctx, pipeline, order, ledger, concurrency_limit, cluster=session)
    finally:
        stop_watch.set()
        if session is not None:
            session.__exit__(None, None, None)
        shutil.rmtree(scratch, ignore_errors=True)
    ledger.finish(status)
    lease.release()  # [store] the run is written; another process may take it now
    publish_run_artifacts(ledger.doc, pipeline)
    summary = ledger.summary()
    if status != "succeeded":
        failed = [s["id"] for s in summary["steps"] if s["status"] == "failed"]
        return Failed(message=f"run {run_id}: steps failed: {', '.join(failed) or 'cancelled'}", data=summary)  # type: ignore[return-value]
    return summary


def _check_limit(name: str) -> None:
    """Fail before any container starts when the named global concurrency limit does not exist."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    from algodock.errors import InvalidInput

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            raise InvalidInput(
                f"concurrency_limit: no Prefect global concurrency limit named {name!r}; "
                f"create it with `prefect gcl create {name} --limit N`"
            ) from None


def _schedule(ctx: RunContext, pipeline: Pipeline, order: list[str], ledger: Ledger, concurrency_limit: str | None = None, cluster: Any = None) -> str:
    """Submit each step when its dependencies are done; skip dependents of failures."""
    records: dict[str, StepRecord] = {}
    running: dict[concurrent.futures.Future, str] = {}
    prefect_futures: dict[str, Any] = {}
    waiting = list(order)
    specs = {s.id: s for s in pipeline.spec.steps}

    def submit_ready() -> None:
        for step_id in list(waiting):
            deps = pipeline.dependencies[step_id]
            if any(records.get(d) is None for d in deps):
                continue
            waiting.remove(step_id)
            if any(records[d].status not in ("succeeded", "cached") for d in deps) or ctx.cancel.is_set():
                records[step_id] = StepRecord(id=step_id, status="skipped")
                ledger.update(records[step_id])
                continue
            retries = specs[step_id].retries
            if cluster is not None:
                from algodock.flows.cluster import run_cluster_step
            task_fn = (run_cluster_step if cluster is not None else run_step_task).with_options(
                name=step_id,
                task_run_name=step_id,
                retries=max(retries, INFRA_RETRIES),
                retry_condition_fn=_retry_condition(retries),
            )
            upstream = {d: records[d] for d in deps}
            # "running" before submitting: a fast (cached) step may finish, and record itself, before submit returns
            ledger.update(StepRecord(id=step_id, status="running"))
            if cluster is not None:  # on a Dask worker with room for the request; the ledger is updated here
                fut, waitable = cluster.submit(task_fn, step_id, upstream, pipeline.manifests[step_id].container_parameters.resource_request)
            else:
                fut = task_fn.submit(quote(ctx), step_id, quote(upstream), quote(ledger), concurrency_limit)
                waitable = fut.wrapped_future
            prefect_futures[step_id] = fut
            running[waitable] = step_id

    submit_ready()
    while running:
        done, _ = concurrent.futures.wait(list(running), return_when=concurrent.futures.FIRST_COMPLETED)
        for f in done:
            step_id = running.pop(f)
            try:
                value = prefect_futures[step_id].result(raise_on_failure=True)
                records[step_id] = value
                if cluster is not None:
                    ledger.update(value)
            except StepFailed as exc:
                records[step_id] = exc.record
                if cluster is not None:
                    ledger.update(exc.record)
            except BaseException as exc:  # a crash of the task itself, not of the algorithm
                records[step_id] = StepRecord(
                    id=step_id, status="failed", failure=Failure(kind="infrastructure", message=f"{type(exc).__name__}: {exc}")
                )
                ledger.update(records[step_id])
        submit_ready()
    for step_id in waiting:  # only reachable when a dependency never finished
        records[step_id] = StepRecord(id=step_id, status="skipped")
        ledger.update(records[step_id])
    if ctx.cancel.is_set():
        return "cancelled"
    return "succeeded" if all(r.status in ("succeeded", "cached") for r in records.values()) else "failed"
