"""Marginal wall time per step of a linear chain: the flow against raw ``docker run``.

Each step is a busybox ``cp`` of its input file to its output (a no-op that still hands data
on), in the full sandbox. The marginal cost of a step is ``(T(10 steps) - T(2 steps)) / 8``,
which cancels every per-run constant (flow-run creation, engine connection, the first image
resolve). Measured in the same run, in rounds whose order reverses from one to the next (raw
in the middle, next to every arm); the figure is the median over the rounds of each arm's
marginal over raw's in the same round (the ratio of the medians is printed beside it):

* ``flow``: ``flows.pipeline.run_pipeline`` under a local Prefect server, a local store,
  ``no_cache=True``: every step a Prefect task, staged by hardlink, hashed, committed,
  recorded in the lineage document; a dependent's container created while its upstream
  runs (``algodock/pipeline/ahead.py``);
* ``flow, ALGODOCK_CREATE_AHEAD=0``: the same without creating ahead (with ``--ab``);
* ``engine``: the same steps through ``execute_step`` one after another in this process (no
  Prefect; ``_util.run_engine``): the engine's share of a flow step (with ``--ab`` also
  without creating ahead);
* ``raw``: the same containers started one after another with ``docker run --rm`` and the
  exact sandbox flags of ``algodock.runtime.sandbox.container_config`` (each step's input folder
  is the previous step's output folder, mounted read-only).

After the timed pairs, one counted pair of runs gives the Docker and Prefect API calls per
step (``_util.ApiCalls``, marginal in the same way).

Target (issue 17): flow marginal <= 0.95x raw marginal; the engine's too.

    .venv/bin/python bench/chain.py [--quick] [--pairs N] [--ab] [--profile]

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
    ApiCalls,
    StepProfiler,
    busybox_image,
    exit_status,
    fmt_s,
    prefect_server,
    print_table,
    quick,
    run_engine,
    run_flow,
    scratch_dir,
    step_times,
    verdict,
    write_manifest,
)

from algodock.contract.manifest import INPUT_DIR, load_manifest
from algodock.runtime.engine import container_labels, docker_client
from algodock.runtime.sandbox import UNPRIVILEGED_UID, container_config, docker_run_argv

TARGET_RATIO = 0.95
SHORT, LONG = 2, 10
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


def _pairs() -> int:
    args = sys.argv[1:]
    if "--pairs" in args:
        return int(args[args.index("--pairs") + 1])
    return 2 if quick() else 5


def _flow_marginal(root: Path, manifest: Path, seed: Path, tag: str, ahead: bool, profiler: StepProfiler | None = None) -> tuple[float, list[float]]:
    """One flow pair (2 steps, then 10): its marginal wall per step, and its finish-to-finish step intervals."""
    os.environ["ALGODOCK_CREATE_AHEAD"] = "1" if ahead else "0"
    walls, steps = {}, []
    for n in (SHORT, LONG):
        if profiler is not None and n == LONG:
            profiler.install()
        summary, wall, _, _ = run_flow(_spec(n, manifest, seed), root / "store", f"chain{n}-{tag}-{os.getpid()}", CAPACITY)
        if profiler is not None and n == LONG:
            profiler.uninstall()
        walls[n] = wall
        ends = sorted(t[2] for t in step_times(summary))
        steps += [(b - a).total_seconds() for a, b in zip(ends, ends[1:])]
    return (walls[LONG] - walls[SHORT]) / (LONG - SHORT), steps


def _engine_marginal(root: Path, manifest: Path, seed: Path, client: object, tag: str, ahead: bool) -> tuple[float, list[float]]:
    os.environ["ALGODOCK_CREATE_AHEAD"] = "1" if ahead else "0"
    walls = {n: run_engine(_spec(n, manifest, seed), root / "store", f"engine{n}-{tag}-{os.getpid()}", CAPACITY, client) for n in (SHORT, LONG)}
    return (walls[LONG] - walls[SHORT]) / (LONG - SHORT), []


def _raw_marginal(root: Path, manifest: Path, image_id: str, seed_dir: Path, tag: str) -> tuple[float, list[float]]:
    walls, each = {}, []
    for n in (SHORT, LONG):
        walls[n], runs = _raw_chain(n, root, manifest, image_id, seed_dir, f"{n}-{tag}")
        each += runs
    return (walls[LONG] - walls[SHORT]) / (LONG - SHORT), each


def _counted(root: Path, manifest: Path, seed: Path) -> dict[str, float]:
    """Docker and Prefect API calls per flow step (created ahead), marginal over a 2- and a 10-step run."""
    os.environ["ALGODOCK_CREATE_AHEAD"] = "1"
    totals = {}
    for n in (SHORT, LONG):
        with ApiCalls() as calls:
            run_flow(_spec(n, manifest, seed), root / "store", f"counted{n}-{os.getpid()}", CAPACITY)
        totals[n] = calls
    per_step = {}
    for engine in ("docker", "prefect"):
        for group in (None, "other"):
            key = engine if group is None else f"{engine}, not created ahead"
            per_step[key] = (totals[LONG].total(engine, group) - totals[SHORT].total(engine, group)) / (LONG - SHORT)
    return per_step


def main() -> int:
    pairs = _pairs()
    ab = "--ab" in sys.argv[1:]
    profile = "--profile" in sys.argv[1:]
    client = docker_client()
    image_id = busybox_image(client)
    # raw in the middle: every arm runs next to it, and the order reverses from one pair to the next
    arms = ["flow", *(["flow, ALGODOCK_CREATE_AHEAD=0"] if ab else []), "raw docker run --rm", "engine", *(["engine, ALGODOCK_CREATE_AHEAD=0"] if ab else [])]
    marginals: dict[str, list[float]] = {a: [] for a in arms}
    steps: dict[str, list[float]] = {a: [] for a in arms}
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

        def measure(arm: str, rep: int) -> None:
            if arm == "raw docker run --rm":
                m, each = _raw_marginal(root, manifest, image_id, seed_dir, str(rep))
            elif arm.startswith("engine"):
                m, each = _engine_marginal(root, manifest, seed, client, f"{rep}{len(arm)}", arm == "engine")
            else:
                m, each = _flow_marginal(root, manifest, seed, f"{rep}{len(arm)}", arm == "flow")
            marginals[arm].append(m)
            steps[arm].extend(each)

        for rep in range(pairs):
            for arm in arms if rep % 2 == 0 else arms[::-1]:  # alternating which goes first
                measure(arm, rep)
        calls = _counted(root, manifest, seed)
        profiler = None
        if profile:
            profiler = StepProfiler()
            _flow_marginal(root, manifest, seed, "profile", True, profiler)

    raw = statistics.median(marginals["raw docker run --rm"])

    def paired(arm: str) -> float:
        """The median over the pairs of (the arm's marginal / raw's marginal in the same pair)."""
        return statistics.median(a / r for a, r in zip(marginals[arm], marginals["raw docker run --rm"]))

    print(f"linear chains of {SHORT} and {LONG} busybox cp steps, {pairs} pairs in alternating order; capacity {CAPACITY}")
    print()
    rows = [[arm, fmt_s(statistics.median(marginals[arm])), "/".join(f"{m * 1e3:.0f}" for m in marginals[arm]),
             fmt_s(statistics.median(steps[arm])) if steps[arm] else "", f"{statistics.median(marginals[arm]) / raw:.2f}x", f"{paired(arm):.2f}x"] for arm in arms]
    print_table(["", "marginal/step (median)", "each pair (ms)", "median step interval", "medians vs raw", "median of pair ratios"], rows)
    print()
    print("API calls per flow step (marginal: (calls(10 steps) - calls(2 steps)) / 8): " + ", ".join(f"{k} {v:g}" for k, v in calls.items()))
    if profiler is not None:
        print()
        profiler.report(LONG, sequential=True)
    verdict("flow marginal per step / raw docker run marginal per step (median of the pairs' ratios)", paired("flow"), TARGET_RATIO)
    verdict("engine (execute_step, no Prefect) marginal per step / raw docker run marginal per step (median of the pairs' ratios)", paired("engine"), TARGET_RATIO)
    return exit_status()


if __name__ == "__main__":
    sys.exit(main())
