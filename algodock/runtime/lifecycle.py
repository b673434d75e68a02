"""The life of one step attempt's container, in explicit phases.

:class:`StepContainer` holds everything one attempt's container needs and leaves behind, and
goes through its phases in order: :meth:`~StepContainer.prepare` the sandbox configuration
(labels, staging mounts), :meth:`~StepContainer.create`, :meth:`~StepContainer.stage` the work
folder into it, :meth:`~StepContainer.attach` its output stream and :meth:`~StepContainer.start`
it (log pump, usage sampler, output watcher),
:meth:`~StepContainer.wait` with its limits, :meth:`~StepContainer.check_exit` (how it ended:
a failure kind or a clean exit), :meth:`~StepContainer.collect` its outputs, and
:meth:`~StepContainer.remove` it, whatever happened before. Any phase may raise a
:class:`~algodock.errors.StepFailure` (or an engine error);
:func:`algodock.runtime.runner.run_step` composes the phases and turns every end into a
failure kind of docs/contract.md §4.

A container created ahead (:mod:`algodock.pipeline.ahead`: prepared, created and attached while
the step's upstream steps run) is taken over with :meth:`~StepContainer.adopt` only when its
configuration is exactly what :meth:`~StepContainer.create` would make now; one never used goes
with :meth:`~StepContainer.discard`.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import os
import tarfile
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from algodock.contract.manifest import ALGO_INPUT_PATH, ALGO_OUTPUT_NAME, Manifest
from algodock.errors import DiskLimitFailure, ExitCodeFailure, InfrastructureError, OomFailure, TimeoutFailure, shorten
from algodock.records import ResolvedImage, StepRecord
from algodock.runtime.engine_api import archive_response, raise_for_engine_status
from algodock.runtime.handoff import check_outputs, record_schema
from algodock.runtime.leftovers import REMOVE_ATTEMPTS, remove_container
from algodock.runtime.limits import OutputLimits, OutputWatcher, measure
from algodock.runtime.logs import EMIT_LINES, LogPump
from algodock.runtime.outputs import collect_outputs, read_algo_output
from algodock.runtime.sandbox import RunAs, container_config, create_container_args, lookup_user, run_as
from algodock.runtime.usage import UsageSampler, fmt_bytes, output_totals
from algodock.runtime.volumes import VolumeWorkspace, read_only_mounts, staging_mode

if TYPE_CHECKING:
    import docker
    from docker.models.containers import Container

log = logging.getLogger("algodock.runtime.lifecycle")

KILL_GRACE_SECONDS = 30
TAR_OVERHEAD_PER_ENTRY = 2048


def _now() -> datetime:
    return datetime.now(timezone.utc)


class StepContainer:
    """One step attempt's container, from its sandbox configuration to its removal.

    ``work`` is the prepared work folder (``algo_input.json`` and ``input/``), ``output_dir``
    the empty folder the outputs land in; ``watch_output`` enforces ``output_mb`` /
    ``output_files`` while the container runs (when the output folder is on this host).
    """

    def __init__(
        self,
        client: docker.DockerClient,
        manifest: Manifest,
        image: ResolvedImage,
        *,
        labels: dict[str, str],
        step_id: str,
        work: Path,
        output_dir: Path,
        descriptor_path: str = ALGO_INPUT_PATH,
        watch_output: bool = True,
    ) -> None:
        self.client = client
        self.manifest = manifest
        self.image = image
        self.labels = labels
        self.step_id = step_id
        self.work = work
        self.output_dir = output_dir
        self.descriptor_path = descriptor_path
        self.watch_output = watch_output
        cp = manifest.container_parameters
        self.limits = OutputLimits.of(cp.output_mb, cp.output_files)
        self.container: Container | None = None
        self.config: dict[str, Any] | None = None  # what the container was created with (its name aside)
        self.stream: Any = None  # the attach stream, opened before the start
        self.names: list[str] = []  # every container name asked for, created or maybe created
        self.who: RunAs | None = None
        self.workspace: VolumeWorkspace | None = None
        self.mounts: list | None = None
        self.pump: LogPump | None = None
        self.watcher: OutputWatcher | None = None
        self.sampler: UsageSampler | None = None
        self.started = 0.0  # wall clock at the start, for the engine's events
        self.status: int | None = None
        self.timed_out = False
        self.reading_outputs = False  # from the outputs' read on, an unreadable file is the algorithm's doing

    # ---------------------------------------------------------------- phases

    def prepare(self) -> None:
        """The sandbox configuration: named staging volumes when the engine cannot see this host's folders."""
        if staging_mode(self.client) == "volume":  # the engine cannot see our folders: go through its archive API
            self.workspace = VolumeWorkspace(self.client, self.labels)
            self.mounts = read_only_mounts(self.workspace.work.name, self.workspace.output.name)

    def create(self) -> str:
        """Create the container (as a non-root uid, see :func:`_create`); returns its id."""
        self.container, self.who, self.config = _create(
            self.client, self.manifest, self.image, self.work, self.output_dir, self.labels, self.step_id, self.mounts, self.names, self.descriptor_path
        )
        return self.container.id

    def planned_config(self, user: str) -> dict[str, Any]:
        """The configuration :meth:`create` gives the container when it runs as ``user`` (its name aside)."""
        return _without_name(container_config(
            self.manifest.container_parameters, image_id=self.image.id, user=user, work_dir=self.work, output_dir=self.output_dir,
            labels=self.labels, mounts=self.mounts, descriptor_path=self.descriptor_path,
        ))

    def adopt(self, ahead: StepContainer) -> bool:
        """Take over ``ahead``'s container (created ahead, not started) if it is exactly the one
        :meth:`create` would make now: same image id, command, environment, limits, labels,
        mounts and user. False leaves ``ahead`` to its owner (who removes it)."""
        if ahead.container is None or ahead.who is None or ahead.config is None or ahead.workspace is not None or self.workspace is not None:
            return False
        if ahead.config != self.planned_config(ahead.who.user):
            return False
        self.container, self.who, self.config, self.names, self.stream = ahead.container, ahead.who, ahead.config, ahead.names, ahead.stream
        return True

    def attach(self) -> None:
        """Open the container's output stream (before the start: no line is missed), demultiplexed.

        The SDK's ``attach`` first inspects the container to learn whether it has a TTY; every
        container algodock creates has none, so the stream is opened with the public
        ``attach_socket`` and read frame by frame as the SDK reads it (:class:`_OutputStream`):
        one engine call a step fewer.
        """
        self.stream = _OutputStream(self.client.api.attach_socket(self._created().id, params={"stdout": 1, "stderr": 1, "stream": 1, "logs": 0}))

    def stage(self) -> None:
        """Put the work folder where the container sees it, and give it its output folder."""
        assert self.who is not None, "create before stage"
        if self.workspace is not None:
            self.workspace.fill(self.image.id, self.work, self.who.uid, self.who.gid)  # type: ignore[arg-type]
        else:
            _give_to(self.output_dir, self.who)

    def start(
        self,
        result: StepRecord,
        *,
        on_log: Callable[[str], None] | None = None,
        log_path: Path | None = None,
        emit_limit: int = 2 * 1024 * 1024,
        emit_lines: int = EMIT_LINES,
        log_location: str | None = None,
    ) -> None:
        """Attach the log pump, start the container, then its usage sampler and output watcher."""
        container = self._created()
        if self.stream is None:
            self.attach()
        self.pump = LogPump(self.stream, on_line=on_log, log_path=log_path, emit_limit=emit_limit, emit_lines=emit_lines, log_location=log_location)
        result.started_at = _now()
        self.started = time.time()
        self.pump.start()
        if self.workspace is None and self.watch_output:  # on this host: watched from before the start, which a loaded engine confirms only after 100s of MiB were written
            self.watcher = OutputWatcher(
                self.output_dir, self.limits, kill=container.kill, host_pid=_host_pid(self.client, container.id), container_id=container.id
            ).start()
        _start(container, self.manifest.container_parameters.resource_request.gpu)
        self.sampler = UsageSampler.start(self.client, container)

    def wait(self, result: StepRecord) -> None:
        """Wait for the exit (killing it past ``timeout_seconds``); record the end and the usage."""
        assert self.sampler is not None, "start before wait"
        try:
            self.status, self.timed_out = _wait(self._created(), self.manifest.container_parameters.timeout_seconds)
        finally:
            if self.watcher is not None:
                self.watcher.stop()
        result.finished_at = _now()
        result.usage = self.sampler.stop()
        result.usage.wall_seconds = round((result.finished_at - result.started_at).total_seconds(), 3)  # type: ignore[operator]

    def check_exit(self, result: StepRecord) -> None:
        """How the container ended: its exit code and log tail on ``result``; a failure kind raised unless it exited cleanly."""
        assert self.pump is not None, "start before check_exit"
        cp = self.manifest.container_parameters
        container = self._created()
        self.pump.join(KILL_GRACE_SECONDS)
        if self.watcher is not None and self.watcher.failure is not None:
            raise self.watcher.failure
        if self.workspace is None and self.watch_output:  # what it wrote in the watcher's last interval counts too
            self.limits.check(measure(self.output_dir, self.limits))
        container.reload()
        state = container.attrs.get("State", {})
        result.exit_code = state.get("ExitCode", self.status)
        result.log_tail = self.pump.tail()
        tail = "\n".join(result.log_tail)
        missed = [line for line in self.pump.stderr_tail() if line not in result.log_tail]
        if missed:  # stderr's last words arrived before the end of stdout: say them anyway
            tail += "\nlast lines on stderr:\n" + "\n".join(missed)
        if self.timed_out:
            raise TimeoutFailure(f"the container ran past timeout_seconds={cp.timeout_seconds:g} and was killed", exit_code=result.exit_code)
        if state.get("OOMKilled"):
            peak = result.usage.peak_memory_bytes if result.usage is not None else None
            reached = f" (peak {fmt_bytes(peak)} of {fmt_bytes(cp.resource_request.memory_bytes)})" if peak else ""
            raise OomFailure(
                f"the container was killed for exceeding its memory limit of {cp.resource_request.memory_gb:g} GB{reached} "
                "(raise resource_request.memory_gb, or use less memory)",
                exit_code=result.exit_code,
            )
        if result.exit_code != 0:
            stopper = _stopped_from_outside(self.client, container.id, self.started)
            if stopper:
                raise InfrastructureError(
                    f"the container was stopped from outside ({stopper}: the engine shutting down, or a docker stop/kill) "
                    f"and exited with code {result.exit_code}; it is worth running again",
                    exit_code=result.exit_code,
                )
            raise ExitCodeFailure(f"the container exited with code {result.exit_code}; last log lines:\n{tail}", exit_code=result.exit_code)

    def collect(self, result: StepRecord) -> None:
        """Read the outputs back (from the engine in volume mode), check them against the manifest, record them."""
        cp = self.manifest.container_parameters
        if self.workspace is not None:
            budget = self.limits.max_bytes + (self.limits.max_entries + 1) * TAR_OVERHEAD_PER_ENTRY
            archive = _CappedArchive(self._created(), budget)
            try:
                self.workspace.export_output(archive, self.output_dir, cp)  # type: ignore[arg-type]  # bounded by output_mb / output_files
            finally:
                archive.close()  # a read-back stopped at a limit must not keep the container busy
            self.limits.check(measure(self.output_dir, self.limits))
        assert result.usage is not None, "wait before collect"
        result.usage.output_bytes, result.usage.output_files = output_totals(self.output_dir)
        self.reading_outputs = True  # from here an unreadable file is the algorithm's doing
        algo_output = read_algo_output(self.output_dir)
        if algo_output is not None:
            result.metrics, result.message = algo_output.metrics, algo_output.message
            if algo_output.status != "success":
                raise ExitCodeFailure(
                    f"the algorithm exited 0 but its {ALGO_OUTPUT_NAME} says status {algo_output.status!r}: {shorten(algo_output.message or '', 2000)}",
                    exit_code=0,
                )
        outputs = collect_outputs(self.manifest, self.output_dir, algo_output)
        check_outputs(self.manifest, outputs)  # invalid_output: the files stay for the post-mortem
        result.outputs = [record_schema(o) for o in outputs]

    def remove(self, result: StepRecord, *, later: Callable[[Callable[[], None]], None] | None = None) -> None:
        """Whatever happened: stop sampling and watching, remove every container and volume made; never raises (the engine may be gone).

        ``later`` takes the removal instead (see :func:`~algodock.runtime.runner.run_step`) only
        when the container has exited and nothing of it is read any more (bind staging): one that
        may still run, or whose volumes hold what is read back, is removed now.
        """
        if self.watcher is not None:  # the start failed before the wait could stop it
            self.watcher.stop()
        if self.sampler is not None and result.usage is None:  # the wait itself failed: stop sampling anyway
            try:
                result.usage = self.sampler.stop()
            except Exception as exc:  # accounting must never turn a step into a traceback
                log.warning("could not stop the usage sampler: %s", exc)
        if later is not None and self.status is not None and self.workspace is None:
            later(self._remove_made)
        else:
            self._remove_made()
        if self.pump is not None:
            self.pump.join(5)

    def discard(self) -> None:
        """Remove a container that never started (one created ahead and not used); never raises."""
        if self.stream is not None and self.pump is None:
            with contextlib.suppress(Exception):
                self.stream.close()
        self._remove_made()

    def _remove_made(self) -> None:
        """Every container and volume made for this attempt, through the one removal routine."""
        targets = [self.container.id] if self.container is not None else []
        targets += [n for n in self.names if self.container is None or n != self.container.name]
        for target in targets:
            remove_container(self.client, target, attempts=REMOVE_ATTEMPTS)
        if self.workspace is not None:
            self.workspace.remove()

    def _created(self) -> Container:
        assert self.container is not None, "create first"
        return self.container


