"""One step of a pipeline run, end to end, against a store (no Prefect here).

:class:`RunContext` holds what the steps of one run share: the pipeline, the store, the
engine, the resource pool, the run's scratch folder and the external inputs fetched once.
:func:`execute_step` binds a step's inputs (upstream outputs or external inputs, fetched
from S3 when the store is remote, used in place when local), asks the cache, reserves
resources, runs the container through :func:`algodock.runtime.runner.run_step`, and commits the
outputs and the full container log to the store. On a local store the container writes
straight into the store's folder for the step (a hidden temporary name, renamed into place
once the step succeeded), so no output byte is copied, and the step's work folder (staged
inputs) lives on the store's filesystem too (``<store>/.work/<run_id>/…``), so inputs are
hardlinked, never copied.

Every attempt writes under its own ``runs/<run>/steps/<step>/attempts/<attempt_id>/``:
nothing a lineage document or cache entry points at is ever overwritten. Committing to the
store is retried by itself (:func:`algodock.store.retrying`: backoff, a bound on each try)
from the finished outputs on local disk; the container is never run again for a store
fault. When the store stays down, the step fails with ``infrastructure`` naming the store,
and the outputs are kept on local disk with a ``kept.json`` (their folder is logged); the
step's next attempt on this host commits them instead of running the container again
(:func:`_commit_kept`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel

from algodock.cache import StepCache, cache_key
from algodock.errors import InfrastructureError, InvalidInput, InvalidOutput, StepFailure
from algodock.hashing import parquet_rows, sha256_path
from algodock.pipeline.ahead import CreatedAhead, Reservation, StepPaths, step_paths, work_root  # noqa: F401  (work_root: callers found it here)
from algodock.pipeline.capacity import Cancelled, ResourcePool
from algodock.records import Failure, InputBinding, OutputRecord, ResolvedImage, StepRecord, record_from_result
from algodock.runtime.handoff import check_outputs, parquet_files
from algodock.runtime.images import DEFAULT_PULL_POLICY, RegistryAuth, resolve_image
from algodock.runtime.outputs import copy_regular_tree
from algodock.runtime.runner import run_step
from algodock.runtime.staging import hash_input
from algodock.store.base import Store
from algodock.store.layout import WORK_DIR, attempt_rel, local_path_of, log_rel, new_attempt_id, output_rel, run_rel
from algodock.store.transfer import fetch_input, retrying

if TYPE_CHECKING:
    import docker

    from algodock.contract.manifest import Manifest
    from algodock.pipeline import Pipeline

log = logging.getLogger("algodock.pipeline.execute")

EMIT_LIMIT = 1024 * 1024
"""Bytes of container log a step sends to its logger (the Prefect task-run logs); the rest is only in the store."""


class StepObserver(Protocol):
    """Learns of step events (OpenLineage, Prefect assets, a live view subscribe this way).

    The engine announces; it imports no observer. An observer that raises is logged and
    ignored: it never fails a step.
    """

    def step_started(self, ctx: RunContext, record: StepRecord, upstream: Mapping[str, StepRecord]) -> None:
        """``record`` (status ``running``) is about to stage inputs and run its container."""

    def step_finished(self, ctx: RunContext, record: StepRecord) -> None:
        """``record`` ended: succeeded, cached or failed."""


def _announce(ctx: RunContext, event: str, *args: Any) -> None:
    for observer in ctx.observers:
        try:
            getattr(observer, event)(ctx, *args)
        except Exception as exc:  # an observer's fault is never the step's
            log.warning("step observer %s failed on %s: %s", type(observer).__name__, event, exc)


@dataclass
class RunContext:
    """What the steps of one pipeline run share."""

    pipeline: Pipeline
    store: Store
    run_id: str
    client: docker.DockerClient
    pool: ResourcePool
    scratch: Path
    """A local folder for this run's downloads and temporaries (removed at the end)."""
    use_cache: bool = True
    cancel: threading.Event = field(default_factory=threading.Event)
    cache: StepCache | None = None
    """The step cache (see :mod:`algodock.cache`); None runs every step and remembers nothing."""
    flow_run_id: str | None = None
    """The Prefect flow-run id, when there is one (the parent run of the steps' OpenLineage events)."""
    observers: list[StepObserver] = field(default_factory=list)
    """Told when each step starts and ends (see :class:`StepObserver`)."""
    _external: dict[str, InputBinding] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    pull_policy: str = DEFAULT_PULL_POLICY
    """The run's pull policy (``--pull-policy``); a step's own ``pull_policy`` overrides it."""
    registry_credentials: tuple[RegistryAuth, ...] = ()
    """Credentials for the registries the images come from (else the engine client's docker config)."""
    step_credentials: dict[str, tuple[RegistryAuth, ...]] = field(default_factory=dict)
    """Credentials of single steps (their algorithm block's), used for their image before the run's own."""
    create_ahead: bool = True
    """Create a dependent step's container while its upstream steps run (:mod:`algodock.pipeline.ahead`);
    off where the steps of a run execute in different processes (cluster mode)."""
    _images: dict[tuple[str, str, tuple[str, ...]], ResolvedImage] = field(default_factory=dict)
    _image_locks: dict[tuple[str, str, tuple[str, ...]], threading.Lock] = field(default_factory=dict)
    _ahead: CreatedAhead | None = None
    _ahead_lock: threading.Lock = field(default_factory=threading.Lock)  # not _lock: that one is held while an external input downloads
    _removals: ThreadPoolExecutor | None = None
    _closed: bool = False

    def ahead(self) -> CreatedAhead | None:
        """The run's containers created ahead (None where the rule of :meth:`CreatedAhead.enabled` says no)."""
        with self._ahead_lock:
            if self._ahead is None and CreatedAhead.enabled(self):
                self._ahead = CreatedAhead(self)
            return self._ahead

    def remove_later(self, removal: Callable[[], None]) -> None:
        """Remove a step's exited container off the step's path, in the run's removal thread (the
        next step starts meanwhile); :meth:`close` waits for every removal, so none outlives the
        run (nor this process: the thread is joined at exit; a killed process leaves them to the sweep)."""
        with self._ahead_lock:
            if not self._closed:
                if self._removals is None:
                    self._removals = ThreadPoolExecutor(1, thread_name_prefix="algodock-remove")
                self._removals.submit(removal)
                return
        removal()  # the run has ended: nothing is left waiting for it

    def close(self) -> None:
        """The run ended: remove whatever was created ahead and not used; wait for the removals of exited containers."""
        with self._ahead_lock:
            ahead, self.create_ahead = self._ahead, False
            removals, self._closed = self._removals, True
        if ahead is not None:
            ahead.close()
        if removals is not None:
            removals.shutdown(wait=True)

    def _image_key(self, ref: str, policy: str | None, step_id: str | None) -> tuple[str, str, tuple[str, ...]]:
        own = self.step_credentials.get(step_id or "", ())
        return (ref, policy or self.pull_policy, tuple(c.source for c in own))  # other credentials may be refused: never share their answer

    def known_image(self, ref: str, policy: str | None = None, step_id: str | None = None) -> ResolvedImage | None:
        """``ref`` as :meth:`image` resolved it earlier in this run, else None (never asks anything)."""
        return self._images.get(self._image_key(ref, policy, step_id))  # one dict read: no lock (that one is held while an input downloads)

    def image(self, ref: str, policy: str | None = None, on_log: Callable[[str], None] | None = None, step_id: str | None = None) -> ResolvedImage:
        """``ref`` resolved once per run and pull policy: every step of the run uses the same image.

        Steps asking at once wait for the first one (which pulls, once per engine, see
        :mod:`algodock.runtime.images`); a failure is not remembered, so a retry asks again.
        """
        own = self.step_credentials.get(step_id or "", ())
        key = self._image_key(ref, policy, step_id)
        with self._lock:
            lock = self._image_locks.setdefault(key, threading.Lock())
        with lock:
            if key not in self._images:
                self._images[key] = resolve_image(self.client, ref, policy=key[1], credentials=own + self.registry_credentials, on_log=on_log)
            return self._images[key]

    def step_pull_policy(self, step_id: str) -> str | None:
        """The step's own pull policy (a spec's ``pull_policy:``), None for the run's.

        Any view of a run's steps may carry ``pull_policies`` by step id (a validated
        :class:`~algodock.pipeline.Pipeline` does); one without it leaves every step to the run's.
        """
        return (getattr(self.pipeline, "pull_policies", None) or {}).get(step_id)

    def external_input(self, name: str) -> InputBinding:
        """An external pipeline input, fetched (S3) and hashed once per run."""
        with self._lock:
            if name in self._external:
                return self._external[name]
            uri = self.pipeline.inputs[name]
            local = local_path_of(uri)
            if local is None:  # hashed as it streams in; its listing is what gets staged
                fetched = fetch_input(uri, self.scratch / "external" / name)
                local, digest, files = fetched.path, fetched.sha256, fetched.files
            elif not local.exists():
                raise InvalidInput(f"pipeline input {name!r}: {uri} does not exist")
            else:  # listed once: the files hashed are the files staged
                digest, files = hash_input(local)
            rows = parquet_rows(local, files) if _looks_parquet(local, files) else None
            binding = InputBinding(slot=name, path=local, uri=uri, sha256=digest, rows=rows, files=files)
            self._external[name] = binding
            return binding


