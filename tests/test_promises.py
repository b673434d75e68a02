"""What the README promises and no other test held: each test here is the promise, run for real.

- **One writer per run**: a lease held by another host is taken over once it expired, and
  refused while it has not (the lease object on a local folder and on S3, and ``algodock run``).
- **Prefect retries ``infrastructure``** after 2 s, then 10 s, each jittered within ±50 %: read
  from the step's task-run states in the Prefect API, for a store that really stalls (a moto
  server in its own process, SIGSTOPped).
- **Kept outputs**: the container succeeded, the store stayed down; the step's next attempt
  commits what was kept instead of running the container again, both when it is Prefect's own
  retry and when the run is resumed with the same run id (the engine's event stream shows
  no second container; the lineage's ``attempt_history`` says which attempt ran it).
- **Losing the Prefect API**: ``algodock run`` notices within about 3 s.

The steps are busybox images; the Prefect API is the session's harness (reached through a TCP
path the test can cut, for the API loss).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from algodock.runtime.engine import LABEL
from algodock.store.backends import lease_rel, open_store, s3_filesystem
from tests.s3server import moto_in_process
from tests.waiting import poll
from tests.lineage_support import manifest, sh

pytestmark = pytest.mark.docker

REPO = Path(__file__).resolve().parents[1]
_SCRIPT = Path(sys.executable).parent / "algodock"
ALGODOCK = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "algodock.cli"]
BARRIER = "io.algodock-test.barrier"




class ContainerCreates:
    """The containers the engine creates for ``run_id``, read from its live event stream.

    :meth:`settled` is exact, not a wait: it creates (and removes) a marker container and
    returns once the marker's own create event arrived; the engine sends its events in order,
    so every create before it has been seen.
    """

    def __init__(self, client: Any, run_id: str, image: str) -> None:
        self.client, self.run_id, self.image = client, run_id, image
        self.ids: list[str] = []
        self._markers: set[str] = set()
        self._stream = client.events(decode=True, filters={"type": "container", "event": "create"})
        threading.Thread(target=self._read, daemon=True).start()
        self.settled()  # the subscription is live before anything is asked of the engine

    def _read(self) -> None:
        try:
            for event in self._stream:
                labels = (event.get("Actor") or {}).get("Attributes") or {}
                if labels.get(f"{LABEL}.run_id") == self.run_id:
                    self.ids.append(event.get("id", ""))
                elif BARRIER in labels:
                    self._markers.add(labels[BARRIER])
        except Exception:  # the stream was closed
            pass

    def settled(self) -> list[str]:
        token = uuid.uuid4().hex
        marker = self.client.containers.create(self.image, ["true"], labels={BARRIER: token}, network_mode="none")
        marker.remove(force=True)
        poll("the marker container's create event", lambda: token in self._markers, deadline=30)
        return list(self.ids)

    def close(self) -> None:
        self._stream.close()


def one_step(folder: Path, image: str, *, seconds: float) -> Path:
    """A pipeline of one step ``make``: sleeps, then writes ``out.binary`` (a fresh random line)."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest(folder / "make.json", name="make", image=image,
             command=sh(f"sleep {seconds}; head -c 16 /dev/urandom | od -An -tx1 > /work/output/out.binary"),
             inputs=[], outputs=[{"name": "out", "format": "binary"}])
    path = folder / "pipeline.json"
    path.write_text(json.dumps({"pipeline_version": "0.1", "name": "promise", "steps": [{"id": "make", "manifest": "make.json"}]}))
    return path


def stderr_lines(proc: subprocess.Popen) -> tuple[list[tuple[float, str]], threading.Thread]:
    """Every stderr line of ``proc`` with the monotonic time it arrived."""
    lines: list[tuple[float, str]] = []

    def read() -> None:
        assert proc.stderr is not None
        try:
            for line in proc.stderr:
                lines.append((time.monotonic(), line))
        except ValueError:  # the test closed the pipe when it was done with the process
            pass

    t = threading.Thread(target=read, daemon=True)
    t.start()
    return lines, t


def text(lines: list[tuple[float, str]]) -> str:
    return "".join(line for _, line in lines)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)


# ------------------------------------------------------------------ one writer per run: another host's lease


