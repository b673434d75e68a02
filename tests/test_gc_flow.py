"""The `algodock-gc` flow and deployment (prefect.yaml): the engine's gc with a summary artifact."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from algodock.store.backends import lineage_rel, open_store
from tests.conftest import REPO
from tests.test_gc import assert_verified, fake_run

pytestmark = pytest.mark.prefect


def _store_with_runs(tmp_path: Path, n: int = 3):
    store = open_store(str(tmp_path / "store"))
    for i in range(n):
        fake_run(store, tmp_path / "src", f"r{i}", age=timedelta(days=n - i))
    return store


def _artifact(flow_run_id) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["algodock-gc"])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
        )
    assert len(found) == 1, f"{len(found)} algodock-gc artifacts on flow run {flow_run_id}"
    return str(found[0].data)


def test_the_gc_flow_collects_and_publishes_a_summary(tmp_path, prefect_harness) -> None:
    from algodock.flows.gc import gc_store

    store = _store_with_runs(tmp_path)
    state = gc_store(store=store.uri(), keep_last=1, dry_run=False, return_state=True)
    assert state.is_completed(), state
    doc = state.result()
    assert doc["runs_removed"] == ["r0", "r1"] and doc["runs_kept"] == ["r2"] and doc["dry_run"] is False
    assert not store.exists(lineage_rel("r0"))
    assert_verified(store, ["r2"])
    text = _artifact(state.state_details.flow_run_id)
    assert "removed **2** run(s)" in text and "`r0`" in text and f"**{doc['files']}** file(s)" in text


def test_a_bad_duration_fails_the_flow_run_naming_it(tmp_path, prefect_harness) -> None:
    from algodock.flows.gc import gc_store

    store = _store_with_runs(tmp_path, 1)
    state = gc_store(store=store.uri(), older_than="a month", return_state=True)
    assert state.is_failed() and "a month" in str(state.message)
    assert store.exists(lineage_rel("r0"))


@pytest.mark.server
def test_the_algodock_gc_deployment_of_prefect_yaml_runs_on_a_worker(tmp_path, on_prefect_server, process_worker) -> None:
    from prefect.client.orchestration import get_client

    from algodock.flows.gc import gc_store
    from tests.prefect_server import off_loop, start_deployment, wait_for

    project = yaml.safe_load((REPO / "prefect.yaml").read_text())
    [spec] = [d for d in project["deployments"] if d["name"] == "algodock-gc"]
    assert spec["entrypoint"] == "flows/algodock_flows.py:gc_store" and spec["schedules"], spec
    store = _store_with_runs(tmp_path)
    parameters = {**spec["parameters"], "store": store.uri(), "keep_last": 2, "older_than": "1d"}

    def deploy() -> None:
        source = gc_store.from_source(source=str(REPO), entrypoint=spec["entrypoint"])
        source.deploy(name="algodock-gc-test", work_pool_name=process_worker.pool, parameters=parameters, build=False, push=False, print_next_steps=False)

    off_loop(deploy)
    flow_run = start_deployment("algodock-gc/algodock-gc-test")
    with get_client(sync_client=True) as client:
        state = wait_for(lambda: (s := client.read_flow_run(flow_run.id).state) and s.is_final() and s, timeout=300, what="the gc flow run to end")
    assert state.is_completed(), state
    assert not store.exists(lineage_rel("r0")) and store.exists(lineage_rel("r1"))
    assert "removed **1** run(s)" in _artifact(flow_run.id)