def _looks_parquet(path: Path, files: tuple[str, ...] | None = None) -> bool:
    if files is not None:  # the one listing of the folder
        return any(f.endswith(".parquet") for f in files)
    if path.is_dir():
        return any(p.suffix == ".parquet" for p in path.rglob("*.parquet"))
    return path.suffix == ".parquet"


def _filename(o: OutputRecord) -> str:
    return o.name if o.multiple else f"{o.name}.{o.format}"


def bind_inputs(ctx: RunContext, step_id: str, upstream: Mapping[str, StepRecord], dest: Path) -> dict[str, InputBinding]:
    """Turn a step's input references into local bindings (fetching from a remote store)."""
    bindings: dict[str, InputBinding] = {}
    for slot, ref in ctx.pipeline.bindings[step_id].items():
        if ref.kind == "input":
            ext = ctx.external_input(ref.name)
            bindings[slot] = InputBinding(slot=slot, path=ext.path, uri=ext.uri, sha256=ext.sha256, rows=ext.rows, files=ext.files)
            continue
        producer = upstream[ref.name]
        out = next(o for o in producer.outputs if o.name == ref.output)
        local = local_path_of(out.uri)
        if local is None:
            local = ctx.store.fetch(out.uri, dest / slot, expected_sha256=out.sha256)  # checked as it streams in
        bindings[slot] = InputBinding(slot=slot, path=local, uri=out.uri, sha256=out.sha256, produced_by=ref.name, rows=out.rows)
    return bindings


