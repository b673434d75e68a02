"""Against a real ``prefect server start`` process: a worker's deployment run cancelled, the API killed mid-run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, write_manifest
from tests.prefect_server import start_deployment, PrefectServer, deploy_pipeline, wait_for

pytestmark = [pytest.mark.docker, pytest.mark.prefect, pytest.mark.server]

SMALL = {"resource_request": {"cpu_millicore": 100, "memory_gb": 0.1}}


def _containers(client, label: str) -> list:
    return client.containers.list(all=True, filters={"label": label})


def test_cancelling_a_deployment_run_removes_its_containers(tmp_path, on_prefect_server, process_worker, docker_client, busybox_image):
    """A deployment run (no run_id parameter) run by a real worker, cancelled through the API."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    write_manifest(tmp_path / "sleep.json", name="sleeper", image=busybox_image, command=["sh", "-c", "echo started; sleep 300"], container=SMALL)
    (tmp_path / "p.yaml").write_text('pipeline_version: "0.1"\nname: cancel-deploy\nsteps:\n  - {id: slow, manifest: sleep.json}\n')
    name = deploy_pipeline("cancel-test", process_worker.pool, {"spec": str(tmp_path / "p.yaml"), "store": str(tmp_path / "store"), "no_cache": True})
    flow_run = start_deployment(name)
    label = f"io.algodock.flow_run_id={flow_run.id}"
    try:
        wait_for(lambda: [c for c in _containers(docker_client, label) if c.status == "running"], timeout=180, what=f"a running container labelled {label}")
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(flow_run.id, Cancelling(), force=True)
        cancelled_at = time.monotonic()
        wait_for(lambda: not _containers(docker_client, label), timeout=30, what="the cancelled run's container to be removed")
        assert time.monotonic() - cancelled_at < 30
        with get_client(sync_client=True) as client:
            state = wait_for(lambda: (s := client.read_flow_run(flow_run.id).state) and s.is_final() and s, timeout=60, what="the flow run to end")
        assert state.is_cancelled(), state
    finally:
        for c in _containers(docker_client, label):
            c.remove(force=True)


def test_the_api_going_away_mid_run(tmp_path, docker_client, busybox_image):
    """`algodock run` against a server that is SIGKILLed while a step runs: no container left, summary printed, exit by the steps."""
    server = PrefectServer(tmp_path / "home")
    try:
        # The first step outlives the server's death by a few seconds (the algorithm's own duration).
        write_manifest(tmp_path / "wait.json", name="waiter", image=busybox_image, container=SMALL,
                       command=["sh", "-c", "echo working; sleep 8; mkdir -p /work/output/out; echo done > /work/output/out/x.txt"],
                       outputs=[{"name": "out", "format": "binary", "multiple": True}])
        write_manifest(tmp_path / "after.json", name="after", image=busybox_image, container=SMALL,
                       command=["sh", "-c", "mkdir -p /work/output/out; echo after > /work/output/out/y.txt"],
                       inputs=[{"name": "prev", "format": "binary", "multiple": True}], outputs=[{"name": "out", "format": "binary", "multiple": True}])
        (tmp_path / "p.yaml").write_text(
            'pipeline_version: "0.1"\nname: api-away\nsteps:\n'
            "  - {id: first, manifest: wait.json}\n"
            "  - {id: second, manifest: after.json, inputs: {prev: first.out}}\n"
        )
        env = {**os.environ, "PREFECT_API_URL": server.api_url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        proc = subprocess.Popen([sys.executable, "-m", "algodock.cli", "run", str(tmp_path / "p.yaml"), "--store", str(tmp_path / "store"),
                                 "--run-id", "away1", "--json", "--no-cache"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
        label = "io.algodock.run_id=away1"
        wait_for(lambda: [c for c in _containers(docker_client, label) if c.status == "running"], timeout=120, what="the first step's container")
        server.kill()
        out, err = proc.communicate(timeout=240)
    finally:
        if "proc" in locals() and proc.poll() is None:
            proc.kill()
        server.stop()
    assert not _containers(docker_client, label), "a container outlived `algodock run`"
    summary = json.loads(out)
    assert [s["status"] for s in summary["steps"]] == ["succeeded", "succeeded"], err[-3000:]
    assert proc.returncode == 0, err[-3000:]
    assert "Prefect" in err and "incomplete" in err
    lineage = json.loads((tmp_path / "store/runs/away1/lineage.json").read_text())
    assert lineage["status"] == "succeeded"
