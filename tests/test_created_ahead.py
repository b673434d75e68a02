"""Containers created ahead (algodock/pipeline/ahead.py), on a real engine, driven through execute_step.

A chain ``up -> down``: ``up`` waits until the test drops ``go`` into its output folder, so
``down``'s container is created ahead while ``up`` runs, and the test decides what happens
next (``up`` succeeds, fails, the run is cancelled, the process is killed).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from algodock.runtime.engine import LABEL
from algodock.runtime.leftovers import list_containers, sweep_orphans
from algodock.runtime.lifecycle import StepContainer
from tests.conftest import write_manifest
from tests.waiting import poll

pytestmark = pytest.mark.docker

UP = "while [ ! -e /work/output/go ]; do sleep 0.02; done; rm /work/output/go; echo {k} > /work/output/out.binary; exit {code}"
SANDBOX_FIELDS = {
    "HostConfig": ["NetworkMode", "ReadonlyRootfs", "Tmpfs", "CapDrop", "CapAdd", "SecurityOpt", "PidsLimit", "NanoCpus", "Memory", "MemorySwap",
                   "IpcMode", "Mounts", "Binds", "LogConfig", "DeviceRequests", "Privileged", "UsernsMode", "PidMode"],
    "Config": ["Env", "Cmd", "Entrypoint", "Labels", "User", "Image", "WorkingDir", "Volumes", "NetworkDisabled"],
}


def chain(folder: Path, image: str, *, up_code: int = 0) -> Path:
    """``up`` (held until ``go``; its parameter ``k`` is what it writes, ``p`` changes nothing) -> ``down`` (copies it)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_manifest(
        folder / "up.json", name="up", image=image, command=["sh", "-c", UP.format(k=1, code=up_code)],
        outputs=[{"name": "out", "format": "binary"}],
        parameters={"type": "object", "properties": {"p": {"type": "integer", "default": 0}}, "additionalProperties": False},
    )
    write_manifest(
        folder / "down.json", name="down", image=image, command=["sh", "-c", "cp /work/input/data/* /work/output/copy.binary"],
        inputs=[{"name": "data", "format": "binary"}], outputs=[{"name": "copy", "format": "binary"}],
        container={"resource_request": {"cpu_millicore": 500, "memory_gb": 0.25}, "env": {"MODE": "copy"}},
    )
    steps = [{"id": "up", "manifest": "up.json"}, {"id": "down", "manifest": "down.json", "inputs": {"data": "up.out"}}]
    path = folder / "pipeline.json"
    path.write_text(json.dumps({"pipeline_version": "0.1", "name": "ahead", "steps": steps}))
    return path


def context(spec: Path, store: Path, client: Any, run_id: str, *, cache: bool = False, overrides: dict[str, dict[str, Any]] | None = None) -> Any:
    from algodock.lineage.cache import StoreCache
    from algodock.pipeline import load_pipeline
    from algodock.pipeline.capacity import Capacity, ResourcePool
    from algodock.pipeline.execute import RunContext
    from algodock.store.backends import open_store

    cap = Capacity(cpu_millicore=2000, memory_gb=2)
    the_store = open_store(str(store))
    pipeline = load_pipeline(spec, capacity=cap, overrides=overrides or {})
    ctx = RunContext(pipeline=pipeline, store=the_store, run_id=run_id, client=client, pool=ResourcePool(cap), scratch=store.parent / f"scratch-{run_id}")
    ctx.scratch.mkdir(parents=True, exist_ok=True)
    if cache:
        ctx.cache = StoreCache(the_store, run_id=run_id)
    return ctx


def containers(client: Any, run_id: str, step_id: str) -> list[str]:
    return [c.id for c in list_containers(client, f"{LABEL}.run_id={run_id}", f"{LABEL}.step_id={step_id}")]


def exists(client: Any, container_id: str) -> bool:
    from docker.errors import NotFound

    try:
        client.api.inspect_container(container_id)
        return True
    except NotFound:
        return False


def release(store: Path, run_id: str) -> None:
    """Drop ``go`` into ``up``'s output folder (it is running)."""
    out = poll("up's output folder", lambda: list((store / "runs" / run_id / "steps" / "up" / "attempts").glob("*/.tmp-outputs-*")))
    (out[0] / "go").write_text("")


def run_up(ctx: Any, result: dict[str, Any]) -> threading.Thread:
    from algodock.pipeline.execute import execute_step

    t = threading.Thread(target=lambda: result.update(up=execute_step(ctx, "up", {})), daemon=True)
    t.start()
    return t