def foreign_lease(*, expires_in: float) -> dict[str, Any]:
    """A lease written by a host that is not this one, expiring ``expires_in`` seconds from now.

    Its pid is a process that is gone on this host: only the expiry may decide, never a
    look at this host's processes."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    now = datetime.now(timezone.utc)
    return {"run_id": "r", "holder": {"host": f"elsewhere-{uuid.uuid4().hex[:6]}", "pid": int(dead.stdout), "pid_start": "1", "token": "other"},
            "since": (now - timedelta(minutes=5)).isoformat(), "renewed_at": (now - timedelta(seconds=30)).isoformat(),
            "expires_at": (now + timedelta(seconds=expires_in)).isoformat(), "released": False}


def a_store(where: str, tmp_path: Path) -> str:
    if where == "s3":
        bucket = f"lease-{uuid.uuid4().hex[:8]}"
        s3_filesystem().mkdir(bucket)
        return f"s3://{bucket}/st"
    return str(tmp_path / "store")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_an_expired_lease_of_another_host_is_taken_over(tmp_path, where, s3_endpoint, caplog) -> None:
    from algodock.store.lease import RunLease

    store = open_store(a_store(where, tmp_path))
    theirs = foreign_lease(expires_in=-1)
    store.create_json(lease_rel("r"), theirs)
    with caplog.at_level(logging.WARNING, logger="algodock.store.lease"):
        with RunLease(store, "r", ttl=30):
            mine = store.read_json(lease_rel("r"))
            assert mine["holder"]["host"] == socket.gethostname() and mine["holder"]["pid"] == os.getpid()
            assert datetime.fromisoformat(mine["expires_at"]) > datetime.now(timezone.utc)
    assert theirs["holder"]["host"] in caplog.text and "took over" in caplog.text
    assert store.read_json(lease_rel("r"))["released"] is True


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_live_lease_of_another_host_is_refused(tmp_path, where, s3_endpoint) -> None:
    from algodock.store.lease import RunBusy, RunLease

    store = open_store(a_store(where, tmp_path))
    theirs = foreign_lease(expires_in=60)
    store.create_json(lease_rel("r"), theirs)
    with pytest.raises(RunBusy) as refused:
        RunLease(store, "r", ttl=30).acquire()
    message = str(refused.value)
    assert theirs["holder"]["host"] in message and f"pid {theirs['holder']['pid']}" in message and "since" in message
    assert store.read_json(lease_rel("r")) == theirs, "a refused writer changed the lease"


def test_algodock_run_refuses_a_live_foreign_lease_and_takes_an_expired_one(tmp_path, busybox_image, docker_client, prefect_harness) -> None:
    """End to end: the refusal comes before any container; once the lease expired the same command runs."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    spec = one_step(tmp_path / "p", busybox_image, seconds=0)
    store_dir = tmp_path / "store"
    run_id = f"foreign-{uuid.uuid4().hex[:6]}"
    store = open_store(str(store_dir))
    theirs = {**foreign_lease(expires_in=60), "run_id": run_id}
    store.create_json(lease_rel(run_id), theirs)
    creates = ContainerCreates(docker_client, run_id, busybox_image)
    argv = [*ALGODOCK, "run", str(spec), "--store", str(store_dir), "--run-id", run_id, "--json"]
    try:
        refused = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, cwd=spec.parent)
        assert refused.returncode == 1, refused.stderr[-3000:]
        doc = json.loads(refused.stdout)
        assert doc["failure"]["kind"] == "invalid_input" and theirs["holder"]["host"] in doc["failure"]["message"]
        assert creates.settled() == [], "a refused run started a container"

        doc, version = store.read_json_versioned(lease_rel(run_id))
        store.replace_json(lease_rel(run_id), {**doc, "expires_at": (datetime.now(timezone.utc) - timedelta(seconds=1)).isoformat()}, version)
        taken = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, cwd=spec.parent)
        assert taken.returncode == 0, taken.stderr[-3000:]
        assert json.loads(taken.stdout)["status"] == "succeeded"
        assert "took over the lease" in taken.stderr and theirs["holder"]["host"] in taken.stderr
        assert len(creates.settled()) == 1
    finally:
        creates.close()
    after = store.read_json(lease_rel(run_id))
    assert after["holder"]["host"] == socket.gethostname() and after["released"] is True


# ------------------------------------------------------------------ a store that stalls: Prefect's retries, kept outputs


