"""Marginal wall time per step of a linear chain: the flow against raw ``docker run``.

Each step is a busybox ``cp`` of its input file to its output, in the full sandbox. The
marginal cost of a step is ``(T(long chain) - T(short chain)) / (long - short)``, which
cancels every per-run constant (flow-run creation, engine connection, the first image
resolve). Measured in the same run:

* ``flow``: ``flows.pipeline.run_pipeline`` under Prefect's test harness (a local server),
  a local store, ``no_cache=True``: every step a Prefect task, staged by hardlink, hashed,
  committed, recorded in the lineage document;
* ``raw``: the same containers started one after another with ``docker run --rm`` and the
  exact sandbox flags of ``algodock.runtime.sandbox.container_config`` (each step's input folder
  is the previous step's output folder, mounted read-only).

Target (issue 3, item 10): flow marginal <= 1.25x raw marginal.

    .venv/bin/python bench/chain.py [--quick] [--profile]

``--profile`` adds, for the long chain, where a step's time goes (``_util.StepProfiler``).
"""

from __future__ import annotations

import _util  # noqa: F401  (environment and sys.path first)

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _util import (
    StepProfiler,
    busybox_image,
    exit_status,
    fmt_s,
    prefect_server,
    print_table,
    quick,
    run_flow,
    scratch_dir,
    step_times,
    verdict,
    write_manifest,
)

from algodock.contract.manifest import INPUT_DIR, load_manifest
from algodock.runtime.engine import container_labels, docker_client
from algodock.runtime.sandbox import UNPRIVILEGED_UID, container_config, docker_run_argv

TARGET_RATIO = 1.25
CAPACITY = "cpu_millicore=2000,memory_gb=8"
COMMAND = ["cp", f"{INPUT_DIR}/data/out.binary", "/work/output/out.binary"]


def _spec(n: int, manifest: Path, seed: Path) -> dict:
    steps = [{"id": "s000", "manifest": str(manifest), "inputs": {"data": "inputs.seed"}}]
    steps += [{"id": f"s{i:03d}", "manifest": str(manifest), "inputs": {"data": f"s{i - 1:03d}.out"}} for i in range(1, n)]
    return {"pipeline_version": "0.1", "name": f"chain-{n}", "inputs": {"seed": str(seed)}, "steps": steps}


def _raw_chain(n: int, root: Path, manifest_path: Path, image_id: str, seed_dir: Path, tag: str) -> tuple[float, list[float]]:
    """``n`` sequential ``docker run --rm``, each copying the previous step's output: (wall, each run)."""
    from docker.types import Mount

    cp = load_manifest(manifest_path).container_parameters
    work = root / f"raw-{tag}"
    (work / "input").mkdir(parents=True)
    (work / "algo_input.json").write_text('{"version": "0.1", "config": {"parameters": {}}, "input_data": []}')
    outs = [work / f"out-{i:03d}" for i in range(n)]
    for out in outs:
        out.mkdir()
        os.chown(out, UNPRIVILEGED_UID, UNPRIVILEGED_UID)
    argvs = []
    for i in range(n):
        cfg = container_config(
            cp, image_id=image_id, user=f"{UNPRIVILEGED_UID}:{UNPRIVILEGED_UID}", work_dir=work, output_dir=outs[i],
            labels=container_labels(f"raw-{tag}", f"s{i:03d}", 1),
        )
        cfg["mounts"] = [m for m in cfg["mounts"] if m["Target"] != INPUT_DIR]
        cfg["mounts"].append(Mount(f"{INPUT_DIR}/data", str(outs[i - 1] if i else seed_dir), type="bind", read_only=True))
        argvs.append(docker_run_argv(cfg))
    each = []
    t0 = time.perf_counter()
    for argv in argvs:
        t1 = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        each.append(time.perf_counter() - t1)
    wall = time.perf_counter() - t0
    assert (outs[-1] / "out.binary").read_bytes() == (seed_dir / "out.binary").read_bytes()
    return wall, each


