"""Run one algorithm step in its sandbox, exactly as CONTRACT.md says.

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

import io
import logging
import os
import shutil
import tarfile
import tempfile
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from algodock.contract.manifest import ALGO_INPUT_PATH, ALGO_OUTPUT_NAME, INPUT_DIR, Manifest
from algodock.runtime.engine import container_labels, docker_client, resolve_image, sweep_orphans
from algodock.errors import ExitCodeFailure, InfrastructureError, InvalidInput, OomFailure, StepFailure, TimeoutFailure
from algodock.runtime.logs import LogPump
from algodock.runtime.outputs import collect_outputs, read_algo_output
from algodock.contract.params import resolve_parameters
from algodock.records import InputBinding, ResolvedImage, StepRecord
from algodock.runtime.sandbox import RunAs, container_config, lookup_user, run_as
from algodock.runtime.staging import plan_inputs, prepare_work_dir
from algodock.runtime.usage import UsageSampler, fmt_bytes, output_totals
from algodock.runtime.volumes import VolumeWorkspace, read_only_mounts, staging_mode

if TYPE_CHECKING:
    import docker
    from docker.models.containers import Container

log = logging.getLogger("algodock.runtime.runner")

KILL_GRACE_SECONDS = 30
_swept: set[int] = set()


def _now() -> datetime:
    return datetime.now(timezone.utc)


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


def _give_to(output_dir: Path, who: RunAs) -> None:
    """The container's uid must own its output folder."""
    try:
        os.chown(output_dir, who.uid, who.gid)  # type: ignore[arg-type]
        os.chmod(output_dir, 0o755)
    except PermissionError:
        # Not root: the next best thing is a folder anyone may write (the container is sandboxed).
        os.chmod(output_dir, 0o777)
        log.warning("cannot chown %s to uid %s (not root); made it world-writable instead", output_dir, who.uid)


def _read_passwd(container: Container) -> str:
    from docker.errors import APIError, NotFound

    try:
        stream, _ = container.get_archive("/etc/passwd")
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
            member = tar.next()
            fh = tar.extractfile(member) if member else None
            return fh.read(1024 * 1024).decode("utf-8", "replace") if fh else ""
    except (NotFound, APIError, tarfile.TarError):
        return ""