def execute_step(
    ctx: RunContext,
    step_id: str,
    upstream: Mapping[str, StepRecord],
    *,
    attempt: int = 1,
    on_log: Callable[[str], None] | None = None,
    task_run_id: str | None = None,
    around_container: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
) -> StepRecord:
    """Run one step of ``ctx.pipeline``; returns its record (never raises a StepFailure).

    ``around_container``: a context manager factory entered once the step's local resources
    are held, just before its container starts, and exited as soon as the container exited
    (e.g. a Prefect global concurrency slot): held neither while inputs are staged nor while
    the step waits for resources.
    """
    manifest = ctx.pipeline.manifests[step_id]
    record = StepRecord(
        id=step_id,
        status="running",
        algorithm=manifest.name,
        algorithm_version=manifest.version,
        image=manifest.container_parameters.image,
        command=list(manifest.container_parameters.command),
        parameters=ctx.pipeline.parameters[step_id],
        resource_request=manifest.container_parameters.resource_request.model_dump(),
        attempts=attempt,
        task_run_id=task_run_id,
    )
    ahead = ctx.ahead()
    reservation = ahead.claim(step_id, attempt) if ahead is not None else None
    attempt_id = reservation.attempt_id if reservation is not None else new_attempt_id(attempt)
    paths = reservation.paths if reservation is not None else step_paths(ctx, step_id, attempt_id)
    scratch = paths.scratch
    scratch.mkdir(parents=True, exist_ok=True)
    _announce(ctx, "step_started", record, upstream)
    try:
        record = _execute(ctx, step_id, upstream, record, paths, attempt, attempt_id, on_log, around_container, reservation)
        return record
    except StepFailure as failure:
        record.status = "failed"
        record.failure = failure
        return record
    finally:
        if reservation is not None:  # not used (a cache hit, a failure before the start): its container goes
            reservation.discard()
        if ahead is not None:
            ahead.step_ended(step_id, record.status in ("succeeded", "cached"))
        shutil.rmtree(scratch, ignore_errors=True)
        with contextlib.suppress(OSError):
            scratch.parent.rmdir()  # the run's work folder, once its last step is done
        _announce(ctx, "step_finished", record)


