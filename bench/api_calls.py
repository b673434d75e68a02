"""Docker engine API calls one step makes, counted by method and path (``_util.ApiCalls``).

Two counts, each the marginal per step of a chain of busybox ``cp`` steps driven through
:func:`algodock.pipeline.execute.execute_step` (the engine layer every flow calls, no
Prefect): ``(calls(10 steps) - calls(2 steps)) / 8``, which cancels the per-run calls (the
orphan sweep, the image resolved once per run):

* ``created ahead`` (the default): the calls on the step's own path, and those the
  background thread makes while the upstream step runs (``algodock/pipeline/ahead.py``);
* ``ALGODOCK_CREATE_AHEAD=0``: every call on the step's own path.

One step of :func:`algodock.runtime.runner.run_step` (``algodock run-step``) is counted too.
The Prefect API calls of a step are counted by ``bench/chain.py`` (it runs the flow).

Targets: at most 4 engine calls per step on its own path with created ahead (start, wait,
the inspect of how it ended, remove), at most 7 in all.

    .venv/bin/python bench/api_calls.py
    ALGODOCK_BENCH_SRC=<a tree of an earlier commit> .venv/bin/python bench/api_calls.py   # the same count on that code
"""

from __future__ import annotations

import _util  # noqa: F401  (environment and sys.path first)

import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

from _util import ApiCalls, busybox_image, exit_status, print_table, scratch_dir, verdict, write_manifest

from algodock.contract.manifest import INPUT_DIR, parse_manifest
from algodock.pipeline import load_pipeline
from algodock.pipeline.capacity import Capacity, ResourcePool
from algodock.pipeline.execute import RunContext, execute_step
from algodock.runtime.engine import docker_client
from algodock.runtime.runner import run_step
from algodock.store.backends import open_store

TARGET_OWN_PATH = 4
TARGET_ALL = 7
SHORT, LONG = 2, 10
CAPACITY = Capacity(cpu_millicore=2000, memory_gb=4)


def _chain(root: Path, image: str, n: int) -> Path:
    manifest = write_manifest(
        root / "cp.json", name="cp", image=image, command=["cp", f"{INPUT_DIR}/data/out.binary", "/work/output/out.binary"],
        container={"resource_request": {"cpu_millicore": 1000, "memory_gb": 0.25}, "timeout_seconds": 60},
        inputs=[{"name": "data", "format": "binary"}], outputs=[{"name": "out", "format": "binary"}],
    )
    seed = root / "seed" / "out.binary"
    seed.parent.mkdir(exist_ok=True)
    seed.write_bytes(os.urandom(4096))
    steps = [{"id": "s000", "manifest": str(manifest), "inputs": {"data": "inputs.seed"}}]
    steps += [{"id": f"s{i:03d}", "manifest": str(manifest), "inputs": {"data": f"s{i - 1:03d}.out"}} for i in range(1, n)]
    spec = root / f"chain-{n}.json"
    spec.write_text(json.dumps({"pipeline_version": "0.1", "name": f"chain-{n}", "inputs": {"seed": str(seed)}, "steps": steps}))
    return spec


def _run_chain(root: Path, client: Any, image: str, n: int, ahead: bool) -> ApiCalls:
    os.environ["ALGODOCK_CREATE_AHEAD"] = "1" if ahead else "0"
    run_id = f"calls-{n}-{uuid.uuid4().hex[:6]}"
    pipeline = load_pipeline(_chain(root, image, n), capacity=CAPACITY)
    scratch = root / f"scratch-{run_id}"
    scratch.mkdir()
    ctx = RunContext(pipeline=pipeline, store=open_store(str(root / "store")), run_id=run_id, client=client, pool=ResourcePool(CAPACITY), scratch=scratch)
    records: dict[str, Any] = {}
    with ApiCalls() as calls:
        for step_id in pipeline.topological_order():
            records[step_id] = execute_step(ctx, step_id, {d: records[d] for d in pipeline.dependencies[step_id]})
            if records[step_id].status != "succeeded":
                sys.exit(f"bench: step {step_id} failed: {records[step_id].failure}")
        if hasattr(ctx, "close"):
            ctx.close()
    return calls


def _marginal(short: ApiCalls, long_: ApiCalls, group: str | None = None) -> dict[str, float]:
    def calls(c: ApiCalls) -> dict[str, int]:
        out: dict[str, int] = {}
        for (engine, call, g), count in c.counts.items():
            if engine == "docker" and (group is None or g == group):
                out[call] = out.get(call, 0) + count
        return out

    a, b = calls(short), calls(long_)
    return {k: (b.get(k, 0) - a.get(k, 0)) / (LONG - SHORT) for k in sorted(set(a) | set(b))}


def main() -> int:
    client = docker_client()
    image = busybox_image(client)
    with scratch_dir("api-calls") as root:
        m = parse_manifest({"manifest_version": "0.1", "name": "one", "version": "1.0.0",
                            "container_parameters": {"image": image, "command": ["sh", "-c", "echo hi > /work/output/out.csv"]},
                            "outputs": [{"name": "out", "format": "csv"}]})
        run_step(m, output_dir=root / "warm", client=client, run_id="calls", step_id="one")  # the per-process sweep, not counted
        with ApiCalls() as one:
            result = run_step(m, output_dir=root / "one", client=client, run_id="calls", step_id="one")
        assert result.ok, result.failure
        counted: dict[str, dict[str, float]] = {"run_step": {k: float(v) for k, v in one.by_call("docker").items()}}
        _run_chain(root, client, image, SHORT, True)  # warm-up
        for ahead in (False, True):
            short, long_ = _run_chain(root, client, image, SHORT, ahead), _run_chain(root, client, image, LONG, ahead)
            name = "chain step, created ahead" if ahead else "chain step (ALGODOCK_CREATE_AHEAD=0)"
            counted[name] = _marginal(short, long_)
            if ahead:
                counted["  of which on the step's own path"] = _marginal(short, long_, "other")
                counted["  of which created ahead (background)"] = _marginal(short, long_, "ahead")
    calls = sorted({c for v in counted.values() for c in v})
    rows = [[name, *(f"{v.get(c, 0):g}" for c in calls), f"{sum(v.values()):g}"] for name, v in counted.items()]
    print(f"Docker engine API calls per step (chains: (calls({LONG} steps) - calls({SHORT} steps)) / {LONG - SHORT}); code: {os.environ.get('ALGODOCK_BENCH_SRC') or 'this checkout'}")
    print_table(["", *calls, "total"], rows)
    ahead = "chain step, created ahead"
    own = sum(counted["  of which on the step's own path"].values())
    verdict("engine calls per chain step on its own path (created ahead)", own, TARGET_OWN_PATH, unit=" calls")
    verdict("engine calls per chain step in all", sum(counted[ahead].values()), TARGET_ALL, unit=" calls")
    return exit_status()


if __name__ == "__main__":
    sys.exit(main())