def ahead_of_down(client: Any, run_id: str) -> str:
    """The id of ``down``'s container, created while ``up`` is held, once the engine answers for
    it: dockerd lists a container a moment before it can inspect it (an inspect then says "No
    such container", seen under load)."""

    def created() -> str | None:
        found = containers(client, run_id, "down")
        assert len(found) <= 1, f"one container created ahead, found {found}"
        return found[0] if found and exists(client, found[0]) else None

    return poll("down's container created ahead", created)


def sandbox(client: Any, container_id: str, paths: tuple[str, str]) -> dict[str, Any]:
    attrs = client.api.inspect_container(container_id)
    fields = {f"{part}.{key}": attrs[part].get(key) for part, keys in SANDBOX_FIELDS.items() for key in keys}
    return json.loads(json.dumps(fields).replace(paths[0], "<work>").replace(paths[1], "<output>"))


def test_a_created_ahead_container_is_the_one_that_starts_and_is_sandboxed_as_one_created_at_start(tmp_path, docker_client, busybox_image, monkeypatch) -> None:
    from algodock.pipeline.execute import execute_step

    run_id = f"ahead-{uuid.uuid4().hex[:8]}"
    store = tmp_path / "store"
    ctx = context(chain(tmp_path / "p", busybox_image), store, docker_client, run_id)
    started: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {}
    real_start = StepContainer.start

    def start(box: StepContainer, *args: Any, **kwargs: Any) -> None:  # a spy: what starts, beside what would be created now
        if box.step_id == "down":
            fresh = StepContainer(box.client, box.manifest, box.image, labels=box.labels, step_id=box.step_id, work=box.work, output_dir=box.output_dir)
            fresh.prepare()
            fresh.create()
            try:
                paths = (str(box.work), str(box.output_dir))
                started["down"] = (box.container.id, sandbox(box.client, box.container.id, paths), sandbox(box.client, fresh.container.id, paths))
            finally:
                fresh.discard()
        real_start(box, *args, **kwargs)

    monkeypatch.setattr(StepContainer, "start", start)
    result: dict[str, Any] = {}
    t = run_up(ctx, result)
    ahead = ahead_of_down(docker_client, run_id)
    assert docker_client.api.inspect_container(ahead)["State"]["Status"] == "created"
    release(store, run_id)
    t.join(120)
    assert result["up"].status == "succeeded", result["up"].failure
    down = execute_step(ctx, "down", {"up": result["up"]})
    assert down.status == "succeeded", down.failure
    ran, what_started, created_at_start = started["down"]
    assert ran == ahead == down.container_id, "the step must start the container created ahead, and the lineage must name it"
    assert what_started == created_at_start
    assert what_started["HostConfig.NetworkMode"] == "none" and what_started["HostConfig.CapDrop"] == ["ALL"]
    assert "MODE=copy" in what_started["Config.Env"] and what_started["Config.Labels"][f"{LABEL}.step_id"] == "down"
    ctx.close()  # the run ends: it waits for the removals of its steps' exited containers
    assert not exists(docker_client, ahead), "removed by the end of the run, as any container"
    assert (store / "runs" / run_id).is_dir() and not list((store / ".work").glob(f"{run_id}/*"))


def test_a_cache_hit_removes_the_container_created_ahead(tmp_path, docker_client, busybox_image) -> None:
    from algodock.pipeline.execute import execute_step

    spec, store = chain(tmp_path / "p", busybox_image), tmp_path / "store"
    first = context(spec, store, docker_client, f"ahead-{uuid.uuid4().hex[:8]}", cache=True)
    result: dict[str, Any] = {}
    t = run_up(first, result)
    release(store, first.run_id)
    t.join(120)
    assert execute_step(first, "down", {"up": result["up"]}).status == "succeeded"

    run_id = f"ahead-{uuid.uuid4().hex[:8]}"  # p changes nothing in up's output: up runs, down is a cache hit
    second = context(spec, store, docker_client, run_id, cache=True, overrides={"up": {"p": 7}})
    t = run_up(second, result)
    ahead = ahead_of_down(docker_client, run_id)
    release(store, run_id)
    t.join(120)
    assert result["up"].status == "succeeded", result["up"].failure
    down = execute_step(second, "down", {"up": result["up"]})
    assert down.status == "cached"
    assert not exists(docker_client, ahead)
    assert not list((store / "runs" / run_id / "steps").glob("down/attempts/*")), "the folders made ahead go with it"


