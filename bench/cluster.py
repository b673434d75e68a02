"""Scale out: 12 steps of ``sleep 5`` at 1000 millicores on two engines advertising 4000 and
2000 millicores (A+B) against the same on engine A alone (target: A+B makespan / A makespan,
summed over the pairs, <= 0.75; two waves against three is 0.67).

    .venv/bin/python bench/cluster.py [--steps 12] [--seconds 5] [--a-millicores 4000] [--b-millicores 2000] [--pairs 2]

Starts what `make cluster` starts, privately and on 127.0.0.1: a second Docker engine
(``scripts/extra-engine.sh start adkbench``), a Dask scheduler, and one `algodock worker` per
engine (A on the main engine, B on the second); runs the pipeline with ``--cluster`` and a
shared local store (this is one machine), after a warm-up run, in pairs of runs alternating
which goes first (A+B, A, A, A+B, ...): for "A" the second engine's worker is retired; for
"A+B" after that a new one is started and warmed up (untimed). The makespan is the last
step's exit minus the first step's start, from the run summary.

After the first A+B run it prints a timeline per step (seconds from the first step's arrival
at the Dask scheduler): scheduler assignment, task start on the worker, the step task's body,
its attempt claimed in the store, container start and exit, records written, the task's end
on the worker and at the scheduler; then where the seconds between waves go, and the Prefect
API calls per step (every HTTP request to the API from the workers, and from the flow).
"""

from __future__ import annotations

import _util  # noqa: F401  (environment and sys.path first)

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

from _util import BENCH_BUSYBOX, busybox_image, exit_status, fmt_s, prefect_server, print_table, verdict, write_manifest

from algodock.runtime.engine import docker_client

REPO = Path(__file__).resolve().parents[1]
ENGINE = "adkbench"
TARGET = 0.75


def _engine(images: list[str]) -> str:
    out = subprocess.run(["bash", str(REPO / "scripts/extra-engine.sh"), "start", ENGINE, "--load", *images], capture_output=True, text=True)
    if out.returncode:
        sys.exit(out.stderr)
    return out.stdout.strip().splitlines()[-1].split("=", 1)[1]


def _wait_workers(address: str, n: int) -> None:
    from distributed import Client

    with Client(address, timeout="30s") as c:
        c.wait_for_workers(n, timeout=120)


def _wait_for_n(address: str, n: int) -> None:
    from distributed import Client

    with Client(address, timeout="30s") as c:
        deadline = time.monotonic() + 60
        while len(c.scheduler_info(n_workers=-1)["workers"]) != n:
            if time.monotonic() > deadline:
                sys.exit(f"bench: the cluster did not shrink to {n} worker(s)")
            time.sleep(0.2)  # polling the scheduler with a deadline


def _api_calls(path: Path, since: float, until: float) -> Counter[str]:
    """The Prefect API requests the probe logged in ``[since, until]``, by method and route."""
    calls: Counter[str] = Counter()
    if not path.exists():
        return calls
    for line in path.read_text().splitlines():
        t, method, route = line.split(" ", 2)
        if since <= float(t) <= until:
            calls[f"{method} {_route(route)}"] += 1
    return calls


