"""One removal routine and one sweep by labels (run, step, attempt, flow run, owner), on a real engine."""

from __future__ import annotations

import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from algodock.runtime.engine import LABEL, MANAGED_LABEL, container_labels
from algodock.runtime.leftovers import kill_run_containers, list_containers, remove_container, sweep, sweep_orphans

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture
def made(docker_client: Any) -> Iterator[list[Any]]:
    """Containers and volumes a test creates; whatever the code under test left is removed after it."""
    objs: list[Any] = []
    yield objs
    for obj in objs:
        try:
            obj.remove(force=True)
        except Exception:  # removed by the code under test: the point
            pass


def _labels(run_id: str, step_id: str, attempt: int, *, dead: int | None = None, flow_run_id: str | None = None) -> dict[str, str]:
    labels = container_labels(run_id, step_id, attempt, flow_run_id=flow_run_id)
    if dead is not None:  # owned by a process that is gone
        labels.update({f"{LABEL}.pid": str(dead), f"{LABEL}.pid_start": "1"})
    return labels


def _names(client: Any, run_id: str) -> set[str]:
    return {c.name for c in list_containers(client, f"{LABEL}.run_id={run_id}")}


def test_sweep_picks_by_run_step_and_attempt_and_spares_live_owners(docker_client, busybox_image, dead_pid, made) -> None:
    run = f"sweep-{uuid.uuid4().hex[:8]}"
    create = lambda labels: made.append(docker_client.containers.create(busybox_image, ["true"], labels=labels)) or made[-1]  # noqa: E731
    target = create(_labels(run, "s", 1, dead=dead_pid))
    other_attempt = create(_labels(run, "s", 2, dead=dead_pid))
    other_step = create(_labels(run, "t", 1, dead=dead_pid))
    live = create(_labels(run, "s", 1))

    removed = sweep(docker_client, run_id=run, step_id="s", attempt=1)
    assert [c.name for c in removed] == [target.name]
    assert _names(docker_client, run) == {other_attempt.name, other_step.name, live.name}

    removed = sweep(docker_client, run_id=run)  # the run's dead owners' containers, not the live one
    assert {c.name for c in removed} == {other_attempt.name, other_step.name}
    assert _names(docker_client, run) == {live.name}


def test_kill_run_containers_removes_live_ones_of_that_run_or_flow_run_only(docker_client, busybox_image, made) -> None:
    run, other, flow_run = (f"kill-{uuid.uuid4().hex[:8]}" for _ in range(3))
    mine = made.append(docker_client.containers.create(busybox_image, ["sleep", "60"], labels=_labels(run, "s", 1))) or made[-1]
    mine.start()
    by_flow = made.append(docker_client.containers.create(busybox_image, ["true"], labels=_labels(other, "s", 1, flow_run_id=flow_run))) or made[-1]
    spared = made.append(docker_client.containers.create(busybox_image, ["true"], labels=_labels(other, "t", 1))) or made[-1]

    assert kill_run_containers(docker_client) == [], "no run and no flow run named: nothing may be removed"
    assert kill_run_containers(docker_client, run) == [mine.name]
    assert kill_run_containers(docker_client, flow_run_id=flow_run) == [by_flow.name]
    assert _names(docker_client, run) == set() and _names(docker_client, other) == {spared.name}


def test_sweep_orphans_removes_staging_volumes_of_dead_owners_only(docker_client, dead_pid, made) -> None:
    suffix = uuid.uuid4().hex[:8]
    orphan = docker_client.volumes.create(name=f"algodock-work-{suffix}-dead", labels=_labels("vol-run", "s", 1, dead=dead_pid))
    live = docker_client.volumes.create(name=f"algodock-work-{suffix}-live", labels=_labels("vol-run", "s", 1))
    made.extend([orphan, live])

    removed = sweep_orphans(docker_client)
    assert orphan.name in removed and live.name not in removed
    names = {v.name for v in docker_client.volumes.list(filters={"label": f"{MANAGED_LABEL}=true"})}
    assert orphan.name not in names and live.name in names


def test_remove_container_says_what_it_did_and_never_raises(docker_client, busybox_image, made) -> None:
    import docker

    c = made.append(docker_client.containers.create(busybox_image, ["true"], labels=_labels("rm-run", "s", 1))) or made[-1]
    assert remove_container(docker_client, c.id) == "removed"
    assert remove_container(docker_client, c.id) == "gone"
    nowhere = docker.DockerClient(base_url="tcp://127.0.0.1:1", version="1.41", timeout=2)  # no engine answers there
    assert remove_container(nowhere, c.id, attempts=2) == "failed"


PRIVATE_SDK = re.compile(r"\b(api|client)\.(_get|_post|_put|_delete|_url|_result|_raise_for_status|_stream_helper|_auth_configs|_custom_adapter|_version)\b")


def test_no_private_docker_sdk_api_in_the_package() -> None:
    hits = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in sorted((ROOT / "algodock").rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if PRIVATE_SDK.search(line)
    ]
    assert not hits, "private docker SDK API (use the public APIClient / requests.Session methods):\n" + "\n".join(hits)
