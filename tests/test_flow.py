"""Pipelines through the real Prefect flow, a real Docker engine and real stores.

The algorithms are small Python scripts run in the example image (it has python3 and
pyarrow), so the parquet hand-off between steps is real.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, write_manifest
from tests.waiting import settled_task_runs, upstream_ids

pytestmark = [pytest.mark.docker, pytest.mark.prefect]

PY_IMAGE = "algodock/device-visits:1.0.0"

SCALE = r"""
import json, os, sys, pyarrow.parquet as pq, pyarrow.compute as pc, pyarrow as pa
cfg = json.load(open(os.environ["ALGORITHM_INPUT_PATH"]))
k = cfg["config"]["parameters"]["factor"]
if k < 0:
    print("negative factor", file=sys.stderr); sys.exit(3)
files = [f for d in cfg["input_data"] for f in d["files"]]
t = pa.concat_tables([pq.read_table(f) for f in files])
out = pa.table({"x": pc.multiply(t["x"], k)})
pq.write_table(out, "/work/output/scaled.parquet")
json.dump({"version": "0.1.0", "status": "success", "output_data": [{"name": "scaled", "format": "parquet", "path": "scaled.parquet"}], "metrics": {"rows": out.num_rows}}, open("/work/output/algo_output.json", "w"))
print("scaled", out.num_rows)
"""

SQUARE_PARTS = r"""
import json, os, pyarrow.parquet as pq, pyarrow.compute as pc
cfg = json.load(open(os.environ["ALGORITHM_INPUT_PATH"]))
os.makedirs("/work/output/squared")
for i, f in enumerate(cfg["input_data"][0]["files"]):
    t = pq.read_table(f)
    pq.write_table(t.set_column(0, "x", pc.multiply(t["x"], t["x"])), f"/work/output/squared/part-{i}.parquet")
print("squared")  # no algo_output.json: the output is found as the folder squared/
"""

MERGE = r"""
import json, os, pyarrow.parquet as pq, pyarrow as pa, pyarrow.compute as pc
cfg = json.load(open(os.environ["ALGORITHM_INPUT_PATH"]))
by = {d["name"]: pa.concat_tables([pq.read_table(f) for f in d["files"]]) for d in cfg["input_data"]}
total = pc.sum(by["a"]["x"]).as_py() + pc.sum(by["b"]["x"]).as_py()
pq.write_table(pa.table({"total": [total], "rows_a": [by["a"].num_rows], "rows_b": [by["b"].num_rows]}), "/work/output/merged.parquet")
"""


def _manifests(d: Path) -> dict[str, Path]:
    rr = {"cpu_millicore": 500, "memory_gb": 0.5}
    return {
        "scale": write_manifest(
            d / "scale.json", name="scale", image=PY_IMAGE, command=["python3", "-c", SCALE],
            container={"resource_request": rr, "timeout_seconds": 120},
            parameters={"type": "object", "properties": {"factor": {"type": "integer", "default": 2}}, "additionalProperties": False},
            inputs=[{"name": "numbers", "format": "parquet", "multiple": True}],
            outputs=[{"name": "scaled", "format": "parquet"}],
        ),
        "square": write_manifest(
            d / "square.json", name="square", image=PY_IMAGE, command=["python3", "-c", SQUARE_PARTS],
            container={"resource_request": rr, "timeout_seconds": 120},
            inputs=[{"name": "numbers", "format": "parquet", "multiple": True}],
            outputs=[{"name": "squared", "format": "parquet", "multiple": True}],
        ),
        "merge": write_manifest(
            d / "merge.json", name="merge", image=PY_IMAGE, command=["python3", "-c", MERGE],
            container={"resource_request": rr, "timeout_seconds": 120},
            inputs=[{"name": "a", "format": "parquet"}, {"name": "b", "format": "parquet", "multiple": True}],
            outputs=[{"name": "merged", "format": "parquet"}],
        ),
    }


def _numbers(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"x": list(range(1, 51))}), folder / "part-000.parquet")
    pq.write_table(pa.table({"x": list(range(51, 101))}), folder / "part-001.parquet")
    return folder


def _spec(d: Path, numbers_uri: str, *, factor: int = 2) -> Path:
    _manifests(d)
    spec = d / "pipeline.yaml"
    spec.write_text(
        f"""
