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

import base64
import io
import json
import logging
import os
import shutil
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from algodock.contract.manifest import ALGO_INPUT_PATH, ALGO_OUTPUT_NAME, INPUT_DIR, Manifest
from algodock.contract.params import resolve_parameters
from algodock.errors import DiskLimitFailure, ExitCodeFailure, InfrastructureError, InvalidInput, InvalidOutput, OomFailure, StepFailure, TimeoutFailure, shorten
from algodock.records import InputBinding, ResolvedImage, StepRecord
from algodock.runtime.engine import container_labels, docker_client
from algodock.runtime.engine_api import archive_response, raise_for_engine_status
from algodock.runtime.handoff import check_inputs, check_outputs, record_schema
from algodock.runtime.images import RegistryAuth, resolve_image
from algodock.runtime.leftovers import REMOVE_ATTEMPTS, remove_container, sweep_orphans_once
from algodock.runtime.limits import OutputLimits, OutputWatcher, measure
from algodock.runtime.logs import EMIT_LINES, LogPump
from algodock.runtime.outputs import collect_outputs, read_algo_output
from algodock.runtime.sandbox import RunAs, container_config, lookup_user, run_as
from algodock.runtime.staging import plan_inputs, prepare_work_dir
from algodock.runtime.usage import UsageSampler, fmt_bytes, output_totals
from algodock.runtime.volumes import VolumeWorkspace, read_only_mounts, staging_mode

if TYPE_CHECKING:
    import docker
    from docker.models.containers import Container

log = logging.getLogger("algodock.runtime.runner")

KILL_GRACE_SECONDS = 30
TAR_OVERHEAD_PER_ENTRY = 2048
WATCH_OUTPUT = True
"""Enforce output_mb/output_files while the container runs (bench/output_limit.py turns it off to measure its cost)."""


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
    except (NotFound, APIError, tarfile.TarError, KeyError, OSError):  # a symlink, a folder, junk: no named user then
        return ""


def _create(
    client: docker.DockerClient,
    manifest: Manifest,
    image: ResolvedImage,
    work: Path,
    output_dir: Path,
    labels: dict[str, str],
    step_id: str,
    mounts: list | None,
    names: list[str],
    descriptor_path: str = ALGO_INPUT_PATH,
) -> tuple[Container, RunAs]:
    """Create the container as a non-root uid, by number.

    A named ``USER`` is resolved with the image's own ``/etc/passwd`` (read from a container
    created as the unprivileged uid) and the step then runs as that ``uid:gid``: the engine
    never resolves a name itself, so what runs is exactly what owns the output folder, and a
    name whose uid is 0 (or that cannot be resolved) runs as the unprivileged uid.
    Every name is appended to ``names`` before the engine is asked, so a create that times
    out after the engine made the container still leaves something to remove.
    """
    who = run_as(image.user)

    def create(user: str) -> Container:
        name = f"algodock-{step_id}-{uuid.uuid4().hex[:10]}"
        names.append(name)
        cfg = container_config(
            manifest.container_parameters,
            image_id=image.id,
            user=user,
            work_dir=work,
            output_dir=output_dir,
            labels=labels,
            name=name,
            mounts=mounts,
            descriptor_path=descriptor_path,
        )
        return client.containers.create(**cfg)

    if who.uid is not None:
        return create(who.user), who
    unprivileged = run_as("0")
    container = create(unprivileged.user)
    named = lookup_user(_read_passwd(container), image.user)
    if named is None:  # unknown, or a name for uid 0
        return container, unprivileged
    remove_container(client, container.id, attempts=REMOVE_ATTEMPTS)
    return create(named.user), named