def _execute(
    ctx: RunContext,
    step_id: str,
    upstream: Mapping[str, StepRecord],
    record: StepRecord,
    paths: StepPaths,
    attempt: int,
    attempt_id: str,
    on_log: Callable[[str], None] | None,
    around_container: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
    reservation: Reservation | None = None,
) -> StepRecord:
    manifest = ctx.pipeline.manifests[step_id]
    scratch = paths.scratch
    say = (lambda message: on_log(f"[algodock] {message}")) if on_log else None
    bindings = bind_inputs(ctx, step_id, upstream, scratch / "inputs")
    image = ctx.image(manifest.container_parameters.image, ctx.step_pull_policy(step_id), say, step_id)
    record.image_id, record.repo_digest = image.id, image.repo_digest

    if ctx.cache is not None:
        hit = ctx.cache.lookup(record, bindings, use=ctx.use_cache, manifest=manifest)
        if hit is not None:
            return _checked_hit(ctx, manifest, hit)
    if (keep_dir() / ctx.run_id / step_id).is_dir():  # an earlier attempt's outputs the store would not take
        record.cache_key = record.cache_key or cache_key(record, bindings, manifest)
        committed = _commit_kept(ctx, step_id, record, attempt_id, say)
        if committed is not None:
            return committed

    if paths.attempt_dir is not None:  # local store: the container writes into the store itself
        paths.attempt_dir.mkdir(parents=True, exist_ok=True)
    output_dir = paths.output_dir
    log_path = scratch / "container.log"

    rr = manifest.container_parameters.resource_request
    held = False
    slot = contextlib.ExitStack()

    def acquire() -> None:  # run_step calls it with the container created: only the start waits
        nonlocal held
        ctx.pool.acquire(rr, ctx.cancel, on_wait=lambda: on_log and on_log(f"[algodock] waiting for resources ({rr.cpu_millicore} millicores, {rr.memory_gb:g} GB)"))
        held = True
        if around_container is not None:
            slot.enter_context(around_container())

    def started() -> None:  # the container runs: the dependents that may start next get theirs meanwhile
        ahead = ctx.ahead()
        if ahead is not None:
            ahead.container_started(step_id)

    def release() -> None:  # as soon as the container exited, before its clean-up
        nonlocal held
        slot.close()
        if held:
            held = False
            ctx.pool.release(rr)

    try:
        result = run_step(
            manifest,
            inputs=bindings,
            parameters=ctx.pipeline.parameters[step_id],
            parameters_resolved=True,
            output_dir=output_dir,
            run_id=ctx.run_id,
            step_id=step_id,
            attempt=attempt,
            client=ctx.client,
            image=image,
            on_log=on_log,
            log_path=log_path,
            log_location=ctx.store.uri(log_rel(ctx.run_id, step_id, attempt_id)),  # where the "full log is in …" line points
            emit_limit=EMIT_LIMIT,
            work_dir=scratch / "work",
            before_start=acquire,
            on_start=started,
            on_exit=release,
            flow_run_id=ctx.flow_run_id,
            ahead=reservation.take() if reservation is not None else None,
            remove_later=ctx.remove_later,
        )
    except Cancelled as exc:
        raise InfrastructureError(f"the run was cancelled before step {step_id!r} started") from exc
    finally:
        release()

    record_from_result(record, result)
    record.attempts = attempt
    if not result.ok:
        try:
            _store_log(ctx, step_id, attempt_id, record, log_path, say)
        except InfrastructureError as exc:
            log.warning("step %s: %s", step_id, exc)  # the step's own failure is what it reports
        _keep_failed(ctx, step_id, attempt_id, output_dir)
        return record
    try:
        _store_log(ctx, step_id, attempt_id, record, log_path, say)
        record.outputs = _commit_outputs(ctx, step_id, attempt_id, result.outputs, say)
    except InfrastructureError as exc:
        return _keep_for_retry(ctx, step_id, attempt_id, record, result.outputs, output_dir, log_path, exc)
    _discard(output_dir)
    if ctx.cache is not None:
        ctx.cache.remember(ctx.run_id, record)
    return record


