"""Small pipelines of busybox steps for the lineage, cache and OpenLineage tests.

:func:`run_local` drives a pipeline through :func:`algodock.pipeline.execute.execute_step` step by
step, the way the Prefect flow does (same cache, same records, the lineage document written
to the store), but without Prefect, so most tests run in seconds. A few tests go through the
real flow for what only the flow does (retries of a flow run, artifacts, asset events).

The images are ``FROM`` the suite's busybox image plus a file ``/algo-version``; rebuilding a
tag with another version moves the tag to a new image id.
"""

from __future__ import annotations

import json
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from algodock.lineage.cache import StoreCache
from algodock.pipeline.capacity import Capacity, ResourcePool
from algodock.lineage.openlineage import OpenLineageObserver
from algodock.pipeline.execute import RunContext, execute_step
from algodock.pipeline import Pipeline, load_pipeline
from algodock.records import LineageDocument, StepRecord
from algodock.store.backends import Store, lineage_rel
from tests.conftest import BUSYBOX_IMAGE, build_image

MOVED = "algodock-test/lineage-moved:1"
"""The tag the tests move to a new image."""
STABLE = "algodock-test/lineage-stable:1"
CAPACITY = Capacity(cpu_millicore=4000, memory_gb=4)


def build_versioned(client: Any, tag: str, version: str) -> str:
    """Build ``tag`` as busybox plus ``/algo-version`` holding ``version``; returns the image id."""
    return build_image(client, tag, f"FROM {BUSYBOX_IMAGE}\nCOPY algo-version /algo-version\n", {"algo-version": f"{version}\n".encode()})


def sh(script: str) -> list[str]:
    return ["/bin/sh", "-c", script]


def manifest(path: Path, *, name: str, image: str, command: list[str], inputs: list[dict], outputs: list[dict], parameters: dict | None = None, env: dict | None = None) -> Path:
    doc = {
        "manifest_version": "0.1",
        "name": name,
        "version": "1.0.0",
        "container_parameters": {"image": image, "command": command, "timeout_seconds": 60, "env": env or {}},
        "parameters": parameters or {"type": "object"},
        "inputs": inputs,
        "outputs": outputs,
    }
    path.write_text(json.dumps(doc, indent=2))
    return path


def write_table(path: Path, values: list[int]) -> Path:
    """A small parquet file with columns ``id`` (int64) and ``label`` (string)."""
    pq.write_table(pa.table({"id": pa.array(values, pa.int64()), "label": [f"v{v}" for v in values]}), path)
    return path


def five_step_pipeline(folder: Path) -> Path:
    """``raw`` (parquet) feeds ``stamp`` and ``copy`` (both on the moved tag) and ``side``;
    ``after_stamp`` and ``after_copy`` (stable tag) consume them. ``stamp`` appends the image's
    ``/algo-version`` to its output, so a moved tag changes its bytes; ``copy`` does not."""
    m = folder / "manifests"
    m.mkdir(parents=True, exist_ok=True)
    parquet_in = [{"name": "raw", "format": "parquet"}]
    manifest(m / "stamp.json", name="stamp", image=MOVED, command=sh("cat /work/input/raw/* /algo-version > /work/output/out.binary"), inputs=parquet_in, outputs=[{"name": "out", "format": "binary"}])
    manifest(m / "copy.json", name="copy", image=MOVED, command=sh("cp /work/input/raw/* /work/output/table.parquet"), inputs=parquet_in, outputs=[{"name": "table", "format": "parquet"}])
    manifest(m / "pass-bin.json", name="pass-bin", image=STABLE, command=sh("cat /work/input/data/* > /work/output/out.binary"), inputs=[{"name": "data", "format": "binary"}], outputs=[{"name": "out", "format": "binary"}])
    manifest(
        m / "pass-parquet.json",
        name="pass-parquet",
        image=STABLE,
        command=sh("cp /work/input/raw/* /work/output/table.parquet"),
        inputs=parquet_in,
        outputs=[{"name": "table", "format": "parquet"}],
        parameters={"type": "object", "properties": {"label": {"type": "string", "default": "a"}}, "additionalProperties": False},
    )
    if not (folder / "raw.parquet").exists():
        write_table(folder / "raw.parquet", [1, 2, 3])
    spec = {
        "pipeline_version": "0.1",
        "name": "five",
        "inputs": {"raw": "raw.parquet"},
        "steps": [
            {"id": "stamp", "manifest": "manifests/stamp.json", "inputs": {"raw": "inputs.raw"}},
            {"id": "copy", "manifest": "manifests/copy.json", "inputs": {"raw": "inputs.raw"}},
            {"id": "after_stamp", "manifest": "manifests/pass-bin.json", "inputs": {"data": "stamp.out"}},
            {"id": "after_copy", "manifest": "manifests/pass-parquet.json", "inputs": {"raw": "copy.table"}},
            # the same algorithm as after_copy on the same bytes: without its own parameter it would be a cache hit
            {"id": "side", "manifest": "manifests/pass-parquet.json", "inputs": {"raw": "inputs.raw"}, "parameters": {"label": "side"}},
        ],
    }
    path = folder / "pipeline.json"
    path.write_text(json.dumps(spec, indent=2))
    return path


def run_local(
    spec: Path | Pipeline,
    store: Store,
    run_id: str,
    client: Any,
    *,
    overrides: dict[str, dict[str, Any]] | None = None,
    use_cache: bool = True,
    flow_run_id: str | None = None,
) -> LineageDocument:
    """Run every step in order through ``execute_step`` (no Prefect); write and return the lineage document."""
    pipeline = spec if isinstance(spec, Pipeline) else load_pipeline(spec, overrides=overrides, capacity=CAPACITY)
    with tempfile.TemporaryDirectory(prefix="algodock-test-run-") as scratch:
        ctx = RunContext(pipeline=pipeline, store=store, run_id=run_id, client=client, pool=ResourcePool(CAPACITY), scratch=Path(scratch), use_cache=use_cache, flow_run_id=flow_run_id, observers=[OpenLineageObserver()])
        ctx.cache = StoreCache(store, run_id=run_id)
        doc = LineageDocument(
            run_id=run_id, pipeline=pipeline.spec.name, spec_sha256=pipeline.spec_sha256, flow_run_id=flow_run_id, store=store.uri(), started_at=datetime.now(timezone.utc)
        )
        records: dict[str, StepRecord] = {}
        for step_id in pipeline.topological_order():
            deps = pipeline.dependencies[step_id]
            if any(records[d].status not in ("succeeded", "cached") for d in deps):
                records[step_id] = StepRecord(id=step_id, status="skipped")
            else:
                for attempt in range(1, 4):  # as the flow: infrastructure failures are retried
                    records[step_id] = execute_step(ctx, step_id, {d: records[d] for d in deps}, attempt=attempt)
                    failure = records[step_id].failure
                    if failure is None or failure.kind != "infrastructure":
                        break
            doc.steps = list(records.values())
            store.write_json(lineage_rel(run_id), doc.model_dump(mode="json"))
        doc.status = "succeeded" if all(r.status in ("succeeded", "cached") for r in records.values()) else "failed"
        doc.finished_at = datetime.now(timezone.utc)
        store.write_json(lineage_rel(run_id), doc.model_dump(mode="json"))
    return doc


def statuses(doc: LineageDocument) -> dict[str, str]:
    return {s.id: s.status for s in doc.steps}
