"""Algorithm containers as Prefect tasks in a user's own flow (``from algodock.flows import …``),
against the session's Prefect server, a real Docker engine and real stores.

The algorithms are the small scripts of test_flow.py run in the example image, plus the two
example algorithms themselves (device-visits, dwell-stats).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, write_manifest
from tests.waiting import settled_task_runs, upstream_ids
from tests.test_flow import PY_IMAGE, _manifests, example_image  # noqa: F401  (fixture)

pytestmark = [pytest.mark.docker, pytest.mark.prefect]

EXAMPLES = REPO / "examples"


def _numbers(n: int = 100, start: int = 1) -> pa.Table:
    return pa.table({"x": list(range(start, start + n))})


def _lineage(store: Path, run_id: str) -> dict:
    return json.loads((store / "runs" / run_id / "lineage.json").read_text())


def test_a_mixed_flow_hands_tables_in_and_out_and_the_graph_has_the_edges(tmp_path, prefect_harness, example_image):
    from prefect import flow, task
    from prefect.runtime import flow_run

    from algodock.flows import StepResult, algodock_run, algorithm, output

    m = _manifests(tmp_path)
    scale, square, merge = algorithm(m["scale"]), algorithm(m["square"]), algorithm(m["merge"])
    store = tmp_path / "store"

    @task
    def make_numbers() -> pa.Table:
        return _numbers()

    @task
    def total(result: StepResult) -> int:
        return result.read("merged").column("total")[0].as_py()

    @flow
    def mixed() -> tuple[int, str]:
        with algodock_run(store=str(store), run_id="mix1", cache=False) as run:
            numbers = make_numbers.submit()
            doubled = scale.submit(inputs={"numbers": numbers}, parameters={"factor": 2})
            squared = square.submit(inputs={"numbers": numbers})
            merged = merge.submit(inputs={"a": doubled, "b": output(squared, "squared")})
            t = total.submit(merged)
            assert run.run_id == "mix1" and run.store == str(store)
            return t.result(), str(flow_run.id)

    value, flow_run_id = mixed()
    assert value == 2 * sum(range(1, 101)) + sum(x * x for x in range(1, 101))

    # Lineage: every step, who produced what, the table's sha256 and the task run that made it.
    lineage = _lineage(store, "mix1")
    assert lineage["status"] == "succeeded" and lineage["flow_run_id"] == flow_run_id
    by = {s["id"]: s for s in lineage["steps"]}
    assert set(by) == {"scale", "square", "merge"} and all(s["status"] == "succeeded" for s in by.values())
    assert {i["name"]: i["produced_by"] for i in by["merge"]["inputs"]} == {"a": "scale", "b": "square"}
    runs = settled_task_runs(flow_run_id, 5)
    [numbers_run] = [r for name, r in runs.items() if name.startswith("make_numbers")]
    [table_in] = by["scale"]["inputs"]
    assert table_in["produced_by_task_run"] == str(numbers_run.id)
    assert table_in["uri"].endswith(f"tables/{table_in['sha256']}.parquet")
    assert json.loads((store / "runs/mix1/run.json").read_text())["status"] == "succeeded"

    # The run graph's edges are Prefect's own task_inputs, Python tasks included.
    assert upstream_ids(runs["scale"]) == {str(numbers_run.id)}
    assert upstream_ids(runs["merge"]) == {str(runs["scale"].id), str(runs["square"].id)}
    [total_run] = [r for name, r in runs.items() if name.startswith("total")]
    assert upstream_ids(total_run) == {str(runs["merge"].id)}


def test_a_second_run_is_cached_naming_the_run_reused(tmp_path, prefect_harness, example_image):
    from prefect import flow
    from prefect.runtime import flow_run

    from algodock.flows import algodock_run, algorithm

    scale = algorithm(_manifests(tmp_path)["scale"])
    store = tmp_path / "store"

    @flow
    def twice(run_id: str):
        with algodock_run(store=str(store), run_id=run_id):
            r = scale.submit(inputs={"numbers": _numbers()}, parameters={"factor": 3}).result()
        return r, str(flow_run.id)

    first, _ = twice("c1")
    second, flow_run_id = twice("c2")
    assert first.status == "succeeded" and second.status == "cached"
    assert second.outputs["scaled"].sha256 == first.outputs["scaled"].sha256
    assert second.read("scaled").column("x").to_pylist() == [3 * x for x in range(1, 101)]
    state = settled_task_runs(flow_run_id, 1)["scale"].state
    assert state.name == "Cached" and state.is_completed() and "c1" in state.message
    step = _lineage(store, "c2")["steps"][0]
    assert step["status"] == "cached" and step["cached_from"] == "c1" and step["usage"] is None


def test_a_failure_raises_algorithm_failed_and_its_dependent_is_not_ready(tmp_path, prefect_harness, example_image):
    from prefect import flow
    from prefect.runtime import flow_run

    from algodock.flows import AlgorithmFailed, algodock_run, algorithm

    m = _manifests(tmp_path)
    scale, merge = algorithm(m["scale"]), algorithm(m["merge"])
    store = tmp_path / "store"

    @flow
    def failing():
        with algodock_run(store=str(store), run_id="f1", cache=False):
            bad = scale.submit(inputs={"numbers": _numbers()}, parameters={"factor": -1})
            good = scale.submit(inputs={"numbers": _numbers()}, parameters={"factor": 1})
            after = merge.submit(inputs={"a": bad, "b": good})
            with pytest.raises(AlgorithmFailed) as failed:
                bad.result()
            after.wait()
            return failed.value, after.state, good.result(), str(flow_run.id)

    exc, after_state, good, flow_run_id = failing(return_state=False)
    assert exc.kind == "exit_code" and exc.step_id == "scale" and "negative factor" in "\n".join(exc.log_tail)
    assert after_state.name == "NotReady"
    assert good.status == "succeeded" and good.step_id == "scale-2"
    by = {s["id"]: s for s in _lineage(store, "f1")["steps"]}
    assert by["scale"]["status"] == "failed" and by["scale"]["failure"]["kind"] == "exit_code"
    assert by["scale"]["attempts"] == 1  # exit_code is not retried without retries=
    assert by["merge"]["status"] == "skipped" and by["merge"]["started_at"] is None  # no container
    runs = settled_task_runs(flow_run_id, 3)
    assert runs["scale"].state.is_failed()
    assert runs["merge"].state.name == "NotReady"  # named by its step id, as a pipeline's step is


def test_bad_input_is_refused_at_submit_naming_algorithm_step_and_field(tmp_path, prefect_harness, example_image):
    from prefect import flow, task

    from algodock.errors import InvalidInput
    from algodock.flows import AlgorithmFailed, algodock_run, algorithm, output

    m = _manifests(tmp_path)
    scale, merge = algorithm(m["scale"]), algorithm(m["merge"])
    store = tmp_path / "store"

    @task
    def not_data() -> dict:
        return {"x": 1}

    @flow
    def bad() -> list[str]:
        errors = []
        with algodock_run(store=str(store), run_id="b1", cache=False):
            calls = [
                lambda: scale.submit(inputs={"nums": _numbers()}),
                lambda: scale.submit(inputs={"numbers": _numbers()}, parameters={"factr": 2}),
                lambda: scale.submit(inputs={"numbers": _numbers()}, parameters={"factor": "two"}),
                lambda: merge.submit(inputs={"b": _numbers()}),
                lambda: merge.submit(inputs={"a": [_numbers()], "b": _numbers()}),
                lambda: merge.submit(inputs={"a": str(tmp_path / "nowhere"), "b": _numbers()}),
                lambda: merge.submit(inputs={"a": 42, "b": _numbers()}),
            ]
            for call in calls:
                with pytest.raises(InvalidInput) as exc:
                    call()
                errors.append(str(exc.value))
            done = scale.submit(inputs={"numbers": _numbers()})
            with pytest.raises(InvalidInput) as exc:
                merge.submit(inputs={"a": output(done, "nope"), "b": _numbers()})
            errors.append(str(exc.value))
            late = scale.submit(inputs={"numbers": not_data.submit()})
            with pytest.raises(AlgorithmFailed) as failed:
                late.result()
            errors.append(str(failed.value))
            assert failed.value.kind == "invalid_input"
        return errors

    errors = bad()
    expected = [
        ("algorithm scale, step scale: inputs.nums", "no such input slot"),
        ("algorithm scale, step scale: parameters.factr", "unknown parameter"),
        ("algorithm scale, step scale: parameters.factor", "is not of type 'integer'"),
        ("algorithm merge, step merge: inputs.a", "required input missing"),
        ("algorithm merge, step merge: inputs.a", "only for a slot with multiple: true"),
        ("algorithm merge, step merge: inputs.a", "does not exist"),
        ("algorithm merge, step merge: inputs.a", "got int"),
        ("algorithm merge, step merge: inputs.a", "has no output 'nope' (outputs: scaled)"),
        ("algorithm scale, step scale-2: inputs.numbers", "returned dict"),
    ]
    for text, (where, what) in zip(errors, expected):
        assert where in text and what in text, text
    by = {s["id"]: s for s in _lineage(store, "b1")["steps"]}
    assert set(by) == {"scale", "scale-2"}  # refused calls made no step
    assert by["scale-2"]["status"] == "failed" and by["scale-2"]["usage"] is None  # no container ran


def test_map_fan_out_and_fan_in_with_deterministic_step_ids(tmp_path, prefect_harness, example_image):
    from prefect import flow, unmapped

    from algodock.flows import algodock_run, algorithm

    m = _manifests(tmp_path)
    scale, square = algorithm(m["scale"]), algorithm(m["square"])
    store = tmp_path / "store"

    @flow
    def fan():
        with algodock_run(store=str(store), run_id="m1", cache=False):
            parts = [{"numbers": _numbers(10, start=10 * i + 1)} for i in range(3)]
            scaled = scale.map(inputs=parts, parameters=unmapped({"factor": 10}))
            together = square.submit(inputs={"numbers": scaled})  # a list of futures into a multiple slot
            return [f.result() for f in scaled], together.result()

    scaled, together = fan()
    assert [r.step_id for r in scaled] == ["scale", "scale-2", "scale-3"]
    assert [r.read("scaled").column("x").to_pylist() for r in scaled] == [[10 * x for x in range(10 * i + 1, 10 * i + 11)] for i in range(3)]
    got = sorted(together.read("squared").column("x").to_pylist())
    assert got == sorted((10 * x) ** 2 for x in range(1, 31))
    assert [s["id"] for s in _lineage(store, "m1")["steps"]] == ["scale", "scale-2", "scale-3", "square"]


def test_the_capacity_packs_the_containers_of_a_run(tmp_path, prefect_harness, example_image):
    from prefect import flow

    from algodock.flows import algodock_run, algorithm

    scale = algorithm(_manifests(tmp_path)["scale"])  # each asks for 500 millicores
    store = tmp_path / "store"

    @flow
    def packed():
        with algodock_run(store=str(store), run_id="p1", capacity={"cpu_millicore": 1000, "memory_gb": 4}, cache=False):
            futures = [scale.submit(inputs={"numbers": _numbers(5, start=i)}) for i in range(4)]
            return [f.result() for f in futures]

    assert all(r.status == "succeeded" for r in packed())
    spans = sorted((s["started_at"], s["finished_at"]) for s in _lineage(store, "p1")["steps"])
    # never more than two containers at once: each container overlaps at most one other at any time
    for i, (start, _) in enumerate(spans):
        running = [s for s in spans[:i] if s[1] > start]
        assert len(running) <= 1, (start, running)


def test_a_step_request_above_the_capacity_is_refused_at_submit(tmp_path, prefect_harness, example_image):
    from prefect import flow

    from algodock.errors import InvalidInput
    from algodock.flows import algodock_run, algorithm

    scale = algorithm(_manifests(tmp_path)["scale"])

    @flow
    def too_big():
        with algodock_run(store=str(tmp_path / "store"), capacity="cpu_millicore=100,memory_gb=4"):
            with pytest.raises(InvalidInput, match=r"algorithm scale, step scale: resource_request can never fit .*cpu_millicore 500 > 100"):
                scale.submit(inputs={"numbers": _numbers()})

    too_big()


def test_the_example_algorithms_in_an_implicit_run(tmp_path, prefect_harness, example_image, monkeypatch):
    from prefect import flow, task
    from prefect.runtime import flow_run

    from algodock.flows import algorithm

    pings = tmp_path / "pings"
    subprocess.run([sys.executable, str(EXAMPLES / "generate_pings.py"), "--out", str(pings), "--devices", "5", "--hours", "6", "--parts", "2", "--seed", "3"], check=True, capture_output=True)
    store = tmp_path / "store"
    monkeypatch.setenv("ALGODOCK_STORE", str(store))
    visits = algorithm(EXAMPLES / "device-visits/manifest.json")
    stats = algorithm(str(EXAMPLES / "dwell-stats/manifest.json"))

    @task
    def devices(result) -> int:
        return result.read("stats").num_rows

    @flow
    def daily():
        v = visits.submit(inputs={"pings": sorted(pings.iterdir())}, parameters={"look_back_time": 86400})
        s = stats(inputs={"visits": v})  # a direct call inside the flow
        return devices(s), str(flow_run.id)

    n, flow_run_id = daily()
    assert 1 <= n <= 5
    [run_json] = list(store.glob("runs/*/run.json"))
    summary = json.loads(run_json.read_text())
    assert summary["status"] == "succeeded" and summary["flow_run_id"] == flow_run_id
    assert [s["id"] for s in summary["steps"]] == ["device-visits", "dwell-stats"]
    assert not list(store.glob("runs/*/lease.json")) or json.loads(next(store.glob("runs/*/lease.json")).read_text()).get("released")


def test_outside_any_flow_a_call_is_a_one_step_run(tmp_path, prefect_harness, example_image, monkeypatch):
    from algodock.flows import algorithm

    store = tmp_path / "store"
    monkeypatch.setenv("ALGODOCK_STORE", str(store))
    data = tmp_path / "n.parquet"
    pq.write_table(_numbers(3), data)
    result = algorithm(_manifests(tmp_path)["scale"])(inputs={"numbers": data}, parameters={"factor": 5})
    assert result.status == "succeeded" and result.read("scaled").column("x").to_pylist() == [5, 10, 15]
    lineage = _lineage(store, result.run_id)
    assert lineage["status"] == "succeeded" and [s["id"] for s in lineage["steps"]] == ["scale"]


def test_a_flow_under_the_dask_task_runner(tmp_path, prefect_harness, example_image):
    from prefect import flow
    from prefect_dask import DaskTaskRunner

    from algodock.flows import algodock_run, algorithm

    scale = algorithm(_manifests(tmp_path)["scale"])
    # In process, the cluster's only sockets are its scheduler's and its worker's HTTP servers: on
    # loopback (by default 0.0.0.0:8787 and 0.0.0.0 on a free port).
    runner = DaskTaskRunner(cluster_kwargs={"processes": False, "n_workers": 1, "threads_per_worker": 2, "dashboard_address": "127.0.0.1:0",
                                            "worker_dashboard_address": "127.0.0.1:0", "resources": {"cpu_millicore": 1000, "memory_gb": 2}})

    @flow(task_runner=runner)
    def on_dask():
        with algodock_run(store=str(tmp_path / "store"), run_id="d1", cache=False):
            a = scale.submit(inputs={"numbers": _numbers(4)}, parameters={"factor": 2})
            b = scale.submit(inputs={"numbers": a}, parameters={"factor": 3})
            return b.result()

    assert on_dask().read("scaled").column("x").to_pylist() == [6, 12, 18, 24]


def test_retries_rerun_an_exit_code_failure_and_a_resumed_run_reuses_what_succeeded(tmp_path, prefect_harness, busybox_image):
    from prefect import flow

    from algodock.flows import AlgorithmFailed, algodock_run, algorithm

    flaky = write_manifest(  # always exits 3
        tmp_path / "flaky.json", name="flaky", image=busybox_image, command=["sh", "-c", "echo ok > /work/output/out.binary; exit 3"],
        container={"timeout_seconds": 60}, outputs=[{"name": "out", "format": "binary"}],
    )
    ok = write_manifest(tmp_path / "ok.json", name="ok", image=busybox_image, command=["sh", "-c", "echo ok > /work/output/out.binary"],
                        container={"timeout_seconds": 60}, outputs=[{"name": "out", "format": "binary"}])
    fixed = write_manifest(tmp_path / "fixed.json", name="fixed", image=busybox_image, command=["sh", "-c", "echo fixed > /work/output/out.binary"],
                           container={"timeout_seconds": 60}, outputs=[{"name": "out", "format": "binary"}])
    store = tmp_path / "store"

    @flow
    def with_retries(retries: int):
        with algodock_run(store=str(store), run_id=f"rt{retries}", cache=False):
            fut = algorithm(flaky, retries=retries).submit(inputs={})
            try:
                fut.result()
            except AlgorithmFailed as exc:
                return exc.kind

    assert with_retries(0) == "exit_code"
    assert _lineage(store, "rt0")["steps"][0]["attempts"] == 1
    assert with_retries(1) == "exit_code"
    assert _lineage(store, "rt1")["steps"][0]["attempts"] == 2  # retried once: exit_code is a user-retried kind

    @flow
    def resumable(fail: bool):
        with algodock_run(store=str(store), run_id="resume"):
            first = algorithm(ok).submit(inputs={})
            second = algorithm(flaky if fail else fixed, name="second").submit(inputs={}, wait_for=[first])
            first.wait()
            second.wait()
            return first.state.name, second.state.name

    assert resumable(True) == ("Completed", "Failed")
    first_state, second_state = resumable(False)
    assert first_state == "Cached" and second_state == "Completed"
    by = {s["id"]: s for s in _lineage(store, "resume")["steps"]}
    assert by["ok"]["status"] == "succeeded" and by["ok"]["attempts"] == 1  # as in pipelines: the first attempt's record, kept
    assert by["second"]["status"] == "succeeded" and by["second"]["attempts"] == 1


def test_a_bad_call_is_a_value_error_too(tmp_path, prefect_harness, example_image):
    from prefect import flow

    from algodock.flows import algodock_run, algorithm

    scale = algorithm(_manifests(tmp_path)["scale"])

    @flow
    def bad():
        with algodock_run(store=str(tmp_path / "store")):
            with pytest.raises(ValueError, match="algorithm scale, step scale: inputs.numbers: required input missing"):
                scale.submit(inputs={})

    bad()


def test_a_step_materializes_its_outputs_as_assets_reading_its_external_inputs(tmp_path, prefect_harness, example_image):
    """Each algorithm call is a materializing task: its outputs' store URIs are assets, the
    files it reads are their dependencies, the event carries the output's sha256 and where its bytes are."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    from algodock.flows import algodock_run, algorithm
    from tests.waiting import poll

    m = _manifests(tmp_path)
    scale = algorithm(m["scale"])
    store = tmp_path / "store"
    numbers = tmp_path / "numbers.parquet"
    pq.write_table(_numbers(), numbers)

    @flow
    def assets():
        with algodock_run(store=str(store), run_id="as1", cache=False):
            return scale.submit(inputs={"numbers": str(numbers)}).result()

    result = assets()
    out = result.outputs["scaled"]
    key = "file://" + str(store / "runs/as1/steps/scale/outputs/scaled.parquet")

    def events():
        with get_client(sync_client=True) as client:
            page = client.read_events(filter=EventFilter(event=EventNameFilter(name=["prefect.asset.materialization.succeeded"]),
                                                         resource=EventResourceFilter(id=[key])), limit=50)
        return page.events

    [event] = poll("the materialization event of the step's output", events, deadline=30, every=0.5)
    assert event.payload["sha256"] == out.sha256 and event.payload["uri"] == out.uri and event.payload["step"] == "scale"
    related = {(r.id, r.role) for r in event.related}
    assert ("file://" + str(numbers), "asset") in related and ("algodock", "asset-materialized-by") in related