# ---------------------------------------------------------------- the phases' steps


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
) -> tuple[Container, RunAs, dict[str, Any]]:
    """Create the container as a non-root uid, by number; returns it, who it runs as and its configuration.

    A named ``USER`` is resolved with the image's own ``/etc/passwd`` (read from a container
    created as the unprivileged uid) and the step then runs as that ``uid:gid``: the engine
    never resolves a name itself, so what runs is exactly what owns the output folder, and a
    name whose uid is 0 (or that cannot be resolved) runs as the unprivileged uid.
    Every name is appended to ``names`` before the engine is asked, so a create that times
    out after the engine made the container still leaves something to remove.
    """
    who = run_as(image.user)
    made: dict[str, Any] = {}

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
        made.clear()
        made.update(_without_name(cfg))
        created = client.api.create_container(**create_container_args(client.api, cfg))
        return client.containers.prepare_model({"Id": created["Id"], "Name": f"/{name}"})  # no inspect: the id and name are all a step needs

    if who.uid is not None:
        return create(who.user), who, made
    unprivileged = run_as("0")
    container = create(unprivileged.user)
    named = lookup_user(_read_passwd(container), image.user)
    if named is None:  # unknown, or a name for uid 0
        return container, unprivileged, made
    remove_container(client, container.id, attempts=REMOVE_ATTEMPTS)
    return create(named.user), named, made


