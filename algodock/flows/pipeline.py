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
import shutil
import tempfile
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run as runtime_flow_run
from prefect.states import Cancelled, Failed
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from algodock.cache import StoreCache
from algodock.lineage.openlineage import OpenLineageObserver
from algodock.pipeline.capacity import Capacity, ResourcePool
from algodock.runtime.leftovers import kill_run_containers
from algodock.pipeline.execute import RunContext, execute_step, recover_run
from algodock.store.lease import RunLease
from algodock.pipeline import Pipeline
from algodock.pipeline.prepare import check_shared_store, prepare_run, take_prepared
from algodock.records import Failure, LineageDocument, StepRecord
from algodock.lineage.ledger import Ledger
from algodock.blocks import DockerHost, DockerRegistryCredentials, StoreBlock
from algodock.runtime.images import DEFAULT_PULL_POLICY, PullPolicy
from algodock.flows.compose import (  # the one retry policy and run naming of every algorithm step
    AlgorithmFailed,
    check_concurrency_limit,
    execute_in_task,
    retry_options,
    default_run_id,
)
from algodock.flows.artifacts import add_output_metadata, cached_state, materializing, publish_run_artifacts

CANCEL_WATCH_SECONDS = 2.0


LISTENERS: list[Any] = []
"""Callables ``(record: StepRecord) -> None`` told of every step change (the CLI's live view)."""


def _notify(record: StepRecord) -> None:
    for listener in list(LISTENERS):
        try:
            listener(record)
        except Exception:  # a broken view must not break the run
            pass


API_PROBE_SECONDS = 1.0
API_LOST_AFTER = 3
"""Consecutive failed probes of the Prefect API's /health (one a second) after which the run
goes on without Prefect: the steps' outcome is what counts, Prefect's record stays incomplete."""


class RunWatch:
    """What a caller sees of a run without asking Prefect: whether it finished, whether
    Prefect's API went away, and which path (Prefect's task, or direct) runs each step."""

    def __init__(self) -> None:
        self.finished = threading.Event()
        self.prefect_lost = threading.Event()
        self.final: dict[str, StepRecord] = {}
        self._claims: dict[str, str] = {}
        self._lock = threading.Lock()

    def claim(self, step_id: str, by: str) -> bool:
        """True when ``by`` ("prefect" or "direct") runs ``step_id``: the first claim wins."""
        with self._lock:
            return self._claims.setdefault(step_id, by) == by


_WATCHES: dict[str, RunWatch] = {}


def run_watch(run_id: str) -> RunWatch:
    """The :class:`RunWatch` of ``run_id`` in this process (created on first use)."""
    return _WATCHES.setdefault(run_id, RunWatch())


def _watch_api(watch: RunWatch, stop: threading.Event) -> None:
    """Probe the Prefect API; set ``watch.prefect_lost`` when it stops answering at all.

    Any HTTP answer counts as alive (a Cloud API may want auth for /health): only refused
    connections and timeouts count as misses.
    """
    import httpx
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return  # an in-process API cannot go away without this process
    misses = 0
    with httpx.Client(timeout=2.0) as http:  # one client: building one (its TLS context) costs more than the probe
        while not stop.wait(API_PROBE_SECONDS):
            try:
                http.get(url.rstrip("/") + "/health")
                misses = 0
            except httpx.HTTPError:
                misses += 1
            if misses >= API_LOST_AFTER:
                logging.getLogger("algodock").warning(
                    "the Prefect API at %s does not answer: the run goes on without it; Prefect's record of this run will be incomplete", url
                )
                watch.prefect_lost.set()
                return


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


def _run_step(ctx: RunContext, step_id: str, upstream: dict[str, StepRecord], ledger: Ledger, concurrency_limit: str | None = None) -> Any:
    """The body of a step's task: run it; raise :class:`StepFailed` on failure so Prefect can retry it.

    ``upstream``: the records of the steps it reads from; their task runs are this task's
    ``wait_for`` (see :func:`_schedule`), which Prefect records as its ``task_inputs``.
    """
    watch = run_watch(ctx.run_id)
    if not watch.claim(step_id, "prefect"):  # run directly while the Prefect API was away
        return Cancelled(message=f"step {step_id} ran outside Prefect while its API did not answer; see the lineage")

    def record(done: StepRecord) -> None:
        ledger.update(done)
        watch.final[step_id] = done  # what the scheduler uses if Prefect cannot be told

    step = execute_in_task(ctx, step_id, upstream, record=record, concurrency_limit=concurrency_limit)
    if step.record.status == "failed":
        raise StepFailed(step.record, cancelled=step.cancelled)
    if step.reused:
        return cached_state(step.record, ctx.run_id)  # Prefect emits no asset event for a Cached state, as for its own cache hits
    add_output_metadata(step.record, ctx)
    return step.record


