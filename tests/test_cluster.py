"""Cluster mode on one machine: two Docker engines, a Dask scheduler, one `algodock worker` per engine.

The second engine is ``scripts/extra-engine.sh start adktest`` (own socket, data-root and
bridge); its data-root is kept between sessions so the images load once. Worker 1 runs on the
main engine with 2 GB, worker 2 on the second with 4 GB: a 3 GB step fits only worker 2.
Both have 2000 millicores (this machine's 2 CPUs: Docker refuses a larger CPU limit), so two
1500-millicore steps never share a worker.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import BUSYBOX_IMAGE, REPO, write_manifest
from tests.waiting import settled_task_runs, upstream_ids

pytestmark = [pytest.mark.docker, pytest.mark.s3, pytest.mark.prefect]

ENGINE = "adktest"
EXAMPLES = ["algodock/device-visits:1.0.0", "algodock/dwell-stats:1.0.0"]


def _wait(predicate, timeout: float, what: str, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)  # polling a state with a deadline, not a synchronisation sleep
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Cluster:
    """The scheduler and workers of the test cluster (processes this session started)."""

    def __init__(self, second_host: str, log_dir: Path) -> None:
        self.second_host = second_host
        self.log_dir = log_dir
        self.workers: dict[int, subprocess.Popen] = {}
        sched_file = log_dir / "scheduler.json"
        self.scheduler = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
             "--no-dashboard", "--scheduler-file", str(sched_file)],
            stdout=subprocess.DEVNULL, stderr=open(log_dir / "scheduler.log", "w"),
        )
        self.address = _wait(lambda: sched_file.exists() and json.loads(sched_file.read_text() or "{}").get("address"), 60, "the Dask scheduler")
        for i in (1, 2):
            self.start_worker(i)

    def worker_args(self, i: int) -> list[str]:
        docker_host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock") if i == 1 else self.second_host
        memory = "2" if i == 1 else "4"
        return [sys.executable, "-m", "algodock.cli", "worker", "--scheduler", self.address, "--host", "127.0.0.1",
                "--docker-host", docker_host, "--cpu-millicore", "2000", "--memory-gb", memory, "--name", f"w{i}"]

    def start_worker(self, i: int) -> None:
        from prefect.settings import PREFECT_API_URL

        # The workers report to this session's Prefect server, as `make cluster`'s do to theirs
        # (without an API URL, Prefect would start a temporary server of its own in each worker).
        env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
        self.workers[i] = subprocess.Popen(self.worker_args(i), stdout=subprocess.DEVNULL, stderr=open(self.log_dir / f"worker{i}.log", "a"), env=env)
        _wait(lambda: f"w{i}" in self.worker_names(), 90, f"worker w{i} to join")

    def worker_names(self) -> set[str]:
        from distributed import Client

        with Client(self.address, timeout="10s") as c:
            return {w.get("name") for w in c.scheduler_info(n_workers=-1)["workers"].values()}

    def kill_worker(self, i: int) -> None:
        self.workers[i].send_signal(signal.SIGKILL)
        self.workers[i].wait(30)

    def stop_worker(self, i: int) -> None:
        """Stop worker ``i`` as its operator would (SIGTERM), and wait until the scheduler has let it go."""
        self.workers[i].terminate()
        self.workers[i].wait(60)
        _wait(lambda: f"w{i}" not in self.worker_names(), 60, f"the scheduler to let worker w{i} go")

    def close(self) -> None:
        for p in [*self.workers.values(), self.scheduler]:
            if p.poll() is None:
                p.terminate()
        for p in [*self.workers.values(), self.scheduler]:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture(scope="session")
def second_engine(docker_client, busybox_image) -> Iterator:
    """The second Docker engine, with the test and example images loaded; its client."""
    from algodock.runtime.engine import docker_client as connect

    images = [BUSYBOX_IMAGE] + [i for i in EXAMPLES if docker_client.images.list(name=i)]
    out = subprocess.run(["bash", str(REPO / "scripts/extra-engine.sh"), "start", ENGINE, "--load", *images],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    host = out.stdout.strip().splitlines()[-1].split("=", 1)[1]
    client = connect(host)
    yield client
    client.close()
    subprocess.run(["bash", str(REPO / "scripts/extra-engine.sh"), "stop", ENGINE], capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def cluster(second_engine, s3_endpoint, prefect_harness, tmp_path_factory) -> Iterator[Cluster]:
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="cluster")
    c = Cluster(_host_of(), tmp_path_factory.mktemp("cluster"))  # its logs, kept with pytest's last sessions
    try:
        yield c
    finally:
        c.close()


def _host_of() -> str:
    out = subprocess.run(["bash", str(REPO / "scripts/extra-engine.sh"), "env", ENGINE], capture_output=True, text=True)
    return out.stdout.strip().split("=", 1)[1]


@pytest.fixture(scope="session")
def engine_ids(docker_client, second_engine) -> dict[str, str]:
    return {"main": docker_client.info()["ID"], "second": second_engine.info()["ID"]}


def _sleeper(tmp_path: Path, busybox_image: str, name: str, seconds: float, cpu: int = 500, memory_gb: float = 0.25) -> str:
    write_manifest(tmp_path / f"{name}.json", name=name, image=BUSYBOX_IMAGE, command=["sh", "-c", f"echo {name}; sleep {seconds}"],
                   container={"resource_request": {"cpu_millicore": cpu, "memory_gb": memory_gb}})
    return f"{name}.json"


def _summary(run_id: str, store: str) -> dict:
    from algodock.store.backends import lineage_rel, open_store, run_json_rel

    s = open_store(store)
    return {"summary": s.read_json(run_json_rel(run_id)), "lineage": s.read_json(lineage_rel(run_id))}


def test_a_host_local_store_is_refused_before_anything_starts(tmp_path, busybox_image):
    from click.testing import CliRunner

    from algodock.cli import main

    _sleeper(tmp_path, busybox_image, "s", 0)
    (tmp_path / "p.yaml").write_text('pipeline_version: "0.1"\nname: local\nsteps:\n  - {id: a, manifest: s.json}\n')
    result = CliRunner().invoke(main, ["run", str(tmp_path / "p.yaml"), "--cluster", "tcp://127.0.0.1:1", "--store", str(tmp_path / "store")])
    assert result.exit_code == 1
    assert "is local to this host" in result.output and "--shared-store" in result.output
    assert not (tmp_path / "store").exists()


def test_steps_are_placed_by_resources_on_both_engines(tmp_path, cluster, engine_ids, busybox_image):
    """1500-millicore steps fill both workers; a 3 GB step fits only the second worker."""
    from algodock.flows.pipeline import run_pipeline

    _sleeper(tmp_path, busybox_image, "mid", 1.5, cpu=1500)
    _sleeper(tmp_path, busybox_image, "big", 0.5, cpu=500, memory_gb=3)
    steps = "".join(f"  - {{id: m{i}, manifest: mid.json}}\n" for i in range(4)) + "  - {id: big, manifest: big.json}\n"
    (tmp_path / "p.yaml").write_text(f'pipeline_version: "0.1"\nname: spread\nsteps:\n{steps}')
    state = run_pipeline(spec=str(tmp_path / "p.yaml"), store="s3://cluster/spread", run_id="spread1", no_cache=True,
                         cluster=cluster.address, return_state=True)
    assert state.is_completed(), state.message
    got = _summary("spread1", "s3://cluster/spread")
    by = {s["id"]: s for s in got["summary"]["steps"]}
    assert all(s["status"] == "succeeded" for s in by.values()), by
    assert by["big"]["engine"]["id"] == engine_ids["second"]
    assert {by[f"m{i}"]["engine"]["id"] for i in range(4)} == set(engine_ids.values())
    lineage = {s["id"]: s for s in got["lineage"]["steps"]}
    assert lineage["big"]["engine"] == by["big"]["engine"] and len(lineage["big"]["attempt_history"]) == 1


def test_the_example_pipeline_runs_on_the_cluster_with_an_s3_store(tmp_path, cluster, engine_ids):
    import boto3

    from algodock.flows.pipeline import run_pipeline

    images = ["algodock/device-visits:1.0.0", "algodock/dwell-stats:1.0.0"]
    if not all(cluster_engine_has(i) for i in images):
        pytest.fail("the example images are missing: `make images` builds them")
    subprocess.run([sys.executable, str(REPO / "examples/generate_pings.py"), "--out", str(tmp_path / "pings"), "--devices", "5",
                    "--hours", "2", "--parts", "2", "--seed", "3"], check=True, capture_output=True)
    s3 = boto3.client("s3")
    for part in sorted((tmp_path / "pings").iterdir()):
        s3.upload_file(str(part), "cluster", f"raw/pings/{part.name}")
    spec = (REPO / "deployments/device-visits-daily.yaml").read_text().replace("../.algodock/demo/pings", "s3://cluster/raw/pings/")
    spec = spec.replace("../examples/", str(REPO / "examples") + "/")
    (tmp_path / "p.yaml").write_text(spec)
    state = run_pipeline(spec=str(tmp_path / "p.yaml"), store="s3://cluster/example", run_id="example1",
                         cluster=cluster.address, return_state=True)
    assert state.is_completed(), state.message
    by = {s["id"]: s for s in _summary("example1", "s3://cluster/example")["summary"]["steps"]}
    assert [by[s]["status"] for s in ("visits", "stats")] == ["succeeded", "succeeded"]
    assert all(by[s]["engine"]["id"] in engine_ids.values() for s in by)
    assert by["stats"]["outputs"][0]["uri"].startswith("s3://cluster/example/")

    # The workers' tasks materialize the outputs as assets, as on one host (metadata included).
    events = _asset_events("s3://cluster/example/runs/example1/", want=2)
    assert {e.payload["step"] for e in events} == {"visits", "stats"}
    stats_event = next(e for e in events if e.payload["step"] == "stats")
    assert stats_event.payload["sha256"] == by["stats"]["outputs"][0]["sha256"] and stats_event.payload["uri"] == by["stats"]["outputs"][0]["uri"]

    # The cache works across hosts: a second run reuses both steps' outputs in the store, whichever host asks.
    state = run_pipeline(spec=str(tmp_path / "p.yaml"), store="s3://cluster/example", run_id="example2",
                         cluster=cluster.address, return_state=True)
    assert state.is_completed(), state.message
    got = _summary("example2", "s3://cluster/example")
    again = {s["id"]: s for s in got["summary"]["steps"]}
    assert [(again[s]["status"], again[s]["cached_from"]) for s in ("visits", "stats")] == [("cached", "example1")] * 2
    assert {s["cached_from"] for s in got["lineage"]["steps"]} == {"example1"}
    assert again["stats"]["outputs"][0]["sha256"] == by["stats"]["outputs"][0]["sha256"]


def _asset_events(key_prefix: str, want: int) -> list:
    """The asset materialization events whose asset key starts with ``key_prefix`` (they reach the server asynchronously)."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    def read() -> list | None:
        with get_client(sync_client=True) as client:
            page = client.read_events(filter=EventFilter(event=EventNameFilter(name=["prefect.asset.materialization.succeeded"]),
                                                         resource=EventResourceFilter(id_prefix=[key_prefix])), limit=50)
        return page.events if len(page.events) >= want else None

    return _wait(read, 30, f"{want} asset events under {key_prefix}", every=0.5)