def main() -> int:
    short, long_, reps = (4, 10, 1) if quick() else (8, 24, 2)
    profile = "--profile" in sys.argv[1:]
    client = docker_client()
    image_id = busybox_image(client)
    with scratch_dir("chain") as root, prefect_server():
        seed_dir = root / "seed"
        seed_dir.mkdir()
        (seed_dir / "out.binary").write_bytes(os.urandom(4096))
        manifest = write_manifest(
            root / "cp.json", name="cp", image=_util.BENCH_BUSYBOX, command=COMMAND,
            container={"resource_request": {"cpu_millicore": 1000, "memory_gb": 0.25}, "timeout_seconds": 60},
            inputs=[{"name": "data", "format": "binary"}], outputs=[{"name": "out", "format": "binary"}],
        )
        seed = seed_dir / "out.binary"
        # Warm-up (not timed): Prefect registers the flow, the engine caches the image, imports settle.
        run_flow(_spec(2, manifest, seed), root / "store", f"warmup-{os.getpid()}", CAPACITY)
        _raw_chain(2, root, manifest, image_id, seed_dir, f"warmup-{os.getpid()}")

        flow: dict[int, list[float]] = {short: [], long_: []}
        raw: dict[int, list[float]] = {short: [], long_: []}
        spans: dict[int, list[float]] = {short: [], long_: []}
        flow_steps: list[float] = []  # finish-to-finish intervals of consecutive flow steps
        raw_steps: list[float] = []  # each raw docker run
        profiler = None
        for rep in range(reps):
            for n in (short, long_):  # interleaved, so drift affects both alike

                def flow_run() -> None:
                    nonlocal profiler
                    if profile and n == long_ and rep == reps - 1:
                        profiler = StepProfiler().install()
                    summary, wall, _, _ = run_flow(_spec(n, manifest, seed), root / "store", f"chain{n}-{rep}-{os.getpid()}", CAPACITY)
                    if profiler is not None:
                        profiler.uninstall()
                    flow[n].append(wall)
                    times = step_times(summary)
                    spans[n].append((max(t[2] for t in times) - min(t[1] for t in times)).total_seconds())
                    ends = sorted(t[2] for t in times)
                    flow_steps.extend((b - a).total_seconds() for a, b in zip(ends, ends[1:]))

                def raw_run() -> None:
                    raw_wall, each = _raw_chain(n, root, manifest, image_id, seed_dir, f"{n}-{rep}")
                    raw[n].append(raw_wall)
                    raw_steps.extend(each)

                for run in (flow_run, raw_run) if rep % 2 == 0 else (raw_run, flow_run):  # alternating which goes first
                    run()

    def marginal(d: dict[int, list[float]]) -> float:
        return (min(d[long_]) - min(d[short])) / (long_ - short)

    m_flow, m_raw, m_span = marginal(flow), marginal(raw), marginal(spans)
    print(f"linear chains of {short} and {long_} busybox cp steps, best of {reps}; capacity {CAPACITY}")
    print()
    rows = [
        ["flow (run_pipeline wall)", fmt_s(min(flow[short])), fmt_s(min(flow[long_])), fmt_s(m_flow), f"{m_flow / m_raw:.2f}x"],
        ["flow (first start..last finish)", fmt_s(min(spans[short])), fmt_s(min(spans[long_])), fmt_s(m_span), f"{m_span / m_raw:.2f}x"],
        ["raw docker run --rm", fmt_s(min(raw[short])), fmt_s(min(raw[long_])), fmt_s(m_raw), "1.00x"],
    ]
    med_flow, med_raw = statistics.median(flow_steps), statistics.median(raw_steps)
    print_table(["", f"{short} steps", f"{long_} steps", "marginal/step", "vs raw"], rows)
    print()
    print(f"all samples (s): flow {_fmt(flow)}; raw {_fmt(raw)}")
    print(
        f"medians per step (robust to bursts of load): flow finish-to-finish {fmt_s(med_flow)}, "
        f"raw docker run {fmt_s(med_raw)}: {med_flow / med_raw:.2f}x"
    )
    if profiler is not None:
        print()
        profiler.report(long_, sequential=True)
    verdict("flow marginal per step / raw docker run marginal per step (best of each)", m_flow / m_raw, TARGET_RATIO)
    return exit_status()


def _fmt(d: dict[int, list[float]]) -> str:
    return ", ".join(f"{n}: " + "/".join(f"{x:.2f}" for x in v) for n, v in d.items())


if __name__ == "__main__":
    sys.exit(main())