def step_task(ctx: RunContext, step_id: str) -> Any:
    """The Prefect task of ``step_id`` (a materializing task of its outputs, see :func:`materializing`)."""
    spec = next(s for s in ctx.pipeline.spec.steps if s.id == step_id)
    return materializing(
        _run_step,
        ctx,
        step_id,
        name=step_id,
        task_run_name=step_id,
        cache_policy=NO_CACHE,
        persist_result=False,
        **retry_options(spec.retries),
    )


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
    from algodock.blocks import registry_auths, resolve_store, step_registry_auths

    logger = get_run_logger()
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
    if prepared is not None and (prepared.capacity is not None or session is None):
        pipeline = prepared.pipeline
        cap = prepared.capacity or Capacity.from_engine(client)
        lease = RunLease(the_store, run_id).acquire()  # this flow's own hold of the lease the command took
    else:  # a deployment or a call from Python; or a cluster run, whose capacity is its biggest worker's
        cap = Capacity.parse(capacity) if capacity else (session.largest_worker() if session else Capacity.from_engine(client))
        prepared = prepare_run(spec, store=the_store, run_id=run_id, overrides=overrides, capacity=cap, resolve_block=_block_manifest, require_digest=require_digest)
        pipeline, lease = prepared.pipeline, prepared.lease  # RunBusy names the holder
    auths = registry_auths(registry_credentials)  # an unknown block name fails here, before any container
    recover_run(the_store, run_id, client)  # containers, .tmp-* and work folders of a dead earlier writer
    scratch = Path(tempfile.mkdtemp(prefix=f"algodock-{run_id}-"))
    ctx = RunContext(pipeline=pipeline, store=the_store, run_id=run_id, client=client, pool=ResourcePool(cap), scratch=scratch, use_cache=not no_cache, flow_run_id=flow_run_id, observers=[OpenLineageObserver()],
                     pull_policy=pull_policy, registry_credentials=auths, step_credentials=step_registry_auths(pipeline))
    ctx.cache = StoreCache(the_store, run_id=run_id)  # reads an earlier attempt's lineage before the Ledger rewrites it
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
    if session is not None:
        session.start_run(run_id, pipeline, the_store, ctx.cache, not no_cache, flow_run_id, StepFailed,
                          images={"pull_policy": ctx.pull_policy, "registry_credentials": ctx.registry_credentials, "step_credentials": ctx.step_credentials})
    workers = max_workers(pipeline, cap)
    logger.info("run %s of pipeline %s: %d steps, capacity %s (up to %d at once), store %s", run_id, pipeline.spec.name, len(order), cap, workers, the_store.uri())

    stop_watch = threading.Event()
    watch = run_watch(run_id)
    if flow_run_id:
        # In copies of this context, so the watchers talk to the same Prefect API (settings set in code included).
        kill = session.cancel_everywhere if session is not None else None
        for target, args in ((_watch_cancellation, (flow_run_id, ctx, stop_watch, kill)), (_watch_api, (watch, stop_watch))):
            threading.Thread(target=contextvars.copy_context().run, args=(target, *args), daemon=True).start()
    runner = ThreadPoolTaskRunner(max_workers=workers).__enter__()
    try:
        status = _schedule(ctx, pipeline, order, ledger, runner, concurrency_limit, watch, workers, cluster=session)
    except BaseException:
        # The process is being ended (a worker's SIGTERM on cancellation arrives here as an
        # exception, before Prefect could run any hook) or the flow crashed: no container of
        # this run may outlive it.
        ctx.cancel.set()
        ctx.pool.wake_all()
        if session is not None:
            with contextlib.suppress(Exception):
                session.cancel_everywhere()
        for label in ({"flow_run_id": flow_run_id} if flow_run_id else {}, {"run_id": run_id}):
            if label and client is not None:
                with contextlib.suppress(Exception):
                    kill_run_containers(client, **label)
        raise
    finally:
        stop_watch.set()
        shutil.rmtree(scratch, ignore_errors=True)
        if session is not None:
            session.__exit__(None, None, None)
    ledger.finish(status)
    lease.release()  # the run is written; another process may take it now
    watch.finished.set()
    if watch.prefect_lost.is_set():  # task threads may still be retrying calls to the API: do not wait for them
        logger.warning("run %s %s without the Prefect API: its record there is incomplete", run_id, status)
        return ledger.summary()
    runner.__exit__(None, None, None)
    publish_run_artifacts(ledger.doc, pipeline)
    summary = ledger.summary()
    if status != "succeeded":
        failed = [s["id"] for s in summary["steps"] if s["status"] == "failed"]
        return Failed(message=f"run {run_id}: steps failed: {', '.join(failed) or 'cancelled'}", data=summary)  # type: ignore[return-value]
    return summary