def cluster_engine_has(image: str) -> bool:
    import docker

    return bool(docker.from_env().images.list(name=image))


def _containers(client, run_id: str) -> list:
    """The run's containers on an engine, from the engine's list alone (no inspect that races a removal)."""
    return client.api.containers(all=True, filters={"label": f"io.algodock.run_id={run_id}"})


def test_a_worker_killed_mid_step_the_step_reruns_on_the_other_and_its_container_is_swept(tmp_path, cluster, engine_ids, second_engine, busybox_image):
    from algodock.flows.pipeline import run_pipeline

    _sleeper(tmp_path, busybox_image, "slow", 4, cpu=1000)
    (tmp_path / "p.yaml").write_text('pipeline_version: "0.1"\nname: loss\nsteps:\n  - {id: slow, manifest: slow.json}\n')
    outcome: dict = {}
    run_id = f"loss-{uuid.uuid4().hex[:8]}"  # its own: a container left by an earlier session must not count
    # Placement made certain: only worker 2 is up when the step is submitted, and worker 1 joins
    # only after worker 2 died (Dask holds the step until then), so the lost attempt's container
    # is on the second engine, which no other process sweeps, and the re-run lands on worker 1.
    cluster.stop_worker(1)
    runner = threading.Thread(target=lambda: outcome.update(state=run_pipeline(
        spec=str(tmp_path / "p.yaml"), store="s3://cluster/loss", run_id=run_id, no_cache=True, cluster=cluster.address, return_state=True)), daemon=True)
    runner.start()
    _wait(lambda: _containers(second_engine, run_id), 120, "the step's container on the second engine")
    where = 2
    dead = cluster.workers[where].pid
    cluster.kill_worker(where)
    assert list(Path(tempfile.gettempdir()).glob(f"algodock-worker-{dead}.*")), "a killed worker cannot remove its scratch folder"
    cluster.start_worker(1)
    runner.join(180)
    assert not runner.is_alive()
    assert outcome["state"].is_completed(), outcome["state"].message
    got = _summary(run_id, "s3://cluster/loss")
    step = got["lineage"]["steps"][0]
    history = step["attempt_history"]
    assert [a["status"] for a in history] == ["lost", "succeeded"], history
    assert [a["engine"]["id"] for a in history] == [engine_ids["second"], engine_ids["main"]], history
    assert step["attempts"] == 2 and step["engine"] == history[1]["engine"]
    # the lost attempt's container stays on the dead worker's engine until that worker returns
    lost = second_engine
    assert _containers(lost, run_id), "the lost attempt's container was removed before its worker returned"
    cluster.start_worker(where)
    _wait(lambda: not _containers(lost, run_id), 30, "the returning worker to sweep the lost attempt's container")
    assert not list(Path(tempfile.gettempdir()).glob(f"algodock-worker-{dead}.*")), "a starting worker removes a dead one's scratch folder"
    # the steps' own scratch folders (their staged inputs) were inside their worker's: none is left
    assert not list(Path(tempfile.gettempdir()).glob(f"algodock-{run_id}-*"))


