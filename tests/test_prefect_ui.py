"""The Prefect UI in a real browser (Playwright driving Debian's chromium) against a real server and worker.

A deployment run whose middle step fails (its external input lacks a file) is opened in
the UI; the test fixes the input and presses Retry: the worker re-runs the flow run, the
step that succeeded before is Cached (no container), the failed and skipped steps run, and
the task runs name their upstream task runs (the graph's edges).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from tests.conftest import write_manifest
from tests.prefect_server import start_deployment, deploy_pipeline, wait_for
from tests.waiting import settled_task_runs, upstream_ids

pytestmark = [pytest.mark.docker, pytest.mark.prefect, pytest.mark.server, pytest.mark.browser]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
SMALL = {"resource_request": {"cpu_millicore": 100, "memory_gb": 0.1}}


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium under Playwright (no browser download: `make browser` installs the package).

    Module-scoped: Playwright's sync API runs an event loop in the test thread, and while it
    runs Prefect's dual sync/async functions return coroutines, so it must not outlive this module.
    """
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but {CHROMIUM} is missing: `make browser` installs it", pytrace=False)
        pytest.skip(f"{CHROMIUM} is missing (`make browser`)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


def test_retry_from_the_ui_reruns_only_what_failed(tmp_path, on_prefect_server, process_worker, docker_client, busybox_image, browser):
    from prefect.client.orchestration import get_client

    gate = tmp_path / "gate"
    gate.mkdir()
    (gate / "waiting").write_text("not yet")
    write_manifest(tmp_path / "make.json", name="make", image=busybox_image, container=SMALL,
                   command=["sh", "-c", "mkdir -p /work/output/out; echo made > /work/output/out/a.txt"],
                   outputs=[{"name": "out", "format": "binary", "multiple": True}])
    write_manifest(tmp_path / "check.json", name="check", image=busybox_image, container=SMALL,
                   command=["sh", "-c", "find /work/input -name ok | grep -q ok || { echo 'gate closed' >&2; exit 3; }; mkdir -p /work/output/out; echo checked > /work/output/out/b.txt"],
                   inputs=[{"name": "prev", "format": "binary", "multiple": True}, {"name": "gate", "format": "binary", "multiple": True}],
                   outputs=[{"name": "out", "format": "binary", "multiple": True}])
    write_manifest(tmp_path / "last.json", name="last", image=busybox_image, container=SMALL,
                   command=["sh", "-c", "mkdir -p /work/output/out; echo last > /work/output/out/c.txt"],
                   inputs=[{"name": "prev", "format": "binary", "multiple": True}], outputs=[{"name": "out", "format": "binary", "multiple": True}])
    spec = tmp_path / "p.yaml"
    spec.write_text(
        f'pipeline_version: "0.1"\nname: retry-ui\ninputs: {{gate: "{gate}"}}\nsteps:\n'
        "  - {id: make, manifest: make.json}\n"
        "  - {id: check, manifest: check.json, inputs: {prev: make.out, gate: inputs.gate}}\n"
        "  - {id: last, manifest: last.json, inputs: {prev: check.out}}\n"
    )
    name = deploy_pipeline("retry-test", process_worker.pool, {"spec": str(spec), "store": str(tmp_path / "store")})
    flow_run = start_deployment(name)
    with get_client(sync_client=True) as client:
        first = wait_for(lambda: (s := client.read_flow_run(flow_run.id).state) and s.is_final() and s, timeout=240, what="the first attempt to end")
    assert first.is_failed(), first
    runs = settled_task_runs(flow_run.id, 3)
    assert runs["make"].state.is_completed() and runs["check"].state.is_failed() and runs["last"].state.name == "NotReady"
    first_make_id = str(runs["make"].id)

    (gate / "ok").write_text("open")  # the fix, before Retry
    # A live stream of the engine's container starts for this flow run (a `since` query would read
    # dockerd's small in-memory event buffer, which a busy shared engine overwrites).
    stream = docker_client.events(decode=True, filters={"label": f"io.algodock.flow_run_id={flow_run.id}", "type": "container", "event": "start"})
    ran: list[str] = []
    reader = threading.Thread(target=lambda: [ran.append(e["Actor"]["Attributes"]["io.algodock.step_id"]) for e in stream], daemon=True)
    reader.start()
    page = browser.new_page()
    try:
        page.goto(f"{on_prefect_server.ui_url}/runs/flow-run/{flow_run.id}", wait_until="networkidle")
        page.get_by_role("button", name="Retry").first.click()
        dialog = page.get_by_role("dialog")
        dialog.get_by_role("button", name="Retry").click()
        with get_client(sync_client=True) as client:
            final = wait_for(lambda: (s := client.read_flow_run(flow_run.id).state) and s.is_final() and s.timestamp > first.timestamp and s,
                             timeout=240, what="the retried run to end")
        assert final.is_completed(), final
        page.reload(wait_until="networkidle")
        page.screenshot(path=str(tmp_path / "retried-run.png"), full_page=True)
        assert page.get_by_text("Completed").first.is_visible()
    finally:
        page.close()
        stream.close()
        reader.join(10)
    # Only the failed and the skipped steps ran containers on the retry (the engine's own events).
    assert sorted(ran) == ["check", "last"], ran
    (run_dir,) = list((tmp_path / "store/runs").iterdir())  # one run id: the retried flow run keeps it
    by = {s["id"]: s for s in json.loads((run_dir / "lineage.json").read_text())["steps"]}
    assert (by["make"]["status"], by["check"]["status"], by["last"]["status"]) == ("succeeded",) * 3
    assert by["make"]["task_run_id"] == first_make_id  # kept from the first attempt: no container ran
    runs = settled_task_runs(flow_run.id, 3, created_after=first.timestamp)  # the retry's own task runs
    assert runs["make"].state.name == "Cached" and first_make_id in runs["make"].state.message
    assert runs["check"].state.name == "Completed" and runs["last"].state.name == "Completed"
    assert upstream_ids(runs["check"]) == {str(runs["make"].id)}
    assert upstream_ids(runs["last"]) == {str(runs["check"].id)}
