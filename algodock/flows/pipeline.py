"""The Prefect flow that runs a pipeline spec: one algorithm task per step, named after the step.

The steps are the same :func:`~algodock.flows.compose.algorithm` tasks a Python flow calls,
submitted at once in dependency order, each given its upstream steps' futures as inputs:
Prefect starts a step when they completed (the run graph's edges) and gives a dependent of a
failure ``NotReady``; a started step waits in the run's
:class:`~algodock.pipeline.capacity.ResourcePool` until its resource request fits, so
independent steps run concurrently and the host is packed tightly. A failed step's dependents
are ``skipped`` while independent branches finish; the flow run fails when any step failed.
The lineage document in the store is rewritten as each step ends. On a cluster the same
futures go to Dask (see algodock.flows.cluster). When Prefect's API goes away mid-run, the run
ends without it (:func:`~algodock.pipeline.direct.finish_directly`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import threading
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run as runtime_flow_run
from prefect.states import Failed
from prefect.task_runners import ThreadPoolTaskRunner

from algodock.pipeline.capacity import Capacity
from algodock.runtime.leftovers import kill_run_containers
from algodock.pipeline.composed import ComposedRun
from algodock.pipeline.direct import finish_directly
from algodock.pipeline.execute import RunContext
from algodock.store.lease import RunLease
from algodock.pipeline import Pipeline
from algodock.pipeline.prepare import check_shared_store, prepare_run, take_prepared
from algodock.records import Failure, StepRecord
from algodock.lineage.ledger import Ledger
from algodock.blocks import DockerHost, DockerRegistryCredentials, StoreBlock
from algodock.runtime.images import DEFAULT_PULL_POLICY, PullPolicy
from algodock.flows.compose import (  # every step is an algorithm task, with the one retry policy and run naming
    AlgorithmFailed,
    algorithm,
    check_concurrency_limit,
    current_run,
    default_run_id,
    forget_run,
    open_spec_run,
    retry_options,
)
from algodock.flows.artifacts import publish_run_artifacts
from algodock.flows.watch import API_PROBE_SECONDS, RunWatch, run_watch, watch_run

LISTENERS: list[Any] = []
"""Callables ``(record: StepRecord) -> None`` told of every step change (the CLI's live view)."""


def _notify(record: StepRecord) -> None:
    for listener in list(LISTENERS):
        try:
            listener(record)
        except Exception:  # a broken view must not break the run
            pass


class StepFailed(AlgorithmFailed):
    """Raised by a pipeline step's task so that Prefect records the failure (and may retry it):
    an :class:`~algodock.flows.compose.AlgorithmFailed` carrying the step's record.

    ``cancelled``: the flow run was cancelled while the step waited or ran; its kind is then
    ``cancelled`` (never retried), whatever the container's own failure was.
    """

    def __init__(self, record: StepRecord, cancelled: bool = False) -> None:
        failure = record.failure or Failure(kind="infrastructure", message="unknown failure")
        super().__init__("cancelled" if cancelled else failure.kind, record.id, failure.message, record.log_tail)
        self.record = record
        self.cancelled = cancelled

    def __reduce__(self) -> tuple[Any, ...]:  # pickled back from a Dask worker (cluster mode)
        return (type(self), (self.record, self.cancelled))


def _block_manifest(name: str) -> Any:
    from algodock.blocks import manifest_from_block

    return manifest_from_block(name)


def _kill_on_cancel(flow: Any, flow_run: Any, state: Any) -> None:
    """Flow hook: when a worker cancels or crashes the run, remove its containers by label.

    Containers carry the flow-run id as a label (a deployment run's run id is derived from
    the flow-run name, so the flow-run id is what a hook always knows); a run started with
    an explicit ``run_id`` is also looked up by it.
    """
    params = flow_run.parameters or {}
    try:
        if params.get("cluster"):  # the containers are on the workers' engines
            from algodock.flows.cluster import cancel_on_cluster

            cancel_on_cluster(params["cluster"], str(params.get("run_id") or default_run_id(str(flow_run.id))))
            return
        engine = params.get("engine")
        client = _engine_client(engine if isinstance(engine, str) else None)
        killed = kill_run_containers(client, flow_run_id=str(flow_run.id))
        if params.get("run_id"):
            killed += kill_run_containers(client, str(params["run_id"]))
        if killed:
            logging.getLogger("algodock").warning("flow run %s ended (%s): removed containers %s", flow_run.id, state.name, ", ".join(killed))
    except Exception as exc:  # the hook must not mask the cancellation itself
        logging.getLogger("algodock").warning("could not remove containers of flow run %s: %s", flow_run.id, exc)


def _engine_client(engine: Any) -> Any:
    from algodock.blocks import resolve_engine

    return resolve_engine(engine)


@flow(
    name="algodock-pipeline",
    on_cancellation=[_kill_on_cancel],
    on_crashed=[_kill_on_cancel],
    validate_parameters=True,
)
def run_pipeline(
    spec: str | dict[str, Any],
    store: str | StoreBlock | None = None,
    run_id: str | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    capacity: str | None = None,
    no_cache: bool = False,
    concurrency_limit: str | None = None,
    engine: str | DockerHost | None = None,
    cluster: str | None = None,
    shared_store: bool = False,
    registry_credentials: list[str | DockerRegistryCredentials] | None = None,
    pull_policy: PullPolicy = DEFAULT_PULL_POLICY,
    require_digest: bool = False,
) -> dict[str, Any]:
    """Run the pipeline ``spec`` (a YAML path, or the spec as a dict) and return the run summary.

    ``store``: local folder, ``s3://bucket/prefix``, a saved store block by name
    (``"algodock-store/lake"``) or a :class:`~blocks.StoreBlock` (default ``./.algodock/store``);
    ``engine``: the Docker engine, a prefect-docker ``DockerHost`` block or its name
    (``"docker-host/gpu-box"``; default ``DOCKER_HOST`` or the local socket);
    ``overrides``: ``{step_id: {param: value}}``; ``capacity``: ``cpu_millicore=N,memory_gb=M``
    (default: the engine's CPUs and memory); ``no_cache``: run every step;
    ``concurrency_limit``: the name of a Prefect global concurrency limit that every step also
    holds one slot of while its container runs: a limit shared by all hosts and runs (the
    capacity packs this host; Prefect's limits poll, so they are no tool for packing).
    ``cluster``: a Dask scheduler address (``tcp://HOST:8786``): steps run on its
    ``algodock worker``s, placed by their resource requests (see algodock.flows.cluster); the
    store must then be S3, or a path every host mounts, declared with ``shared_store``.
    ``registry_credentials``: prefect-docker ``DockerRegistryCredentials`` blocks, or their
    names, for the registries the images come from (default: the engine host's docker config);
    ``pull_policy``: ``if_not_present``, ``always`` or ``never`` for steps that set none;
    ``require_digest``: refuse, before any container, a step whose image is not pinned by digest.
    """
    from algodock.blocks import registry_auths, resolve_store

    flow_run_id = str(runtime_flow_run.id) if runtime_flow_run.id else None
    session = None
    the_store = resolve_store(store)
    run_id = run_id or default_run_id(flow_run_id)
    prepared = take_prepared(the_store, run_id, spec)  # `algodock run` prepared it: not again
    if cluster:
        from algodock.flows.cluster import ClusterSession

        if prepared is None:  # refuse a host-local store before anything starts
            check_shared_store(store if isinstance(store, str) or store is None else getattr(store, "uri", None), shared_store)
        session = ClusterSession(cluster).__enter__()
    client = _engine_client(engine) if session is None else None
    if concurrency_limit:  # before the run is taken: nothing to give back when it is missing
        check_concurrency_limit(concurrency_limit)
    held: RunLease | None = None
    """The lease as this flow's preparation took it (None: `algodock run` holds it), given back when the run is written."""
    if prepared is not None:  # the spec as `algodock run` loaded it; a cluster run's capacity is its biggest worker's
        pipeline = prepared.pipeline
        cap = prepared.capacity or (session.largest_worker() if session else Capacity.from_engine(client))
        if prepared.capacity is None:
            pipeline.check_capacity(cap)
    else:  # a deployment or a call from Python
        cap = Capacity.parse(capacity) if capacity else (session.largest_worker() if session else Capacity.from_engine(client))
        prepared = prepare_run(spec, store=the_store, run_id=run_id, overrides=overrides, capacity=cap, resolve_block=_block_manifest, require_digest=require_digest)
        pipeline, held = prepared.pipeline, prepared.lease  # RunBusy names the holder
    auths = registry_auths(registry_credentials)  # an unknown block name fails here, before any container
    try:
        if session is not None:
            return _run_on_cluster(session, pipeline, the_store, run_id, cap, auths, no_cache, flow_run_id, pull_policy)
        return _run_here(pipeline, the_store, run_id, client, cap, auths, no_cache, flow_run_id, pull_policy, concurrency_limit)
    finally:
        if held is not None:
            held.release()


def _run_here(pipeline: Pipeline, the_store: Any, run_id: str, client: Any, cap: Capacity, auths: Any, no_cache: bool,
              flow_run_id: str | None, pull_policy: Any, concurrency_limit: str | None) -> Any:
    """The run on this host: each step is an :func:`~algodock.flows.compose.algorithm` task,
    submitted at once, waiting for its upstream steps' futures as in any Python flow: Prefect
    starts it when they completed (the run graph's edges) and gives a dependent of a failure
    ``NotReady``; the tasks run in a pool of threads sized by the capacity (:func:`_threads`)."""
    from algodock.blocks import step_registry_auths

    logger = get_run_logger()
    workers = max_workers(pipeline, cap)
    watch = run_watch(run_id)
    runner = ThreadPoolTaskRunner(max_workers=_threads(pipeline, workers)).__enter__()
    run = open_spec_run(
        pipeline, the_store, run_id, client, cap, use_cache=not no_cache, flow_run_id=flow_run_id, pull_policy=pull_policy,
        registry_credentials=auths, step_credentials=step_registry_auths(pipeline), concurrency_limit=concurrency_limit,
        runner=runner, watch=watch, on_change=_notify,
    )
    ctx = run.composed.ctx
    order = pipeline.topological_order()
    logger.info("run %s of pipeline %s: %d steps, capacity %s (up to %d at once), store %s", run_id, pipeline.spec.name, len(order), cap, workers, the_store.uri())
    stop_watch = watch_run(flow_run_id, ctx, watch)
    try:
        with current_run(run):
            futures = _submit_steps(pipeline, order)
        if not _wait(futures, watch):  # Prefect's API went away: the run ends without it
            finish_directly(ctx, run.composed.ledger, watch.final, lambda s: watch.claim(s, "direct"), workers)
            forget_run(run)
            status = run.composed.finish()
            watch.finished.set()
            logger.warning("run %s %s without the Prefect API: its record there is incomplete", run_id, status)
            return run.composed.ledger.summary()
        status = run.close()  # writes the run, publishes its artifacts, gives the lease back
    except BaseException:
        # The process is being ended (a worker's SIGTERM on cancellation arrives here as an
        # exception, before Prefect could run any hook) or the flow crashed: no container of
        # this run may outlive it.
        run.cancel()
        if flow_run_id:
            with contextlib.suppress(Exception):
                kill_run_containers(client, flow_run_id=flow_run_id)
        with contextlib.suppress(Exception):
            forget_run(run)
            run.composed.finish()
        raise
    finally:
        stop_watch.set()
    watch.finished.set()
    runner.__exit__(None, None, None)
    return _outcome(run_id, status, run.composed.ledger.summary())


def _submit_steps(pipeline: Pipeline, order: list[str]) -> dict[str, Any]:
    """Submit every step as an algorithm task, in dependency order, waiting for the futures of
    the steps it depends on (``wait_for``: the run graph's edges; the inputs are the spec's
    bindings, read from the upstream records). Waiting, not resolving, lets Prefect name a
    step's task run before it finds an upstream failed (``NotReady``)."""
    futures: dict[str, Any] = {}
    for step_id in order:
        step = pipeline.steps[step_id]
        task = algorithm(step.manifest, name=step_id, retries=step.retries)
        upstream = [futures[d] for d in sorted(step.dependencies)]
        futures[step_id] = task.submit(inputs={}, step_id=step_id, wait_for=upstream or None)
    return futures


def _wait(futures: dict[str, Any], watch: RunWatch) -> bool:
    """Wait for every step's task; False as soon as Prefect's API went away (see :func:`_watch_api`)."""
    pending = {f.wrapped_future for f in futures.values()}
    while pending:
        if watch.prefect_lost.is_set():
            return False
        _, pending = concurrent.futures.wait(pending, timeout=API_PROBE_SECONDS, return_when=concurrent.futures.FIRST_COMPLETED)
    return not watch.prefect_lost.is_set()  # lost at the very end: the run is still written without Prefect


def _threads(pipeline: Pipeline, workers: int) -> int:
    """Threads of the run's task runner: a task waits in its thread for its upstream futures, so
    the steps that have upstream steps get one each (they were submitted after their upstreams, so
    a thread never waits for a step with none), and ``workers`` run containers; at most 256."""
    waiting = sum(1 for s in pipeline.steps.values() if s.dependencies)
    return max(1, min(len(pipeline.steps), workers + waiting, 256))


def _run_on_cluster(session: Any, pipeline: Pipeline, the_store: Any, run_id: str, cap: Capacity, auths: Any, no_cache: bool,
                    flow_run_id: str | None, pull_policy: Any) -> Any:
    """The run on a Dask cluster (see algodock.flows.cluster): the same spec run as on one host
    (lease, clean-up, cache, lineage), its steps sent to the workers' engines."""
    from algodock.blocks import step_registry_auths

    logger = get_run_logger()
    try:
        composed = ComposedRun(
            the_store, run_id, None, cap, use_cache=not no_cache, flow_run_id=flow_run_id, pull_policy=pull_policy,
            registry_credentials=auths, pipeline=pipeline, step_credentials=step_registry_auths(pipeline), on_change=_notify,
        ).open()
        ctx = composed.ctx
        session.start_run(run_id, pipeline, the_store, ctx.cache, not no_cache, flow_run_id, StepFailed,
                          images={"pull_policy": ctx.pull_policy, "registry_credentials": ctx.registry_credentials, "step_credentials": ctx.step_credentials})
        order = pipeline.topological_order()
        logger.info("run %s of pipeline %s: %d steps on cluster %s, store %s", run_id, pipeline.spec.name, len(order), session.address, the_store.uri())
        watch = run_watch(run_id)
        stop_watch = watch_run(flow_run_id, ctx, watch, kill=session.cancel_everywhere)
        try:
            _submit_to_cluster(ctx, pipeline, order, composed.ledger, session)
        except BaseException:
            ctx.cancel.set()
            with contextlib.suppress(Exception):
                session.cancel_everywhere()
            with contextlib.suppress(Exception):
                composed.finish()
            raise
        finally:
            stop_watch.set()
    finally:
        session.__exit__(None, None, None)
    status = composed.finish()  # writes the run, gives the lease back
    watch.finished.set()
    publish_run_artifacts(composed.ledger.doc, pipeline)
    return _outcome(run_id, status, composed.ledger.summary())


def _outcome(run_id: str, status: str, summary: dict[str, Any]) -> Any:
    """What the flow returns: the run's summary, in a ``Failed`` state naming the failed steps unless it succeeded."""
    if status != "succeeded":
        failed = [s["id"] for s in summary["steps"] if s["status"] == "failed"]
        return Failed(message=f"run {run_id}: steps failed: {', '.join(failed) or 'cancelled'}", data=summary)
    return summary


def max_workers(pipeline: Pipeline, capacity: Capacity) -> int:
    """How many steps run at once: as many as the capacity can hold, plus one (the threads
    that run containers, see :func:`_threads`; also the pool of the run's end without Prefect).

    The most steps that fit together is found by packing the smallest requests first; the
    extra one stages the next step's inputs (or serves a cache hit) while the capacity is
    full. Never more than the number of steps, never less than one.
    """
    requests = sorted(
        ((m.container_parameters.resource_request.cpu_millicore, m.container_parameters.resource_request.memory_gb) for m in pipeline.manifests.values()),
    )
    cpu, mem, fit = capacity.cpu_millicore, capacity.memory_gb, 0
    for c, m in requests:
        if c > cpu or m > mem:
            break
        cpu, mem, fit = cpu - c, mem - m, fit + 1
    return max(1, min(len(requests), fit + 1))


def _submit_to_cluster(ctx: RunContext, pipeline: Pipeline, order: list[str], ledger: Ledger, session: Any) -> None:
    """Submit every step to the cluster session at once, each with its upstream steps' submissions
    as ``upstream``: the session sends a step to a worker with room once they ended, with their
    records, and never sends one whose upstream did not succeed (``skipped``); the records come
    back here to the ledger."""
    from algodock.flows import cluster as cluster_mode

    futures: dict[str, Any] = {}
    waiting: dict[concurrent.futures.Future[Any], str] = {}
    for step_id in order:
        step = pipeline.steps[step_id]
        task_fn = cluster_mode.step_task(ctx, step_id, name=step_id, task_run_name=step_id, **retry_options(step.retries))
        upstream = {d: futures[d] for d in sorted(step.dependencies)}
        futures[step_id], done = session.submit(task_fn, step_id, upstream, step.manifest.container_parameters.resource_request)
        waiting[done] = step_id
    pending = set(waiting)
    while pending:
        done_now, pending = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
        for f in done_now:
            step_id = waiting[f]
            ledger.update(_cluster_record(step_id, futures[step_id]))


def _cluster_record(step_id: str, future: Any) -> StepRecord:
    """The record a step's task on the cluster returned, raised (``StepFailed``), or ``skipped`` when it never ran."""
    from algodock.flows.cluster import UpstreamNotDone

    try:
        value = future.result(raise_on_failure=True)
    except StepFailed as exc:
        return exc.record
    except UpstreamNotDone:  # never sent: a step it depends on did not succeed
        return StepRecord(id=step_id, status="skipped")
    except BaseException as exc:
        state = getattr(future, "state", None)
        if state is not None and (state.is_pending() or state.is_cancelled()):  # NotReady: an upstream step did not succeed
            return StepRecord(id=step_id, status="skipped")
        return StepRecord(id=step_id, status="failed", failure=Failure(kind="infrastructure", message=f"{type(exc).__name__}: {exc}"))
    if isinstance(value, StepRecord):
        return value
    return StepRecord(id=step_id, status="skipped")


def run_with_watchdog(on_prefect_lost: Any, **params: Any) -> Any:
    """``run_pipeline(**params, return_state=True)`` for a command-line run.

    When the Prefect API went away and every step of the run has ended (the lineage holds
    the outcome), ``on_prefect_lost()`` is called from another thread: it must report and
    end the process, since Prefect's engine would go on retrying its calls to the API for
    minutes. ``params`` must name the ``run_id``.
    """
    watch = run_watch(params["run_id"])
    lock = threading.Lock()
    returned = threading.Event()

    def watchdog() -> None:
        while not returned.is_set():
            if watch.finished.wait(0.5) and watch.prefect_lost.is_set():
                with lock:
                    if not returned.is_set():
                        on_prefect_lost()
                return

    threading.Thread(target=watchdog, name="algodock-watchdog", daemon=True).start()
    try:
        return run_pipeline(**params, return_state=True)
    finally:
        with lock:
            returned.set()
