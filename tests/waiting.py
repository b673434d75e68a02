"""Waiting on a condition in tests: poll it until it holds, fail naming what was awaited; a flow run's task runs as the
server recorded them; a run cancelled from the UI, timed."""

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


def settled_task_runs(flow_run_id: Any, count: int, *, created_after: Any = None, deadline: float = 60.0) -> dict[str, Any]:
    """The flow run's task runs by name (the newest of a name wins), once its ``count`` task runs
    (created after ``created_after``, when given) are recorded in the state they ended in; more
    than ``count`` fails at once.

    The server records task runs and their states from the events the task engine sends, so right
    after a flow run returns they may trail it: a task run not there yet, or read with no state or
    Running. A dependent of a failure ends ``NotReady``, a Pending state that is not final."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    def ended(run: Any) -> bool:
        return run.state is not None and (run.state.is_final() or run.state.name == "NotReady")

    def recorded() -> list[Any]:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[str(flow_run_id)])))
        return [r for r in runs if created_after is None or r.created > created_after]

    def settled() -> dict[str, Any] | None:
        runs = recorded()
        assert len(runs) <= count, f"flow run {flow_run_id}: {len(runs)} task runs, expected {count}: {sorted(r.name for r in runs)}"
        if len(runs) < count or not all(ended(r) for r in runs):
            return None
        return {r.name: r for r in sorted(runs, key=lambda r: r.created)}

    def seen() -> str:
        return "\n".join(f"{r.name}: {r.state and r.state.name}" for r in recorded())

    return poll(f"{count} task runs of flow run {flow_run_id} to be recorded ended", settled, deadline=deadline, every=0.1, seen=seen)


def upstream_ids(task_run: Any) -> set[str]:
    """The ids of the task runs ``task_run`` depends on in Prefect's run graph (its ``task_inputs``)."""
    return {str(i.id) for inputs in task_run.task_inputs.values() for i in inputs if getattr(i, "input_type", "") == "task_run"}


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
