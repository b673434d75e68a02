"""Helpers shared by the benches (not a bench itself).

Import this module first: it points Prefect at a private ``PREFECT_HOME`` (so concurrent
sessions on one machine never share ``~/.prefect``'s sqlite) before Prefect is imported,
and puts the repository on ``sys.path`` so ``algodock``, ``flows`` and ``tests`` import.
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
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

_PREFECT_HOME = tempfile.mkdtemp(prefix="algodock-bench-prefect-")
atexit.register(shutil.rmtree, _PREFECT_HOME, True)
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
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


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


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


def docker_run_argv(cfg: dict[str, Any], *, remove: bool = True) -> list[str]:
    """The ``docker run`` command line with exactly the sandbox of ``algodock.sandbox.container_config``."""
    argv = ["docker", "run"]
    if remove:
        argv.append("--rm")
    argv += ["--user", cfg["user"], "--network", cfg["network_mode"], "--ipc", cfg["ipc_mode"]]
    if cfg.get("read_only"):
        argv.append("--read-only")
    for path, opts in cfg.get("tmpfs", {}).items():
        argv += ["--tmpfs", f"{path}:{opts}"]
    for cap in cfg.get("cap_drop", []):
        argv += ["--cap-drop", cap]
    for opt in cfg.get("security_opt", []):
        argv += ["--security-opt", opt]
    argv += ["--pids-limit", str(cfg["pids_limit"]), "--cpus", f"{cfg['nano_cpus'] / 1e9:g}"]
    argv += ["--memory", f"{cfg['mem_limit']}b", "--memory-swap", f"{cfg['memswap_limit']}b"]
    for key, value in cfg.get("environment", {}).items():
        argv += ["--env", f"{key}={value}"]
    for key, value in cfg.get("labels", {}).items():
        argv += ["--label", f"{key}={value}"]
    for m in cfg.get("mounts", []):
        argv += ["--mount", f"type={m['Type']},source={m['Source']},target={m['Target']}" + (",readonly" if m.get("ReadOnly") else "")]
    log_config = cfg.get("log_config")
    if log_config is not None:
        argv += ["--log-driver", log_config.type]
        for key, value in (log_config.config or {}).items():
            argv += ["--log-opt", f"{key}={value}"]
    return argv + [cfg["image"], *cfg["command"]]


def write_manifest(path: Path, *, image: str, command: list[str], **extra: Any) -> Path:
    from tests.conftest import write_manifest as write

    return write(path, image=image, command=command, **extra)


# ---------------------------------------------------------------- Prefect


@contextmanager
def prefect_server() -> Iterator[None]:
    """Prefect's test harness: a temporary server and database, for this process only."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def run_flow(spec: dict[str, Any], store: Path, run_id: str, capacity: str) -> tuple[dict[str, Any], float]:
    """Run ``flows.pipeline.run_pipeline`` (inside :func:`prefect_server`); the run summary and wall seconds."""
    import json

    from flows.pipeline import run_pipeline

    t0 = time.perf_counter()
    state = run_pipeline(spec=spec, store=str(store), run_id=run_id, capacity=capacity, no_cache=True, return_state=True)
    wall = time.perf_counter() - t0
    summary = json.loads((store / "runs" / run_id / "run.json").read_text())
    if not state.is_completed():
        failed = [(s["id"], s.get("failure")) for s in summary["steps"] if s["status"] != "succeeded"]
        sys.exit(f"bench: run {run_id} did not succeed: {state.message}; {failed[:3]}")
    return summary, wall


def step_times(summary: dict[str, Any]) -> list[tuple[str, datetime, datetime]]:
    """``(id, started_at, finished_at)`` of every step of a run summary that ran a container."""
    out = []
    for s in summary["steps"]:
        if s.get("started_at") and s.get("finished_at"):
            out.append((s["id"], datetime.fromisoformat(s["started_at"]), datetime.fromisoformat(s["finished_at"])))
    return out


def max_overlap(intervals: Sequence[tuple[datetime, datetime]]) -> int:
    """The largest number of intervals open at one instant (an end before a start at a tie)."""
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals], key=lambda e: (e[0], e[1]))
    best = cur = 0
    for _, delta in events:
        cur += delta
        best = max(best, cur)
    return best


if __name__ == "__main__":
    print("bench/_util.py holds helpers for the other benches; nothing to run.")