def test_cancelling_a_python_flow_from_the_ui_removes_its_containers(tmp_path, prefect_harness, docker_client, busybox_image):
    """The UI's Cancel button on a flow that calls algorithms: the running container dies within
    seconds, the step ends `cancelled`, its dependent never starts, the run is `cancelled`."""
    from prefect import flow

    from algodock.flows import algodock_run, algorithm
    from tests.waiting import cancel_from_the_ui

    sleeper = write_manifest(tmp_path / "sleep.json", name="sleeper", image=busybox_image,
                             command=["sh", "-c", "echo started; sleep 300; mkdir -p /work/output/out"],
                             container={"resource_request": {"cpu_millicore": 100, "memory_gb": 0.1}},
                             outputs=[{"name": "out", "format": "binary", "multiple": True}])
    after = write_manifest(tmp_path / "after.json", name="after", image=busybox_image, command=["true"],
                           container={"resource_request": {"cpu_millicore": 100, "memory_gb": 0.1}},
                           inputs=[{"name": "prev", "format": "binary", "multiple": True}])
    store = tmp_path / "store"
    slow, then = algorithm(sleeper), algorithm(after)

    @flow
    def cancellable():
        with algodock_run(store=str(store), run_id="ccancel1", cache=False):
            first = slow.submit(inputs={})
            then.submit(inputs={"prev": first})

    killed_after = cancel_from_the_ui(docker_client, "ccancel1", store, lambda: cancellable(return_state=True))
    assert killed_after < 10, f"the container outlived the cancellation by {killed_after:.1f} s"
    summary = json.loads((store / "runs/ccancel1/run.json").read_text())
    by = {s["id"]: s for s in summary["steps"]}
    assert by["sleeper"]["status"] == "failed" and "cancelled" in by["sleeper"]["failure"]["message"]
    assert by["after"]["status"] == "skipped"
    assert summary["status"] == "cancelled"
    assert not docker_client.containers.list(all=True, filters={"label": "io.algodock.run_id=ccancel1"})


