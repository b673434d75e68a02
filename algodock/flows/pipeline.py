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
from prefect.utilities.annotations import quote

from algodock.pipeline.capacity import Capacity
from algodock.runtime.leftovers import kill_run_containers
from algodock.pipeline.direct import finish_directly
from algodock.pipeline import Pipeline
from algodock.pipeline.prepare import check_shared_store, prepare_run, take_prepared
from algodock.records import StepRecord
from algodock.blocks import DockerHost, DockerRegistryCredentials, StoreBlock
from algodock.runtime.images import DEFAULT_PULL_POLICY, PullPolicy
from algodock.flows.compose import (  # every step is an algorithm task, with the one retry policy and run naming
    algorithm,
    check_concurrency_limit,
    current_run,
    default_run_id,
    forget_run,
    open_spec_run,
)
from algodock.flows.results import output
from algodock.flows.watch import API_PROBE_SECONDS, RunWatch, run_watch, watch_run

LISTENERS: list[Any] = []
"""Callables ``(record: StepRecord) -> None`` told of every step change (the CLI's live view)."""


def _notify(record: StepRecord) -> None:
    for listener in list(LISTENERS):
        try:
            listener(record)
        except Exception:  # a broken view must not break the run
            pass


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
    the_store = resolve_store(store)
    run_id = run_id or default_run_id(flow_run_id)
    prepared = take_prepared(the_store, run_id, spec)  # `algodock run` prepared it: not again
    with contextlib.ExitStack() as stack:
        session = None
        if cluster:
            from algodock.flows.cluster import ClusterSession

            if prepared is None:  # refuse a host-local store before anything starts
                check_shared_store(store if isinstance(store, str) or store is None else getattr(store, "uri", None), shared_store)
            session = stack.enter_context(ClusterSession(cluster))
        client = _engine_client(engine) if session is None else None
        if concurrency_limit:  # before the run is taken: nothing to give back when it is missing
            check_concurrency_limit(concurrency_limit)
        if prepared is not None:  # the spec as `algodock run` loaded it; a cluster run's capacity is its biggest worker's
            pipeline = prepared.pipeline
            cap = prepared.capacity or (session.largest_worker() if session else Capacity.from_engine(client))
            if prepared.capacity is None:
                pipeline.check_capacity(cap)
        else:  # a deployment or a call from Python
            cap = Capacity.parse(capacity) if capacity else (session.largest_worker() if session else Capacity.from_engine(client))
            prepared = prepare_run(spec, store=the_store, run_id=run_id, overrides=overrides, capacity=cap, resolve_block=_block_manifest, require_digest=require_digest)
            stack.callback(prepared.lease.release)  # this flow's preparation took the lease (`algodock run` holds its own): given back when the run is written
        auths = registry_auths(registry_credentials)  # an unknown block name fails here, before any container
        return _run(prepared.pipeline, the_store, run_id, cap, auths, no_cache, flow_run_id, pull_policy, concurrency_limit, client=client, session=session)


def _run(pipeline: Pipeline, the_store: Any, run_id: str, cap: Capacity, auths: Any, no_cache: bool, flow_run_id: str | None,
         pull_policy: Any, concurrency_limit: str | None, *, client: Any, session: Any) -> Any:
    """The run: each step is an :func:`~algodock.flows.compose.algorithm` task, submitted at once,
    waiting for its upstream steps' futures as in any Python flow: Prefect starts it when they
    completed (the run graph's edges) and gives a dependent of a failure ``NotReady``.

    On this host (``client``, its engine) the tasks run in a pool of threads sized by the
    capacity (:func:`_threads`); on a cluster (``session``, see algodock.flows.cluster) they go
    to the run's cluster session, which sends each to a worker with room once its upstream steps
    ended, and each step's record comes back to the lineage as it ends.
    """
    from algodock.blocks import step_registry_auths

    logger = get_run_logger()
    watch = run_watch(run_id)
    if session is None:
        workers = max_workers(pipeline, cap)
        runner, kill, where = ThreadPoolTaskRunner(max_workers=_threads(pipeline, workers)).__enter__(), None, f"capacity {cap} (up to {workers} at once)"
    else:
        runner, kill, where = session, session.cancel_everywhere, f"cluster {session.address}"
    try:
        run = open_spec_run(
            pipeline, the_store, run_id, client, cap, use_cache=not no_cache, flow_run_id=flow_run_id, pull_policy=pull_policy,
            registry_credentials=auths, step_credentials=step_registry_auths(pipeline), concurrency_limit=concurrency_limit,
            runner=runner, watch=watch, on_change=_notify,
        )
        if session is not None:
            session.start_run(run_id)
        ctx = run.composed.ctx
        order = pipeline.topological_order()
        logger.info("run %s of pipeline %s: %d steps, %s, store %s", run_id, pipeline.spec.name, len(order), where, the_store.uri())
        stop_watch = watch_run(flow_run_id, ctx, watch, kill=kill)
        try:
            with current_run(run):
                futures = _submit_steps(pipeline, order)
            for future in futures.values():  # a step in another process: its record reaches the lineage as it ends
                future.wrapped_future.add_done_callback(lambda _f, future=future: run.settle_one(future))
            if not _wait(futures, watch) and session is None:  # Prefect's API went away: the run ends without it
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
            # this run may outlive it, on any host.
            run.cancel()
            with contextlib.suppress(Exception):
                kill() if kill else (flow_run_id and kill_run_containers(client, flow_run_id=flow_run_id))
            with contextlib.suppress(Exception):
                forget_run(run)
                run.composed.finish()
            raise
        finally:
            stop_watch.set()
    finally:
        if session is not None:  # before the lease is given back: nothing of the run is sent after
            session.close()
    watch.finished.set()
    if session is None:  # only now: its threads all ended (not after a failure or without the API, where one may hang)
        runner.__exit__(None, None, None)
    return _outcome(run_id, status, run.composed.ledger.summary())


def _submit_steps(pipeline: Pipeline, order: list[str]) -> dict[str, Any]:
    """Submit every step as an algorithm task, in dependency order, waiting for the futures of the
    steps it depends on (``wait_for``: the run graph's edges), its inputs the spec's: an external
    location, or ``output(future, name)`` of an upstream step. As in any Python flow, a step starts
    when its upstream steps completed, and a dependent of a failure ends ``NotReady`` without a
    container. The inputs are quoted: on the run's host the step reads its upstream records from
    the run, and Prefect names a task run before it finds an upstream failed only when it waits,
    not when it resolves; a step sent to another process gets them resolved by its task runner.
    """
    futures: dict[str, Any] = {}
    for step_id in order:
        step = pipeline.steps[step_id]
        task = algorithm(step.manifest, name=step_id, retries=step.retries)
        inputs = {slot: pipeline.inputs[ref.name] if ref.kind == "input" else output(futures[ref.name], ref.output)
                  for slot, ref in pipeline.bindings[step_id].items()}
        upstream = [futures[d] for d in sorted(step.dependencies)]
        futures[step_id] = task.submit(inputs=quote(inputs), step_id=step_id, wait_for=upstream or None)
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