def _checked_hit(ctx: RunContext, manifest: Manifest, hit: StepRecord) -> StepRecord:
    """A cache hit whose bytes still match the outputs' declared schemas (a declaration can change
    while the bytes stay: the cache key does not cover it); else the step fails ``invalid_output``
    naming the file and column, and no container runs."""
    try:
        check_outputs(manifest, hit.outputs, locate=lambda o: _stored_files(ctx.store, o.uri), where=f"outputs served from the cache of run {hit.cached_from}")
    except InvalidOutput as failure:
        hit.status, hit.failure, hit.outputs = "failed", failure, []
    except OSError as exc:
        hit.status, hit.outputs = "failed", []
        hit.failure = InfrastructureError(f"could not read the cached outputs' footers to check their schemas: {exc}")
    return hit


def _stored_files(store: Store, uri: str) -> tuple[Callable[[str], Any], list[str]]:
    """An opener for the parquet files of a stored output and their relative paths (footers read in place)."""
    local = local_path_of(uri)
    if local is not None:
        return (lambda rel: open(local / rel if rel else local, "rb")), parquet_files(local)
    fs = getattr(store, "fs", None)
    if fs is None:
        raise OSError(f"{uri}: no filesystem to read it from")
    key = uri.removeprefix("s3://").rstrip("/")
    if fs.isdir(key):
        rels = sorted(k[len(key) + 1 :] for k in fs.find(key) if k.endswith(".parquet"))
        return (lambda rel: fs.open(f"{key}/{rel}", "rb")), rels
    return (lambda rel: fs.open(key, "rb")), [""]


def _store_log(ctx: RunContext, step_id: str, attempt_id: str, record: StepRecord, log_path: Path, say: Callable[[str], None] | None) -> None:
    if log_path.exists():
        dest = log_rel(ctx.run_id, step_id, attempt_id)
        record.log_uri = retrying(lambda: ctx.store.put_output(log_path, dest, move=True), f"storing the log at {ctx.store.uri(dest)}", on_retry=say)


def _commit_outputs(ctx: RunContext, step_id: str, attempt_id: str, outputs: list[OutputRecord], say: Callable[[str], None] | None) -> list[OutputRecord]:
    """``outputs`` stored under this attempt's own prefix, each with its stored URI."""
    return [o.model_copy(update={"uri": _commit(ctx, step_id, attempt_id, o, say)}) for o in outputs]


def _commit(ctx: RunContext, step_id: str, attempt_id: str, o: OutputRecord, say: Callable[[str], None] | None) -> str:
    """Store one output under this attempt's own prefix (retried), or reuse identical stored bytes; return its URI."""
    filename = _filename(o)
    if ctx.cache is not None and ctx.use_cache:
        earlier = ctx.cache.same_bytes(o.sha256, filename)
        if earlier is not None:
            log.info("step %s: output %s has the bytes already stored at %s; recording that copy", step_id, o.name, earlier)
            return earlier
    dest = output_rel(ctx.run_id, step_id, filename, attempt_id)
    uri = retrying(lambda: ctx.store.put_output(o.path, dest, move=True), f"storing output {o.name} at {ctx.store.uri(dest)}", on_retry=say)
    if ctx.cache is not None:
        ctx.cache.remember_bytes(o.sha256, filename, uri)
    return uri


def keep_dir() -> Path:
    """Where outputs the store would not take are kept (``ALGODOCK_KEEP_DIR``, default ``~/.algodock/kept``)."""
    return Path(os.environ.get("ALGODOCK_KEEP_DIR") or Path.home() / ".algodock" / "kept")


class KeptOutput(BaseModel):
    name: str
    rel: str
    """Where it is inside :attr:`KeptAttempt.outputs_dir`."""
    multiple: bool = False


class KeptAttempt(BaseModel):
    """``<keep dir>/<run>/<step>/<attempt_id>/kept.json``: a succeeded attempt whose outputs the
    store would not take, kept on local disk until a later attempt of the step commits them."""

    attempt_id: str
    record: StepRecord
    """The attempt's record as the container left it (status ``succeeded``)."""
    outputs_dir: Path
    outputs: list[KeptOutput]
    log: Path | None = None
    """The container log, when the store did not take it either."""


KEPT_RECORD = "kept.json"