class _CappedArchive:
    """A container whose ``get_archive`` stream stops with ``disk_limit`` past ``max_bytes``.

    Named-volume staging reads the output back through the engine's archive API; this keeps
    an output over its limits from filling this host's disk while it is read back.
    """

    def __init__(self, container: Container, max_bytes: int) -> None:
        self._container = container
        self._max = max_bytes
        self._responses: list[Any] = []

    def close(self) -> None:
        """Close every archive response, read to its end or not (the engine then lets the container go)."""
        for res in self._responses:
            try:
                res.close()
            except Exception:  # already closed, or the engine is gone
                pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._container, name)

    def get_archive(self, path: str, chunk_size: int = 2 * 1024 * 1024, **_: Any) -> tuple[Any, Any]:
        # The SDK's own get_archive hides the response: a stream abandoned half-read keeps the
        # engine's archive (and so the container) busy, and removing the container then hangs.
        res = archive_response(self._container.client.api, self._container.id, path)
        self._responses.append(res)
        raise_for_engine_status(res)
        info = json.loads(base64.b64decode(res.headers.get("x-docker-container-path-stat") or "e30="))
        return self._capped(res, chunk_size), info

    def _capped(self, res: Any, chunk_size: int) -> Any:
        seen = 0
        try:
            for chunk in res.iter_content(chunk_size, False):
                seen += len(chunk)
                if seen > self._max:
                    raise DiskLimitFailure(
                        f"the output folder read back from the engine is larger than output_mb allows ({seen // 2**20} MiB "
                        "and more); raise container_parameters.output_mb or write less"
                    )
                yield chunk
        finally:
            res.close()


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
    on_exit: Callable[[], None] | None = None,
    descriptor_path: str = ALGO_INPUT_PATH,
    flow_run_id: str | None = None,
    pull_policy: str | None = None,
    registry_credentials: Iterable[RegistryAuth] = (),
) -> StepRecord:
    """Run ``manifest``'s container on ``inputs`` with ``parameters``; outputs land in ``output_dir``.

    Never raises (but ``KeyboardInterrupt``/``SystemExit``): every way a step ends is a
    ``failure`` of docs/contract.md §4 on the result, and the container is removed whatever happened.

    ``before_start`` is called once the container is created, just before it starts (a
    resource pool waits there, so creation overlaps other steps' runs); ``on_exit`` as soon
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
    names: list[str] = []  # every container name asked for, created or maybe created
    own_work = work_dir is None
    work: Path | None = None
    pump: LogPump | None = None
    watcher: OutputWatcher | None = None
    workspace: VolumeWorkspace | None = None
    mounts: list | None = None
    limits = OutputLimits.of(cp.output_mb, cp.output_files)
    reading_outputs = False
    sampler: UsageSampler | None = None
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

        labels = container_labels(run_id, step_id, attempt, flow_run_id=flow_run_id)
        if staging_mode(client) == "volume":  # the engine cannot see our folders: go through its archive API
            workspace = VolumeWorkspace(client, labels)
            mounts = read_only_mounts(workspace.work.name, workspace.output.name)
        container, who = _create(client, manifest, resolved, work, output_dir, labels, step_id, mounts, names, descriptor_path)
        result.container_id = container.id
        if workspace is not None:
            workspace.fill(resolved.id, work, who.uid, who.gid)  # type: ignore[arg-type]
        else:
            _give_to(output_dir, who)
        if before_start is not None:
            try:
                before_start()
            except Exception as exc:  # e.g. cancelled while waiting for resources
                raise InfrastructureError(f"the step did not start: {exc}") from exc
        stream = container.attach(stdout=True, stderr=True, stream=True, logs=False, demux=True)
        pump = LogPump(stream, on_line=on_log, log_path=log_path, emit_limit=emit_limit, emit_lines=emit_lines, log_location=log_location)
        result.started_at = _now()
        started = time.time()
        pump.start()
        _start(container, cp.resource_request.gpu)
        sampler = UsageSampler.start(client, container)
        if workspace is None and WATCH_OUTPUT:  # the output folder is on this host: watch it while the container runs
            watcher = OutputWatcher(output_dir, limits, kill=container.kill, host_pid=_host_pid(client, container.id), container_id=container.id).start()
        try:
            status, timed_out = _wait(container, cp.timeout_seconds)
        finally:
            if watcher is not None:
                watcher.stop()
        result.finished_at = _now()
        result.usage = sampler.stop()
        result.usage.wall_seconds = round((result.finished_at - result.started_at).total_seconds(), 3)
        if on_exit is not None:
            on_exit()
        pump.join(KILL_GRACE_SECONDS)
        if watcher is not None and watcher.failure is not None:
            raise watcher.failure
        if workspace is None and WATCH_OUTPUT:  # what it wrote in the watcher's last interval counts too
            limits.check(measure(output_dir, limits))
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
            stopper = _stopped_from_outside(client, container.id, started)
            if stopper:
                raise InfrastructureError(
                    f"the container was stopped from outside ({stopper}: the engine shutting down, or a docker stop/kill) "
                    f"and exited with code {result.exit_code}; it is worth running again",
                    exit_code=result.exit_code,
                )
            raise ExitCodeFailure(f"the container exited with code {result.exit_code}; last log lines:\n{tail}", exit_code=result.exit_code)

        if workspace is not None:
            budget = limits.max_bytes + (limits.max_entries + 1) * TAR_OVERHEAD_PER_ENTRY
            archive = _CappedArchive(container, budget)
            try:
                workspace.export_output(archive, output_dir, cp)  # type: ignore[arg-type]  # bounded by output_mb / output_files
            finally:
                archive.close()  # a read-back stopped at a limit must not keep the container busy
            limits.check(measure(output_dir, limits))
        result.usage.output_bytes, result.usage.output_files = output_totals(output_dir)
        reading_outputs = True  # from here an unreadable file is the algorithm's doing
        algo_output = read_algo_output(output_dir)
        if algo_output is not None:
            result.metrics, result.message = algo_output.metrics, algo_output.message
            if algo_output.status != "success":
                raise ExitCodeFailure(
                    f"the algorithm exited 0 but its {ALGO_OUTPUT_NAME} says status {algo_output.status!r}: {shorten(algo_output.message or '', 2000)}",
                    exit_code=0,
                )
        outputs = collect_outputs(manifest, output_dir, algo_output)
        check_outputs(manifest, outputs)  # invalid_output: the files stay for the post-mortem
        result.outputs = [record_schema(o) for o in outputs]
        result.status = "succeeded"
    except StepFailure as failure:
        result.failure = failure
    except Exception as exc:
        result.failure = _as_failure(exc, reading_outputs)
    finally:
        if sampler is not None and result.usage is None:  # the wait itself failed: stop sampling anyway
            try:
                result.usage = sampler.stop()
            except Exception as exc:  # accounting must never turn a step into a traceback
                log.warning("could not stop the usage sampler: %s", exc)
        _clean_up(client, container, names, workspace, pump, work if own_work else None)
        result.finished_at = result.finished_at or _now()
    if result.failure is not None:
        result.status = "failed"
        result.outputs = []
    return result


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


def _clean_up(
    client: docker.DockerClient | None,
    container: Container | None,
    names: list[str],
    workspace: VolumeWorkspace | None,
    pump: LogPump | None,
    own_work: Path | None,
) -> None:
    """Remove everything the step made; never raises (the engine may be gone)."""
    if client is not None:
        targets = [container.id] if container is not None else []
        targets += [n for n in names if container is None or n != container.name]
        for target in targets:
            remove_container(client, target, attempts=REMOVE_ATTEMPTS)
    if workspace is not None:
        workspace.remove()
    if pump is not None:
        pump.join(5)
    if own_work is not None:
        shutil.rmtree(own_work, ignore_errors=True)


def _host_pid(client: docker.DockerClient, container_id: str) -> Callable[[], int | None]:
    """Looks up the container's init pid (``State.Pid``) when called; None when the engine has none."""

    def resolve() -> int | None:
        pid = int((client.api.inspect_container(container_id).get("State") or {}).get("Pid") or 0)
        return pid if pid > 0 else None

    return resolve


