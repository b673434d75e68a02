"""The phases of one step attempt's container (runtime/lifecycle.py), driven one by one on a real engine."""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path
from typing import Any

import pytest

from algodock.contract.manifest import parse_manifest
from algodock.errors import ExitCodeFailure
from algodock.records import StepRecord
from algodock.runtime.engine import LABEL, container_labels
from algodock.runtime.images import resolve_image
from algodock.runtime.leftovers import list_containers
from algodock.runtime.lifecycle import StepContainer
from algodock.runtime.staging import prepare_work_dir

pytestmark = pytest.mark.docker


def _box(client: Any, image: str, tmp_path: Path, script: str) -> tuple[StepContainer, StepRecord, str]:
    m = parse_manifest({
        "manifest_version": "0.1", "name": "phases", "version": "1.0.0",
        "container_parameters": {"image": image, "command": ["sh", "-c", script]}, "inputs": [], "outputs": [],
    })
    run_id = f"phases-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "out"
    out.mkdir(parents=True)
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    prepare_work_dir(work, m, {}, {})
    box = StepContainer(client, m, resolve_image(client, image), labels=container_labels(run_id, "s", 1), step_id="s", work=work, output_dir=out)
    return box, StepRecord(id="s", status="failed", image=image, command=["sh", "-c", script]), run_id


def _state(client: Any, run_id: str) -> list[str]:
    return [client.api.inspect_container(c.id)["State"]["Status"] for c in list_containers(client, f"{LABEL}.run_id={run_id}")]


def test_a_created_container_is_labelled_not_started_and_removed_by_remove(docker_client, busybox_image, tmp_path) -> None:
    box, result, run_id = _box(docker_client, busybox_image, tmp_path, "exit 0")
    box.prepare()
    cid = box.create()
    box.stage()
    assert _state(docker_client, run_id) == ["created"], "create must not start the container"
    labels = docker_client.api.inspect_container(cid)["Config"]["Labels"]
    assert labels[f"{LABEL}.step_id"] == "s" and labels[f"{LABEL}.attempt"] == "1"
    box.remove(result)  # e.g. the run was cancelled before the start
    assert _state(docker_client, run_id) == []


def test_the_phases_in_order_record_the_exit_and_a_failure_kind(docker_client, busybox_image, tmp_path) -> None:
    box, result, run_id = _box(docker_client, busybox_image, tmp_path, "echo bye; exit 3")
    box.prepare()
    box.create()
    box.stage()
    box.start(result)
    box.wait(result)
    assert result.usage is not None and result.finished_at is not None
    with pytest.raises(ExitCodeFailure, match="exited with code 3"):
        box.check_exit(result)
    assert result.exit_code == 3 and result.log_tail == ["bye"]
    box.remove(result)
    assert _state(docker_client, run_id) == []


def test_remove_hands_an_exited_container_to_later_and_removes_one_that_never_ran_at_once(docker_client, busybox_image, tmp_path) -> None:
    """A run's removal thread (``later``) takes only a container that has exited; one that was
    never started (or may still run) is removed before ``remove`` returns."""
    handed: list[Any] = []
    box, result, run_id = _box(docker_client, busybox_image, tmp_path / "a", "exit 0")
    box.prepare()
    box.create()
    box.remove(result, later=handed.append)
    assert handed == [] and _state(docker_client, run_id) == [], "never started: removed at once"

    box, result, run_id = _box(docker_client, busybox_image, tmp_path / "b", "exit 0")
    box.prepare()
    box.create()
    box.stage()
    box.start(result)
    box.wait(result)
    box.check_exit(result)
    box.remove(result, later=handed.append)
    assert len(handed) == 1 and _state(docker_client, run_id) == ["exited"], "exited: its removal waits for later"
    handed[0]()
    assert _state(docker_client, run_id) == []


def test_a_run_waits_for_the_removals_it_was_handed_when_it_closes(tmp_path) -> None:
    """``RunContext.remove_later`` returns at once; ``close`` returns only once every removal ran;
    after it a removal runs in the caller (nothing is left waiting for a closed run)."""
    import threading

    from algodock.pipeline.capacity import Capacity, ResourcePool
    from algodock.pipeline.execute import RunContext

    ctx = RunContext(pipeline=None, store=None, run_id="r", client=None, pool=ResourcePool(Capacity(1000, 1)), scratch=tmp_path)  # type: ignore[arg-type]
    gate, done = threading.Event(), []
    ctx.remove_later(lambda: (gate.wait(30), done.append("slow")))
    assert done == [], "handed to the run's removal thread, not run by the step"
    closing = threading.Thread(target=ctx.close)
    closing.start()
    closing.join(0.2)
    assert closing.is_alive(), "close must wait for the removal"
    gate.set()
    closing.join(30)
    assert done == ["slow"]
    ctx.remove_later(lambda: done.append("after"))
    assert done == ["slow", "after"]