def _keep_for_retry(
    ctx: RunContext, step_id: str, attempt_id: str, record: StepRecord, outputs: list[OutputRecord], output_dir: Path, log_path: Path, exc: InfrastructureError
) -> StepRecord:
    """The container succeeded and the store stayed down: keep its outputs and log on local disk
    with ``kept.json`` beside them, and fail the step as ``infrastructure``. The next attempt of
    the step on this host (Prefect's retry, or a resumed run) commits them instead of running
    the container again (:func:`_commit_kept`)."""
    folder = keep_dir() / ctx.run_id / step_id / attempt_id
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if ctx.store.is_local:  # in the store's own attempt folder, under a name the resume clean-up leaves alone
            kept_outputs = output_dir.with_name("kept-outputs")
            output_dir.rename(kept_outputs)
        else:
            kept_outputs = folder / "outputs"
            shutil.move(str(output_dir), str(kept_outputs))
        kept_log = None
        if record.log_uri is None and log_path.exists():
            kept_log = folder / "container.log"
            shutil.move(str(log_path), str(kept_log))
        kept = KeptAttempt(
            attempt_id=attempt_id,
            record=record,
            outputs_dir=kept_outputs,
            outputs=[KeptOutput(name=o.name, rel=Path(o.path or "").relative_to(output_dir).as_posix(), multiple=o.multiple) for o in outputs],
            log=kept_log,
        )
        (folder / KEPT_RECORD).write_text(kept.model_dump_json(indent=1))
        where = f"the outputs are kept on local disk at {kept_outputs}; the next attempt of the step commits them without running the container again"
    except (OSError, ValueError) as keep_exc:
        log.error("step %s: could not keep the outputs at %s (%s); they stay at %s until the step's work folder is removed", step_id, folder, keep_exc, output_dir)
        where = f"the outputs could not be kept ({keep_exc})"
    message = f"the store {ctx.store.uri()} failed after the container succeeded: {exc}; {where}"
    log.error("step %s: %s", step_id, message)
    failed = record.model_copy(deep=True)
    failed.status, failed.outputs = "failed", []
    failed.failure = Failure(kind="infrastructure", message=message)
    return failed


def _commit_kept(ctx: RunContext, step_id: str, record: StepRecord, attempt_id: str, say: Callable[[str], None] | None) -> StepRecord | None:
    """Commit the outputs an earlier attempt of this step kept when the store failed (see
    :func:`_keep_for_retry`), if they were made from exactly what this attempt would run
    (same cache key) and still hold their recorded bytes; None when there are none (run it)."""
    for meta in sorted((keep_dir() / ctx.run_id / step_id).glob(f"*/{KEPT_RECORD}")):
        try:
            kept = KeptAttempt.model_validate_json(meta.read_bytes())
        except (OSError, ValueError) as exc:
            log.warning("step %s: ignoring unreadable %s: %s", step_id, meta, exc)
            continue
        if kept.record.cache_key != record.cache_key:
            log.info("step %s: the outputs kept from attempt %s were made from other inputs; not using them", step_id, kept.attempt_id)
            continue
        outputs = _intact_outputs(step_id, kept)
        if outputs is None:
            continue
        if say:
            say(f"committing the outputs of attempt {kept.attempt_id}, kept on local disk when the store failed; the container is not run again")
        done = record_from_result(record.model_copy(deep=True), kept.record)
        done.log_uri = kept.record.log_uri
        done.attempt_history = [  # honest about what ran: one container, two attempts
            {"attempt": kept.record.attempts, "attempt_id": kept.attempt_id, "status": "failed", "ran_container": True,
             **kept.record.model_dump(mode="json", include={"started_at", "finished_at"}),
             "failure": {"kind": "infrastructure", "message": "the container succeeded; the store failed, the outputs were kept on local disk"}},
            {"attempt": record.attempts, "attempt_id": attempt_id, "status": "succeeded", "ran_container": False, "committed_from": kept.attempt_id},
        ]
        try:
            if kept.log is not None:
                _store_log(ctx, step_id, attempt_id, done, kept.log, say)
            done.outputs = _commit_outputs(ctx, step_id, attempt_id, outputs, say)
        except InfrastructureError as exc:
            done.status, done.outputs = "failed", []
            done.failure = Failure(kind="infrastructure", message=f"the store {ctx.store.uri()} still fails: {exc}; the outputs stay kept at {kept.outputs_dir}")
            return done
        _discard(kept.outputs_dir)
        shutil.rmtree(meta.parent, ignore_errors=True)
        if ctx.cache is not None:
            ctx.cache.remember(ctx.run_id, done)
        return done
    return None


