"""A flood of short log lines: does it slow the step, grow the memory, or hold the command up
after the container's exit? Each against a quiet baseline measured in the same run.

    .venv/bin/python bench/log_flood.py [--mb 200] [--rounds 2]

The flooding step prints 41-byte lines until it has written ``--mb`` MB; the quiet step is the
same container printing one line. The stored log keeps 64 MiB (head and tail), Prefect gets
at most 20,000 lines (in batches). In ``--rounds`` rounds, alternating the order (A B, B A):

* ``docker run`` (the baseline): each container with the sandbox's own flags
  (``algodock.runtime.sandbox.container_config``), its log read to the end and thrown away;
* ``algodock run-step``: the same container through the command (a fresh process, the log
  kept in the stored 64 MiB and shown on stderr); its wall time and its peak RSS
  (``ru_maxrss`` from ``wait4``), on the flood and on the quiet step;
* ``algodock run``: a one-step pipeline of each (Prefect server as a user starts it, the
  task-run logs in batches); the figure is the time from the step's ``finished_at`` (the
  container's exit) to the command's return.

Targets: the flood's marginal wall time through run-step against through docker run, each
flood minus quiet (medians, so process start-up cancels out), <= 1.25 (the flood is not slowed
by what algodock does with it); run-step peak RSS flood / quiet (medians) <= 1.5 (memory
does not grow with the log); `algodock run`'s seconds after the exit, flood / quiet (medians)
<= 1.5 (the lines to Prefect do not hold the command up).
"""

from __future__ import annotations

import _util  # noqa: F401  (environment and sys.path first)

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from _util import busybox_image, exit_status, fmt_s, prefect_server, print_table, raw_argvs, scratch_dir, verdict, write_manifest

from algodock.runtime.engine import docker_client

ALGODOCK = str(Path(sys.executable).parent / "algodock")
SLOWDOWN_TARGET, RSS_TARGET, AFTER_EXIT_TARGET = 1.25, 1.5, 1.5
LINE = "0123456789012345678901234567890123456789"


def _flood_command(mb: int) -> list[str]:
    return ["/bin/sh", "-c", f"yes {LINE} | head -c {mb * 1_000_000}; echo the-end"]


