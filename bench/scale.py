"""Scale up on one host: 100 vs 1000 tiny steps, a 300-step fan-out against raw `docker run`,
the orchestrator's peak RSS and the bytes written for lineage per run.

    .venv/bin/python bench/scale.py [--small 100] [--large 1000] [--fanout 300] [--slots 20] [--pairs 2]

All in one run, against one Prefect server (``prefect server start``, as a user starts it):

* ``per-step cost``: flow wall / steps for ``--small`` and ``--large`` independent busybox
  ``true`` steps of 100 millicores on a capacity of ``--slots`` x 100 millicores; target:
  the large run's per-step cost <= 1.10 x the small run's (nothing grows faster than the work);
* ``fan-out``: the ``--fanout``-step run's makespan (first container start to last exit)
  against the same number of raw ``docker run --rm`` with the sandbox's flags, ``--slots``
  at a time, in ``--pairs`` pairs (raw first, then flow first, ...), measured before the
  scale-up runs so the server has no backlog of their events; target: total flow makespan
  <= 1.10 x total raw;
* ``peak RSS``: the most this process (the orchestrator) held resident (``VmRSS``, sampled
  every 20 ms) during the ``--large`` run against during the ``--small`` run, both after the
  fan-out; target: <= 1.5 x (10 x the steps, not 10 x the memory); ``ru_maxrss`` is printed
  beside it;
* ``lineage bytes``: bytes of ``lineage.json`` and ``run.json`` written per run (counted
  at ``Store.write_json``; an S3 store PUTs exactly these bytes).
"""

from __future__ import annotations

import _util  # noqa: F401  (environment and sys.path first)

import argparse
import json
import os
import resource
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

from _util import busybox_image, exit_status, fmt_s, prefect_server, print_table, process_cpu, raw_argvs, run_flow, scratch_dir, server_pid, step_times, verdict, write_manifest

from algodock.runtime.engine import docker_client

WRITTEN: dict[str, int] = {}


def _count_lineage_bytes() -> None:
    """Count the bytes every store writes per JSON document name (lineage.json, run.json)."""
    from algodock.store import backends

    for cls in (backends.LocalStore, backends.S3Store):
        original = cls.write_json

        def counted(self, rel, obj, _original=original, **kwargs):  # type: ignore[no-untyped-def]
            name = rel.rsplit("/", 1)[-1]
            WRITTEN[name] = WRITTEN.get(name, 0) + len(json.dumps(obj).encode())
            return _original(self, rel, obj, **kwargs)

        cls.write_json = counted  # type: ignore[method-assign]


def _machine_cpu() -> float:
    """CPU seconds the whole machine has been busy (``/proc/stat``: all but idle and iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _rss_mb() -> float:
    """This process's resident memory now (``VmRSS`` of ``/proc/self/status``), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise SystemExit("bench: no VmRSS in /proc/self/status")


