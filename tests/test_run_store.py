"""`algodock run --json` against its store, as a user runs it (a subprocess, real Docker, real
Prefect API, a local store or a moto S3 server in its own process): immutable outputs and an
honest cache, store faults retried without re-running the container, a run killed with
SIGKILL and resumed, one writer per run.

The steps are tiny busybox images; the Prefect test server is the session's harness.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from algodock.runtime.engine import LABEL
from algodock.hashing import sha256_path
from algodock.store.backends import lease_rel, local_path_of, open_store, s3_filesystem
from tests.conftest import BUSYBOX_IMAGE
from tests.s3server import moto_in_process
from tests.waiting import poll
from tests.lineage_support import STABLE, build_versioned, manifest, sh

pytestmark = pytest.mark.docker

REPO = Path(__file__).resolve().parents[1]
_SCRIPT = Path(sys.executable).parent / "algodock"
ALGODOCK = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "algodock.cli"]


@pytest.fixture(scope="module")
def image(docker_client, busybox_image) -> str:
    return build_versioned(docker_client, STABLE, "stable")


@pytest.fixture(scope="module")
def prefect_env(prefect_harness) -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}




def algodock_run(spec: Path, env: dict[str, str], *args: str, timeout: float = 300) -> tuple[int, dict[str, Any], str]:
    proc = subprocess.run([*ALGODOCK, "run", str(spec), *args, "--json"], capture_output=True, text=True, env=env, timeout=timeout, cwd=spec.parent)
    try:
        doc = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"`algodock run` printed no JSON (exit {proc.returncode}); stderr:\n{proc.stderr[-4000:]}")
    return proc.returncode, doc, proc.stderr


def k_pipeline(folder: Path, image: str, *, seconds: int = 0, second_step: bool = False, out_mb: int = 0) -> Path:
    """One step ``make`` writing its parameter ``k`` (and optional padding) to ``out.binary``;
    optionally a step ``use`` that copies it (and records the inode it saw)."""
    folder.mkdir(parents=True, exist_ok=True)
    pad = f" && head -c {out_mb * 1024 * 1024} /dev/zero >> /work/output/out.binary" if out_mb else ""
    wait = f"sleep {seconds} && " if seconds else ""
    manifest(
        folder / "make.json", name="make", image=image,
        command=sh(f"{wait}grep -o '\"k\": *[0-9]*' /work/algo_input.json > /work/output/out.binary{pad}"),
        inputs=[], outputs=[{"name": "out", "format": "binary"}],
        parameters={"type": "object", "properties": {"k": {"type": "integer", "default": 1}}, "additionalProperties": False},
    )
    steps: list[dict[str, Any]] = [{"id": "make", "manifest": "make.json"}]
    if second_step:
        manifest(
            folder / "use.json", name="use", image=image,
            command=sh("stat -c %i /work/input/data/* > /work/output/inode.binary"),
            inputs=[{"name": "data", "format": "binary"}], outputs=[{"name": "inode", "format": "binary"}],
        )
        steps.append({"id": "use", "manifest": "use.json", "inputs": {"data": "make.out"}})
    path = folder / "pipeline.json"
    path.write_text(json.dumps({"pipeline_version": "0.1", "name": "k", "steps": steps}))
    return path


def step(doc: dict[str, Any], step_id: str) -> dict[str, Any]:
    return next(s for s in doc["steps"] if s["id"] == step_id)


def lineage(store: Path | str, run_id: str) -> dict[str, Any]:
    return open_store(str(store)).read_json(f"runs/{run_id}/lineage.json")


def read_output(uri: str) -> bytes:
    local = local_path_of(uri)
    if local is not None:
        return local.read_bytes()
    return s3_filesystem().cat_file(uri.removeprefix("s3://"))


class ContainerCreates:
    """Counts the containers the engine creates for ``run_id``, from its live event stream (the
    engine's event history is a short ring buffer on a busy engine, so it is watched from the start)."""

    def __init__(self, client, run_id: str) -> None:
        self.seen: list[str] = []
        self._client = client
        self._run_id = run_id
        self._stream = client.events(decode=True, filters={"type": "container", "event": "create", "label": f"{LABEL}.run_id={run_id}"})
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for event in self._stream:
                self.seen.append(event.get("id", ""))
        except Exception:  # closed
            pass

    def count(self) -> int:
        """How many were created until now, exactly: a marker container with the run's label is
        created (never started) and the count is what the stream delivered before the marker's
        own event. The engine sends events in order, so nothing created earlier is still on the way."""
        marker = self._client.containers.create(BUSYBOX_IMAGE, ["true"], network_mode="none",
                                                labels={f"{LABEL}.run_id": self._run_id, f"{LABEL}.test_marker": "true"})
        try:
            poll("the marker container's create event", lambda: marker.id in self.seen, deadline=30)
        finally:
            marker.remove(force=True)
        return self.seen.index(marker.id)

    def close(self) -> None:
        self._stream.close()


# ------------------------------------------------------------------ 1. immutable outputs, honest cache


def test_reused_run_id_never_overwrites_what_the_cache_serves(tmp_path, image, prefect_env) -> None:
    spec = k_pipeline(tmp_path / "p", image)
    store = tmp_path / "store"
    rc1, first, err1 = algodock_run(spec, prefect_env, "--store", str(store), "--run-id", "daily")
    assert rc1 == 0, err1[-3000:]
    rc2, second, err2 = algodock_run(spec, prefect_env, "--store", str(store), "--run-id", "daily", "--set", "make.k=2")
    assert rc2 == 0, err2[-3000:]
    assert step(second, "make")["status"] == "succeeded"
    out1, out2 = step(first, "make")["outputs"][0], step(second, "make")["outputs"][0]
    assert out1["uri"] != out2["uri"], "a reused run id wrote over the first run's output"
    assert read_output(out1["uri"]).strip().endswith(b"1") and read_output(out2["uri"]).strip().endswith(b"2")

    rc3, third, err3 = algodock_run(spec, prefect_env, "--store", str(store), "--run-id", "daily")
    assert rc3 == 0, err3[-3000:]
    out3 = step(third, "make")["outputs"][0]
    assert step(third, "make")["status"] == "cached"
    assert out3["sha256"] == out1["sha256"]
    data = read_output(out3["uri"])
    assert data.strip().endswith(b"1"), f"the cache served the k=2 bytes under k=1's sha256: {data!r}"
    assert sha256_path(local_path_of(out3["uri"])) == out3["sha256"]


def test_a_changed_cached_output_is_a_miss(tmp_path, image, prefect_env) -> None:
    spec = k_pipeline(tmp_path / "p", image)
    store = tmp_path / "store"
    rc, first, err = algodock_run(spec, prefect_env, "--store", str(store), "--run-id", "a")
    assert rc == 0, err[-3000:]
    path = local_path_of(step(first, "make")["outputs"][0]["uri"])
    assert path is not None
    path.chmod(0o644)
    path.write_bytes(b"tampered\n")
    rc, second, err = algodock_run(spec, prefect_env, "--store", str(store), "--run-id", "b")
    assert rc == 0, err[-3000:]
    assert step(second, "make")["status"] == "succeeded", "a cached output whose bytes changed was served"
    assert "changed in the store" in err
    assert read_output(step(second, "make")["outputs"][0]["uri"]).strip().endswith(b"1")


# ------------------------------------------------------------------ 5. the work folder on the store's filesystem


def test_inputs_are_hardlinks_of_stored_outputs(tmp_path, image, prefect_env) -> None:
    """The system temp folder on another filesystem (a tmpfs here) than the store: inputs must still be hardlinks."""
    spec = k_pipeline(tmp_path / "p", image, second_step=True)
    store = tmp_path / "store"
    other_fs = Path("/dev/shm") / f"algodock-test-{uuid.uuid4().hex[:8]}"
    other_fs.mkdir()
    assert os.stat(other_fs).st_dev != os.stat(tmp_path).st_dev, "the test needs /dev/shm on another filesystem than the store"
    try:
        rc, doc, err = algodock_run(spec, {**prefect_env, "TMPDIR": str(other_fs)}, "--store", str(store), "--run-id", "links", "--no-cache")
    finally:
        import shutil

        shutil.rmtree(other_fs, ignore_errors=True)
    assert rc == 0, err[-3000:]
    produced = local_path_of(step(doc, "make")["outputs"][0]["uri"])
    seen = int(read_output(step(doc, "use")["outputs"][0]["uri"]).split()[0])
    assert seen == os.stat(produced).st_ino, "the staged input is a copy, not the stored output itself"
    assert not (store / ".work" / "links").exists(), "the run's work folder was left behind"


# ------------------------------------------------------------------ 7. one writer per run


def test_a_second_writer_of_the_same_run_is_refused(tmp_path, image, prefect_env, docker_client) -> None:
    spec = k_pipeline(tmp_path / "p", image, seconds=30)
    store = tmp_path / "store"
    scratch_before = set(Path(tempfile.gettempdir()).glob("algodock-one-*"))
    first = subprocess.Popen([*ALGODOCK, "run", str(spec), "--store", str(store), "--run-id", "one", "--no-cache", "--json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=prefect_env, cwd=spec.parent)
    try:
        poll("the first run's container", lambda: docker_client.containers.list(filters={"label": f"{LABEL}.run_id=one"}), deadline=120)
        rc, doc, err = algodock_run(spec, prefect_env, "--store", str(store), "--run-id", "one", "--no-cache")
        assert rc == 1
        assert doc["status"] == "failed" and doc["failure"]["kind"] == "invalid_input"
        message = doc["failure"]["message"]
        assert "'one'" in message and f"pid {first.pid}" in message and socket.gethostname() in message and "since" in message
        assert docker_client.containers.list(all=True, filters={"label": f"{LABEL}.run_id=one"}).__len__() == 1, "the refused run started a container"
    finally:
        first.terminate()  # as a scheduler or a user stops a run: it cleans up after itself
        try:
            first.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            first.kill()
            first.wait()
    assert set(Path(tempfile.gettempdir()).glob("algodock-one-*")) == scratch_before, "the stopped run left its scratch folder"
    assert not docker_client.containers.list(all=True, filters={"label": f"{LABEL}.run_id=one"}), "the stopped run left its container"


def test_lease_of_a_dead_holder_is_taken_over(tmp_path) -> None:
    from algodock.store.lease import RunBusy, RunLease

    store = open_store(str(tmp_path / "store"))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    now = datetime.now(timezone.utc).isoformat()
    store.create_json(lease_rel("r"), {"run_id": "r", "holder": {"host": socket.gethostname(), "pid": int(dead.stdout), "pid_start": "1", "token": "x"},
                                       "since": now, "renewed_at": now, "expires_at": "2999-01-01T00:00:00+00:00", "released": False})
    with RunLease(store, "r", ttl=30):
        assert store.read_json(lease_rel("r"))["holder"]["pid"] == os.getpid()
        child = subprocess.run([sys.executable, "-c", f"from algodock.store.lease import RunLease; from algodock.store.backends import open_store; RunLease(open_store({str(tmp_path / 'store')!r}), 'r').acquire()"],
                               capture_output=True, text=True)
        assert child.returncode != 0 and "RunBusy" in child.stderr and f"pid {os.getpid()}" in child.stderr
    assert store.read_json(lease_rel("r"))["released"] is True
    with RunLease(store, "r", ttl=30):  # released: free to take
        pass
    assert RunBusy.kind == "invalid_input"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_lease_heartbeat_renews_and_a_stale_holder_learns_it_lost(tmp_path, where, s3_endpoint) -> None:
    from algodock.store.lease import RunLease

    if where == "s3":
        bucket = f"beat-{uuid.uuid4().hex[:8]}"
        s3_filesystem().mkdir(bucket)
        store = open_store(f"s3://{bucket}/st")
    else:
        store = open_store(str(tmp_path / "store"))
    lease = RunLease(store, "beat", ttl=0.6).acquire()
    try:
        first = store.read_json(lease_rel("beat"))
        poll("a renewal", lambda: store.read_json(lease_rel("beat"))["renewed_at"] != first["renewed_at"], deadline=10)
        assert not lease.lost.is_set()
        # someone else takes the lease over (as if this holder had stalled past its expiry)
        doc, version = store.read_json_versioned(lease_rel("beat"))
        store.replace_json(lease_rel("beat"), {**doc, "holder": {"host": "elsewhere", "pid": 1, "token": "other"}}, version)
        poll("the holder to notice it lost the lease", lease.lost.is_set, deadline=10)
    finally:
        lease.release()
    assert store.read_json(lease_rel("beat"))["holder"]["host"] == "elsewhere", "a holder that lost the lease must not write it again"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_lease_acquisition_is_race_free(tmp_path, where, s3_endpoint) -> None:
    """Eight processes race for one run: exactly one holds it."""
    if where == "s3":
        bucket = f"lease-{uuid.uuid4().hex[:8]}"
        s3_filesystem().mkdir(bucket)
        uri = f"s3://{bucket}/st"
    else:
        uri = str(tmp_path / "store")
    script = (
        "import sys, time\n"
        "from algodock.store.lease import RunBusy, RunLease\n"
        "from algodock.store.backends import open_store\n"
        "sys.stdin.readline()\n"
        f"try:\n    RunLease(open_store({uri!r}), 'race', ttl=60).acquire()\nexcept RunBusy:\n    print('busy'); sys.exit(0)\n"
        "print('held', flush=True)\nsys.stdin.readline()\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ)) for _ in range(8)]
    try:
        for p in procs:  # all imported and waiting: release them together
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        answers = [p.stdout.readline().strip() for p in procs if p.stdout is not None]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert sorted(answers) == ["busy"] * 7 + ["held"], answers


# ------------------------------------------------------------------ 3. conditional commits on S3


def test_two_writers_cannot_both_commit_one_s3_output(tmp_path, s3_endpoint) -> None:
    from algodock.store.backends import MARKER_SUFFIX, S3Store

    bucket = f"cw-{uuid.uuid4().hex[:8]}"
    s3_filesystem().mkdir(bucket)
    store = S3Store(f"s3://{bucket}/st")
    sources = []
    for who in ("a", "b"):
        folder = tmp_path / who
        folder.mkdir()
        for i in range(20):
            (folder / f"part-{i:02d}.bin").write_bytes(who.encode() * (1000 + i) * (1 if who == "a" else 2))
        sources.append(folder)
    barrier = threading.Barrier(2)
    outcome: dict[str, str] = {}

    def write(src: Path) -> None:
        barrier.wait()
        try:
            store.put_output(src, "runs/r/steps/s/attempts/1-x/outputs/out")
            outcome[src.name] = "committed"
        except FileExistsError as exc:
            outcome[src.name] = f"refused: {exc}"

    threads = [threading.Thread(target=write, args=(s,)) for s in sources]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(v.split(":")[0] for v in outcome.values()) == ["committed", "refused"], outcome
    marker = store.read_json("runs/r/steps/s/attempts/1-x/outputs/out" + MARKER_SUFFIX)
    assert marker["files"][0]["size"] in (1000, 2000)
    by_name = {s.name: s for s in sources}
    loser = next(n for n, v in outcome.items() if v.startswith("refused"))
    winner = next(n for n, v in outcome.items() if v == "committed")
    with pytest.raises(FileExistsError):  # never replaced afterwards either
        store.put_output(by_name[loser], "runs/r/steps/s/attempts/1-x/outputs/out")
    # The winner's own upload again (a retry whose answer was lost) is the same commit: no error, no change.
    assert store.put_output(by_name[winner], "runs/r/steps/s/attempts/1-x/outputs/out") == store.uri("runs/r/steps/s/attempts/1-x/outputs/out")
    assert store.read_json("runs/r/steps/s/attempts/1-x/outputs/out" + MARKER_SUFFIX) == marker


# ------------------------------------------------------------------ 4. a stalled store is retried, the container is not


@pytest.fixture
def moto_process() -> Iterator[tuple[str, subprocess.Popen]]:
    """A moto server in its own process (so it can be SIGSTOPped)."""
    with moto_in_process() as endpoint_and_process:
        yield endpoint_and_process


def _stderr_reader(proc: subprocess.Popen) -> tuple[list[str], threading.Thread]:
    lines: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    return lines, t


def test_stalled_s3_upload_is_retried_without_rerunning_the_container(tmp_path, image, prefect_env, moto_process, docker_client) -> None:
    endpoint, moto = moto_process
    env = {**prefect_env, "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "ALGODOCK_STORE_TIMEOUT": "2", "ALGODOCK_STORE_OP_TIMEOUT": "4", "ALGODOCK_STORE_ATTEMPTS": "8", "ALGODOCK_STORE_BACKOFF": "0.5"}
    subprocess.run([sys.executable, "-c", "from algodock.store.backends import s3_filesystem; s3_filesystem().mkdir('stall')"], env=env, check=True, timeout=60)
    spec = k_pipeline(tmp_path / "p", image, seconds=3, out_mb=8)
    creates = ContainerCreates(docker_client, "stall")
    proc = subprocess.Popen([*ALGODOCK, "run", str(spec), "--store", "s3://stall/st", "--run-id", "stall", "--no-cache", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=spec.parent)
    lines, reader = _stderr_reader(proc)
    try:
        poll("the step's container to run", lambda: docker_client.containers.list(filters={"label": f"{LABEL}.run_id=stall"}), deadline=120)
        moto.send_signal(signal.SIGSTOP)  # the endpoint stalls: connections are accepted, nothing answers
        poll("a retried store operation", lambda: any("retrying in" in line for line in lines), deadline=120)
        moto.send_signal(signal.SIGCONT)
        stdout, _ = proc.communicate(timeout=300)
    finally:
        moto.send_signal(signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(10)
    doc = json.loads(stdout)
    assert proc.returncode == 0, "".join(lines)[-4000:]
    assert step(doc, "make")["status"] == "succeeded"
    assert creates.count() == 1, "the container ran again for a store fault"
    creates.close()
    out = step(doc, "make")["outputs"][0]
    assert out["uri"].startswith("s3://stall/st/runs/stall/steps/make/attempts/")


def test_a_stalled_store_fails_a_cache_pin_and_a_json_record_within_the_op_timeout(moto_process, monkeypatch) -> None:
    """A cache hit pins the files it reuses (a JSON record written, then gc's plan read) with
    no retrying() around it: each of S3Store's JSON reads and writes is bounded on its own by
    ALGODOCK_STORE_OP_TIMEOUT, so a stalled endpoint fails the pin as ``infrastructure``
    instead of holding the step for ever (s3fs's request timeout does not end a stalled PUT)."""
    from algodock.errors import InfrastructureError
    from algodock.store.backends import S3Store
    from algodock.store.gc import pin

    endpoint, moto = moto_process
    for k, v in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                 "ALGODOCK_STORE_TIMEOUT": "1", "ALGODOCK_STORE_OP_TIMEOUT": "2"}.items():
        monkeypatch.setenv(k, v)
    s3_filesystem().mkdir("pins")
    store = S3Store("s3://pins/st")
    store.write_json("runs/r/x.json", {"a": 1})
    assert pin(store, "r2", ["runs/r/x.json"]) is True  # answers while the endpoint does
    outcomes: dict[str, BaseException | None] = {}

    def attempt(name: str, op: Any) -> None:
        try:
            op()
            outcomes[name] = None
        except BaseException as exc:  # the outcome is the assertion
            outcomes[name] = exc

    moto.send_signal(signal.SIGSTOP)  # connections are accepted, nothing answers
    try:
        ops = {"pin": lambda: pin(store, "r3", ["runs/r/x.json"]), "write_json": lambda: store.write_json("runs/r/y.json", {}), "read_json": lambda: store.read_json("runs/r/x.json")}
        threads = [threading.Thread(target=attempt, args=(name, op), daemon=True) for name, op in ops.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)  # the bound is 2 s: 60 is "never answered"
        assert not any(t.is_alive() for t in threads), f"still waiting on the stalled store after 60 s: {sorted(set(ops) - set(outcomes))}"
    finally:
        moto.send_signal(signal.SIGCONT)
    for name, exc in outcomes.items():
        assert isinstance(exc, InfrastructureError), f"{name}: {exc!r}"
        assert "s3://pins/st/" in str(exc), f"{name}: {exc}"


def test_a_store_that_stays_down_fails_the_step_and_the_retry_commits_the_kept_outputs(tmp_path, image, moto_process, docker_client, monkeypatch) -> None:
    """Attempt 1: the container succeeds, the store stays down past its retries: the step fails as
    ``infrastructure`` naming the store, the outputs and log are kept on local disk. Attempt 2 (what
    Prefect's retry runs), with the store back: the kept outputs are committed; the container is not
    run again (docs/contract.md §4)."""
    from algodock.lineage.cache import StoreCache
    from algodock.pipeline import load_pipeline
    from algodock.pipeline.capacity import Capacity, ResourcePool
    from algodock.pipeline.execute import RunContext, execute_step  # in-process: each attempt by hand
    from algodock.store.backends import S3Store

    endpoint, moto = moto_process
    keep = tmp_path / "kept"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "ALGODOCK_STORE_TIMEOUT": "1", "ALGODOCK_STORE_OP_TIMEOUT": "2", "ALGODOCK_STORE_ATTEMPTS": "2", "ALGODOCK_STORE_BACKOFF": "0.1",
           "ALGODOCK_KEEP_DIR": str(keep)}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    subprocess.run([sys.executable, "-c", "from algodock.store.backends import s3_filesystem; s3_filesystem().mkdir('down')"], check=True, timeout=60)
    spec = k_pipeline(tmp_path / "p", image, seconds=3)
    store = S3Store("s3://down/st")
    cap = Capacity(cpu_millicore=2000, memory_gb=2)
    ctx = RunContext(pipeline=load_pipeline(spec, capacity=cap), store=store, run_id="down", client=docker_client, pool=ResourcePool(cap), scratch=tmp_path / "scratch")
    ctx.cache = StoreCache(store, run_id="down")
    result: dict[str, Any] = {}
    t = threading.Thread(target=lambda: result.update(record=execute_step(ctx, "make", {}, attempt=1)))
    t.start()
    try:
        poll("the step's container to run", lambda: docker_client.containers.list(filters={"label": f"{LABEL}.run_id=down"}), deadline=120)
        moto.send_signal(signal.SIGSTOP)
        t.join(300)
    finally:
        moto.send_signal(signal.SIGCONT)
    first = result["record"]
    assert first.status == "failed" and first.failure.kind == "infrastructure"
    assert "s3://down/st" in first.failure.message and str(keep) in first.failure.message
    assert "commits them without running the container again" in first.failure.message
    [kept] = keep.rglob("out.binary")
    kept_bytes, kept_sha256 = kept.read_bytes(), sha256_path(kept)
    assert kept_bytes.strip().endswith(b"1")
    assert list(keep.rglob("kept.json")) and list(keep.rglob("container.log")), "the record and the log are kept beside the outputs"

    creates = ContainerCreates(docker_client, "down")
    said: list[str] = []
    second = execute_step(ctx, "make", {}, attempt=2, on_log=said.append)
    assert second.status == "succeeded", second.failure
    assert creates.count() == 0, "the container ran again for a store fault"
    creates.close()
    assert any("committing the outputs of attempt 1-" in line for line in said), said
    assert second.attempts == 2 and second.exit_code == 0 and second.started_at == first.started_at, "the record is the attempt that ran"
    ran, committed = second.attempt_history
    assert ran["attempt"] == 1 and ran["ran_container"] and ran["status"] == "failed" and ran["failure"]["kind"] == "infrastructure"
    assert committed == {"attempt": 2, "attempt_id": committed["attempt_id"], "status": "succeeded", "ran_container": False, "committed_from": ran["attempt_id"]}
    [out] = second.outputs
    assert out.uri.startswith("s3://down/st/runs/down/steps/make/attempts/2-") and out.sha256 == kept_sha256
    assert store.fs.cat_file(out.uri.removeprefix("s3://")) == kept_bytes
    assert second.log_uri and "/attempts/2-" in second.log_uri and store.fs.exists(second.log_uri.removeprefix("s3://"))
    assert not keep.joinpath("down", "make").exists() or not any(keep.joinpath("down", "make").iterdir()), "committed outputs are no longer kept"
    # A third attempt of the same run is served from the committed outputs, not from a kept copy.
    third = execute_step(ctx, "make", {}, attempt=3)
    assert third.status == "cached" and [o.uri for o in third.outputs] == [out.uri]


@pytest.mark.parametrize("forgery", ["other-inputs", "changed-bytes"])
def test_kept_outputs_are_committed_only_when_made_from_the_same_inputs_and_unchanged(tmp_path, image, docker_client, monkeypatch, forgery: str) -> None:
    """A kept attempt whose cache key differs from this attempt's, or whose bytes no longer match
    its record, is never committed: the step runs its container instead."""
    import hashlib

    from algodock.pipeline import load_pipeline
    from algodock.pipeline.capacity import Capacity, ResourcePool
    from algodock.pipeline.execute import KEPT_RECORD, KeptAttempt, KeptOutput, RunContext, execute_step

    keep = tmp_path / "kept"
    monkeypatch.setenv("ALGODOCK_KEEP_DIR", str(keep))
    spec = k_pipeline(tmp_path / "p", image)
    cap = Capacity(cpu_millicore=2000, memory_gb=2)
    store = open_store(str(tmp_path / "store"))
    ctx = RunContext(pipeline=load_pipeline(spec, capacity=cap), store=store, run_id="forge", client=docker_client, pool=ResourcePool(cap), scratch=tmp_path / "scratch")
    real = execute_step(ctx, "make", {}, attempt=1)  # no cache in ctx: only the kept folder could stand in for the container
    assert real.status == "succeeded"

    forged = b"forged\n"
    folder = keep / "forge" / "make" / "1-forged"
    (folder / "outputs").mkdir(parents=True)
    (folder / "outputs" / "out.binary").write_bytes(forged if forgery == "other-inputs" else b"changed after it was kept\n")
    record = real.model_copy(deep=True)
    record.outputs = [record.outputs[0].model_copy(update={"sha256": hashlib.sha256(forged).hexdigest()})]
    if forgery == "other-inputs":
        record.cache_key = "0" * 64
    kept = KeptAttempt(attempt_id="1-forged", record=record, outputs_dir=folder / "outputs", outputs=[KeptOutput(name="out", rel="out.binary")])
    (folder / KEPT_RECORD).write_text(kept.model_dump_json())

    creates = ContainerCreates(docker_client, "forge")
    again = execute_step(ctx, "make", {}, attempt=2)
    assert again.status == "succeeded", again.failure
    assert creates.count() == 1, "the container must run"
    creates.close()
    assert again.outputs[0].sha256 == real.outputs[0].sha256 != record.outputs[0].sha256
    assert local_path_of(again.outputs[0].uri).read_bytes() != forged
    assert (folder / KEPT_RECORD).exists(), "what was kept is left alone, not deleted"


# ------------------------------------------------------------------ 6. crash and resume


def test_killed_run_resumes_with_the_same_run_id(tmp_path, image, prefect_env, docker_client) -> None:
    spec = k_pipeline(tmp_path / "p", image, second_step=False)
    # a second, slow step after a finished first one: the kill lands while it runs
    slow = json.loads((tmp_path / "p" / "make.json").read_text())
    slow["name"] = "slow"
    slow["container_parameters"]["command"] = sh("sleep 30; cat /work/input/data/* > /work/output/copy.binary")
    slow["inputs"] = [{"name": "data", "format": "binary"}]
    slow["outputs"] = [{"name": "copy", "format": "binary"}]
    (tmp_path / "p" / "slow.json").write_text(json.dumps(slow))
    doc = json.loads(spec.read_text())
    doc["steps"].append({"id": "slow", "manifest": "slow.json", "inputs": {"data": "make.out"}})
    spec.write_text(json.dumps(doc))
    store = tmp_path / "store"
    creates = ContainerCreates(docker_client, "crash")

    proc = subprocess.Popen([*ALGODOCK, "run", str(spec), "--store", str(store), "--run-id", "crash", "--no-cache", "--json"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=prefect_env, cwd=spec.parent)
    try:
        poll("the slow step's container", lambda: docker_client.containers.list(filters={"label": f"{LABEL}.step_id=slow"}), deadline=120)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    left = docker_client.containers.list(all=True, filters={"label": f"{LABEL}.run_id=crash"})
    assert left, "the killed run's container should still be there before the resume"
    crashed = subprocess.run([*ALGODOCK, "lineage", "crash", "--store", str(store), "--json"], capture_output=True, text=True, env=prefect_env)
    shown = json.loads(crashed.stdout)
    assert shown["status"] != "running" and "died" in json.dumps(shown), shown
    assert list(store.rglob(".tmp-outputs-*")), "a killed step leaves its temporary outputs (until the resume)"

    rc, resumed, err = algodock_run(spec, prefect_env, "--store", str(store), "--run-id", "crash")
    assert rc == 0, err[-4000:]
    assert step(resumed, "make")["status"] in ("succeeded", "cached")
    assert creates.count() == 3, "the finished step ran again"  # make, slow (killed), slow
    creates.close()
    present = {x["Id"] for x in docker_client.api.containers(all=True)}
    assert not [c.id for c in left if c.id in present], "the killed run's container was not removed"
    assert not list(store.rglob(".tmp-outputs-*")) and not list(store.rglob(".tmp-*"))
    assert not (store / ".work" / "crash").exists()
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob("algodock-crash-*"))
    doc = lineage(store, "crash")
    assert doc["status"] == "succeeded" and all(s["status"] != "running" for s in doc["steps"])
    verify = subprocess.run([*ALGODOCK, "lineage", "verify", "crash", "--store", str(store)], capture_output=True, text=True, env=prefect_env)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_store_credentials_reach_neither_the_container_nor_the_store(tmp_path, image, prefect_env, s3_endpoint) -> None:
    """The S3 credentials algodock uses are in its own environment only: a step that prints its
    whole environment and every file it can read under /work shows none of them, and nothing
    written to the store (outputs, log, lineage, run summary, cache, lease) holds them."""
    secret, key_id = "s3cr3t-value-never-leaks-7f3a", "AKIAALGODOCKNEVERLEAKS"
    env = {**prefect_env, "AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret,
           "AWS_DEFAULT_REGION": "us-east-1"}
    subprocess.run([sys.executable, "-c", "from algodock.store.backends import s3_filesystem; s3_filesystem().mkdir('creds')"], env=env, check=True, timeout=60)
    folder = tmp_path / "p"
    folder.mkdir()
    manifest(folder / "env.json", name="env", image=image, command=sh("env; cat /work/algo_input.json; env > /work/output/env.binary"),
             inputs=[], outputs=[{"name": "env", "format": "binary"}])
    (folder / "pipeline.json").write_text(json.dumps({"pipeline_version": "0.1", "name": "creds", "steps": [{"id": "env", "manifest": "env.json"}]}))
    code, doc, err = algodock_run(folder / "pipeline.json", env, "--store", "s3://creds/st", "--run-id", "creds")
    assert code == 0, err[-4000:]
    seen = read_output(step(doc, "env")["outputs"][0]["uri"]).decode()
    assert "ALGORITHM_INPUT_PATH=" in seen, "the probe printed the container's environment"
    assert "AWS_" not in seen, "no AWS variable reaches the container"
    env_for_fs = {k: v for k, v in env.items() if k.startswith("AWS_")}
    fs = subprocess.run([sys.executable, "-c", "import sys\nfrom algodock.store.backends import s3_filesystem\nfs = s3_filesystem()\n"
                         "for p in fs.find('creds/st'):\n    sys.stdout.buffer.write(fs.cat_file(p))\n"],
                        env={**os.environ, **env_for_fs}, capture_output=True, timeout=120)
    assert fs.returncode == 0, fs.stderr[-2000:]
    assert len(fs.stdout) > 0 and b"ALGORITHM_INPUT_PATH" in fs.stdout, "the store was read (the log and the output are in it)"
    for value in (secret, key_id):
        assert value.encode() not in fs.stdout, f"{value!r} was written to the store"
        assert value not in json.dumps(doc)