def test_a_worker_sweeps_only_the_scratch_of_dead_workers(tmp_path):
    from algodock.processes import process_start
    from algodock.worker import sweep_dead_scratch

    gone = subprocess.Popen(["true"])
    gone.wait()
    me = os.getpid()
    folders = {
        "dead": f"algodock-worker-{gone.pid}.{process_start(me)}-abcd1234",
        "reused-pid": f"algodock-worker-{me}.1-abcd1234",  # this pid, another start time: its owner is gone
        "alive": f"algodock-worker-{me}.{process_start(me)}-abcd1234",
        "not-a-worker's": "algodock-worker-notes",
    }
    for name in folders.values():
        (tmp_path / name).mkdir()
    removed = sweep_dead_scratch(tmp_path)
    assert sorted(removed) == sorted(str(tmp_path / folders[k]) for k in ("dead", "reused-pid"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([folders["alive"], folders["not-a-worker's"]])


def test_cancelling_the_flow_run_kills_containers_on_every_host(tmp_path, cluster, docker_client, second_engine, busybox_image):
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    from algodock.flows.pipeline import run_pipeline

    # 1500 of 2000 millicores: one at a time per worker
    _sleeper(tmp_path, busybox_image, "long", 300, cpu=1500)
    steps = "".join(f"  - {{id: s{i}, manifest: long.json}}\n" for i in range(4))
    (tmp_path / "p.yaml").write_text(f'pipeline_version: "0.1"\nname: cancel\nsteps:\n{steps}')
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(state=run_pipeline(
        spec=str(tmp_path / "p.yaml"), store="s3://cluster/cancel", run_id="cancel1", no_cache=True, cluster=cluster.address, return_state=True)), daemon=True)
    runner.start()
    _wait(lambda: _containers(docker_client, "cancel1") and _containers(second_engine, "cancel1"), 120, "a container on each engine")
    flow_run_id = _summary("cancel1", "s3://cluster/cancel")["summary"]["flow_run_id"]
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Cancelling(), force=True)
    _wait(lambda: not _containers(docker_client, "cancel1") and not _containers(second_engine, "cancel1"), 20, "both containers to be killed")
    runner.join(120)
    assert not runner.is_alive()
    summary = _summary("cancel1", "s3://cluster/cancel")["summary"]
    assert summary["status"] == "cancelled"
    # one step fits a worker at a time: the two that ran were cancelled, the two never started are
    # skipped (as on one host), none started after the cancellation
    ran = [s for s in summary["steps"] if s["status"] == "failed"]
    assert len(ran) == 2 and all("cancelled" in s["failure"]["message"] for s in ran), summary["steps"]
    assert sorted(s["status"] for s in summary["steps"]) == ["failed", "failed", "skipped", "skipped"], summary["steps"]


