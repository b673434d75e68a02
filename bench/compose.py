"""The same 8-step DAG as a YAML pipeline and as a Python flow: per-step cost of each, against raw ``docker run``.

Each step is a busybox ``cp`` of its input file to its output, in the full sandbox. The DAG
(a tree: ``s0`` feeds ``s1``-``s3``, each of those one more, ``s4`` one more) is run, in the same
process against the same Prefect server and engine, as:

* ``pipeline``: ``flows.pipeline.run_pipeline`` on the spec (``no_cache``);
* ``python``: a ``@flow`` calling ``algorithm(manifest).submit(...)`` with the upstream futures
  as inputs, inside ``algodock_run(cache=False)``;
* ``raw``: 8 containers started one after another with ``docker run --rm`` and the exact
  sandbox flags, each copying the previous one's output (``chain.py``'s baseline: no staging,
  hashing, store or Prefect).

Per-step cost is a run's wall time / 8, best of the repetitions; the two flows alternate
order each repetition. Target (issue 14): python <= 1.05x pipeline. Exit status 1 when missed.

    .venv/bin/python bench/compose.py [--quick]
"""

from __future__ import annotations

import _util  # noqa: F401  (environment and sys.path first)

import os
import sys
import time
from pathlib import Path

from _util import busybox_image, exit_status, fmt_s, prefect_server, print_table, quick, run_flow, scratch_dir, verdict, write_manifest
from chain import _raw_chain

from algodock.contract.manifest import INPUT_DIR
from algodock.runtime.engine import docker_client

TARGET_RATIO = 1.05
CAPACITY = "cpu_millicore=2000,memory_gb=8"
STEPS = 8
PARENT = {1: 0, 2: 0, 3: 0, 4: 1, 5: 2, 6: 3, 7: 4}
"""Step -> the step it reads (s0 reads the seed)."""


def _spec(manifest: Path, seed: Path) -> dict:
    steps = [{"id": "s0", "manifest": str(manifest), "inputs": {"data": "inputs.seed"}}]
    steps += [{"id": f"s{i}", "manifest": str(manifest), "inputs": {"data": f"s{p}.out"}} for i, p in PARENT.items()]
    return {"pipeline_version": "0.1", "name": "dag8", "inputs": {"seed": str(seed)}, "steps": steps}


def _python_flow(manifest: Path) -> object:
    from prefect import flow

    from algodock.flows import algodock_run, algorithm

    cp = algorithm(manifest)

    @flow(name="dag8-python")
    def dag8(seed: str, store: str, run_id: str) -> list[str]:
        with algodock_run(store=store, run_id=run_id, capacity=CAPACITY, cache=False):
            futures = [cp.submit(inputs={"data": seed}, step_id="s0")]
            for i, p in PARENT.items():
                futures.append(cp.submit(inputs={"data": futures[p]}, step_id=f"s{i}"))
            return [f.result().status for f in futures]

    return dag8


def main() -> int:
    reps = 2 if quick() else 5
    client = docker_client()
    image_id = busybox_image(client)
    with scratch_dir("compose") as root, prefect_server():
        seed_dir = root / "seed"
        seed_dir.mkdir()
        (seed_dir / "out.binary").write_bytes(os.urandom(4096))
        seed = seed_dir / "out.binary"
        manifest = write_manifest(
            root / "cp.json", name="cp", image=_util.BENCH_BUSYBOX, command=["cp", f"{INPUT_DIR}/data/out.binary", "/work/output/out.binary"],
            container={"resource_request": {"cpu_millicore": 1000, "memory_gb": 0.25}, "timeout_seconds": 60},
            inputs=[{"name": "data", "format": "binary"}], outputs=[{"name": "out", "format": "binary"}],
        )
        dag8 = _python_flow(manifest)
        spec = _spec(manifest, seed)
        store = root / "store"

        def pipeline(tag: str) -> float:
            return run_flow(spec, store, f"yaml-{tag}", CAPACITY).wall

        def python(tag: str) -> float:
            t0 = time.perf_counter()
            statuses = dag8(str(seed), str(store), f"py-{tag}")
            wall = time.perf_counter() - t0
            assert statuses == ["succeeded"] * STEPS, statuses
            return wall

        pipeline(f"warmup-{os.getpid()}")  # not timed: registration, image cache, imports
        python(f"warmup-{os.getpid()}")
        walls: dict[str, list[float]] = {"pipeline": [], "python": [], "raw": []}
        for rep in range(reps):
            order = [("pipeline", pipeline), ("python", python)]
            for name, fn in order if rep % 2 == 0 else reversed(order):
                walls[name].append(fn(f"{rep}-{os.getpid()}"))
            walls["raw"].append(_raw_chain(STEPS, root, manifest, image_id, seed_dir, f"{rep}-{os.getpid()}")[0])

    per = {k: min(v) / STEPS for k, v in walls.items()}
    print(f"an 8-step DAG of busybox cp steps, best of {reps}; capacity {CAPACITY}")
    print()
    print_table(
        ["", "wall (best)", "per step", "vs raw", "vs pipeline"],
        [[k, fmt_s(min(walls[k])), fmt_s(per[k]), f"{per[k] / per['raw']:.2f}x", f"{per[k] / per['pipeline']:.2f}x"] for k in ("pipeline", "python", "raw")],
    )
    print()
    print("all samples (s): " + "; ".join(f"{k} " + "/".join(f"{x:.2f}" for x in v) for k, v in walls.items()))
    ratio = per["python"] / per["pipeline"]
    verdict("python flow per step / pipeline per step (best of each)", ratio, TARGET_RATIO)
    return exit_status()


if __name__ == "__main__":
    sys.exit(main())
