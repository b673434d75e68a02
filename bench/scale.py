"""Scale up on one host: 100 vs 1000 tiny steps, a 300-step fan-out against raw `docker run`,
the orchestrator's peak RSS and the bytes written for lineage per run.

    .venv/bin/python bench/scale.py [--small 100] [--large 1000] [--fanout 300] [--slots 20]

All in one run, against one Prefect server (``prefect server start``, as a user starts it):

* ``per-step cost``: flow wall / steps for ``--small`` and ``--large`` independent busybox
  ``true`` steps of 100 millicores on a capacity of ``--slots`` x 100 millicores; target:
  the large run's per-step cost <= 1.10 x the small run's (nothing grows faster than the work);
* ``fan-out``: the ``--fanout``-step run's makespan (first container start to last exit)
  against the same number of raw ``docker run --rm`` with the sandbox's flags, ``--slots``
  at a time; target <= 1.10;
* ``peak RSS``: this process's ``ru_maxrss`` after the large run (it is the orchestrator);
  target < 500 MB;
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
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _util import busybox_image, fmt_s, prefect_server, print_table, run_flow, scratch_dir, step_times, verdict, write_manifest

from algodock.contract.manifest import load_manifest
from algodock.runtime.engine import container_labels, docker_client
from algodock.runtime.sandbox import UNPRIVILEGED_UID, container_config, docker_run_argv

WRITTEN: dict[str, int] = {}


def _count_lineage_bytes() -> None:
    """Count the bytes every store writes per JSON document name (lineage.json, run.json)."""
    from algodock.store import backends

    for cls in (backends.LocalStore, backends.S3Store):
        original = cls.write_json

        def counted(self, rel, obj, _original=original):  # type: ignore[no-untyped-def]
            name = rel.rsplit("/", 1)[-1]
            WRITTEN[name] = WRITTEN.get(name, 0) + len(json.dumps(obj).encode())
            return _original(self, rel, obj)

        cls.write_json = counted  # type: ignore[method-assign]


def _spec(manifest: Path, n: int) -> dict:
    return {"pipeline_version": "0.1", "name": f"wide-{n}", "steps": [{"id": f"s{i}", "manifest": str(manifest)} for i in range(n)]}


def _raw(root: Path, manifest: Path, image_id: str, n: int, slots: int) -> float:
    cp = load_manifest(manifest).container_parameters
    work = root / "raw"
    (work / "input").mkdir(parents=True)
    (work / "algo_input.json").write_text('{"version": "0.1", "config": {"parameters": {}}, "input_data": []}')
    argvs = []
    for i in range(n):
        out = work / f"out-{i}"
        out.mkdir()
        os.chown(out, UNPRIVILEGED_UID, UNPRIVILEGED_UID)
        cfg = container_config(cp, image_id=image_id, user=f"{UNPRIVILEGED_UID}:{UNPRIVILEGED_UID}", work_dir=work, output_dir=out,
                               labels=container_labels("raw-scale", f"s{i}", 1))
        argvs.append(docker_run_argv(cfg))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=slots) as pool:
        list(pool.map(lambda argv: subprocess.run(argv, check=True, stdout=subprocess.DEVNULL), argvs))
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", type=int, default=100)
    parser.add_argument("--large", type=int, default=1000)
    parser.add_argument("--fanout", type=int, default=300)
    parser.add_argument("--slots", type=int, default=20)
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
        walls = {}
        for n in (args.small, args.large):
            WRITTEN.clear()
            run = run_flow(_spec(manifest, n), root / "store", f"n{n}-{os.getpid()}", capacity)
            walls[n] = run.wall
            rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            rows.append([f"{n} steps", fmt_s(run.wall), f"{run.wall / n * 1000:.0f} ms", f"{rss_mb:.0f} MB",
                         f"{WRITTEN.get('lineage.json', 0) / 1e6:.2f} MB", f"{WRITTEN.get('run.json', 0) / 1e6:.2f} MB"])
        WRITTEN.clear()
        run = run_flow(_spec(manifest, args.fanout), root / "store", f"fan{args.fanout}-{os.getpid()}", capacity)
        times = step_times(run.summary)
        makespan = (max(t[2] for t in times) - min(t[1] for t in times)).total_seconds()
        raw = _raw(root, manifest, image_id, args.fanout, args.slots)
    print(f"independent busybox `true` steps, 100 millicores each, capacity {capacity} ({args.slots} at a time)")
    print_table(["run", "flow wall", "per step", "peak RSS (process)", "lineage.json written", "run.json written"], rows)
    per_small, per_large = walls[args.small] / args.small, walls[args.large] / args.large
    ratio = per_large / per_small
    print(f"per-step cost at {args.large} / at {args.small}: {ratio:.2f}x  {verdict(ratio <= 1.10)} (target <= 1.10)")
    print(f"{args.fanout}-step fan-out: flow makespan {fmt_s(makespan)} vs {args.fanout} raw docker run {args.slots} at a time {fmt_s(raw)}: "
          f"{makespan / raw:.2f}x  {verdict(makespan / raw <= 1.10)} (target <= 1.10)")
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"orchestrator peak RSS {rss_mb:.0f} MB  {verdict(rss_mb < 500)} (target < 500 MB)")


if __name__ == "__main__":
    main()