def _probe_this_process(path: Path) -> None:
    """Log this process's Prefect API requests to ``path`` (the probe the workers load through ``PYTHONPATH``)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_api_probe", REPO / "bench/_probe/sitecustomize.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module._install(str(path))


def _route(route: str) -> str:
    """``task_runs/<uuid>/set_state`` -> ``task_runs/{id}/set_state``."""
    return "/".join("{id}" if len(p) == 36 and p.count("-") == 4 else p for p in route.split("/"))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--a-millicores", type=int, default=4000)
    parser.add_argument("--b-millicores", type=int, default=2000)
    parser.add_argument("--pairs", type=int, default=2, help="pairs of runs (A+B, A), alternating which goes first")
    parser.add_argument("--profile", metavar="DIR", help="py-spy (if installed) records the flow and both workers during the first A+B run into DIR (collapsed stacks)")
    args = parser.parse_args()
    busybox_image(docker_client())
    second = _engine([BENCH_BUSYBOX])
    tmp = Path(tempfile.mkdtemp(prefix="algodock-bench-cluster-"))
    probe = tmp / "api-calls.log"
    flow_probe = tmp / "flow-api-calls.log"
    _probe_this_process(flow_probe)
    procs: list[subprocess.Popen] = []
    results: dict[str, list[tuple[float, Counter[str]]]] = {"A+B": [], "A": []}
    timeline: list[dict[str, Any]] = []
    calls_per_step: dict[str, float] = {}
    try:
        sched_file = tmp / "scheduler.json"
        procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
                                       "--no-dashboard", "--scheduler-file", str(sched_file)], stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 60
        while not (sched_file.exists() and sched_file.read_text()):
            if time.monotonic() > deadline:
                sys.exit("bench: the Dask scheduler did not start")
            time.sleep(0.2)  # polling for the scheduler file with a deadline
        address = json.loads(sched_file.read_text())["address"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "bench/_probe"), os.environ.get("PYTHONPATH", "")]),
               "ALGODOCK_BENCH_PROBE": str(probe)}

        def worker(name: str, docker_host: str, millicores: int) -> subprocess.Popen:
            return subprocess.Popen([sys.executable, "-m", "algodock.cli", "worker", "--scheduler", address, "--host", "127.0.0.1",
                                     "--docker-host", docker_host, "--cpu-millicore", str(millicores), "--memory-gb", "8", "--name", name],
                                    stderr=open(tmp / f"{name}.log", "w"), env=env)

        manifest = write_manifest(tmp / "sleep.json", name="sleep", image=BENCH_BUSYBOX, command=["sleep", f"{args.seconds:g}"],
                                  container={"resource_request": {"cpu_millicore": 1000, "memory_gb": 0.25}, "timeout_seconds": 120})
        spec = {"pipeline_version": "0.1", "name": "wide", "steps": [{"id": f"s{i}", "manifest": str(manifest)} for i in range(args.steps)]}
        from algodock.flows.pipeline import run_pipeline

        with prefect_server():
            procs.append(worker("A", os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock"), args.a_millicores))
            warm = {**spec, "steps": spec["steps"][:8]}
            second_worker: subprocess.Popen | None = None
            for n, label in _order(args.pairs):
                if n == 2 and second_worker is None:  # (re)start the second engine's worker and warm it up
                    second_worker = worker(f"B-{len(procs)}", second, args.b_millicores)
                    procs.append(second_worker)
                    _wait_workers(address, 2)
                    # warm-up (not timed): each worker's first step imports Prefect's task engine
                    run_pipeline(spec=warm, store=str(tmp / "store"), run_id=f"warm-{len(procs)}-{os.getpid()}", no_cache=True, cluster=address, shared_store=True)
                if n == 1 and second_worker is not None:  # retire the second engine's worker; the first one is warm
                    second_worker.terminate()
                    second_worker.wait(60)
                    second_worker = None
                    _wait_for_n(address, 1)
                run_id = f"bench-{label.replace('+', '')}-{len(results[label])}-{os.getpid()}"
                spies = _spy(args.profile, {"flow": os.getpid(), "A": procs[1].pid, "B": second_worker.pid if second_worker else 0}) if n == 2 and not timeline else []
                t0 = time.time()
                state = run_pipeline(spec=spec, store=str(tmp / "store"), run_id=run_id, no_cache=True, cluster=address, shared_store=True, return_state=True)
                t1 = time.time()
                for spy in spies:
                    spy.send_signal(2)
                    spy.wait(60)
                if not state.is_completed():
                    sys.exit(f"bench: {label}: {state.message}")
                summary = json.loads((tmp / "store/runs" / run_id / "run.json").read_text())
                starts = [datetime.fromisoformat(s["started_at"]) for s in summary["steps"]]
                ends = [datetime.fromisoformat(s["finished_at"]) for s in summary["steps"]]
                engines = Counter(s["engine"]["id"][:8] for s in summary["steps"])
                results[label].append(((max(ends) - min(starts)).total_seconds(), engines))
                if n == 2 and not timeline:
                    lineage = json.loads((tmp / "store/runs" / run_id / "lineage.json").read_text())
                    timeline = _timeline(address, lineage)
                    calls = _api_calls(probe, t0, t1)
                    calls_per_step = {f"workers: {k}": v / args.steps for k, v in calls.items()}
                    calls_per_step.update({f"flow: {k}": v / args.steps for k, v in _api_calls(flow_probe, t0, t1).items()})
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        subprocess.run(["bash", str(REPO / "scripts/extra-engine.sh"), "stop", ENGINE], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    _print_timeline(timeline)
    print("\nPrefect API calls per step of the first A+B run, from the workers and from the flow (HTTP requests to the API;"
          " task-run states and asset events travel as events over a websocket):")
    print_table(["request", "per step"], [[k, f"{v:g}"] for k, v in sorted(calls_per_step.items(), key=lambda kv: -kv[1])] + [["total", f"{sum(calls_per_step.values()):g}"]])
    waves = -(-args.steps // (args.a_millicores // 1000))
    print(f"\n{args.steps} steps of {args.seconds:g} s at 1000 millicores; A {args.a_millicores} millicores, B {args.b_millicores}")
    for label in ("A", "A+B"):
        ideal = (waves if label == "A" else -(-args.steps // ((args.a_millicores + args.b_millicores) // 1000))) * args.seconds
        runs = ", ".join(f"{fmt_s(m)} ({', '.join(f'{k} {v}' for k, v in sorted(e.items()))})" for m, e in results[label])
        print(f"{label + ':':5} makespans {runs} (ideal {fmt_s(ideal)})")
    both, alone = (sum(m for m, _ in results[label]) for label in ("A+B", "A"))
    verdict(f"A+B makespan / A makespan, summed over {args.pairs} pair(s)", both / alone, TARGET)
    return exit_status()


def _spy(folder: str | None, pids: dict[str, int]) -> list[subprocess.Popen]:
    if not folder or not shutil.which("py-spy", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")):
        return []
    Path(folder).mkdir(parents=True, exist_ok=True)
    exe = shutil.which("py-spy", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    return [subprocess.Popen([str(exe), "record", "--format", "raw", "--threads", "--rate", "200", "--pid", str(pid), "-o", f"{folder}/{name}.txt"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for name, pid in pids.items() if pid]


def _timeline(address: str, lineage: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per step: unix times of each event, from the lineage and the Dask scheduler's and workers' logs."""
    from distributed import Client

    def scheduler_log(dask_scheduler: Any) -> list[tuple[str, str, str, float]]:
        return [(str(e[0]), e[1], e[2], e[-1]) for e in dask_scheduler.transition_log]

    def worker_log(dask_worker: Any) -> list[tuple[str, str, str, float]]:
        return [(str(e[0]), e[1], e[2], e[-1]) for e in dask_worker.state.log if len(e) >= 5 and isinstance(e[1], str)]

    with Client(address, timeout="30s") as c:
        sched = c.run_on_scheduler(scheduler_log)
        workers = c.run(worker_log)
    rows = []
    if not all("timeline" in (step.get("attempt_history") or [{}])[-1] for step in lineage["steps"]):
        return rows  # a version of algodock that does not record it (ALGODOCK_BENCH_SRC)
    for step in lineage["steps"]:
        last = step["attempt_history"][-1]
        key = last["timeline"]["dask_key"]
        s_events = [(a, b, t) for k, a, b, t in sched if k == key]
        w_events = [(a, b, t) for log in workers.values() for k, a, b, t in log if k == key]

        def first(events: list[tuple[str, str, float]], to: str, frm: str | None = None) -> float | None:
            return next((t for a, b, t in events if b == to and (frm is None or a == frm)), None)

        def iso(s: str) -> float:
            return datetime.fromisoformat(s).timestamp()

        rows.append({
            "step": step["id"], "engine": step["engine"]["id"][:8],
            "arrived": first(s_events, "waiting") or first(s_events, "processing"),
            "assigned": first(s_events, "processing"),
            "w.executing": first(w_events, "executing"),
            "body": iso(last["timeline"]["task_started"]),
            "claimed": iso(last["timeline"]["claimed"]),
            "c.start": iso(step["started_at"]),
            "c.exit": iso(step["finished_at"]),
            "executed": iso(last["timeline"]["executed"]),
            "w.done": first(w_events, "memory"),
            "s.done": first(s_events, "memory"),
        })
    return rows