def _intact_outputs(step_id: str, kept: KeptAttempt) -> list[OutputRecord] | None:
    """The kept attempt's outputs, each at its kept path, if every one still hashes to its
    recorded sha256; None (logged) when one is gone or changed."""
    where = {k.name: k for k in kept.outputs}
    outputs = []
    for o in kept.record.outputs:
        k = where.get(o.name)
        try:
            intact = k is not None and sha256_path(kept.outputs_dir / k.rel) == o.sha256
        except OSError:
            intact = False
        if not intact:
            log.warning("step %s: output %s kept from attempt %s is gone or changed; running the step", step_id, o.name, kept.attempt_id)
            return None
        outputs.append(o.model_copy(update={"path": kept.outputs_dir / k.rel, "multiple": k.multiple}))
    return outputs


def _discard(output_dir: Path) -> None:
    if output_dir.exists():
        shutil.rmtree(output_dir, ignore_errors=True)


def _keep_failed(ctx: RunContext, step_id: str, attempt_id: str, output_dir: Path) -> None:
    """Whatever a failed attempt wrote is kept beside the step for a post-mortem, never lost."""
    if output_dir.exists() and any(output_dir.iterdir()):
        kept = output_dir.with_name(f"{output_dir.name}-kept")  # beside it: same filesystem, hardlinks
        try:
            # Only regular files and folders: no symlink to a host file, no FIFO, for whoever reads the store.
            copy_regular_tree(output_dir, kept)
            ctx.store.put_output(kept, f"{attempt_rel(ctx.run_id, step_id, attempt_id)}/failed-outputs", move=True)
        except Exception as exc:  # a post-mortem copy must not hide the step's own failure
            log.warning("could not keep the outputs of failed step %s: %s", step_id, exc)
        _discard(kept)
    _discard(output_dir)


_SCRATCH_SUFFIX = re.compile(r"^[a-z0-9_]{8}$")


def recover_run(store: Store, run_id: str, client: docker.DockerClient | None = None) -> list[str]:
    """Clean up after an earlier writer of ``run_id`` that died (call it holding the run's lease).

    Removes containers whose owning process is gone (by label, pid checked), the run's
    hidden ``.tmp-…`` folders in a local store, its work folders (``<store>/.work/<run_id>``)
    and the scratch folders a killed flow left in the system temp folder. Returns what it removed.
    """
    removed: list[str] = []
    if client is not None:
        from algodock.runtime.leftovers import sweep

        try:
            # This run's containers only, from the list call alone (no inspect of each container,
            # so an unrelated container the engine is slow to describe cannot stall the resume).
            removed += [f"container {c.id[:12]}" for c in sweep(client, run_id=run_id, dead_owners_only=True)]
        except Exception as exc:  # the engine may be down; the run reports that itself
            log.warning("run %s: could not remove leftover containers: %s", run_id, exc)
    run_dir = store.local_path(run_rel(run_id)) if store.is_local else None
    if run_dir is not None and run_dir.is_dir():
        for dirpath, dirnames, _ in os.walk(run_dir):
            for name in list(dirnames):
                if name.startswith((".tmp-", ".old-")):
                    shutil.rmtree(os.path.join(dirpath, name), ignore_errors=True)
                    removed.append(os.path.join(dirpath, name))
                    dirnames.remove(name)
    work = store.local_path(WORK_DIR, run_id) if store.is_local else None
    if work is not None and work.exists():
        shutil.rmtree(work, ignore_errors=True)
        removed.append(str(work))
    prefix = f"algodock-{run_id}-"  # the flow's scratch: tempfile.mkdtemp(prefix=prefix), 8 random characters
    tmp = Path(tempfile.gettempdir())
    for entry in tmp.glob(f"{glob_escape(prefix)}*"):
        if entry.is_dir() and _SCRATCH_SUFFIX.match(entry.name[len(prefix):]):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(str(entry))
    if removed:
        log.warning("run %s: removed what a crashed earlier writer left: %s", run_id, ", ".join(removed))
    return removed


def glob_escape(text: str) -> str:
    import glob

    return glob.escape(text)