@pytest.fixture(scope="module")
def moto_process() -> Iterator[tuple[str, subprocess.Popen]]:
    """A moto server in its own process (so it can be SIGSTOPped)."""
    with moto_in_process() as endpoint_and_process:
        yield endpoint_and_process


def stalling_env(endpoint: str, keep: Path) -> dict[str, str]:
    """`algodock run`'s environment: the harness's API, the moto endpoint, a store that gives up
    within seconds (1 s per request, 2 s per try, 2 tries), outputs kept under ``keep``; the
    bucket ``lake`` exists."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "ALGODOCK_STORE_TIMEOUT": "1",
           "ALGODOCK_STORE_OP_TIMEOUT": "2", "ALGODOCK_STORE_ATTEMPTS": "2", "ALGODOCK_STORE_BACKOFF": "0.1", "ALGODOCK_KEEP_DIR": str(keep)}
    subprocess.run([sys.executable, "-c", "from algodock.store.backends import s3_filesystem; fs = s3_filesystem(); fs.exists('lake') or fs.mkdir('lake')"], env=env, check=True, timeout=60)
    return env


def container_running(client: Any, run_id: str) -> Callable[[], Any]:
    return lambda: client.containers.list(filters={"label": f"{LABEL}.run_id={run_id}"})


def stored(env: dict[str, str], uri: str) -> bytes:
    proc = subprocess.run([sys.executable, "-c", f"import sys; from algodock.store.backends import s3_filesystem; sys.stdout.buffer.write(s3_filesystem().cat_file({uri.removeprefix('s3://')!r}))"],
                          env=env, capture_output=True, check=True, timeout=60)
    return proc.stdout


def lineage_step(env: dict[str, str], run_id: str) -> dict[str, Any]:
    doc = json.loads(stored(env, f"s3://lake/st/runs/{run_id}/lineage.json"))
    return next(s for s in doc["steps"] if s["id"] == "make")


def kept_attempts(keep: Path, run_id: str) -> list[Path]:
    return sorted((keep / run_id / "make").glob("*/kept.json"))


def task_run_states(flow_run_id: str) -> list[Any]:
    """The states of the flow run's one task run, oldest first, once the API recorded all of them (three runs, a final state)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        def final_states() -> list[Any] | None:
            [task_run] = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[uuid.UUID(flow_run_id)])))
            states = sorted(client.read_task_run_states(task_run.id), key=lambda s: s.timestamp)
            return states if states and states[-1].is_final() and sum(s.name == "AwaitingRetry" for s in states) == 2 else None

        return poll("the task run's states in the Prefect API", final_states, deadline=30, every=0.2)


