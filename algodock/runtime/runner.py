"""Run one algorithm step in its sandbox, exactly as docs/contract.md says.

:func:`run_step` never raises a :class:`~algodock.errors.StepFailure`: every failure,
including bad parameters or inputs (found before any container starts), comes back as the
``failure`` of a :class:`~algodock.records.StepRecord`. The container is always removed.

>>> from algodock.contract.manifest import load_manifest                    # doctest: +SKIP
>>> result = run_step(load_manifest("examples/device-visits/manifest.json"),
...                   inputs={"pings": "data/pings"}, output_dir="out")  # doctest: +SKIP
>>> result.status, [o.name for o in result.outputs]              # doctest: +SKIP
('succeeded', ['visits'])
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from algodock.contract.manifest import ALGO_INPUT_PATH, INPUT_DIR, Manifest
from algodock.contract.params import resolve_parameters
from algodock.errors import InfrastructureError, InvalidInput, InvalidOutput, StepFailure
from algodock.records import InputBinding, ResolvedImage, StepRecord
from algodock.runtime.engine import container_labels, docker_client
from algodock.runtime.handoff import check_inputs
from algodock.runtime.images import RegistryAuth, resolve_image
from algodock.runtime.leftovers import sweep_orphans_once
from algodock.runtime.lifecycle import StepContainer, _now
from algodock.runtime.logs import EMIT_LINES
from algodock.runtime.staging import plan_inputs, prepare_work_dir

if TYPE_CHECKING:
    import docker

log = logging.getLogger("algodock.runtime.runner")

WATCH_OUTPUT = True
"""Enforce output_mb/output_files while the container runs (bench/output_limit.py turns it off to measure its cost)."""


def as_bindings(inputs: Mapping[str, InputBinding | str | os.PathLike]) -> dict[str, InputBinding]:
    """Accept plain paths for convenience: ``{"pings": "data/"}``."""
    return {
        name: b if isinstance(b, InputBinding) else InputBinding(slot=name, path=Path(b))
        for name, b in inputs.items()
    }


def prepare_output_dir(output_dir: Path) -> None:
    """Create the output folder; it must be empty so nothing stale passes for a result."""
    output_dir.mkdir(parents=True, exist_ok=True)
    if any(output_dir.iterdir()):
        raise InvalidInput(f"output folder {output_dir} is not empty; give an empty or new folder")


def run_step(
    manifest: Manifest,
    *,
    inputs: Mapping[str, InputBinding | str | os.PathLike] | None = None,
    parameters: Mapping[str, Any] | None = None,
    output_dir: str | os.PathLike,
    run_id: str | None = None,
    step_id: str | None = None,
    attempt: int = 1,
    client: docker.DockerClient | None = None,
    image: ResolvedImage | None = None,
    on_log: Callable[[str], None] | None = None,
    log_path: Path | None = None,
    emit_limit: int = 2 * 1024 * 1024,
    emit_lines: int = EMIT_LINES,
    log_location: str | None = None,
    work_dir: Path | None = None,
    parameters_resolved: bool = False,
    before_start: Callable[[], None] | None = None,
    on_start: Callable[[], None] | None = None,
    on_exit: Callable[[], None] | None = None,
    descriptor_path: str = ALGO_INPUT_PATH,
    flow_run_id: str | None = None,
    pull_policy: str | None = None,
    registry_credentials: Iterable[RegistryAuth] = (),
    ahead: StepContainer | None = None,
    remove_later: Callable[[Callable[[], None]], None] | None = None,
) -> StepRecord:
    """Run ``manifest``'s container on ``inputs`` with ``parameters``; outputs land in ``output_dir``.

    Never raises (but ``KeyboardInterrupt``/``SystemExit``): every way a step ends is a
    ``failure`` of docs/contract.md §4 on the result, and the container is removed whatever happened.

    ``before_start`` is called once the container is created, just before it starts (a
    resource pool waits there, so creation overlaps other steps' runs); ``on_start`` once it
    runs (the engine then creates the containers of the steps that may start next); ``on_exit`` as soon
    as it has exited, before the clean-up (the pool gets its resources back at once).
    ``on_log`` gets at most ``emit_lines`` lines (and ``emit_limit`` bytes), then one line
    naming ``log_location`` (default ``log_path``), where the whole log is kept.
    ``descriptor_path`` is where the container sees ``algo_input.json`` (and what
    ``ALGORITHM_INPUT_PATH`` says); ``algodock check-image`` moves it to catch algorithms
    that hard-code the default.
    ``flow_run_id``: the Prefect flow run the step belongs to, stamped as a container label so
    that cancelling the flow run finds its containers.
    ``pull_policy`` and ``registry_credentials``: how the image is resolved when ``image`` is
    not given (see :func:`algodock.runtime.images.resolve_image`); the pull's progress goes to ``on_log``.
    ``ahead``: a container created ahead for this attempt (:mod:`algodock.pipeline.ahead`), now
    owned by this call: used when it is exactly the container this call would create, else
    removed; either way it never outlives the step.
    ``remove_later``: takes the removal of the container once it has exited (a run's removal
    thread, which the run waits for at its end), so the step does not wait for it; a container
    that may still run is removed before this returns, as is every container without it.
    """
    cp = manifest.container_parameters
    step_id = step_id or manifest.name
    run_id = run_id or f"adhoc-{uuid.uuid4().hex[:12]}"
    output_dir = Path(output_dir).absolute()
    result = StepRecord(
        id=step_id,
        status="failed",
        image=cp.image,
        command=list(cp.command),
        resource_request=cp.resource_request.model_dump(),
        parameters=dict(parameters or {}),
    )
    box: StepContainer | None = None
    work: Path | None = None
    try:
        if not parameters_resolved:
            result.parameters = resolve_parameters(manifest.parameters, parameters or {})
        bindings = as_bindings(inputs or {})
        plan_inputs(manifest, bindings, Path(INPUT_DIR))  # a check only: bad inputs fail before the engine is asked anything
        check_inputs(manifest, bindings)  # parquet inputs against the slots' schemas, footers only: no container for bad data
        client = client or docker_client()
        sweep_orphans_once(client)
        say = (lambda line: on_log(f"[algodock] {line}")) if on_log else None
        resolved = image or resolve_image(client, cp.image, policy=pull_policy, credentials=registry_credentials, on_log=say)
        result.image_id, result.repo_digest = resolved.id, resolved.repo_digest
        prepare_output_dir(output_dir)
        # Beside the output folder, so inputs on that filesystem hardlink instead of copying.
        work = work_dir or Path(tempfile.mkdtemp(prefix=f".algodock-{step_id}-", dir=output_dir.parent))
        result.inputs = prepare_work_dir(work, manifest, bindings, result.parameters)

        box = StepContainer(
            client, manifest, resolved, labels=container_labels(run_id, step_id, attempt, flow_run_id=flow_run_id), step_id=step_id,
            work=work, output_dir=output_dir, descriptor_path=descriptor_path, watch_output=WATCH_OUTPUT,
        )
        if ahead is not None and box.adopt(ahead):
            result.container_id = box.container.id  # type: ignore[union-attr]
        else:
            ahead = _discarded(ahead)
            box.prepare()
            result.container_id = box.create()
        ahead = None
        box.stage()
        if before_start is not None:
            try:
                before_start()
            except Exception as exc:  # e.g. cancelled while waiting for resources
                raise InfrastructureError(f"the step did not start: {exc}") from exc
        box.start(result, on_log=on_log, log_path=log_path, emit_limit=emit_limit, emit_lines=emit_lines, log_location=log_location)
        if on_start is not None:
            on_start()
        box.wait(result)
        if on_exit is not None:
            on_exit()
        box.check_exit(result)
        box.collect(result)
        result.status = "succeeded"
    except StepFailure as failure:
        result.failure = failure
    except Exception as exc:
        result.failure = _as_failure(exc, box is not None and box.reading_outputs)
    finally:
        if ahead is not None:  # the step ended before its container was made
            ahead.discard()
        if box is not None:
            box.remove(result, later=remove_later)
        if work is not None and work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
        result.finished_at = result.finished_at or _now()
    if result.failure is not None:
        result.status = "failed"
        result.outputs = []
    return result


def _discarded(ahead: StepContainer | None) -> None:
    """Remove a created-ahead container this step will not use; always None."""
    if ahead is not None:
        ahead.discard()
    return None


def _as_failure(exc: Exception, reading_outputs: bool) -> StepFailure:
    """The failure kind of an exception that is not a StepFailure (docs/contract.md §4)."""
    from docker.errors import DockerException
    from requests.exceptions import RequestException

    if isinstance(exc, (DockerException, RequestException)):  # RequestException is an OSError: test it first
        return InfrastructureError(f"the Docker engine failed: {type(exc).__name__}: {exc}")
    if isinstance(exc, OSError) and reading_outputs:
        where = f" ({exc.filename})" if exc.filename else ""
        return InvalidOutput(f"an output cannot be read{where}: {exc.strerror or exc}; the algorithm must leave its outputs readable")
    if isinstance(exc, OSError):
        return InfrastructureError(f"{type(exc).__name__}: {exc}")
    log.error("unexpected error in a step: %s: %s", type(exc).__name__, exc, exc_info=log.isEnabledFor(logging.DEBUG))
    return InfrastructureError(f"unexpected error (a bug in algodock, please report it): {type(exc).__name__}: {exc}")
