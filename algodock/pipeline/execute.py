"""One step of a pipeline run, end to end, against a store (no Prefect here).

:class:`RunContext` holds what the steps of one run share: the pipeline, the store, the
engine, the resource pool, the run's scratch folder and the external inputs fetched once.
:func:`execute_step` binds a step's inputs (upstream outputs or external inputs, fetched
from S3 when the store is remote, used in place when local), asks the cache, reserves
resources, runs the container through :func:`algodock.runtime.runner.run_step`, and commits the
outputs and the full container log to the store. On a local store the container writes
straight into the store's folder for the step (a hidden temporary name, renamed into place
once the step succeeded), so no output byte is copied.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from algodock.pipeline.capacity import Cancelled, ResourcePool
from algodock.runtime.engine import resolve_image
from algodock.errors import InfrastructureError, InvalidInput, StepFailure
from algodock.hashing import parquet_rows
from algodock.records import InputBinding, OutputRecord, ResolvedImage, StepRecord, record_from_result
from algodock.runtime.outputs import copy_regular_tree
from algodock.runtime.runner import run_step
from algodock.runtime.staging import hash_input
from algodock.store.backends import Store, fetch_input, local_path_of, log_rel, output_rel, step_rel

if TYPE_CHECKING:
    import docker

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
    cache: Any = None
    """An object with ``lookup(record, bindings, use=, manifest=) -> StepRecord | None`` and ``remember(run_id, record)`` (see algodock.lineage.cache)."""
    flow_run_id: str | None = None
    """The Prefect flow-run id, when there is one (the parent run of the steps' OpenLineage events)."""
    observers: list[StepObserver] = field(default_factory=list)
    """Told when each step starts and ends (see :class:`StepObserver`)."""
    _external: dict[str, InputBinding] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _images: dict[str, ResolvedImage] = field(default_factory=dict)

    def image(self, ref: str) -> ResolvedImage:
        """``ref`` resolved to its image id once per run: every step of the run uses the same image."""
        if ref not in self._images:
            self._images.setdefault(ref, resolve_image(self.client, ref))
        return self._images[ref]

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
    scratch = ctx.scratch / f"{step_id}-{attempt}-{uuid.uuid4().hex[:6]}"
    scratch.mkdir(parents=True, exist_ok=True)
    _announce(ctx, "step_started", record, upstream)
    try:
        record = _execute(ctx, step_id, upstream, record, scratch, attempt, on_log, around_container)
        return record
    except StepFailure as failure:
        record.status = "failed"
        record.failure = failure
        return record
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        _announce(ctx, "step_finished", record)


def _execute(
    ctx: RunContext,
    step_id: str,
    upstream: Mapping[str, StepRecord],
    record: StepRecord,
    scratch: Path,
    attempt: int,
    on_log: Callable[[str], None] | None,
    around_container: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
) -> StepRecord:
    manifest = ctx.pipeline.manifests[step_id]
    bindings = bind_inputs(ctx, step_id, upstream, scratch / "inputs")
    image = ctx.image(manifest.container_parameters.image)
    record.image_id, record.repo_digest = image.id, image.repo_digest

    if ctx.cache is not None:
        hit = ctx.cache.lookup(record, bindings, use=ctx.use_cache, manifest=manifest)
        if hit is not None:
            return hit

    step_dir = ctx.store.local_path(step_rel(ctx.run_id, step_id))
    if step_dir is not None:  # local store: the container writes into the store itself
        step_dir.mkdir(parents=True, exist_ok=True)
        output_dir = step_dir / f".tmp-outputs-{attempt}-{uuid.uuid4().hex[:6]}"
    else:
        output_dir = scratch / "outputs"
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
            emit_limit=EMIT_LIMIT,
            work_dir=scratch / "work",
            before_start=acquire,
            on_exit=release,
            flow_run_id=ctx.flow_run_id,
        )
    except Cancelled as exc:
        raise InfrastructureError(f"the run was cancelled before step {step_id!r} started") from exc
    finally:
        release()

    record_from_result(record, result)
    record.attempts = attempt
    if log_path.exists():
        record.log_uri = ctx.store.put_output(log_path, log_rel(ctx.run_id, step_id), move=True)
    if result.ok:
        record.outputs = [
            o.model_copy(update={"uri": ctx.store.put_output(o.path, output_rel(ctx.run_id, step_id, _filename(o)), move=True)})
            for o in result.outputs
        ]
        _discard(output_dir)
        if ctx.cache is not None:
            ctx.cache.remember(ctx.run_id, record)
    else:
        _keep_failed(ctx, step_id, attempt, output_dir)
    return record


def _discard(output_dir: Path) -> None:
    if output_dir.exists():
        shutil.rmtree(output_dir, ignore_errors=True)


def _keep_failed(ctx: RunContext, step_id: str, attempt: int, output_dir: Path) -> None:
    """Whatever a failed attempt wrote is kept beside the step for a post-mortem, never lost."""
    if output_dir.exists() and any(output_dir.iterdir()):
        kept = output_dir.with_name(f"{output_dir.name}-kept")  # beside it: same filesystem, hardlinks
        try:
            # Only regular files and folders: no symlink to a host file, no FIFO, for whoever reads the store.
            copy_regular_tree(output_dir, kept)
            ctx.store.put_output(kept, f"{step_rel(ctx.run_id, step_id)}/failed-attempt-{attempt}", move=True)
        except Exception as exc:  # a post-mortem copy must not hide the step's own failure
            log.warning("could not keep the outputs of failed step %s: %s", step_id, exc)
        _discard(kept)
    _discard(output_dir)