@pytest.fixture(scope="module")
def retried_by_prefect(tmp_path_factory, busybox_image, docker_client, moto_process, prefect_harness) -> dict[str, Any]:
    """``algodock run`` of one step on an S3 store that stalls from the moment the container runs
    until the step failed twice: attempts 1 and 2 fail as ``infrastructure`` (1 ran the container,
    its outputs are kept), Prefect retries each; attempt 3 finds the store back."""
    endpoint, moto = moto_process
    tmp_path = tmp_path_factory.mktemp("retried")
    keep = tmp_path / "kept"
    env = stalling_env(endpoint, keep)
    run_id = f"retried-{uuid.uuid4().hex[:6]}"
    spec = one_step(tmp_path / "p", busybox_image, seconds=2)
    creates = ContainerCreates(docker_client, run_id, busybox_image)
    proc = subprocess.Popen([*ALGODOCK, "run", str(spec), "--store", "s3://lake/st", "--run-id", run_id, "--no-cache", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=spec.parent)
    lines, reader = stderr_lines(proc)
    try:
        poll("the step's container to run", container_running(docker_client, run_id), deadline=120)
        moto.send_signal(signal.SIGSTOP)  # the endpoint stalls: connections are accepted, nothing answers
        poll("the step's second failure", lambda: text(lines).count("step make failed (infrastructure)") == 2, deadline=120, seen=lambda: text(lines))
        kept = {k.parent.name: (Path(json.loads(k.read_text())["outputs_dir"]) / "out.binary").read_bytes() for k in kept_attempts(keep, run_id)}
        moto.send_signal(signal.SIGCONT)
        stdout, _ = proc.communicate(timeout=300)
        reader.join(10)
        created = creates.settled()
    finally:
        moto.send_signal(signal.SIGCONT)
        creates.close()
        stop(proc)
    assert proc.returncode == 0, text(lines)[-4000:]
    summary = json.loads(stdout)
    states = task_run_states(summary["flow_run_id"])
    return {"env": env, "run_id": run_id, "summary": summary, "created": created, "kept": kept, "keep": keep, "states": states}


def test_infrastructure_is_retried_after_2_s_then_10_s_with_jitter(retried_by_prefect) -> None:
    """README: a step failing with ``infrastructure`` is retried twice by Prefect, after 2 s then
    10 s, each jittered within ±50 %. The delays are read from the task run's states as the
    Prefect API recorded them: each ``AwaitingRetry`` carries the time it schedules the next run for."""
    states = retried_by_prefect["states"]
    names = [s.name for s in states]
    waits = [i for i, s in enumerate(states) if s.name == "AwaitingRetry"]
    assert len(waits) == 2 and names[-1] == "Completed", names
    delays = []
    for i, nominal in zip(waits, (2.0, 10.0)):
        waiting = states[i]
        delay = (waiting.state_details.scheduled_time - waiting.timestamp).total_seconds()
        assert nominal * 0.5 <= delay <= nominal * 1.5, f"retry after {delay:.2f} s, not {nominal:g} s ± 50 %"
        started = next(s for s in states[i + 1:] if s.name in ("Retrying", "Running"))
        assert started.timestamp >= waiting.state_details.scheduled_time, f"attempt started at {started.timestamp}, before its retry time {waiting.state_details.scheduled_time}"
        delays.append(delay)
    # Without jitter each delay is its nominal value to the microsecond (the state is stamped
    # just after its retry time is set); with it, both landing within 1 ms of it has odds of about 3e-7.
    assert any(abs(d - nominal) > 0.001 for d, nominal in zip(delays, (2.0, 10.0))), f"retries after exactly {delays} s: no jitter"


def test_prefects_retry_commits_the_kept_outputs_without_a_second_container(retried_by_prefect) -> None:
    """README: the step's next attempt on the same host (Prefect's retry) commits the outputs kept
    when the store failed instead of running the container again; ``attempt_history`` says which
    attempt ran the container and which committed its outputs."""
    r = retried_by_prefect
    assert len(r["created"]) == 1, f"containers created for the step: {r['created']} (the retry ran the container again)"
    [(ran_id, kept_bytes)] = r["kept"].items()  # what attempt 1 kept; attempt 2 found the store still down
    [out] = next(s for s in r["summary"]["steps"] if s["id"] == "make")["outputs"]
    step = lineage_step(r["env"], r["run_id"])
    assert step["status"] == "succeeded" and step["attempts"] == 3
    ran, committed = step["attempt_history"][0], step["attempt_history"][-1]
    assert ran["attempt"] == 1 and ran["attempt_id"] == ran_id and ran["ran_container"] is True and ran["failure"]["kind"] == "infrastructure"
    assert committed == {"attempt": 3, "attempt_id": committed["attempt_id"], "status": "succeeded", "ran_container": False, "committed_from": ran_id}
    assert out["uri"].startswith(f"s3://lake/st/runs/{r['run_id']}/steps/make/attempts/3-")
    assert stored(r["env"], out["uri"]) == kept_bytes, "the committed bytes are not the ones the container wrote"
    assert not kept_attempts(r["keep"], r["run_id"]), "committed outputs are no longer kept"


def test_a_resumed_run_commits_the_kept_outputs_without_a_second_container(tmp_path, busybox_image, docker_client, moto_process, prefect_harness) -> None:
    """Attempt 1 ran the container and the store stalled: its outputs are kept and `algodock run`
    is killed (SIGKILL, as a crash) while Prefect waits to retry. With the store back, the same
    command with the same run id takes the dead run's lease and commits the kept outputs."""
    endpoint, moto = moto_process
    keep = tmp_path / "kept"
    env = stalling_env(endpoint, keep)
    run_id = f"resumed-{uuid.uuid4().hex[:6]}"
    spec = one_step(tmp_path / "p", busybox_image, seconds=2)
    argv = [*ALGODOCK, "run", str(spec), "--store", "s3://lake/st", "--run-id", run_id, "--no-cache", "--json"]
    creates = ContainerCreates(docker_client, run_id, busybox_image)
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=spec.parent)
    try:
        poll("the step's container to run", container_running(docker_client, run_id), deadline=120)
        moto.send_signal(signal.SIGSTOP)
        [kept] = poll("attempt 1's outputs to be kept", lambda: kept_attempts(keep, run_id), deadline=120)
        ran_id = kept.parent.name
        kept_bytes = (Path(json.loads(kept.read_text())["outputs_dir"]) / "out.binary").read_bytes()
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        moto.send_signal(signal.SIGCONT)
        assert len(creates.settled()) == 1
        resumed = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, cwd=spec.parent)
        created = creates.settled()
    finally:
        moto.send_signal(signal.SIGCONT)
        creates.close()
        stop(proc)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert len(created) == 1, f"containers created for the step: {created} (the resumed run ran it again)"
    assert "took over the lease" in resumed.stderr
    [out] = next(s for s in json.loads(resumed.stdout)["steps"] if s["id"] == "make")["outputs"]
    assert stored(env, out["uri"]) == kept_bytes
    step = lineage_step(env, run_id)
    assert step["status"] == "succeeded"
    ran, committed = step["attempt_history"][0], step["attempt_history"][-1]
    assert ran["attempt_id"] == ran_id and ran["ran_container"] is True
    assert committed["ran_container"] is False and committed["committed_from"] == ran_id and committed["status"] == "succeeded"
    assert out["uri"].startswith(f"s3://lake/st/runs/{run_id}/steps/make/attempts/{committed['attempt_id']}/")
    assert not kept_attempts(keep, run_id), "committed outputs are no longer kept"