pipeline_version: "0.1"
name: fan
inputs: {{numbers: "{numbers_uri}"}}
steps:
  - {{id: double, manifest: scale.json, inputs: {{numbers: inputs.numbers}}, parameters: {{factor: {factor}}}}}
  - {{id: square, manifest: square.json, inputs: {{numbers: inputs.numbers}}}}
  - {{id: merge, manifest: merge.json, inputs: {{a: double.scaled, b: square.squared}}}}
"""
    )
    return spec


EXPECTED_TOTAL = 2 * sum(range(1, 101)) + sum(x * x for x in range(1, 101))


def _read_parquet(uri: str) -> pa.Table:
    import fsspec

    with fsspec.open(uri, "rb") as fh:
        return pq.read_table(fh)


@pytest.fixture
def example_image(docker_client) -> str:
    from algodock.runtime.engine import resolve_image
    from algodock.errors import ImageNotFound

    try:
        return resolve_image(docker_client, PY_IMAGE, pull=False).id
    except ImageNotFound:
        if os.environ.get("CI"):
            pytest.fail(f"{PY_IMAGE} is missing: `make images` builds it")
        pytest.skip(f"{PY_IMAGE} is missing: `make images` builds it")


def test_fan_out_fan_in_local_store(tmp_path, prefect_harness, example_image):
    from algodock.flows.pipeline import run_pipeline

    spec = _spec(tmp_path, str(_numbers(tmp_path / "numbers")))
    store = tmp_path / "store"
    state = run_pipeline(spec=str(spec), store=str(store), run_id="r1", no_cache=True, return_state=True)
    assert state.is_completed(), state.message
    summary = json.loads((store / "runs/r1/run.json").read_text())
    by = {s["id"]: s for s in summary["steps"]}
    assert {k: v["status"] for k, v in by.items()} == {"double": "succeeded", "square": "succeeded", "merge": "succeeded"}
    assert by["double"]["image_id"] == example_image
    merged = _read_parquet(by["merge"]["outputs"][0]["uri"]).to_pylist()
    assert merged == [{"total": EXPECTED_TOTAL, "rows_a": 100, "rows_b": 100}]
    squared = by["square"]["outputs"][0]
    assert squared["rows"] == 100 and Path(squared["uri"]).is_dir()  # found without algo_output.json
    [log] = (store / "runs/r1/steps/double/attempts").glob("*/container.log")  # each attempt writes its own
    assert log.read_text().strip() == "scaled 100"
    # Lineage links merge's inputs to the upstream steps and to the very outputs they stored (uri
    # and sha256). That the staged input is the stored file itself (one inode) is
    # test_run_store.py::test_inputs_are_hardlinks_of_stored_outputs.
    lineage = json.loads((store / "runs/r1/lineage.json").read_text())
    merge = next(s for s in lineage["steps"] if s["id"] == "merge")
    assert {i["name"]: i["produced_by"] for i in merge["inputs"]} == {"a": "double", "b": "square"}
    stored = {s["id"]: s["outputs"][0] for s in summary["steps"] if s["id"] in ("double", "square")}
    assert {i["name"]: (i["uri"], i["sha256"]) for i in merge["inputs"]} == {a: (stored[s]["uri"], stored[s]["sha256"]) for a, s in (("a", "double"), ("b", "square"))}


def test_failing_middle_step_skips_dependents_keeps_the_rest(tmp_path, prefect_harness, example_image):
    from algodock.flows.pipeline import run_pipeline

    spec = _spec(tmp_path, str(_numbers(tmp_path / "numbers")), factor=-1)
    store = tmp_path / "store"
    state = run_pipeline(spec=str(spec), store=str(store), run_id="r2", no_cache=True, return_state=True)
    assert state.is_failed()
    summary = json.loads((store / "runs/r2/run.json").read_text())
    by = {s["id"]: s for s in summary["steps"]}
    assert by["double"]["status"] == "failed" and by["double"]["failure"]["kind"] == "exit_code"
    assert "negative factor" in by["double"]["failure"]["message"]
    assert by["square"]["status"] == "succeeded"  # the independent branch finished
    assert by["merge"]["status"] == "skipped"
    assert Path(by["square"]["outputs"][0]["uri"]).is_dir()  # its outputs are kept


def test_s3_store_and_s3_input(tmp_path, prefect_harness, example_image, s3_endpoint):
    import boto3

    from algodock.flows.pipeline import run_pipeline

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    for bucket in ("raw", "lake"):
        s3.create_bucket(Bucket=bucket)
    for part in sorted(_numbers(tmp_path / "numbers").iterdir()):
        s3.upload_file(str(part), "raw", f"numbers/{part.name}")
    spec = _spec(tmp_path, "s3://raw/numbers/")
    state = run_pipeline(spec=str(spec), store="s3://lake/algodock", run_id="r3", no_cache=True, return_state=True)
    assert state.is_completed(), state.message
    summary = json.loads(s3.get_object(Bucket="lake", Key="algodock/runs/r3/run.json")["Body"].read())
    by = {s["id"]: s for s in summary["steps"]}
    assert all(s["status"] == "succeeded" for s in by.values())
    merged_uri = by["merge"]["outputs"][0]["uri"]
    assert merged_uri.startswith("s3://lake/algodock/runs/r3/steps/merge/attempts/") and "/outputs/" in merged_uri
    assert _read_parquet(merged_uri).to_pylist() == [{"total": EXPECTED_TOTAL, "rows_a": 100, "rows_b": 100}]


def test_cli_run_json_and_bad_spec(tmp_path, prefect_harness, example_image):
    from prefect.settings import PREFECT_API_URL

    spec = _spec(tmp_path, str(_numbers(tmp_path / "numbers")))
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    cmd = [sys.executable, "-m", "algodock.cli", "run", str(spec), "--store", str(tmp_path / "store"), "--run-id", "cli1",
           "--set", "double.factor=3", "--capacity", "cpu_millicore=1000,memory_gb=2", "--json", "--no-cache"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert set(summary) >= {"run_id", "status", "flow_run_id", "lineage_uri", "steps"}
    assert summary["status"] == "succeeded" and summary["run_id"] == "cli1"
    merge = next(s for s in summary["steps"] if s["id"] == "merge")
    total = _read_parquet(merge["outputs"][0]["uri"]).column("total")[0].as_py()
    assert total == 3 * sum(range(1, 101)) + sum(x * x for x in range(1, 101))

    bad = tmp_path / "bad.yaml"
    bad.write_text(spec.read_text().replace("double.scaled", "double.nope"))
    proc = subprocess.run([sys.executable, "-m", "algodock.cli", "run", str(bad), "--json"], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 1
    assert "bad.yaml" in proc.stderr and "step merge" in proc.stderr and "nope" in proc.stderr
    assert json.loads(proc.stdout)["status"] == "failed"


def test_cancelling_the_flow_run_kills_its_containers(tmp_path, prefect_harness, docker_client, busybox_image):
    """What the UI's Cancel button does: set the flow run to Cancelling; containers must die within seconds."""
    from algodock.flows.pipeline import run_pipeline
    from tests.waiting import cancel_from_the_ui

    write_manifest(tmp_path / "sleep.json", name="sleeper", image=busybox_image, command=["sh", "-c", "echo started; sleep 300"],
                   container={"resource_request": {"cpu_millicore": 100, "memory_gb": 0.1}})
    (tmp_path / "p.yaml").write_text(
        'pipeline_version: "0.1"\nname: cancel\nsteps:\n  - {id: slow, manifest: sleep.json}\n  - {id: after, manifest: sleep.json, after: [slow]}\n'
    )
    killed_after = cancel_from_the_ui(docker_client, "cancel1", tmp_path / "store", lambda: run_pipeline(
        spec=str(tmp_path / "p.yaml"), store=str(tmp_path / "store"), run_id="cancel1", no_cache=True, return_state=True))
    assert killed_after < 10, f"the container outlived the cancellation by {killed_after:.1f} s"
    summary = json.loads((tmp_path / "store/runs/cancel1/run.json").read_text())
    by = {s["id"]: s for s in summary["steps"]}
    assert by["slow"]["status"] == "failed" and "cancelled" in by["slow"]["failure"]["message"]
    assert by["after"]["status"] == "skipped"
    assert summary["status"] == "cancelled"
    assert not docker_client.containers.list(all=True, filters={"label": "io.algodock.run_id=cancel1"})