def _stopped_from_outside(client: docker.DockerClient, container_id: str, since: float) -> str:
    """The engine's record of a ``kill``/``stop`` of the container that algodock did not send ('' when none).

    Asked only for a non-zero exit that was not our timeout or disk_limit kill: an engine
    shutting down stops its containers (SIGTERM, then SIGKILL), which is not the algorithm's doing.
    """
    events = client.api.events(
        since=f"{since - 1:.6f}", until=f"{time.time():.6f}", decode=True,
        filters={"type": "container", "container": container_id, "event": ["kill", "stop"]},
    )
    for event in events:
        signal = ((event.get("Actor") or {}).get("Attributes") or {}).get("signal")
        return f"{event.get('Action') or event.get('status')}{f' signal {signal}' if signal else ''}"
    return ""


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
    """Wait for the exit; past ``timeout`` kill the container itself. Returns (status, timed_out).

    Only the deadline passing is a timeout: an engine that drops the connection earlier
    (restarted, crashed) is :class:`InfrastructureError`.
    """
    from requests.exceptions import ConnectionError, ReadTimeout

    deadline = time.monotonic() + timeout
    try:
        return container.wait(timeout=timeout).get("StatusCode"), False
    except ReadTimeout:
        pass
    except ConnectionError as exc:
        if time.monotonic() < deadline:
            raise InfrastructureError(f"the Docker engine dropped the connection while container {container.name} ran: {exc}") from exc
    try:
        container.kill()
    except Exception as exc:  # already gone
        log.debug("kill after timeout: %s", exc)
    try:
        return container.wait(timeout=KILL_GRACE_SECONDS).get("StatusCode"), True
    except (ReadTimeout, ConnectionError) as exc:
        raise InfrastructureError(f"the engine did not stop container {container.name} after kill") from exc
