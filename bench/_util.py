"""Helpers shared by the benches (not a bench itself).

Import this module first: it points Prefect at a private ``PREFECT_HOME`` (so concurrent
sessions on one machine never share ``~/.prefect``'s sqlite) before Prefect is imported,
and puts the repository on ``sys.path`` so ``algodock`` and ``tests`` import.
"""

from __future__ import annotations

import atexit
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
# A/B measurements: import algodock and flows from another copy of the tree (for example one
# with an edit reverted); the benches and tests still come from this checkout.
if os.environ.get("ALGODOCK_BENCH_SRC"):
    sys.path.insert(0, os.environ["ALGODOCK_BENCH_SRC"])

_PREFECT_HOME = tempfile.mkdtemp(prefix="algodock-bench-prefect-")
atexit.register(shutil.rmtree, _PREFECT_HOME, True)
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# The flows this process runs report to the server :func:`prefect_server` starts on this
# port; set before Prefect is imported, so every thread (the flow's cancellation watcher
# included) sees it.
_PREFECT_PORT = _free_port()
_PREFECT_API_URL = f"http://127.0.0.1:{_PREFECT_PORT}/api"
os.environ["PREFECT_API_URL"] = _PREFECT_API_URL
# Task-run logs still go to the API (a real cost of the flow); only the console is quiet.
os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")

BENCH_BUSYBOX = "algodock-bench/busybox:1"


def quick() -> bool:
    """True when the bench was started with ``--quick``."""
    return "--quick" in sys.argv[1:]


def work_root() -> Path:
    """A scratch folder on the same filesystem as the repository (so hardlinks work): /tmp when it is."""
    for candidate in (Path(tempfile.gettempdir()), REPO.parent):
        if os.access(candidate, os.W_OK) and os.stat(candidate).st_dev == os.stat(REPO).st_dev:
            return candidate
    return Path(tempfile.gettempdir())


@contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A temporary folder beside the repository, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=f".algodock-bench-{prefix}-", dir=work_root()))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def timed(fn: Callable[[], Any]) -> float:
    """Wall seconds of one call."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def best_and_median(samples: Sequence[float]) -> tuple[float, float]:
    return min(samples), statistics.median(samples)


def fmt_s(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain fixed-width table on stdout."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            print("  ".join("-" * w for w in widths))


TIGHTEN_ENV = "ALGODOCK_BENCH_TIGHTEN"
_missed: list[str] = []


def verdict(name: str, value: float, target: float, unit: str = "x") -> bool:
    """Judge one figure: ``value <= target`` (every target is an upper bound), printed as one
    ``target:`` line; a miss is remembered, so :func:`exit_status` makes the bench exit 1.

    ``ALGODOCK_BENCH_TIGHTEN=<factor>`` multiplies every target by ``factor`` (for example
    ``0`` misses them all): how to see that a bench fails when its target is missed.
    """
    factor = float(os.environ.get(TIGHTEN_ENV, "1"))
    limit = target * factor
    ok = value <= limit
    tightened = f", {TIGHTEN_ENV}={factor:g}" if factor != 1 else ""
    print(f"target: {name}: {value:.3g}{unit} (target <= {limit:.3g}{unit}{tightened}): {'MET' if ok else 'MISSED'}", flush=True)
    if not ok:
        _missed.append(name)
    return ok


def exit_status() -> int:
    """0 when every :func:`verdict` of this run was met, else 1 (naming the missed ones on stderr)."""
    if _missed:
        print(f"bench {Path(sys.argv[0]).name}: target missed: {'; '.join(_missed)}", file=sys.stderr, flush=True)
        return 1
    return 0


# ---------------------------------------------------------------- Docker


def busybox_image(client: Any) -> str:
    """``FROM scratch`` + the host's static busybox (as tests/conftest.py builds it); returns the id."""
    from tests.conftest import build_image

    binary = Path("/bin/busybox")
    if not binary.exists():
        sys.exit("bench: /bin/busybox (Debian's busybox-static) is needed to build the bench image")
    return build_image(
        client,
        BENCH_BUSYBOX,
        'FROM scratch\nCOPY busybox /bin/busybox\nRUN ["/bin/busybox", "--install", "-s", "/bin"]\n',
        {"busybox": binary},
    )