def test_placement_takes_the_worker_with_the_most_room_and_forgets_a_lost_one():
    from algodock.pipeline.placement import Placement

    p = Placement()
    p.update({"a": {"cpu_millicore": 4000, "memory_gb": 2}, "b": {"cpu_millicore": 2000, "memory_gb": 4}})
    assert p.place("big", {"cpu_millicore": 500, "memory_gb": 3}) == "b"  # only b has the memory
    assert [p.place(f"s{i}", {"cpu_millicore": 1000}) for i in range(5)] == ["a", "a", "a", "b", "a"]
    assert p.place("s5", {"cpu_millicore": 1000}) is None  # b has 500 left, a none: it waits
    p.release("s0")
    assert p.place("s5", {"cpu_millicore": 1000}) == "a"
    p.update({"b": {"cpu_millicore": 2000, "memory_gb": 4}})  # a left
    assert sorted(p.orphans()) == ["s1", "s2", "s4", "s5"] and p.free("b")["cpu_millicore"] == 500
    # what the scheduler counts as taken (another run's steps too) is not free; a step it counts is not charged twice
    p.update({"b": {"cpu_millicore": 2000, "memory_gb": 4}}, used={"b": {"cpu_millicore": 1500, "memory_gb": 3}}, seen={"big", "s3"})
    assert p.free("b")["cpu_millicore"] == 500 and p.place("s6", {"cpu_millicore": 1000}) is None


