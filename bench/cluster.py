"""Scale out: 16 steps of 2 s at 1000 millicores on two engines of 2000 millicores each,
against the same on one engine (target: two-engine makespan / one-engine makespan, summed
over the pairs, <= 0.6; ideal 0.5).

    .venv/bin/python bench/cluster.py [--steps 16] [--seconds 2] [--pairs 2]

Starts what `make cluster` starts, privately and on 127.0.0.1: a second Docker engine
(``scripts/extra-engine.sh start adkbench``), a Dask scheduler, and `algodock worker`s of
2000 millicores; runs the pipeline with ``--cluster`` and a shared local store (this is one
machine), after a warm-up run, in pairs of runs alternating which goes first (two engines,
one engine, one engine, two engines, ...): for "one engine" the second engine's worker is
retired; for "two engines" after that a new one is started and warmed up (untimed). The
makespan is the last step's exit minus the first step's start, from the run summary.
"""

from __future__ import annotations

import _util  # noqa: F401  (environment and sys.path first)

import argparse
import json
import os
import subprocess
import shutil
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from _util import BENCH_BUSYBOX, busybox_image, exit_status, fmt_s, prefect_server, verdict, write_manifest

from algodock.runtime.engine import docker_client

REPO = Path(__file__).resolve().parents[1]
ENGINE = "adkbench"


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


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=2)
    parser.add_argument("--pairs", type=int, default=2, help="pairs of runs (two engines, one engine), alternating which goes first")
    args = parser.parse_args()
    busybox_image(docker_client())
    second = _engine([BENCH_BUSYBOX])
    tmp = Path(tempfile.mkdtemp(prefix="algodock-bench-cluster-"))
    procs: list[subprocess.Popen] = []
    results: dict[str, list[tuple[float, int]]] = {"two engines": [], "one engine": []}
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

        def worker(name: str, docker_host: str) -> subprocess.Popen:
            return subprocess.Popen([sys.executable, "-m", "algodock.cli", "worker", "--scheduler", address, "--host", "127.0.0.1",
                                     "--docker-host", docker_host, "--cpu-millicore", "2000", "--memory-gb", "4", "--name", name],
                                    stderr=open(tmp / f"{name}.log", "w"))

        manifest = write_manifest(tmp / "sleep.json", name="sleep", image=BENCH_BUSYBOX, command=["sleep", f"{args.seconds:g}"],
                                  container={"resource_request": {"cpu_millicore": 1000, "memory_gb": 0.25}, "timeout_seconds": 120})
        spec = {"pipeline_version": "0.1", "name": "wide", "steps": [{"id": f"s{i}", "manifest": str(manifest)} for i in range(args.steps)]}
        from algodock.flows.pipeline import run_pipeline

        with prefect_server():
            procs.append(worker("main", os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")))
            warm = {**spec, "steps": spec["steps"][:8]}
            second_worker: subprocess.Popen | None = None
            for n, label in _order(args.pairs):
                if n == 2 and second_worker is None:  # (re)start the second engine's worker and warm it up
                    second_worker = worker(f"{ENGINE}-{len(procs)}", second)
                    procs.append(second_worker)
                    _wait_workers(address, 2)
                    # warm-up (not timed): each worker's first step imports Prefect's task engine
                    run_pipeline(spec=warm, store=str(tmp / "store"), run_id=f"warm-{len(procs)}-{os.getpid()}", no_cache=True, cluster=address, shared_store=True)
                if n == 1 and second_worker is not None:  # retire the second engine's worker; the main one is warm
                    second_worker.terminate()
                    second_worker.wait(60)
                    second_worker = None
                    _wait_for_n(address, 1)
                run_id = f"bench-{n}-{len(results[label])}-{os.getpid()}"
                state = run_pipeline(spec=spec, store=str(tmp / "store"), run_id=run_id, no_cache=True, cluster=address, shared_store=True, return_state=True)
                summary = json.loads((tmp / "store/runs" / run_id / "run.json").read_text())
                if not state.is_completed():
                    sys.exit(f"bench: {label}: {state.message}")
                starts = [datetime.fromisoformat(s["started_at"]) for s in summary["steps"]]
                ends = [datetime.fromisoformat(s["finished_at"]) for s in summary["steps"]]
                engines = {s["engine"]["id"] for s in summary["steps"]}
                results[label].append(((max(ends) - min(starts)).total_seconds(), len(engines)))
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
    ideal = args.steps * args.seconds / 2
    print(f"{args.steps} steps of {args.seconds:g} s at 1000 millicores; workers of 2000 millicores (2 steps at a time each)")
    for label, ideal_s in (("one engine", ideal), ("two engines", ideal / 2)):
        runs = ", ".join(f"{fmt_s(m)} ({e} engine{'s' * (e > 1)} used)" for m, e in results[label])
        print(f"{label + ':':13} makespans {runs} (ideal {fmt_s(ideal_s)})")
    two, one = (sum(m for m, _ in results[label]) for label in ("two engines", "one engine"))
    verdict(f"two-engine makespan / one-engine makespan, summed over {args.pairs} pair(s)", two / one, 0.6)
    return exit_status()


def _order(pairs: int) -> list[tuple[int, str]]:
    """(engines, label) of each timed run: pairs alternating which goes first (two, one, one, two, ...)."""
    pair = [(2, "two engines"), (1, "one engine")]
    return [run for p in range(pairs) for run in (pair if p % 2 == 0 else reversed(pair))]


if __name__ == "__main__":
    sys.exit(main())