def test_step_retries_apply_to_exit_code_failures_only_when_set(tmp_path, prefect_harness, busybox_image):
    from algodock.flows.pipeline import run_pipeline

    write_manifest(tmp_path / "fail.json", name="fail", image=busybox_image, command=["sh", "-c", "echo attempt; exit 4"],
                   container={"resource_request": {"cpu_millicore": 100, "memory_gb": 0.1}})
    (tmp_path / "p.yaml").write_text(
        'pipeline_version: "0.1"\nname: retries\nsteps:\n'
        "  - {id: twice, manifest: fail.json, retries: 1}\n"
        "  - {id: once, manifest: fail.json}\n"
    )
    state = run_pipeline(spec=str(tmp_path / "p.yaml"), store=str(tmp_path / "store"), run_id="retries1", no_cache=True, return_state=True)
    assert state.is_failed()
    lineage = json.loads((tmp_path / "store/runs/retries1/lineage.json").read_text())
    by = {s["id"]: s for s in lineage["steps"]}
    assert (by["twice"]["attempts"], by["once"]["attempts"]) == (2, 1)
    assert by["twice"]["failure"]["kind"] == "exit_code" and by["twice"]["exit_code"] == 4
    assert by["twice"]["task_run_id"] and by["twice"]["task_run_id"] != by["once"]["task_run_id"]


