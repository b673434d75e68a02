"""The output-limit mechanism's cost and slack (algodock/runtime/limits.py).

Cost: a step writing 1 GiB of output, run by :func:`algodock.runtime.runner.run_step` with
the watcher on (the default) and off (``runner.WATCH_OUTPUT = False``), in alternating
order, in two shapes: one 1 GiB file, and 1024 files of 1 MiB in 32 folders (more to walk).
Target (issue 7): watched median <= 1.05 x unwatched median.

Slack: a step writing 3 GiB with ``output_mb: 100``, run ``--slack-runs`` times; a sampler on
the host records the most the output folder held before the step was stopped (``disk_limit``).
The figure is the worst run's peak over the configured limit (a ratio to the limit, not a
timing: the promise is about bytes on disk). Target: <= 1.5 x the limit.

    .venv/bin/python bench/output_limit.py [--repeats N] [--quick]
"""

from __future__ import annotations

import _util  # noqa: F401  (environment and sys.path first)

import argparse
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from _util import busybox_image, exit_status, fmt_s, print_table, scratch_dir, verdict

from algodock.contract.manifest import Manifest, parse_manifest
from algodock.runtime import runner
from algodock.runtime.engine import docker_client
from algodock.runtime.limits import measure

TARGET = 1.05
SLACK_LIMIT_MB, SLACK_TARGET = 100, 1.5
MIB = 1024 * 1024
SHAPES = {
    "one 1 GiB file": "dd if=/dev/zero of=/work/output/out/big bs=1M count=1024 2>/dev/null",
    "1024 files of 1 MiB": "for d in $(seq 1 32); do mkdir -p /work/output/out/$d; for f in $(seq 1 32); do "
    "dd if=/dev/zero of=/work/output/out/$d/$f bs=1M count=1 2>/dev/null; done; done",
}


def _manifest(image: str, script: str, **container: Any) -> Manifest:
    return parse_manifest({
        "manifest_version": "0.2",
        "name": "output-limit",
        "version": "1.0.0",
        "container_parameters": {"image": image, "command": ["sh", "-c", f"mkdir -p /work/output/out && {script}"], "timeout_seconds": 600, **container},
        "outputs": [{"name": "out", "format": "binary", "multiple": True}],
    })


def _run(m: Manifest, client: Any, out: Path, watch: bool) -> float:
    runner.WATCH_OUTPUT = watch
    try:
        t0 = time.perf_counter()
        result = runner.run_step(m, output_dir=out, client=client, run_id="bench", step_id="output-limit")
        took = time.perf_counter() - t0
    finally:
        runner.WATCH_OUTPUT = True
    if not result.ok:
        sys.exit(f"bench: the step failed: {result.failure}")
    shutil.rmtree(out, ignore_errors=True)
    return took


def slack(image: str, client: Any, root: Path) -> tuple[int, str]:
    """The most the host held while a 3 GiB writer with output_mb SLACK_LIMIT_MB ran, and its failure kind."""
    out = root / "slack"
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            if out.exists():
                peak = max(peak, measure(out).bytes)
            stop.wait(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    m = _manifest(image, "dd if=/dev/zero of=/work/output/out/big bs=1M count=3072 2>/dev/null", output_mb=SLACK_LIMIT_MB)
    result = runner.run_step(m, output_dir=out, client=client, run_id="bench", step_id="output-slack")
    stop.set()
    sampler.join(10)
    shutil.rmtree(out, ignore_errors=True)
    return peak, result.failure.kind if result.failure else "succeeded"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="Rounds per shape (each runs watched and unwatched once).")
    parser.add_argument("--slack-runs", type=int, default=3, help="Runs of the 3 GiB writer (the worst peak is the figure).")
    parser.add_argument("--quick", action="store_true", help="1 round per shape, 1 slack run.")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    slack_runs = 1 if args.quick else args.slack_runs

    client = docker_client()
    image = busybox_image(client)
    rows = []
    ratios = []
    with scratch_dir("output-limit") as root:
        for shape, script in SHAPES.items():
            m = _manifest(image, script)
            _run(m, client, root / "warm", True)  # page cache, image metadata
            times: dict[bool, list[float]] = {True: [], False: []}
            for i in range(repeats):
                for watch in ((True, False) if i % 2 == 0 else (False, True)):
                    times[watch].append(_run(m, client, root / f"out-{i}-{watch}", watch))
            on, off = statistics.median(times[True]), statistics.median(times[False])
            ratios.append(on / off)
            rows.append((shape, fmt_s(off), fmt_s(on), f"{on / off:.3f}x"))
        stops = [slack(image, client, root) for _ in range(slack_runs)]

    print(f"\na step writing 1 GiB of output, {repeats} alternating round(s) per shape ({os.cpu_count()} CPUs)")
    print_table(["", "unwatched median", "watched median", "ratio"], rows)
    peaks = ", ".join(f"{peak / MIB:.0f} MiB ({kind})" for peak, kind in stops)
    print(f"\nslack: {slack_runs} step(s) writing 3 GiB with output_mb {SLACK_LIMIT_MB}; the most the host held in each: {peaks}")
    verdict("watched / unwatched (medians, worst shape)", max(ratios), TARGET)
    verdict("slack runs not stopped with disk_limit", sum(kind != "disk_limit" for _, kind in stops), 0, unit=" runs")
    verdict(f"most held on the host / output_mb {SLACK_LIMIT_MB} (worst of {slack_runs})", max(p for p, _ in stops) / (SLACK_LIMIT_MB * MIB), SLACK_TARGET)
    return exit_status()


if __name__ == "__main__":
    sys.exit(main())