def _without_name(cfg: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in cfg.items() if key != "name"}


class _OutputStream:
    """A container's attach socket as ``(stdout, None)`` / ``(None, stderr)`` chunks, read with the
    SDK's own frame reader (``docker.utils.socket``) for a container without a TTY; ends when the
    engine closes it (the container exited or was removed). ``close`` shuts the connection."""

    def __init__(self, sock: Any) -> None:
        from docker.utils.socket import frames_iter

        self._sock = sock
        self._frames = frames_iter(sock, False)

    def __iter__(self) -> _OutputStream:
        return self

    def __next__(self) -> tuple[bytes | None, bytes | None]:
        from docker.utils.socket import demux_adaptor
        from urllib3.exceptions import ProtocolError

        try:
            stream_id, data = next(self._frames)
        except (OSError, ProtocolError):  # the connection went away: the stream has ended, as the SDK's own stream does
            raise StopIteration from None
        return demux_adaptor(stream_id, data)

    def close(self) -> None:
        """Shut the connection (through a duplicate of its descriptor: the shutdown is the connection's)."""
        import socket

        with contextlib.suppress(OSError, ValueError):
            dup = socket.socket(fileno=os.dup(self._sock.fileno()))
            try:
                dup.shutdown(socket.SHUT_RDWR)
            finally:
                dup.close()
        with contextlib.suppress(OSError):
            self._sock.close()


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