# ------------------------------------------------------------------ losing the Prefect API


API_LOSS_NOTICE_SECONDS = 3.0
"""README: "When the Prefect API goes away mid-run, `algodock run` notices within about 3 s"."""


class Forwarder:
    """A TCP path to ``target`` (host, port) from a free port of 127.0.0.1, that :meth:`cut` ends:
    open connections are reset and new ones refused, as when the server's process dies, while
    the server itself (the session's harness, shared with other tests) lives on."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
                server = socket.create_connection(self.target)
            except OSError:  # cut
                return
            with self.lock:
                self.open += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept loop
        self.listener.close()
        with self.lock:
            for s in self.open:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # a reset, not a polite close
                s.close()


def test_losing_the_prefect_api_is_noticed_within_about_3_s(tmp_path, busybox_image, docker_client, prefect_harness) -> None:
    """`algodock run` talks to the harness's API through a TCP path that is cut while a step
    runs (connections reset, new ones refused: what a client sees of a killed server); the
    notice must come about 3 s later (2 s of slack for a busy machine), while the step still runs."""
    from urllib.parse import urlsplit

    from prefect.settings import PREFECT_API_URL

    api = urlsplit(str(PREFECT_API_URL.value()))
    path = Forwarder((api.hostname, api.port))
    run_id = f"away-{uuid.uuid4().hex[:6]}"
    spec = one_step(tmp_path / "p", busybox_image, seconds=8)
    env = {**os.environ, "PREFECT_API_URL": api._replace(netloc=f"127.0.0.1:{path.port}").geturl()}
    proc = subprocess.Popen([*ALGODOCK, "run", str(spec), "--store", str(tmp_path / "store"), "--run-id", run_id, "--no-cache", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=spec.parent)
    lines, reader = stderr_lines(proc)
    try:
        poll("the step's container to run", container_running(docker_client, run_id), deadline=120)
        path.cut()
        cut = time.monotonic()
        noticed = poll("the notice that the Prefect API does not answer",
                       lambda: next((t for t, line in lines if "does not answer" in line), None), deadline=60, seen=lambda: text(lines))
        stdout, _ = proc.communicate(timeout=120)
        reader.join(10)
    finally:
        stop(proc)
    after = noticed - cut
    assert after <= API_LOSS_NOTICE_SECONDS + 2.0, f"noticed {after:.1f} s after the API went away"
    assert proc.returncode == 0, text(lines)[-3000:]
    summary = json.loads(stdout)
    assert summary["status"] == "succeeded" and "incomplete" in text(lines)