def max_workers(pipeline: Pipeline, capacity: Capacity) -> int:
    """Threads for the step tasks: as many steps as the capacity can run at once, plus one.

    The most steps that fit together is found by packing the smallest requests first; the
    extra thread stages the next step's inputs (or serves a cache hit) while the capacity is
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


def _schedule(
    ctx: RunContext,
    pipeline: Pipeline,
    order: list[str],
    ledger: Ledger,
    runner: ThreadPoolTaskRunner,
    concurrency_limit: str | None = None,
    watch: RunWatch | None = None,
    workers: int = 1,
    cluster: Any = None,
) -> str:
    """Submit each step when its dependencies are done; dependents of a failure are not run.

    A step's task waits for its upstream tasks' futures (``wait_for``), so Prefect records
    them in the task run's ``task_inputs`` (the run graph's edges); the upstream records
    themselves are passed as data (the futures are already done). A dependent of a
    failed step is still submitted with those futures: Prefect itself then gives it the state
    it gives any task whose upstream did not complete, ``NotReady`` (Pending, "Upstream task
    run … did not reach a 'COMPLETED' state"), without calling it; the lineage says ``skipped``.

    When the Prefect API goes away (``watch.prefect_lost``), a step whose task already
    recorded its outcome is done, and the steps not yet started run directly
    (:func:`execute_step` in a thread pool of the same size): the run ends as its steps do.

    With ``cluster`` (a :class:`~algodock.flows.cluster.ClusterSession`) each step runs on a
    Dask worker with room for its resource request; its record comes back here, and the
    ledger is updated here. A dependent of a failure is skipped without a task.
    """
    watch = watch or RunWatch()
    records: dict[str, StepRecord] = {}
    running: dict[concurrent.futures.Future, str] = {}
    direct: set[concurrent.futures.Future] = set()
    prefect_futures: dict[str, Any] = {}
    waiting = list(order)
    skipping: set[str] = set()
    direct_pool: concurrent.futures.ThreadPoolExecutor | None = None

    def run_direct(step_id: str) -> None:
        nonlocal direct_pool
        if direct_pool is None:
            direct_pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="algodock-direct")
        inputs = {d: records[d] for d in pipeline.dependencies[step_id]}
        ledger.update(StepRecord(id=step_id, status="running"))

        def body() -> StepRecord:
            record = execute_step(ctx, step_id, inputs, on_log=logging.getLogger(f"algodock.step.{step_id}").info)
            ledger.update(record)
            return record

        fut = direct_pool.submit(contextvars.copy_context().run, body)
        direct.add(fut)
        running[fut] = step_id

    def submit_ready() -> None:
        for step_id in list(waiting):
            deps = pipeline.dependencies[step_id]
            if any(records.get(d) is None for d in deps):
                continue
            waiting.remove(step_id)
            upstream = [prefect_futures[d] for d in sorted(deps) if d in prefect_futures]
            blocked = any(records[d].status not in ("succeeded", "cached") for d in deps)
            lost = watch.prefect_lost.is_set()
            if ctx.cancel.is_set() or (blocked and (lost or len(upstream) < len(deps))):
                records[step_id] = StepRecord(id=step_id, status="skipped")  # nothing in Prefect to point at
                ledger.update(records[step_id])
                continue
            if lost:
                if watch.claim(step_id, "direct"):
                    run_direct(step_id)
                continue
            if cluster is not None:
                submit_to_cluster(step_id, deps, blocked)
                continue
            if blocked:
                skipping.add(step_id)
            else:
                # "running" before submitting: a fast (cached) step may finish, and record itself, before submit returns
                ledger.update(StepRecord(id=step_id, status="running"))
            task_fn = step_task(ctx, step_id)
            inputs = {d: records[d] for d in deps if not blocked}
            fut = runner.submit(
                task_fn,
                {"ctx": quote(ctx), "step_id": step_id, "upstream": quote(inputs), "ledger": quote(ledger), "concurrency_limit": concurrency_limit},
                wait_for=upstream,
            )
            prefect_futures[step_id] = fut
            running[fut.wrapped_future] = step_id

    def submit_to_cluster(step_id: str, deps: set[str], blocked: bool) -> None:
        from algodock.flows import cluster as cluster_mode

        if blocked:
            records[step_id] = StepRecord(id=step_id, status="skipped")
            ledger.update(records[step_id])
            return
        retries = pipeline.steps[step_id].retries
        task_fn = cluster_mode.step_task(
            ctx,
            step_id,
            name=step_id,
            task_run_name=step_id,
            **retry_options(retries),
        )
        # "running" before submitting: a fast (cached) step may finish before submit returns
        ledger.update(StepRecord(id=step_id, status="running"))
        request = pipeline.manifests[step_id].container_parameters.resource_request
        fut, waitable = cluster.submit(task_fn, step_id, {d: records[d] for d in deps}, request)
        prefect_futures[step_id] = fut
        running[waitable] = step_id

    def without_prefect() -> None:
        """The API is gone: take each step's outcome from its task's own record, or run it here."""
        for f, step_id in list(running.items()):
            if f in direct:
                continue
            if step_id in watch.final:
                records[step_id] = watch.final[step_id]
            elif step_id in skipping:
                records[step_id] = StepRecord(id=step_id, status="skipped")
                ledger.update(records[step_id])
            elif watch.claim(step_id, "direct"):  # its task never started: Prefect could not create its run
                del running[f]
                run_direct(step_id)
                continue
            else:
                continue  # its task is running the step: its record will come
            del running[f]

    submit_ready()
    try:
        while running:
            done, _ = concurrent.futures.wait(list(running), timeout=API_PROBE_SECONDS, return_when=concurrent.futures.FIRST_COMPLETED)
            for f in done:
                step_id = running.pop(f)
                if f in direct:
                    try:
                        records[step_id] = f.result()
                    except BaseException as exc:  # execute_step never raises; a bug must still end the step
                        records[step_id] = StepRecord(id=step_id, status="failed", failure=Failure(kind="infrastructure", message=f"{type(exc).__name__}: {exc}"))
                        ledger.update(records[step_id])
                    continue
                if step_id in skipping:
                    records[step_id] = StepRecord(id=step_id, status="skipped")
                    ledger.update(records[step_id])
                    continue
                try:
                    value = prefect_futures[step_id].result(raise_on_failure=True)
                    records[step_id] = value
                    if cluster is not None:  # a worker cannot reach this process's ledger
                        ledger.update(value)
                except StepFailed as exc:
                    records[step_id] = exc.record
                    if cluster is not None:
                        ledger.update(exc.record)
                except BaseException as exc:  # a crash of the task itself, or Prefect's API failing around a finished step
                    if step_id in watch.final:
                        records[step_id] = watch.final[step_id]
                        continue
                    records[step_id] = StepRecord(
                        id=step_id, status="failed", failure=Failure(kind="infrastructure", message=f"{type(exc).__name__}: {exc}")
                    )
                    ledger.update(records[step_id])
            if watch.prefect_lost.is_set():
                without_prefect()
            submit_ready()
    finally:
        if direct_pool is not None:
            direct_pool.shutdown(wait=True)
    for step_id in waiting:  # only reachable when a dependency never finished
        records[step_id] = StepRecord(id=step_id, status="skipped")
        ledger.update(records[step_id])
    if ctx.cancel.is_set():
        return "cancelled"
    return "succeeded" if all(r.status in ("succeeded", "cached") for r in records.values()) else "failed"


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