def _run_step(manifest: Path, out: Path) -> tuple[float, float]:
    """`algodock run-step` as a fresh process: (wall seconds, its peak RSS in MB)."""
    report = out.with_suffix(".json")
    t0 = time.perf_counter()
    with open(report, "w") as stdout:
        proc = subprocess.Popen([ALGODOCK, "run-step", str(manifest), "--output", str(out), "--json"], stdout=stdout, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or json.loads(report.read_text())["status"] != "succeeded":
        sys.exit(f"bench: algodock run-step {manifest.name} failed: {report.read_text()[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def _docker_run(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _algodock_run(pipeline: Path, store: Path) -> tuple[float, float]:
    """`algodock run` of a one-step pipeline: (seconds from the container's exit to the return, container seconds)."""
    proc = subprocess.run([ALGODOCK, "run", str(pipeline), "--store", str(store), "--json"], capture_output=True, text=True)
    returned = time.time()
    if proc.returncode != 0:
        sys.exit(f"bench: algodock run {pipeline.name} failed: {proc.stderr[-2000:]}")
    step = json.loads(proc.stdout)["steps"][0]
    started, finished = (datetime.fromisoformat(step[k]).timestamp() for k in ("started_at", "finished_at"))
    return returned - finished, finished - started


def _alternating(rounds: int, measures: list[Callable[[int], None]]) -> None:
    """Every measure once per round; odd rounds in the reverse order."""
    for i in range(rounds):
        for measure in measures if i % 2 == 0 else reversed(measures):
            measure(i)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=200, help="MB of log lines the flooding step prints")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, alternating the order")
    args = parser.parse_args()
    image_id = busybox_image(docker_client())
    raw: dict[str, list[float]] = {"flood": [], "quiet": []}
    step: dict[str, list[tuple[float, float]]] = {"flood": [], "quiet": []}
    after_exit: dict[str, list[tuple[float, float]]] = {"flood": [], "quiet": []}
    with scratch_dir("flood") as root, prefect_server():
        manifests = {
            "flood": write_manifest(root / "flood.json", name="flood", image=_util.BENCH_BUSYBOX, command=_flood_command(args.mb), container={"timeout_seconds": 900}),
            "quiet": write_manifest(root / "quiet.json", name="quiet", image=_util.BENCH_BUSYBOX, command=["/bin/sh", "-c", "echo the-end"], container={"timeout_seconds": 900}),
        }
        pipelines = {}
        for kind, manifest in manifests.items():
            pipelines[kind] = root / f"{kind}.yaml"
            pipelines[kind].write_text(f'pipeline_version: "0.1"\nname: {kind}\nsteps:\n  - {{id: {kind}, manifest: {manifest.name}}}\n')
        _algodock_run(pipelines["quiet"], root / "store-warm")  # warm-up (not timed): the flow is registered, the page cache warm
        measures: list[Callable[[int], None]] = []
        for kind in ("flood", "quiet"):
            argvs = raw_argvs(root / f"raw-{kind}", manifests[kind], image_id, args.rounds, f"bench-{kind}")
            measures.append(lambda i, kind=kind, argvs=argvs: raw[kind].append(_docker_run(argvs[i])))
            measures.append(lambda i, kind=kind: step[kind].append(_run_step(manifests[kind], root / f"out-{kind}-{i}")))
            measures.append(lambda i, kind=kind: after_exit[kind].append(_algodock_run(pipelines[kind], root / f"store-{kind}-{i}")))
        _alternating(args.rounds, measures)

    def med(samples: list[tuple[float, float]], field: int) -> float:
        return statistics.median(s[field] for s in samples)

    print(f"\n{args.mb} MB of {len(LINE) + 1}-byte log lines vs a quiet step, {args.rounds} round(s) alternating the order")
    print_table(["", "flood (median)", "quiet (median)", "samples (flood)"], [
        ["docker run wall (baseline)", fmt_s(statistics.median(raw["flood"])), fmt_s(statistics.median(raw["quiet"])), " / ".join(f"{x:.1f}" for x in raw["flood"])],
        ["algodock run-step wall", fmt_s(med(step["flood"], 0)), fmt_s(med(step["quiet"], 0)), " / ".join(f"{w:.1f}" for w, _ in step["flood"])],
        ["algodock run-step peak RSS", f"{med(step['flood'], 1):.0f} MB", f"{med(step['quiet'], 1):.0f} MB", " / ".join(f"{r:.0f}" for _, r in step["flood"])],
        ["algodock run: container ran", fmt_s(med(after_exit["flood"], 1)), fmt_s(med(after_exit["quiet"], 1)), ""],
        ["algodock run: returned after the exit", fmt_s(med(after_exit["flood"], 0)), fmt_s(med(after_exit["quiet"], 0)),
         " / ".join(f"{a:.2f}" for a, _ in after_exit["flood"])],
    ])
    ours = med(step["flood"], 0) - med(step["quiet"], 0)
    base = statistics.median(raw["flood"]) - statistics.median(raw["quiet"])
    print(f"the flood's marginal wall time: algodock run-step {fmt_s(ours)}, docker run {fmt_s(base)}")
    verdict("flood minus quiet wall: algodock run-step / docker run (medians)", ours / base, SLOWDOWN_TARGET)
    verdict("algodock run-step peak RSS, flood / quiet (medians)", med(step["flood"], 1) / med(step["quiet"], 1), RSS_TARGET)
    verdict("algodock run: seconds from the exit to the return, flood / quiet (medians)", med(after_exit["flood"], 0) / med(after_exit["quiet"], 0), AFTER_EXIT_TARGET)
    return exit_status()


if __name__ == "__main__":
    sys.exit(main())