def _create(client: docker.DockerClient, manifest: Manifest, image: ResolvedImage, work: Path, output_dir: Path, labels: dict[str, str], step_id: str, mounts: list | None = None, descriptor_path: str = ALGO_INPUT_PATH) -> tuple[Container, RunAs]:
    """Create the container as a non-root user, resolving a named USER with the image's passwd."""
    who = run_as(image.user)

    def create(user: str) -> Container:
        cfg = container_config(
            manifest.container_parameters,
            image_id=image.id,
            user=user,
            work_dir=work,
            output_dir=output_dir,
            labels=labels,
            name=f"algodock-{step_id}-{uuid.uuid4().hex[:10]}",
            mounts=mounts,
            descriptor_path=descriptor_path,
        )
        return client.containers.create(**cfg)

    container = create(who.user)
    if who.uid is None:
        named = lookup_user(_read_passwd(container), image.user)
        if named is None:  # unknown, or a name for uid 0: run as the unprivileged uid instead
            container.remove(force=True)
            who = run_as("0")
            container = create(who.user)
        else:
            who = named
    return container, who


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
    work_dir: Path | None = None,
    parameters_resolved: bool = False,
    before_start: Callable[[], None] | None = None,
    on_exit: Callable[[], None] | None = None,
    descriptor_path: str = ALGO_INPUT_PATH,
    flow_run_id: str | None = None,
) -> StepRecord:
    """Run ``manifest``'s container on ``inputs`` with ``parameters``; outputs land in ``output_dir``.

    ``before_start`` is called once the container is created, just before it starts (a
    resource pool waits there, so creation overlaps other steps' runs); ``on_exit`` as soon
    as it has exited, before the clean-up (the pool gets its resources back at once).
    ``descriptor_path`` is where the container sees ``algo_input.json`` (and what
    ``ALGORITHM_INPUT_PATH`` says); ``algodock check-image`` moves it to catch algorithms
    that hard-code the default.
    ``flow_run_id``: the Prefect flow run the step belongs to, stamped as a container label so
    that cancelling the flow run finds its containers.
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
    container: Container | None = None
    own_work = work_dir is None
    work: Path | None = None
    pump: LogPump | None = None
    workspace: VolumeWorkspace | None = None
    mounts: list | None = None
    sampler: UsageSampler | None = None
    try:
        if not parameters_resolved:
            result.parameters = resolve_parameters(manifest.parameters, parameters or {})
        bindings = as_bindings(inputs or {})
        plan_inputs(manifest, bindings, Path(INPUT_DIR))  # a check only: bad inputs fail before the engine is asked anything
        client = client or docker_client()
        if id(client) not in _swept:
            _swept.add(id(client))
            sweep_orphans(client)
        resolved = image or resolve_image(client, cp.image)
        result.image_id, result.repo_digest = resolved.id, resolved.repo_digest
        prepare_output_dir(output_dir)
        # Beside the output folder, so inputs on that filesystem hardlink instead of copying.
        work = work_dir or Path(tempfile.mkdtemp(prefix=f".algodock-{step_id}-", dir=output_dir.parent))
        result.inputs = prepare_work_dir(work, manifest, bindings, result.parameters)

        labels = container_labels(run_id, step_id, attempt, flow_run_id=flow_run_id)
        if staging_mode(client) == "volume":  # the engine cannot see our folders: go through its archive API
            workspace = VolumeWorkspace(client, labels)
            mounts = read_only_mounts(workspace.work.name, workspace.output.name)
        container, who = _create(client, manifest, resolved, work, output_dir, labels, step_id, mounts, descriptor_path)
        result.container_id = container.id
        if workspace is not None:
            workspace.fill(resolved.id, work, who.uid, who.gid)  # type: ignore[arg-type]
        else:
            _give_to(output_dir, who)
        if before_start is not None:
            before_start()
        stream = container.attach(stdout=True, stderr=True, stream=True, logs=False, demux=True)
        pump = LogPump(stream, on_line=on_log, log_path=log_path, emit_limit=emit_limit)
        result.started_at = _now()
        pump.start()
        _start(container, cp.resource_request.gpu)
        sampler = UsageSampler.start(client, container)
        status, timed_out = _wait(container, cp.timeout_seconds)
        result.finished_at = _now()
        result.usage = sampler.stop()
        result.usage.wall_seconds = round((result.finished_at - result.started_at).total_seconds(), 3)
        if on_exit is not None:
            on_exit()
        pump.join(KILL_GRACE_SECONDS)
        container.reload()
        state = container.attrs.get("State", {})
        result.exit_code = state.get("ExitCode", status)
        result.log_tail = pump.tail()
        tail = "\n".join(result.log_tail)
        missed = [line for line in pump.stderr_tail() if line not in result.log_tail]
        if missed:  # stderr's last words arrived before the end of stdout: say them anyway
            tail += "\nlast lines on stderr:\n" + "\n".join(missed)
        if timed_out:
            raise TimeoutFailure(f"the container ran past timeout_seconds={cp.timeout_seconds:g} and was killed", exit_code=result.exit_code)
        if state.get("OOMKilled"):
            peak = result.usage.peak_memory_bytes
            reached = f" (peak {fmt_bytes(peak)} of {fmt_bytes(cp.resource_request.memory_bytes)})" if peak else ""
            raise OomFailure(
                f"the container was killed for exceeding its memory limit of {cp.resource_request.memory_gb:g} GB{reached} "
                "(raise resource_request.memory_gb, or use less memory)",
                exit_code=result.exit_code,
            )
        if result.exit_code != 0:
            raise ExitCodeFailure(f"the container exited with code {result.exit_code}; last log lines:\n{tail}", exit_code=result.exit_code)

        if workspace is not None:
            workspace.export_output(container, output_dir, cp)  # bounded by output_mb / output_files
        result.usage.output_bytes, result.usage.output_files = output_totals(output_dir)
        algo_output = read_algo_output(output_dir)
        if algo_output is not None:
            result.metrics, result.message = algo_output.metrics, algo_output.message
            if algo_output.status != "success":
                raise ExitCodeFailure(
                    f"the algorithm exited 0 but its {ALGO_OUTPUT_NAME} says status {algo_output.status!r}: {algo_output.message or ''}",
                    exit_code=0,
                )
        result.outputs = collect_outputs(manifest, output_dir, algo_output)
        result.status = "succeeded"
    except StepFailure as failure:
        result.failure = failure
    except Exception as exc:
        from docker.errors import DockerException
        from requests.exceptions import RequestException

        if not isinstance(exc, (DockerException, RequestException, OSError)):
            raise
        result.failure = InfrastructureError(f"{type(exc).__name__}: {exc}")
    finally:
        if sampler is not None and result.usage is None:  # the wait itself failed: stop sampling anyway
            result.usage = sampler.stop()
        if container is not None:
            _remove(container)
        if workspace is not None:
            workspace.remove()
        if pump is not None:
            pump.join(5)
        if own_work and work is not None:
            shutil.rmtree(work, ignore_errors=True)
        result.finished_at = result.finished_at or _now()
    return result


def _start(container: Container, gpus: int) -> None:
    from docker.errors import APIError

    try:
        container.start()
    except APIError as exc:
        if gpus and "device driver" in str(exc):
            raise InfrastructureError(
                f"the manifest asks for {gpus} GPU(s) but this Docker engine cannot provide them "
                f"(install the NVIDIA Container Toolkit, or set resource_request.gpu to 0): {exc.explanation or exc}"
            ) from exc
        raise


def _wait(container: Container, timeout: float) -> tuple[int | None, bool]:
    """Wait for the exit; past ``timeout`` kill the container itself. Returns (status, timed_out)."""
    from requests.exceptions import ConnectionError, ReadTimeout

    try:
        return container.wait(timeout=timeout).get("StatusCode"), False
    except (ReadTimeout, ConnectionError):
        pass
    try:
        container.kill()
    except Exception as exc:  # already gone
        log.debug("kill after timeout: %s", exc)
    try:
        return container.wait(timeout=KILL_GRACE_SECONDS).get("StatusCode"), True
    except (ReadTimeout, ConnectionError) as exc:
        raise InfrastructureError(f"the engine did not stop container {container.name} after kill") from exc


def _remove(container: Container) -> None:
    from docker.errors import APIError, NotFound

    try:
        container.remove(force=True, v=True)
    except NotFound:
        pass
    except APIError as exc:
        log.warning("could not remove container %s: %s", container.name, exc)