def test_steps_wait_on_the_flow_side_until_a_worker_has_room_and_fill_both(tmp_path, cluster, engine_ids, busybox_image):
    """Six 1000-millicore steps on two workers of 2000: the first four fill both workers at once,
    never more than two on one (Dask alone places every step as it arrives, by its threads, and
    may queue three behind one worker while the other idles); each attempt records when its
    task started, claimed and ended."""
    from datetime import datetime

    from algodock.flows.pipeline import run_pipeline

    _sleeper(tmp_path, busybox_image, "one", 2, cpu=1000)
    steps = "".join(f"  - {{id: s{i}, manifest: one.json}}\n" for i in range(6))
    (tmp_path / "p.yaml").write_text(f'pipeline_version: "0.1"\nname: fill\nsteps:\n{steps}')
    run_id = f"fill-{uuid.uuid4().hex[:8]}"
    _wait(lambda: not _busy(cluster.address), 120, "the steps of earlier tests to end on the workers")
    state = run_pipeline(spec=str(tmp_path / "p.yaml"), store="s3://cluster/fill", run_id=run_id, no_cache=True, cluster=cluster.address, return_state=True)
    assert state.is_completed(), state.message
    got = _summary(run_id, "s3://cluster/fill")
    steps_ = got["lineage"]["steps"]
    by_engine: dict[str, list] = {}
    for s in steps_:
        by_engine.setdefault(s["engine"]["id"], []).append((datetime.fromisoformat(s["started_at"]), datetime.fromisoformat(s["finished_at"])))
    assert len(by_engine) == 2 and all(len(v) >= 2 for v in by_engine.values()), {k[:8]: len(v) for k, v in by_engine.items()}
    for spans in by_engine.values():  # never more than the worker's 2000 millicores at once
        assert _most_at_once(spans) <= 2
    assert _most_at_once([span for spans in by_engine.values() for span in spans]) == 4  # both workers full at once
    for s in steps_:
        timeline = s["attempt_history"][-1]["timeline"]
        times = [datetime.fromisoformat(timeline[k]) for k in ("task_started", "claimed", "executed")]
        assert times == sorted(times) and timeline["dask_key"].startswith(f"{s['id']}-")
        assert times[1] <= datetime.fromisoformat(s["started_at"]) and datetime.fromisoformat(s["finished_at"]) <= times[2]


def _busy(address: str) -> bool:
    from distributed import Client

    with Client(address, timeout="10s") as c:
        return any(c.processing().values())


def _most_at_once(spans: list) -> int:
    return max(sum(1 for a, b in spans if a <= t < b) for t, _ in spans)