def write_manifest(path: Path, *, image: str, command: list[str], **extra: Any) -> Path:
    from tests.conftest import write_manifest as write

    return write(path, image=image, command=command, **extra)


# ---------------------------------------------------------------- Prefect


def raw_argvs(work: Path, manifest: Path, image_id: str, n: int, run_id: str) -> list[list[str]]:
    """``n`` raw ``docker run --rm`` command lines of ``manifest``'s container, with the exact
    sandbox flags of ``algodock.runtime.sandbox.container_config``, on an empty input and one
    output folder each (owned by the unprivileged uid) under ``work``."""
    from algodock.contract.manifest import load_manifest
    from algodock.runtime.engine import container_labels
    from algodock.runtime.sandbox import UNPRIVILEGED_UID, container_config, docker_run_argv

    cp = load_manifest(manifest).container_parameters
    (work / "input").mkdir(parents=True)
    (work / "algo_input.json").write_text('{"version": "0.1", "config": {"parameters": {}}, "input_data": []}')
    argvs = []
    for i in range(n):
        out = work / f"out-{i}"
        out.mkdir()
        os.chown(out, UNPRIVILEGED_UID, UNPRIVILEGED_UID)
        cfg = container_config(cp, image_id=image_id, user=f"{UNPRIVILEGED_UID}:{UNPRIVILEGED_UID}", work_dir=work, output_dir=out,
                               labels=container_labels(run_id, f"s{i}", 1))
        argvs.append(docker_run_argv(cfg))
    return argvs