def test_a_log_flood_is_bounded_in_prefect_and_whole_in_the_store(tmp_path, prefect_harness, busybox_image):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    from algodock.pipeline.execute import EMIT_LIMIT
    from algodock.flows.pipeline import run_pipeline

    line = "x" * 999
    write_manifest(tmp_path / "flood.json", name="flood", image=busybox_image,
                   command=["sh", "-c", f"i=0; while [ $i -lt 6000 ]; do echo {line}; i=$((i+1)); done"],
                   container={"resource_request": {"cpu_millicore": 500, "memory_gb": 0.1}})
    (tmp_path / "p.yaml").write_text('pipeline_version: "0.1"\nname: flood\nsteps:\n  - {id: flood, manifest: flood.json}\n')
    state = run_pipeline(spec=str(tmp_path / "p.yaml"), store=str(tmp_path / "store"), run_id="flood1", no_cache=True, return_state=True)
    assert state.is_completed(), state.message
    [full] = (tmp_path / "store/runs/flood1/steps/flood/attempts").glob("*/container.log")
    assert full.stat().st_size == 6000 * 1000  # every byte kept in the store
    summary = json.loads((tmp_path / "store/runs/flood1/run.json").read_text())
    APILogWorker.drain_all()  # this process sends its logs in batches: every one is on the server now
    sent, notices = 0, 0
    with get_client(sync_client=True) as client:
        offset = 0
        while True:
            page = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[summary["flow_run_id"]])), limit=200, offset=offset)
            sent += sum(len(log.message) for log in page)
            notices += sum("is not shown here" in log.message for log in page)
            offset += len(page)
            if len(page) < 200:
                break
    assert notices == 1, "the line that ends the flood in Prefect, naming where the whole log is, is missing: the read is not the whole"
    assert sent <= EMIT_LIMIT + 64 * 1024, f"{sent} bytes of logs reached the Prefect API; the bound is {EMIT_LIMIT}"
    assert offset < 100, f"{offset} log records for about 1000 container lines: they should go in batches (LogBatches)"