def test_a_failed_upstream_removes_its_dependents_containers_created_ahead(tmp_path, docker_client, busybox_image) -> None:
    run_id = f"ahead-{uuid.uuid4().hex[:8]}"
    store = tmp_path / "store"
    ctx = context(chain(tmp_path / "p", busybox_image, up_code=3), store, docker_client, run_id)
    result: dict[str, Any] = {}
    t = run_up(ctx, result)
    ahead = ahead_of_down(docker_client, run_id)
    release(store, run_id)
    t.join(120)
    assert result["up"].status == "failed" and result["up"].failure.kind == "exit_code"
    assert not exists(docker_client, ahead), "removed when up ended, before anything else"


def test_cancelling_the_run_removes_the_containers_created_ahead(tmp_path, docker_client, busybox_image) -> None:
    run_id = f"ahead-{uuid.uuid4().hex[:8]}"
    store = tmp_path / "store"
    ctx = context(chain(tmp_path / "p", busybox_image), store, docker_client, run_id)
    result: dict[str, Any] = {}
    t = run_up(ctx, result)
    ahead = ahead_of_down(docker_client, run_id)
    ctx.cancel.set()
    poll("the cancelled run's container created ahead to be removed", lambda: not exists(docker_client, ahead), deadline=30)
    release(store, run_id)
    t.join(120)


CHILD = """
import sys, threading
from tests.test_created_ahead import context
from algodock.pipeline.execute import execute_step
from algodock.runtime.engine import docker_client
from pathlib import Path
ctx = context(Path(sys.argv[1]), Path(sys.argv[2]), docker_client(), sys.argv[3])
execute_step(ctx, "up", {})
"""


def test_the_sweep_finds_a_container_created_ahead_after_its_process_was_killed(tmp_path, docker_client, busybox_image) -> None:
    run_id = f"ahead-{uuid.uuid4().hex[:8]}"
    store = tmp_path / "store"
    spec = chain(tmp_path / "p", busybox_image)
    repo = Path(__file__).resolve().parents[1]
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(spec), str(store), run_id], cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)})
    try:
        ahead = ahead_of_down(docker_client, run_id)
        labels = docker_client.api.inspect_container(ahead)["Config"]["Labels"]
        assert labels[f"{LABEL}.pid"] == str(child.pid)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    removed = sweep_orphans(docker_client)
    assert not exists(docker_client, ahead)
    assert any(name.startswith("algodock-down-") for name in removed), removed
    assert containers(docker_client, run_id, "up") == [], "the killed step's own container went with the same sweep"


def test_a_container_created_with_another_configuration_is_not_adopted(tmp_path, docker_client, busybox_image) -> None:
    """What a step would create now decides: a container made ahead with another environment
    (say, a manifest edited meanwhile) is refused, and the step's owner removes it."""
    from algodock.contract.manifest import parse_manifest
    from algodock.runtime.engine import container_labels
    from algodock.runtime.images import resolve_image

    def box(env: dict[str, str]) -> StepContainer:
        m = parse_manifest({"manifest_version": "0.1", "name": "m", "version": "1.0.0",
                            "container_parameters": {"image": busybox_image, "command": ["true"], "env": env}, "outputs": []})
        (tmp_path / "work" / "input").mkdir(parents=True, exist_ok=True)
        (tmp_path / "work" / "algo_input.json").touch()
        (tmp_path / "out").mkdir(exist_ok=True)
        return StepContainer(docker_client, m, resolve_image(docker_client, busybox_image), labels=container_labels("adopt", "s", 1),
                             step_id="s", work=tmp_path / "work", output_dir=tmp_path / "out")

    ahead = box({"MODE": "old"})
    ahead.create()
    try:
        assert not box({"MODE": "new"}).adopt(ahead)
        same = box({"MODE": "old"})
        assert same.adopt(ahead) and same.container.id == ahead.container.id
    finally:
        ahead.discard()
    assert not exists(docker_client, ahead.container.id)