@contextmanager
def _peak_rss() -> Iterator[list[float]]:
    """Samples this process's resident memory every 20 ms while the block runs; the list
    holds the highest sample when the block ends."""
    peak = [_rss_mb()]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], _rss_mb())

    sampler = threading.Thread(target=sample, name="rss-sampler", daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        done.set()
        sampler.join()
        peak[0] = max(peak[0], _rss_mb())


class Cpu(NamedTuple):
    """CPU seconds spent during one measured run, by whom."""

    machine: float
    orchestrator: float
    """This process (the flow), or the `docker run` processes it started (raw)."""
    server: float


def _measured(fn, server: int) -> tuple[Any, Cpu]:  # type: ignore[no-untyped-def]
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    m0, s0 = _machine_cpu(), process_cpu(server)
    value = fn()
    me2, kids2 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    ours = (me2.ru_utime + me2.ru_stime - me.ru_utime - me.ru_stime) + (kids2.ru_utime + kids2.ru_stime - kids.ru_utime - kids.ru_stime)
    return value, Cpu(_machine_cpu() - m0, ours, process_cpu(server) - s0)


def _spec(manifest: Path, n: int) -> dict:
    return {"pipeline_version": "0.1", "name": f"wide-{n}", "steps": [{"id": f"s{i}", "manifest": str(manifest)} for i in range(n)]}


def _raw(root: Path, manifest: Path, image_id: str, n: int, slots: int, label: str = "raw") -> float:
    argvs = raw_argvs(root / label, manifest, image_id, n, "raw-scale")
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=slots) as pool:
        list(pool.map(lambda argv: subprocess.run(argv, check=True, stdout=subprocess.DEVNULL), argvs))
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", type=int, default=100)
    parser.add_argument("--large", type=int, default=1000)
    parser.add_argument("--fanout", type=int, default=300)
    parser.add_argument("--slots", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=2, help="fan-out flow/raw pairs (alternating order)")
    args = parser.parse_args()
    capacity = f"cpu_millicore={args.slots * 100},memory_gb={args.slots * 0.125}"
    _count_lineage_bytes()
    client = docker_client()
    image_id = busybox_image(client)
    rows = []
    with scratch_dir("scale") as root, prefect_server():
        manifest = write_manifest(root / "noop.json", name="noop", image=_util.BENCH_BUSYBOX, command=["true"],
                                  container={"resource_request": {"cpu_millicore": 100, "memory_gb": 0.125}, "timeout_seconds": 120})
        run_flow(_spec(manifest, 4), root / "store", f"warmup-{os.getpid()}", capacity)  # flow registered, imports settled
        # The fan-out first, on a server with no backlog of earlier runs' events, in pairs in
        # both orders (raw, flow, flow, raw, ...) so a drift of the machine's speed cancels out.
        fan: list[tuple[float, float]] = []
        cpu: dict[str, list[Cpu]] = {"flow": [], "raw": []}
        server = server_pid()

        def raw_run(pair: int) -> float:
            wall, used = _measured(lambda: _raw(root, manifest, image_id, args.fanout, args.slots, f"raw{pair}"), server)
            cpu["raw"].append(used)
            return wall

        for pair in range(args.pairs):
            raw = raw_run(pair) if pair % 2 == 0 else None
            run, used = _measured(lambda: run_flow(_spec(manifest, args.fanout), root / "store", f"fan{args.fanout}-{pair}-{os.getpid()}", capacity), server)
            cpu["flow"].append(used)
            times = step_times(run.summary)
            makespan = (max(t[2] for t in times) - min(t[1] for t in times)).total_seconds()
            if raw is None:
                raw = raw_run(pair)
            fan.append((makespan, raw))
        walls, peaks = {}, {}
        for n in (args.small, args.large):
            WRITTEN.clear()
            with _peak_rss() as peak:
                run = run_flow(_spec(manifest, n), root / "store", f"n{n}-{os.getpid()}", capacity)
            walls[n], peaks[n] = run.wall, peak[0]
            rows.append([f"{n} steps", fmt_s(run.wall), f"{run.wall / n * 1000:.0f} ms", f"{peak[0]:.0f} MB",
                         f"{WRITTEN.get('lineage.json', 0) / 1e6:.2f} MB", f"{WRITTEN.get('run.json', 0) / 1e6:.2f} MB"])
    print(f"independent busybox `true` steps, 100 millicores each, capacity {capacity} ({args.slots} at a time)")
    print_table(["run", "flow wall", "per step", "peak RSS during the run", "lineage.json written", "run.json written"], rows)
    per_small, per_large = walls[args.small] / args.small, walls[args.large] / args.large
    for i, (makespan, raw) in enumerate(fan):
        print(f"{args.fanout}-step fan-out, pair {i + 1}: flow makespan {fmt_s(makespan)} vs {args.fanout} raw docker run "
              f"{args.slots} at a time {fmt_s(raw)}: {makespan / raw:.2f}x")
    fan_ratio = sum(m for m, _ in fan) / sum(r for _, r in fan)
    per_step = {k: [sum(getattr(c, f) for c in v) / len(v) / args.fanout * 1000 for f in Cpu._fields] for k, v in cpu.items()}
    print(f"CPU per step (ms; the machine has {os.cpu_count()} cores, busy through both runs): "
          f"flow: machine {per_step['flow'][0]:.0f}, orchestrator {per_step['flow'][1]:.0f}, Prefect server {per_step['flow'][2]:.0f}; "
          f"raw: machine {per_step['raw'][0]:.0f}, the `docker run` processes {per_step['raw'][1]:.0f}")
    print(f"orchestrator ru_maxrss over the whole bench: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    verdict(f"per-step flow wall at {args.large} steps / at {args.small} steps", per_large / per_small, 1.10)
    verdict(f"{args.fanout}-step fan-out: flow makespan / raw docker run wall, summed over {len(fan)} pair(s)", fan_ratio, 1.10)
    verdict(f"orchestrator peak RSS during {args.large} steps / during {args.small} steps", peaks[args.large] / peaks[args.small], 1.5)
    return exit_status()


if __name__ == "__main__":
    raise SystemExit(main())