def _template_db() -> Path:
    """A migrated Prefect sqlite database, built once per Prefect version and copied per bench.

    Migrating a fresh database takes 20-50 s on a busy 2-core machine; the benches would
    spend most of their time there. The template is built with Prefect's own command
    (``prefect server database upgrade``) in a child process and renamed into place, so
    concurrent benches never see half of it.
    """
    import subprocess

    import prefect

    template = Path(tempfile.gettempdir()) / f"algodock-bench-prefect-{prefect.__version__}-v3.db"
    if template.exists():
        return template
    tmp = template.with_name(f".{template.name}-{os.getpid()}")
    env = {**os.environ, "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp}"}
    print("bench: building a migrated Prefect database template (once per Prefect version) ...", flush=True)
    subprocess.run([sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"], env=env, check=True, capture_output=True)
    os.replace(tmp, template)
    for suffix in ("-wal", "-shm"):
        Path(f"{tmp}{suffix}").unlink(missing_ok=True)
    return template


@contextmanager
def prefect_server() -> Iterator[str]:
    """A Prefect server as a user starts it (``prefect server start`` on 127.0.0.1) on a
    private copy of a migrated database; yields its API URL. Flows this process runs report
    to it: ``PREFECT_API_URL`` was set when this module was imported, before Prefect was."""
    import subprocess
    import urllib.request

    db = Path(_PREFECT_HOME) / "server.db"
    shutil.copyfile(_template_db(), db)
    env = {
        **os.environ,
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{db}",
        "PREFECT_API_DATABASE_MIGRATE_ON_START": "false",  # the copy is migrated
    }
    log = open(Path(_PREFECT_HOME) / "server.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(_PREFECT_PORT)],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{_PREFECT_API_URL}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"bench: the Prefect server did not start; its log: {log.name}")
            time.sleep(0.2)  # polling the server's health with a deadline, not synchronising on time
        yield _PREFECT_API_URL
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a live process (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_pid() -> int:
    """The Prefect server this process started (its child running `prefect server start`)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if ppid == os.getpid() and b"server" in (entry / "cmdline").read_bytes():
                    return int(entry.name)
            except (OSError, ValueError):
                continue
    raise SystemExit("bench: cannot find the Prefect server's process")


class FlowRun(NamedTuple):
    """One timed run of the pipeline flow."""

    summary: dict[str, Any]
    """The run summary (``runs/<run_id>/run.json``)."""
    wall: float
    """Seconds from calling ``run_pipeline`` to its return."""
    called: datetime
    """When ``run_pipeline`` was called (UTC, comparable with the steps' times)."""
    returned: datetime


def run_flow(spec: dict[str, Any], store: Path, run_id: str, capacity: str) -> FlowRun:
    """Run ``algodock.flows.pipeline.run_pipeline`` (inside :func:`prefect_server`) with ``no_cache=True``."""
    import json

    from algodock.flows.pipeline import run_pipeline

    called = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    state = run_pipeline(spec=spec, store=str(store), run_id=run_id, capacity=capacity, no_cache=True, return_state=True)
    wall = time.perf_counter() - t0
    returned = datetime.now(timezone.utc)
    summary = json.loads((store / "runs" / run_id / "run.json").read_text())
    lineage = json.loads((store / "runs" / run_id / "lineage.json").read_text())
    retried = [s["id"] for s in lineage["steps"] if (s.get("attempts") or 1) > 1]
    if retried:  # e.g. a container removed under us by another process on a shared engine
        print(f"note: run {run_id}: step(s) {', '.join(retried)} needed more than one attempt; its timing includes the retry")
    if not state.is_completed():
        failed = [(s["id"], s.get("failure")) for s in summary["steps"] if s["status"] != "succeeded"]
        sys.exit(f"bench: run {run_id} did not succeed: {state.message}; {failed[:3]}")
    return FlowRun(summary, wall, called, returned)


def run_engine(spec: dict[str, Any] | Path, store: Path, run_id: str, capacity: str, client: Any) -> float:
    """Run a pipeline's steps one after another through the engine alone
    (:func:`algodock.pipeline.execute.execute_step`, no Prefect, no cache); returns the wall seconds."""
    import json

    from algodock.pipeline import load_pipeline
    from algodock.pipeline.capacity import Capacity, ResourcePool
    from algodock.pipeline.execute import RunContext, execute_step
    from algodock.store.backends import open_store

    if isinstance(spec, dict):
        path = store.parent / f"{run_id}.json"
        path.write_text(json.dumps(spec))
        spec = path
    cap = Capacity.parse(capacity)
    pipeline = load_pipeline(spec, capacity=cap)
    scratch = Path(tempfile.mkdtemp(prefix=f"engine-{run_id}-", dir=store.parent))
    t0 = time.perf_counter()
    ctx = RunContext(pipeline=pipeline, store=open_store(str(store)), run_id=run_id, client=client, pool=ResourcePool(cap), scratch=scratch)
    records: dict[str, Any] = {}
    try:
        for step_id in pipeline.topological_order():
            records[step_id] = execute_step(ctx, step_id, {d: records[d] for d in pipeline.dependencies[step_id]})
            if records[step_id].status != "succeeded":
                sys.exit(f"bench: run {run_id}: step {step_id} failed: {records[step_id].failure}")
    finally:
        if hasattr(ctx, "close"):  # an older tree (ALGODOCK_BENCH_SRC) may not have it
            ctx.close()
        shutil.rmtree(scratch, ignore_errors=True)
    return time.perf_counter() - t0


def step_times(summary: dict[str, Any]) -> list[tuple[str, datetime, datetime]]:
    """``(id, started_at, finished_at)`` of every step of a run summary that ran a container."""
    out = []
    for s in summary["steps"]:
        if s.get("started_at") and s.get("finished_at"):
            out.append((s["id"], datetime.fromisoformat(s["started_at"]), datetime.fromisoformat(s["finished_at"])))
    return out


def handoff_gaps(intervals: Sequence[tuple[datetime, datetime]], slots: int) -> list[float]:
    """For every step that had to wait for a slot: seconds from the exit that freed its slot
    (the latest exit before its start) to its own start. The first ``slots`` starts are skipped."""
    ordered = sorted(intervals)
    gaps = []
    for start, _ in ordered[slots:]:
        freed = [end for _, end in intervals if end <= start]
        if freed:
            gaps.append((start - max(freed)).total_seconds())
    return gaps


def max_overlap(intervals: Sequence[tuple[datetime, datetime]]) -> int:
    """The largest number of intervals open at one instant (an end before a start at a tie)."""
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals], key=lambda e: (e[0], e[1]))
    best = cur = 0
    for _, delta in events:
        cur += delta
        best = max(best, cur)
    return best


# ---------------------------------------------------------------- profiling


class StepProfiler:
    """Where a pipeline step's time goes: wraps the engine's phases and every HTTP call to
    the Prefect API with timers (bench-only monkeypatching; nothing in the code changes).

    ``install()`` before a run, ``uninstall()`` after, ``report(steps)`` prints the sum of
    each phase divided by the number of steps. Phases nest (indented), so children are
    included in their parent's time.
    """

    PHASES: list[tuple[str, str, str, int]] = [  # (label, module, attribute, depth)
        ("task submit (Prefect)", "prefect.tasks", "Task.submit", 0),
        ("task body (run_algorithm_step)", "algodock.flows.compose", "run_algorithm_step", 0),
        ("execute_step", "algodock.flows.calls", "execute_step", 1),
        ("bind_inputs", "algodock.pipeline.execute", "bind_inputs", 2),
        ("resolve_image", "algodock.pipeline.execute", "resolve_image", 2),
        ("cache lookup", "algodock.lineage.cache", "StoreCache.lookup", 2),
        ("run_step", "algodock.pipeline.execute", "run_step", 2),
        ("plan_inputs (check)", "algodock.runtime.runner", "plan_inputs", 3),
        ("prepare_work_dir (staging)", "algodock.runtime.runner", "prepare_work_dir", 3),
        ("container create", "algodock.runtime.lifecycle", "_create", 3),
        ("pool acquire", "algodock.pipeline.capacity", "ResourcePool.acquire", 3),
        ("container attach", "algodock.runtime.lifecycle", "StepContainer.attach", 3),
        ("container start", "docker.models.containers", "Container.start", 3),
        ("container wait", "algodock.runtime.lifecycle", "_wait", 3),
        ("container reload", "docker.models.containers", "Container.reload", 3),
        ("collect_outputs (hash)", "algodock.runtime.lifecycle", "collect_outputs", 3),
        ("container remove", "algodock.runtime.lifecycle", "remove_container", 3),
        ("store put_output", "algodock.store.backends", "LocalStore.put_output", 2),
        ("cache remember", "algodock.lineage.cache", "StoreCache.remember", 2),
        ("ledger update", "algodock.lineage.ledger", "Ledger.update", 0),
        ("ledger write", "algodock.lineage.ledger", "Ledger._write", 1),
    ]

    def __init__(self) -> None:
        import threading

        self.spans: dict[str, list[tuple[float, float]]] = {}
        self.totals: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.api: dict[str, list[float]] = {}
        self._saved: list[tuple[Any, str, Any]] = []
        self._lock = threading.Lock()

    def _add(self, label: str, t0: float, t1: float) -> None:
        with self._lock:
            self.spans.setdefault(label, []).append((t0, t1))
            self.totals[label] = self.totals.get(label, 0.0) + t1 - t0
            self.counts[label] = self.counts.get(label, 0) + 1

    def _wrap(self, owner: Any, attr: str, label: str) -> None:
        import functools

        own = isinstance(owner, type) and attr in owner.__dict__
        original = owner.__dict__[attr] if own else getattr(owner, attr)
        func = original.__func__ if isinstance(original, (staticmethod, classmethod)) else original

        @functools.wraps(func)
        def timed_call(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return func(*args, **kwargs)
            finally:
                self._add(label, t0, time.perf_counter())

        # An inherited method is shadowed, then the shadow deleted again on uninstall.
        self._saved.append((owner, attr, original if own or not isinstance(owner, type) else None))
        setattr(owner, attr, timed_call)

    def install(self) -> StepProfiler:
        import importlib

        import httpx

        for label, module, attr, _ in self.PHASES:
            owner: Any = importlib.import_module(module)
            *path, name = attr.split(".")
            for part in path:
                owner = getattr(owner, part)
            self._wrap(owner, name, label)
        # Every synchronous call to the Prefect API (the async ones are background workers).
        for client_cls in (httpx.Client,):
            original = client_cls.send

            def send(client: Any, request: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return _original(client, request, *args, **kwargs)
                finally:
                    if "/api/" in str(request.url):
                        key = f"{request.method} {request.url.path.split('/api/', 1)[1]}"
                        with self._lock:
                            self.api.setdefault(key, []).append(time.perf_counter() - t0)

            self._saved.append((client_cls, "send", original))
            client_cls.send = send  # type: ignore[method-assign]
        return self

    def uninstall(self) -> None:
        while self._saved:
            owner, attr, original = self._saved.pop()
            if original is None:
                delattr(owner, attr)
            else:
                setattr(owner, attr, original)

    def report(self, steps: int, *, sequential: bool = False) -> None:
        print(f"where a step's time goes (totals / {steps} steps; nested phases are part of their parent):")
        rows = []
        for label, _, _, depth in self.PHASES:
            if label in self.totals:
                rows.append(["  " * depth + label, fmt_s(self.totals[label] / steps), f"{self.counts[label] / steps:g}"])
        for key, samples in sorted(self.api.items(), key=lambda kv: -sum(kv[1])):
            rows.append([f"API {key}", fmt_s(sum(samples) / steps), f"{len(samples) / steps:g}"])
        print_table(["phase", "per step", "calls/step"], rows)
        submits, bodies = self.spans.get("task submit (Prefect)"), self.spans.get("task body (run_algorithm_step)")
        if sequential and submits and bodies:
            # One step at a time: whatever is outside the task bodies is the Prefect engine
            # (task-run creation, state changes, futures) and the flow's scheduler.
            outside = (max(b for _, b in bodies) - min(a for a, _ in submits) - sum(b - a for a, b in bodies)) / steps
            print(f"outside the task bodies (Prefect task engine + scheduler), per step: {fmt_s(outside)}")


# ---------------------------------------------------------------- counting API calls


class ApiCalls:
    """Counts every request to the Docker engine (``docker.APIClient.send``: the session every
    docker SDK call goes through) and to the Prefect API (``httpx`` clients, sync and async), by
    method and path (ids replaced by ``{id}``) and by the thread that made it. Pure counting:
    each request is passed on untouched. ``with ApiCalls() as calls: ...``, then ``calls.counts``.
    """

    _ID = r"/(sha256:)?[0-9a-f]{64}|/algodock-[\w.-]+|/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"

    def __init__(self) -> None:
        import collections
        import threading

        self.counts: collections.Counter[tuple[str, str, str]] = collections.Counter()
        """``(engine, "METHOD /path", thread group)`` -> requests; engine is ``docker`` or ``prefect``."""
        self._lock = threading.Lock()
        self._saved: list[tuple[Any, Any]] = []

    def _count(self, engine: str, method: str, url: str) -> None:
        import re
        import threading

        path = re.sub(r"^.*?/v1\.\d+", "", url.split("?", 1)[0]) if engine == "docker" else url.split("?", 1)[0].split("/api", 1)[-1]
        path = re.sub(self._ID, "/{id}", path)
        thread = threading.current_thread().name
        group = "ahead" if thread.startswith("algodock-create-ahead") else "other"
        with self._lock:
            self.counts[(engine, f"{method} {path}", group)] += 1

    def __enter__(self) -> ApiCalls:
        import docker.api.client
        import httpx

        counter = self
        api_send = docker.api.client.APIClient.send

        def docker_send(session: Any, request: Any, **kwargs: Any) -> Any:
            counter._count("docker", request.method, request.url)
            return api_send(session, request, **kwargs)

        sync_send, async_send = httpx.Client.send, httpx.AsyncClient.send

        def prefect_sync(client: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
            if "/api/" in str(request.url):
                counter._count("prefect", request.method, str(request.url))
            return sync_send(client, request, *args, **kwargs)

        async def prefect_async(client: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
            if "/api/" in str(request.url):
                counter._count("prefect", request.method, str(request.url))
            return await async_send(client, request, *args, **kwargs)

        self._saved = [(docker.api.client.APIClient, ("send", api_send)), (httpx.Client, ("send", sync_send)), (httpx.AsyncClient, ("send", async_send))]
        docker.api.client.APIClient.send = docker_send  # type: ignore[method-assign]
        httpx.Client.send = prefect_sync  # type: ignore[method-assign]
        httpx.AsyncClient.send = prefect_async  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: Any) -> None:
        for owner, (name, original) in self._saved:
            setattr(owner, name, original)

    def total(self, engine: str, group: str | None = None) -> int:
        return sum(n for (e, _, g), n in self.counts.items() if e == engine and (group is None or g == group))

    def by_call(self, engine: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for (e, call, _), n in self.counts.items():
            if e == engine:
                out[call] = out.get(call, 0) + n
        return out


if __name__ == "__main__":
    print("bench/_util.py holds helpers for the other benches; nothing to run.")