def test_a_step_with_a_typed_hand_off_is_never_created_ahead(tmp_path, docker_client, busybox_image) -> None:
    """The hand-off check may refuse a typed consumer's inputs, and then its container must never
    have existed: while ``up`` runs, its untyped dependent is created ahead and its typed one is not
    (both are planned in the same pass, when ``up``'s container starts)."""
    run_id = f"ahead-{uuid.uuid4().hex[:8]}"
    folder = tmp_path / "p"
    folder.mkdir()
    write_manifest(folder / "up.json", name="up", image=busybox_image, command=["sh", "-c", UP.format(k=1, code=3)],
                   outputs=[{"name": "out", "format": "binary"}, {"name": "table", "format": "parquet"}])
    write_manifest(folder / "down.json", name="down", image=busybox_image, command=["true"],
                   inputs=[{"name": "data", "format": "binary"}], container={"resource_request": {"cpu_millicore": 500, "memory_gb": 0.25}})
    write_manifest(folder / "typed.json", name="typed", image=busybox_image, command=["true"], manifest_version="0.3",
                   inputs=[{"name": "rows", "format": "parquet", "schema": {"columns": [{"name": "x", "type": "int64"}]}}],
                   container={"resource_request": {"cpu_millicore": 500, "memory_gb": 0.25}})
    steps = [{"id": "up", "manifest": "up.json"}, {"id": "down", "manifest": "down.json", "inputs": {"data": "up.out"}},
             {"id": "typed", "manifest": "typed.json", "inputs": {"rows": "up.table"}}]
    (folder / "pipeline.json").write_text(json.dumps({"pipeline_version": "0.1", "name": "typed", "steps": steps}))
    store = tmp_path / "store"
    ctx = context(folder / "pipeline.json", store, docker_client, run_id)
    result: dict[str, Any] = {}
    t = run_up(ctx, result)
    ahead_of_down(docker_client, run_id)
    assert containers(docker_client, run_id, "typed") == [], "a typed consumer's container was created ahead"
    release(store, run_id)
    t.join(120)
    assert containers(docker_client, run_id, "typed") == []


def test_every_step_of_a_chain_gets_its_container_created_while_the_one_before_runs(tmp_path, docker_client, busybox_image, monkeypatch) -> None:
    """``up -> mid -> down``: ``mid`` runs in the container created ahead for it, and ``down``'s is
    created as soon as ``mid``'s starts, though the background thread already waits (holding
    ``mid``'s until then) with a long pause between its looks at the cancel event. It used to wake
    only at that pause's end, so in a chain of short steps every other step created its own."""
    from algodock.pipeline import ahead as ahead_module
    from algodock.pipeline.execute import execute_step

    monkeypatch.setattr(ahead_module, "CANCEL_CHECK_SECONDS", 120)
    run_id = f"ahead-{uuid.uuid4().hex[:8]}"
    folder = tmp_path / "p"
    chain(folder, busybox_image)
    write_manifest(
        folder / "mid.json", name="mid", image=busybox_image,
        command=["sh", "-c", "while [ ! -e /work/output/go ]; do sleep 0.02; done; rm /work/output/go; cp /work/input/data/* /work/output/out.binary"],
        inputs=[{"name": "data", "format": "binary"}], outputs=[{"name": "out", "format": "binary"}],
        container={"resource_request": {"cpu_millicore": 500, "memory_gb": 0.25}},
    )
    steps = [{"id": "up", "manifest": "up.json"}, {"id": "mid", "manifest": "mid.json", "inputs": {"data": "up.out"}},
             {"id": "down", "manifest": "down.json", "inputs": {"data": "mid.out"}}]
    (folder / "pipeline.json").write_text(json.dumps({"pipeline_version": "0.1", "name": "chain3", "steps": steps}))
    store = tmp_path / "store"
    ctx = context(folder / "pipeline.json", store, docker_client, run_id)
    try:
        result: dict[str, Any] = {}
        t = run_up(ctx, result)
        mid_ahead = poll("mid's container created ahead", lambda: containers(docker_client, run_id, "mid"))
        release(store, run_id)
        t.join(120)
        assert result["up"].status == "succeeded", result["up"].failure
        t = threading.Thread(target=lambda: result.update(mid=execute_step(ctx, "mid", {"up": result["up"]})), daemon=True)
        t.start()
        down_ahead = poll("down's container created ahead while mid runs", lambda: containers(docker_client, run_id, "down"), deadline=30)
        out = poll("mid's output folder", lambda: list((store / "runs" / run_id / "steps" / "mid" / "attempts").glob("*/.tmp-outputs-*")))
        (out[0] / "go").write_text("")
        t.join(120)
        assert result["mid"].status == "succeeded", result["mid"].failure
        assert result["mid"].container_id == mid_ahead[0]
        down = execute_step(ctx, "down", {"mid": result["mid"]})
        assert down.status == "succeeded", down.failure
        assert down.container_id == down_ahead[0], "down must start the container created for it while mid ran"
    finally:
        ctx.cancel.set()
        ctx.close()
