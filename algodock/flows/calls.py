"""One algorithm call, from its submit to its task run's end: what it is given is checked when
the call is made (:func:`check_call`, before any container: every error names the algorithm,
the step and the field); in the task run its values are bound to the step's slots (tables
stored, upstream results read) and the step runs through the engine's
:func:`~algodock.pipeline.execute.execute_step` (:func:`execute_in_task`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect.futures import PrefectFuture
from prefect.states import Cancelled

from algodock.contract.manifest import Manifest
from algodock.contract.params import resolve_parameters
from algodock.errors import InvalidInput, StepFailure
from algodock.pipeline.attempts import ClaimedAttempt
from algodock.pipeline.composed import put_combined, put_table
from algodock.pipeline.execute import execute_step
from algodock.pipeline.spec import Ref
from algodock.records import StepRecord
from algodock.store.layout import local_path_of
from algodock.store.transfer import fetch_input
from algodock.flows.results import AlgorithmFailed, InvalidCall, OutputRef, StepResult
from algodock.flows.runs import OPEN_RUNS, RunHandle, RunTicket, Planned, guest_run


def _where(algorithm: str, step_id: str, field_name: str) -> str:
    return f"algorithm {algorithm}, step {step_id}: {field_name}"


class Deferred:
    """An algorithm call's inputs as its task receives them when they hold futures (not under a
    ``DaskTaskRunner``, whose futures only Dask can read): Prefect does not look inside (the
    futures are the call's ``wait_for``, so Prefect names the task run before it finds an upstream
    failed); the task's body reads the futures' results (:func:`_bind`)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def unwrap(value: Any) -> Any:
    from prefect.utilities.annotations import BaseAnnotation

    while isinstance(value, (BaseAnnotation, Deferred)):
        value = value.value if isinstance(value, Deferred) else value.unwrap()
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

    value = unwrap(value)
    if isinstance(value, (str, os.PathLike)):
        _check_location(value, where)
    elif isinstance(value, pa.Table):
        return
    elif isinstance(value, StepResult):
        _pick_output(list(value.outputs), slot, None, where, f"step {value.step_id}")
    elif isinstance(value, OutputRef):
        source = unwrap(value.source)
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
    inputs = unwrap(inputs)
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
        value = unwrap(value)
        if isinstance(value, (list, tuple)):
            if not slots[name].multiple:
                raise InvalidCall(f"{where}: a list is only for a slot with multiple: true; {name!r} takes one file or folder")
            if not value:
                raise InvalidCall(f"{where}: an empty list")
            for i, item in enumerate(value):
                _check_one(run, name, item, f"{where}[{i}]", sources, f"{name}[{i}]")
        else:
            _check_one(run, name, value, where, sources, name)
    parameters = unwrap(parameters)
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


def _bind(run: RunHandle, step_id: str, planned: Planned, inputs: Mapping[str, Any]) -> tuple[dict[str, Ref | str], dict[str, StepRecord], dict[str, dict[str, Any]]]:
    """Input values (futures read here when they were deferred) -> the step's bindings, its
    upstream records, and what each table came from."""
    import pyarrow as pa

    inputs = unwrap(inputs)

    bindings: dict[str, Ref | str] = {}
    upstream: dict[str, StepRecord] = {}
    tables: dict[str, dict[str, Any]] = {}
    scratch = run.composed.ctx.scratch / "tables"

    def one(slot: str, value: Any, where: str, key: str) -> Ref | str | Path:
        value = unwrap(value)
        name = None
        if isinstance(value, OutputRef):
            value, name = unwrap(value.source), value.name
        if isinstance(value, PrefectFuture):  # an upstream task's future, waited for (``wait_for``): it completed
            value = unwrap(value.result())
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
        value = unwrap(value)
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
    claimed: ClaimedAttempt | None = None,
) -> TaskStep:
    """The one way a step runs inside a Prefect task, an algorithm call's or a pipeline step's:
    the engine's :func:`~algodock.pipeline.execute.execute_step` with the task run's attempt,
    its logs sent to Prefect in batches, the Prefect concurrency slot held only while the
    container runs; the record (engine named) is handed to ``record(r)`` before anything is
    raised or returned. ``claimed``: the attempt a step on a Dask worker claimed in the store
    (its number, instead of the task run's count; its end written there, the step's
    ``attempt_history`` read back)."""
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
            attempt=claimed.n if claimed is not None else int(task_run.run_count or 1),
            on_log=on_log,
            task_run_id=this_run,
            around_container=(lambda: concurrency(concurrency_limit, occupy=1, strict=True)) if concurrency_limit else None,
        )
    done.engine = engine_identity_of(ctx.client)
    cancelled = done.status == "failed" and ctx.cancel.is_set()
    if cancelled:
        assert done.failure is not None
        done.failure.message = f"cancelled: the flow run was cancelled while the step ran ({done.failure.message})"
    if claimed is not None:
        done.attempt_history = claimed.end(done)
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
    began = datetime.now(timezone.utc).isoformat()
    run = OPEN_RUNS.get(run_id)
    if run is None and ticket is not None:  # the step runs in another process than its run (a Dask worker)
        run = guest_run(ticket)
        run.composed.image_options(step_id, ticket.pull_policy, ticket.credentials)
        if ticket.earlier is not None:  # what an earlier attempt of the run left (a resumed run id)
            run.composed.ctx.cache.remember_earlier(ticket.earlier)
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
    planned = run.planned(step_id) or Planned(algorithm, manifest)
    if run.composed.spec is not None and step_id in run.composed.spec.steps:  # its bindings are the spec's; its upstream steps' records are the run's
        bindings, upstream, tables = {}, run.composed.upstream_of(step_id), {}
    else:
        try:
            bindings, upstream, tables = _bind(run, step_id, planned, inputs)
        except StepFailure as exc:
            failed = StepRecord(id=step_id, status="failed", algorithm=manifest.name, failure=exc)
            ended(failed)
            raise AlgorithmFailed(exc.kind, step_id, exc.message, record=failed) from None
    run.composed.add_step(step_id, manifest, parameters, bindings)
    ledger.update(StepRecord(id=step_id, status="running", algorithm=manifest.name))

    def record(done: StepRecord) -> None:
        for inp in done.inputs:  # which Python task made each table
            made = tables.get(inp.name)
            if made is not None:
                inp.produced_by_task_run = made["task_run_id"]
        ended(done)

    step = execute_in_task(ctx, step_id, upstream, record=record, concurrency_limit=run.concurrency_limit, claimed=_claim_on_worker(run, step_id, began))
    done = step.record
    if done.status == "failed":
        assert done.failure is not None
        raise AlgorithmFailed("cancelled" if step.cancelled else done.failure.kind, step_id, done.failure.message, done.log_tail, record=done)
    if step.reused:  # Prefect emits no asset event for a Cached state, as for its own cache hits
        return cached_state(done, run_id, data=StepResult.of(done, run_id, status="cached"))
    add_output_metadata(done, ctx)
    return StepResult.of(done, run_id)


def _claim_on_worker(run: RunHandle, step_id: str, began: str) -> ClaimedAttempt | None:
    """On a Dask worker, the attempt this run of the step claims in the store (see
    :mod:`algodock.pipeline.attempts`); None in the run's own process."""
    if not run.composed.guest:
        return None
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):  # not in a Dask worker's task
        return None
    engine = engine_identity_of(run.composed.ctx.client) or {}
    return ClaimedAttempt.claim(run.composed.store, run.run_id, step_id, engine, worker.address, began, str(worker.get_current_task()))
