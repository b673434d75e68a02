"""Fan-out packing: 8 independent 2-second steps of 1000 millicores on a 2000-millicore capacity.

Ideal: 4 rounds of 2 steps = 8 s (printed for reference only). Measured in the same run, in
alternating order (flow first in odd rounds, raw first in even ones):

* ``flow``: ``flows.pipeline.run_pipeline`` (Prefect's temporary server, local store,
  ``capacity="cpu_millicore=2000,memory_gb=8"``, ``no_cache=True``); the makespan is the
  last step's ``finished_at`` minus the first step's ``started_at`` from the run summary
  (``started_at`` is taken just before the container is started, ``finished_at`` when it
  exited), and the flow's whole wall time is reported beside it;
* ``raw``: 8 ``docker run --rm`` of the same container with the exact sandbox flags of
  ``algodock.runtime.sandbox.container_config``, 2 at a time (a thread pool of 2).

Targets: the median flow makespan <= 1.25 x the median raw wall (issue 3, item 5, against
the raw run of the same rounds instead of the fixed 8 s); the most steps that overlapped
(from their started/finished times) never exceeds 2, a count, not a timing.

    .venv/bin/python bench/fanout.py [--quick] [--profile]
"""

from __future__ import annotations

import _util  # noqa: F401  (environment and sys.path first)

import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _util import (
    StepProfiler,
    busybox_image,
    exit_status,
    fmt_s,
    handoff_gaps,
    max_overlap,
    prefect_server,
    print_table,
    quick,
    raw_argvs,
    run_flow,
    scratch_dir,
    step_times,
    verdict,
    write_manifest,
)

from algodock.runtime.engine import docker_client

STEPS, SECONDS, SLOTS = 8, 2, 2
IDEAL = STEPS * SECONDS / SLOTS
TARGET_RATIO = 1.25
CAPACITY = "cpu_millicore=2000,memory_gb=8"


def _spec(manifest: Path, n: int = STEPS) -> dict:
    return {"pipeline_version": "0.1", "name": "fanout", "steps": [{"id": f"s{i}", "manifest": str(manifest)} for i in range(n)]}


def _raw(root: Path, manifest: Path, image_id: str, tag: str) -> tuple[float, int]:
    """8 ``docker run --rm`` through a pool of 2 threads: (wall seconds, most running at once)."""
    argvs = raw_argvs(root / f"raw-{tag}", manifest, image_id, STEPS, f"raw-{tag}")
    spans: list[tuple[float, float]] = []

    def run(argv: list[str]) -> None:
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        spans.append((t0, time.perf_counter()))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=SLOTS) as pool:
        list(pool.map(run, argvs))
    return time.perf_counter() - t0, max_overlap(spans)


def main() -> int:
    reps = 1 if quick() else 3
    profile = "--profile" in sys.argv[1:]
    client = docker_client()
    image_id = busybox_image(client)
    rows = []
    makespans, walls, raws, overlaps = [], [], [], []
    leads, tails = [], []  # flow wall before the first container start, after the last exit
    profiler = None
    with scratch_dir("fanout") as root, prefect_server():
        manifest = write_manifest(
            root / "sleep.json", name="sleep", image=_util.BENCH_BUSYBOX, command=["sleep", str(SECONDS)],
            container={"resource_request": {"cpu_millicore": 1000, "memory_gb": 0.25}, "timeout_seconds": 60},
        )
        if not quick():  # warm-up (not timed): Prefect registers the flow, imports settle
            run_flow(_spec(manifest, 2), root / "store", f"warmup-{os.getpid()}", CAPACITY)
        for rep in range(reps):
            if rep % 2:  # alternating which goes first, so drift of the machine hits both alike
                raw_wall, raw_overlap = _raw(root, manifest, image_id, str(rep))
            if profile and rep == reps - 1:
                profiler = StepProfiler().install()
            summary, wall, called, returned = run_flow(_spec(manifest), root / "store", f"fanout-{rep}-{os.getpid()}", CAPACITY)
            if profiler is not None:
                profiler.uninstall()
            if rep % 2 == 0:
                raw_wall, raw_overlap = _raw(root, manifest, image_id, str(rep))
            times = step_times(summary)
            assert len(times) == STEPS, summary
            first, last = min(t[1] for t in times), max(t[2] for t in times)
            makespan = (last - first).total_seconds()
            leads.append((first - called).total_seconds())
            tails.append((returned - last).total_seconds())
            overlap = max_overlap([(t[1], t[2]) for t in times])
            gaps = handoff_gaps([(t[1], t[2]) for t in times], SLOTS)
            makespans.append(makespan)
            walls.append(wall)
            raws.append(raw_wall)
            overlaps.append(overlap)
            rows.append([
                f"run {rep + 1}", fmt_s(makespan), f"{makespan / IDEAL:.2f}x", fmt_s(wall), fmt_s(statistics.median(gaps)),
                fmt_s(raw_wall), f"{raw_wall / IDEAL:.2f}x", f"{makespan / raw_wall:.2f}x", overlap, raw_overlap,
            ])

    print(f"{STEPS} independent busybox `sleep {SECONDS}` steps, 1000 millicores each, capacity {CAPACITY}; ideal {IDEAL:g} s")
    print()
    print_table(["", "flow makespan", "vs ideal", "flow wall", "handoff", "raw 2-at-a-time", "raw vs ideal", "flow/raw", "max overlap", "raw overlap"], rows)
    median, raw_median = statistics.median(makespans), statistics.median(raws)
    print()
    print(f"flow makespan best {fmt_s(min(makespans))}, median {fmt_s(median)}; raw best {fmt_s(min(raws))}, median {fmt_s(raw_median)}; "
          f"flow wall best {fmt_s(min(walls))}")
    print(
        f"flow wall outside the makespan (median): {fmt_s(statistics.median(leads))} before the first container start "
        f"(flow run, spec, engine, store, first task), {fmt_s(statistics.median(tails))} after the last exit (records, artifacts, flow end)"
    )
    print("handoff: median time from the exit that freed a slot to the next step's container start call")
    if profiler is not None:
        print()
        profiler.report(STEPS)
    verdict("flow makespan / raw 2-at-a-time wall (medians)", median / raw_median, TARGET_RATIO)
    verdict("most steps running at once, every run", max(overlaps), SLOTS, unit=" steps")
    return exit_status()


if __name__ == "__main__":
    sys.exit(main())