def test_a_flow_on_a_dask_cluster_of_worker_processes_records_its_steps(tmp_path, prefect_harness, example_image):
    """Under a DaskTaskRunner whose workers are other processes, each step runs there (its run
    joined through the call's ticket) and the flow's process writes its record into the lineage."""
    from prefect import flow
    from prefect_dask import DaskTaskRunner

    from algodock.flows import algodock_run, algorithm

    scale = algorithm(_manifests(tmp_path)["scale"])
    runner = DaskTaskRunner(cluster_kwargs={"processes": True, "n_workers": 1, "threads_per_worker": 2, "host": "127.0.0.1",
                                            "dashboard_address": "127.0.0.1:0",  # None still serves HTTP, on 8787
                                            "resources": {"cpu_millicore": 1000, "memory_gb": 2}})
    store = tmp_path / "store"

    @flow(task_runner=runner)
    def on_workers():
        with algodock_run(store=str(store), run_id="dp1", cache=False):
            a = scale.submit(inputs={"numbers": _numbers(4)}, parameters={"factor": 2})
            b = scale.submit(inputs={"numbers": a}, parameters={"factor": 3})
            return b.result()

    result = on_workers()
    assert result.read("scaled").column("x").to_pylist() == [6, 12, 18, 24]
    lineage = _lineage(store, "dp1")
    assert lineage["status"] == "succeeded"
    by = {s["id"]: s for s in lineage["steps"]}
    assert set(by) == {"scale", "scale-2"} and all(s["status"] == "succeeded" and s["image_id"] for s in by.values())
    assert {i["name"]: i["produced_by"] for i in by["scale-2"]["inputs"]} == {"numbers": "scale"}
    assert by["scale"]["inputs"][0]["uri"].endswith(".parquet") and "tables/" in by["scale"]["inputs"][0]["uri"]
