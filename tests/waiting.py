"""Waiting on a condition in tests: poll it until it holds, fail naming what was awaited; a run cancelled from the UI, timed."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


def poll(what: str, check: Callable[[], Any], deadline: float = 60.0, every: float = 0.05, seen: Callable[[], str] | None = None) -> Any:
    """Wait until ``check()`` is truthy (returning it); fail naming ``what`` (and ``seen()``) at the deadline."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(every)  # polling interval, not synchronization: the state decides
    pytest.fail(f"timed out after {deadline:g} s waiting for {what}" + (f"; seen:\n{seen()[-4000:]}" if seen else ""))


def cancel_from_the_ui(docker_client, run_id: str, store: Path, run: Callable[[], Any]) -> float:
    """What the UI's Cancel button does, timed: ``run()`` starts in a thread; once the run's first
    container started, its flow run (from ``runs/<run_id>/run.json`` in ``store``) is set to
    Cancelling; returns the seconds until that container died, after ``run()`` returned."""
    import json
    import threading

    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    events = docker_client.events(decode=True, filters={"label": f"io.algodock.run_id={run_id}", "type": "container"})
    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    try:
        for event in events:  # blocks until the container starts: no sleep
            if event.get("status") == "start":
                break
        flow_run_id = json.loads((store / "runs" / run_id / "run.json").read_text())["flow_run_id"]
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(flow_run_id, Cancelling(), force=True)
        cancelled_at = time.monotonic()
        for event in events:
            if event.get("status") in ("die", "destroy"):
                break
        killed_after = time.monotonic() - cancelled_at
    finally:
        events.close()
    runner.join(120)
    assert not runner.is_alive(), f"run {run_id} did not end after its cancellation"
    return killed_after