def test_a_prefect_global_concurrency_limit_is_shared_by_the_steps(tmp_path, prefect_harness, busybox_image):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    from algodock.errors import InvalidInput
    from algodock.flows.pipeline import run_pipeline

    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="algodock-test-one", limit=1))
    write_manifest(tmp_path / "nap.json", name="nap", image=busybox_image, command=["sleep", "1"],
                   container={"resource_request": {"cpu_millicore": 100, "memory_gb": 0.1}})
    (tmp_path / "p.yaml").write_text(
        'pipeline_version: "0.1"\nname: limited\nsteps:\n' + "".join(f"  - {{id: n{i}, manifest: nap.json}}\n" for i in range(3))
    )
    state = run_pipeline(spec=str(tmp_path / "p.yaml"), store=str(tmp_path / "store"), run_id="gcl1", no_cache=True,
                         capacity="cpu_millicore=2000,memory_gb=4", concurrency_limit="algodock-test-one", return_state=True)
    assert state.is_completed(), state.message
    steps = json.loads((tmp_path / "store/runs/gcl1/run.json").read_text())["steps"]
    spans = sorted((s["started_at"], s["finished_at"]) for s in steps)
    assert all(end <= nxt_start for (_, end), (nxt_start, _) in zip(spans, spans[1:])), f"steps overlapped under a limit of 1: {spans}"

    with pytest.raises(InvalidInput, match="no Prefect global concurrency limit named 'nope'"):
        run_pipeline(spec=str(tmp_path / "p.yaml"), store=str(tmp_path / "store"), run_id="gcl2", concurrency_limit="nope")


def test_the_run_graph_has_the_dag_edges_and_a_second_run_is_cached(tmp_path, prefect_harness, example_image):
    """Prefect's run graph draws the edges from task_inputs; a rerun on the same store is all Cached."""
    from algodock.flows.pipeline import run_pipeline

    spec = _spec(tmp_path, str(_numbers(tmp_path / "numbers")))
    store = tmp_path / "store"
    state = run_pipeline(spec=str(spec), store=str(store), run_id="graph1", return_state=True)
    assert state.is_completed(), state.message
    runs = settled_task_runs(state.state_details.flow_run_id, 3)
    assert set(runs) == {"double", "square", "merge"}
    assert upstream_ids(runs["merge"]) == {str(runs["double"].id), str(runs["square"].id)}
    assert upstream_ids(runs["double"]) == set() and upstream_ids(runs["square"]) == set()
    assert all(r.state.name == "Completed" for r in runs.values())

    state = run_pipeline(spec=str(spec), store=str(store), run_id="graph2", return_state=True)
    assert state.is_completed(), state.message
    runs = settled_task_runs(state.state_details.flow_run_id, 3)
    for name, run in runs.items():
        assert run.state.is_completed() and run.state.name == "Cached", (name, run.state)
        assert "run graph1" in run.state.message, run.state.message
    assert upstream_ids(runs["merge"]) == {str(runs["double"].id), str(runs["square"].id)}
    summary = state.result()
    assert [s["status"] for s in summary["steps"]] == ["cached"] * 3