COLUMNS = ["arrived", "assigned", "w.executing", "body", "claimed", "c.start", "c.exit", "executed", "w.done", "s.done"]


def _print_timeline(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    t0 = min(r["arrived"] or r["body"] for r in rows)
    print("\ntimeline of the first A+B run, seconds from the first step's arrival at the scheduler:")
    table = []
    for r in sorted(rows, key=lambda r: r["c.start"]):
        table.append([r["step"], r["engine"], *("" if r[c] is None else f"{r[c] - t0:.2f}" for c in COLUMNS)])
    print_table(["step", "engine", *COLUMNS], table)
    segments = [("worker executing -> task body", "w.executing", "body"), ("task body -> attempt claimed", "body", "claimed"),
                ("claimed -> container start", "claimed", "c.start"), ("container exit -> execute_step returned", "c.exit", "executed"),
                ("execute_step returned -> task end on worker", "executed", "w.done"), ("task end on worker -> at scheduler", "w.done", "s.done")]
    out = []
    for label, a, b in segments:
        spans = [r[b] - r[a] for r in rows if r[a] is not None and r[b] is not None]
        if spans:
            out.append([label, fmt_s(statistics.median(spans)), fmt_s(max(spans))])
    # Between waves: a later step's container start minus the latest container exit on its engine before it started.
    gaps = []
    for r in rows:
        before = [o["c.exit"] for o in rows if o["engine"] == r["engine"] and o["c.exit"] <= r["c.start"]]
        if before:
            gaps.append(r["c.start"] - max(before))
    if gaps:
        out.append(["between waves: container exit -> next container start on that engine", fmt_s(statistics.median(gaps)), fmt_s(max(gaps))])
    print_table(["segment", "median", "max"], out)


def _order(pairs: int) -> list[tuple[int, str]]:
    """(engines, label) of each timed run: pairs alternating which goes first (A+B, A, A, A+B, ...)."""
    pair = [(2, "A+B"), (1, "A")]
    return [run for p in range(pairs) for run in (pair if p % 2 == 0 else reversed(pair))]


if __name__ == "__main__":
    sys.exit(main())