def test_a_step_waits_for_its_upstream_and_a_failures_dependent_is_never_sent(tmp_path, cluster, busybox_image):
    """Every step is submitted at once: `b` starts after `a` ended (reading its output), and `c`,
    downstream of the failing `f`, and `d`, downstream of `c`, are never sent to a worker
    (`skipped`, no container; ``NotReady`` in Prefect)."""
    from algodock.flows.pipeline import run_pipeline

    small = {"resource_request": {"cpu_millicore": 500, "memory_gb": 0.25}}
    write_manifest(tmp_path / "a.json", name="a", image=BUSYBOX_IMAGE, container=small,
                   command=["sh", "-c", "sleep 1; mkdir -p /work/output/out; echo from-a > /work/output/out/x.txt"],
                   outputs=[{"name": "out", "format": "binary", "multiple": True}])
    write_manifest(tmp_path / "b.json", name="b", image=BUSYBOX_IMAGE, container=small,
                   command=["sh", "-c", "mkdir -p /work/output/out; cat /work/input/prev/x.txt > /work/output/out/y.txt"],
                   inputs=[{"name": "prev", "format": "binary", "multiple": True}], outputs=[{"name": "out", "format": "binary", "multiple": True}])
    write_manifest(tmp_path / "f.json", name="f", image=BUSYBOX_IMAGE, container=small, command=["sh", "-c", "exit 3"],
                   outputs=[{"name": "out", "format": "binary", "multiple": True}])
    (tmp_path / "p.yaml").write_text(
        'pipeline_version: "0.1"\nname: deps\nsteps:\n'
        "  - {id: a, manifest: a.json}\n  - {id: f, manifest: f.json}\n"
        "  - {id: b, manifest: b.json, inputs: {prev: a.out}}\n  - {id: c, manifest: b.json, inputs: {prev: f.out}}\n"
        "  - {id: d, manifest: b.json, inputs: {prev: c.out}}\n"
    )
    state = run_pipeline(spec=str(tmp_path / "p.yaml"), store="s3://cluster/deps", run_id="deps1", no_cache=True,
                         cluster=cluster.address, return_state=True)
    assert state.is_failed()
    lineage = {s["id"]: s for s in _summary("deps1", "s3://cluster/deps")["lineage"]["steps"]}
    assert lineage["a"]["status"] == "succeeded" and lineage["b"]["status"] == "succeeded"
    assert lineage["b"]["started_at"] >= lineage["a"]["finished_at"], "b started before its upstream ended"
    assert lineage["f"]["status"] == "failed" and lineage["f"]["failure"]["kind"] == "exit_code"
    assert all(lineage[s]["status"] == "skipped" and lineage[s]["started_at"] is None for s in "cd")
    # the same algorithm tasks as on one host: the run graph has the edge a -> b, and each task
    # run records the attempt the worker claimed; c and d, never sent, end NotReady naming the
    # step that did not succeed, as a dependent of a failure does on one host (they were missing
    # from the Prefect UI)
    runs = settled_task_runs(state.state_details.flow_run_id, 5)
    assert upstream_ids(runs["b"]) == {str(runs["a"].id)}
    assert runs["f"].state.is_failed()
    for skipped, failed in (("c", "f"), ("d", "c")):
        assert runs[skipped].state.name == "NotReady" and runs[skipped].start_time is None, runs[skipped].state
        assert str(runs[failed].id) in runs[skipped].state.message and upstream_ids(runs[skipped]) == {str(runs[failed].id)}
    assert lineage["b"]["task_run_id"] == str(runs["b"].id) and lineage["b"]["attempt_history"][0]["attempt"] == 1


def test_a_run_refused_before_it_starts_leaves_no_connection_to_the_cluster(tmp_path, cluster, busybox_image):
    """Another host holds the run's lease: the run is refused (RunBusy) before any step, and the
    flow's connection to the cluster is closed with it (it stayed open before)."""
    from distributed import Client

    from algodock.flows.pipeline import run_pipeline
    from algodock.store.backends import open_store
    from algodock.store.layout import lease_rel
    from algodock.store.lease import RunBusy
    from tests.test_promises import foreign_lease

    _sleeper(tmp_path, busybox_image, "s", 0)
    (tmp_path / "p.yaml").write_text('pipeline_version: "0.1"\nname: busy\nsteps:\n  - {id: a, manifest: s.json}\n')
    run_id = f"busy-{uuid.uuid4().hex[:8]}"
    open_store("s3://cluster/busy").create_json(lease_rel(run_id), {**foreign_lease(expires_in=300), "run_id": run_id})
    with Client(cluster.address, timeout="10s") as watcher:
        def clients() -> int:
            return watcher.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.clients))

        before = clients()
        with pytest.raises(RunBusy):
            run_pipeline(spec=str(tmp_path / "p.yaml"), store="s3://cluster/busy", run_id=run_id, cluster=cluster.address)
        assert clients() == before