def test_steps_that_share_no_data_have_no_edge_in_the_run_graph(tmp_path, prefect_harness, busybox_image):
    """Four independent steps, two at a time: a step that starts after another ended has no edge
    to it. Prefect draws an edge to a task whose result holds an object passed to this one; every
    step's result holds the run's id, passed to every step (edges seen here, and once in CI)."""
    from algodock.flows.pipeline import run_pipeline

    write_manifest(tmp_path / "s.json", name="s", image=busybox_image, container={"resource_request": {"cpu_millicore": 500, "memory_gb": 0.1}},
                   command=["sh", "-c", "mkdir -p /work/output/out; echo x > /work/output/out/x.txt"],
                   outputs=[{"name": "out", "format": "binary", "multiple": True}])
    (tmp_path / "p.yaml").write_text('pipeline_version: "0.1"\nname: apart\nsteps:\n' + "".join(f"  - {{id: s{i}, manifest: s.json}}\n" for i in range(4)))
    state = run_pipeline(spec=str(tmp_path / "p.yaml"), store=str(tmp_path / "store"), run_id="apart1", no_cache=True,
                         capacity="cpu_millicore=1000,memory_gb=4", return_state=True)
    assert state.is_completed(), state.message
    runs = settled_task_runs(state.state_details.flow_run_id, 4)
    edges = {name: {key: [str(i.id) for i in inputs] for key, inputs in run.task_inputs.items() if inputs} for name, run in runs.items()}
    assert edges == {f"s{i}": {} for i in range(4)}


def test_a_skipped_dependent_is_not_ready_in_prefect(tmp_path, prefect_harness, example_image):
    from algodock.flows.pipeline import run_pipeline

    spec = _spec(tmp_path, str(_numbers(tmp_path / "numbers")), factor=-1)
    state = run_pipeline(spec=str(spec), store=str(tmp_path / "store"), run_id="skip1", no_cache=True, return_state=True)
    assert state.is_failed()
    runs = settled_task_runs(state.state_details.flow_run_id, 3)
    assert runs["double"].state.is_failed() and runs["square"].state.is_completed()
    merge = runs["merge"]
    assert merge.state.name == "NotReady" and str(runs["double"].id) in merge.state.message
    assert merge.start_time is None  # never ran
    assert upstream_ids(merge) == {str(runs["double"].id), str(runs["square"].id)}


def test_max_workers_follows_the_capacity(tmp_path):
    from algodock.pipeline.capacity import Capacity
    from algodock.pipeline import load_pipeline
    from algodock.flows.pipeline import max_workers

    spec = _spec(tmp_path, str(_numbers(tmp_path / "numbers")))
    p = load_pipeline(spec)  # three steps of 500 millicores, 0.5 GB
    assert max_workers(p, Capacity.parse("cpu_millicore=500,memory_gb=8")) == 2
    assert max_workers(p, Capacity.parse("cpu_millicore=1000,memory_gb=8")) == 3
    assert max_workers(p, Capacity.parse("cpu_millicore=64000,memory_gb=64")) == 3


def test_a_concurrency_slot_is_held_only_while_the_container_runs(tmp_path, prefect_harness, busybox_image):
    """Capacity for one container at a time, a global limit of 2: the step waiting for local
    resources must not hold a slot (it would if the slot covered the whole task)."""
    import threading

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    from algodock.flows.pipeline import run_pipeline

    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="algodock-test-two", limit=2))
    write_manifest(tmp_path / "nap.json", name="nap", image=busybox_image, command=["sleep", "3"],
                   container={"resource_request": {"cpu_millicore": 1000, "memory_gb": 0.1}})
    (tmp_path / "p.yaml").write_text('pipeline_version: "0.1"\nname: slots\nsteps:\n  - {id: a, manifest: nap.json}\n  - {id: b, manifest: nap.json}\n')
    seen: list[int] = []
    done = threading.Event()

    def watch() -> None:
        with get_client(sync_client=True) as client:
            while not done.wait(0.2):
                seen.append(client.read_global_concurrency_limit_by_name("algodock-test-two").active_slots)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        state = run_pipeline(spec=str(tmp_path / "p.yaml"), store=str(tmp_path / "store"), run_id="slots1", no_cache=True,
                             capacity="cpu_millicore=1000,memory_gb=4", concurrency_limit="algodock-test-two", return_state=True)
    finally:
        done.set()
        watcher.join(10)
    assert state.is_completed(), state.message
    assert 1 in seen, f"no slot was ever seen held: {seen}"
    assert max(seen) == 1, f"a slot was held by a step that was not running its container: {seen}"
