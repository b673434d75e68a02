"""A team's Prefect server: one ``prefect server start`` on Postgres, many writers at once.

SQLite takes one writer at a time; a team runs the server on Postgres (README, "Running on
several hosts"; PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://...). The same load
on a SQLite-backed server also passed on this machine (docs/scale.md, "The Prefect API"). Here a throwaway Postgres
cluster and the server on it, both on 127.0.0.1, take six concurrent ``algodock run``
processes, then a scheduled deployment run by a real worker while more ``algodock run``s go on.
Every flow run must complete with its task runs, and the rows must be in Postgres.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import write_manifest
from tests.pg_server import Postgres, PostgresPrefectServer, pg_bin
from tests.prefect_server import ProcessWorker, off_loop, quiet_env, stop_group, wait_for
from tests.waiting import settled_task_runs, upstream_ids

pytestmark = [pytest.mark.docker, pytest.mark.prefect, pytest.mark.server]

_SCRIPT = Path(sys.executable).parent / "algodock"
ALGODOCK = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "algodock.cli"]
SMALL = {"resource_request": {"cpu_millicore": 100, "memory_gb": 0.1}}
STEPS = ("make", "left", "right")
UNWANTED = ("database is locked", "Traceback")


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    pg = Postgres(pg_bin())
    yield pg
    pg.stop()


@pytest.fixture(scope="module")
def team_server(tmp_path_factory, postgres) -> Iterator[PostgresPrefectServer]:
    server = PostgresPrefectServer(tmp_path_factory.mktemp("team-server"), postgres)
    yield server
    server.stop()
    log = server.log.read_text(errors="replace")
    assert "database is locked" not in log, log[-3000:]


@pytest.fixture
def on_team_server(team_server) -> Iterator[PostgresPrefectServer]:
    """This test's Prefect client talks to :func:`team_server` (not the session's harness)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings

    with temporary_settings({PREFECT_API_URL: team_server.api_url, PREFECT_SERVER_ANALYTICS_ENABLED: False}):
        yield team_server


def _pipeline(folder: Path, image: str) -> Path:
    """``make`` -> ``left``, ``make`` -> ``right``: three busybox steps, two edges, data along both."""
    out = [{"name": "out", "format": "binary", "multiple": True}]
    write_manifest(folder / "make.json", name="make", image=image, container=SMALL, outputs=out,
                   command=["sh", "-c", "mkdir -p /work/output/out; echo made > /work/output/out/a.txt"])
    for side in ("left", "right"):
        write_manifest(folder / f"{side}.json", name=side, image=image, container=SMALL, outputs=out,
                       inputs=[{"name": "prev", "format": "binary", "multiple": True}],
                       command=["sh", "-c", f"mkdir -p /work/output/out; grep -rh made /work/input > /work/output/out/{side}.txt"])
    spec = folder / "team.yaml"
    spec.write_text(
        'pipeline_version: "0.1"\nname: team\nsteps:\n'
        "  - {id: make, manifest: make.json}\n"
        "  - {id: left, manifest: left.json, inputs: {prev: make.out}}\n"
        "  - {id: right, manifest: right.json, inputs: {prev: make.out}}\n"
    )
    return spec


class CliRun:
    """``algodock run SPEC --json`` in the background, as a team member runs it; its output in files."""

    def __init__(self, spec: Path, store: Path, run_id: str, env: dict[str, str]) -> None:
        self.run_id = run_id
        self.stdout, self.stderr = spec.parent / f"{run_id}.json", spec.parent / f"{run_id}.err"
        self.started = time.monotonic()
        with self.stdout.open("wb") as out, self.stderr.open("wb") as err:
            self.proc = subprocess.Popen([*ALGODOCK, "run", str(spec), "--store", str(store), "--run-id", run_id, "--no-cache", "--json"],
                                         stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env, cwd=spec.parent, start_new_session=True)

    def finish(self, timeout: float) -> dict[str, Any]:
        """Wait for the process; it must exit 0 with every step succeeded and nothing alarming on stderr. Its summary."""
        self.proc.wait(timeout)
        err = self.stderr.read_text(errors="replace")
        out = self.stdout.read_text(errors="replace")
        for word in UNWANTED:
            assert word not in err and word not in out, f"`algodock run` {self.run_id} printed {word!r}:\n{err[-4000:]}"
        assert self.proc.returncode == 0, f"`algodock run` {self.run_id} exited {self.proc.returncode}:\n{err[-4000:]}"
        summary = json.loads(out)
        assert summary["status"] == "succeeded" and [s["status"] for s in summary["steps"]] == ["succeeded"] * len(STEPS), summary
        return summary

    def stop(self) -> None:
        """SIGTERM (the run removes its containers), SIGKILL after 30 s."""
        stop_group(self.proc)


def _start_runs(spec: Path, server: PostgresPrefectServer, prefix: str, n: int) -> list[CliRun]:
    """``n`` concurrent ``algodock run``s of ``spec`` against ``server``, run ids ``prefix-0``..."""
    # One PREFECT_HOME and one store for all: one machine of the team, runs told apart by run id.
    env = quiet_env(spec.parent / "prefect-home", server.api_url)
    return [CliRun(spec, spec.parent / "store", f"{prefix}-{i}", env) for i in range(n)]


def _assert_completed_with_tasks(client: Any, flow_run_id: Any) -> None:
    """The flow run is Completed; its three task runs are Completed, and left and right name make as upstream."""
    flow_run = client.read_flow_run(flow_run_id)
    assert flow_run.state and flow_run.state.is_completed(), (flow_run_id, flow_run.state)
    tasks = settled_task_runs(flow_run_id, len(STEPS))  # the server records task runs from events: they may trail the flow run's end
    assert sorted(tasks) == sorted(STEPS) and all(t.state.is_completed() for t in tasks.values()), {n: t.state for n, t in tasks.items()}
    for side in ("left", "right"):
        assert upstream_ids(tasks[side]) == {str(tasks["make"].id)}, (side, tasks[side].task_inputs)


def _rows_in_postgres(postgres: Postgres, table: str, column: str, ids: list[str]) -> int:
    """How many rows of the server's ``table`` in Postgres have ``column`` in ``ids``."""
    listed = ",".join(f"'{i}'" for i in ids)
    return int(postgres.query(f"SELECT count(*) FROM {table} WHERE {column} IN ({listed})"))


def test_six_concurrent_runs_on_one_postgres_server(tmp_path, on_team_server, postgres, docker_client, busybox_image):
    from prefect.client.orchestration import get_client

    spec = _pipeline(tmp_path, busybox_image)
    runs = _start_runs(spec, on_team_server, "team", 6)
    try:
        summaries = [run.finish(timeout=300) for run in runs]
    finally:
        for run in runs:
            run.stop()

    flow_run_ids = [s["flow_run_id"] for s in summaries]
    assert all(flow_run_ids) and len(set(flow_run_ids)) == 6, flow_run_ids
    with get_client(sync_client=True) as client:
        for flow_run_id in flow_run_ids:
            _assert_completed_with_tasks(client, flow_run_id)
    # The server's rows are in Postgres (no SQLite file beside it).
    assert _rows_in_postgres(postgres, "flow_run", "id", flow_run_ids) == 6
    assert _rows_in_postgres(postgres, "task_run", "flow_run_id", flow_run_ids) == 6 * len(STEPS)
    assert not list(on_team_server.home.glob("*.db")), list(on_team_server.home.iterdir())


def _deploy_every(spec: Path, pool: str, seconds: int) -> Any:
    """flows/algodock_flows.py:run_pipeline (prefect.yaml's entry point) as a deployment on an interval schedule; its id."""
    from algodock.flows.pipeline import run_pipeline
    from tests.conftest import REPO

    params = {"spec": str(spec), "store": str(spec.parent / "store"), "no_cache": True}
    source = run_pipeline.from_source(source=str(REPO), entrypoint="flows/algodock_flows.py:run_pipeline")
    return off_loop(lambda: source.deploy(name="team-every", work_pool_name=pool, parameters=params, interval=timedelta(seconds=seconds),
                                          build=False, push=False, print_next_steps=False))


def _deployment_runs(client: Any, deployment_id: Any, *state_types: Any) -> list[Any]:
    """The deployment's flow runs (in one of ``state_types``, when given)."""
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterDeploymentId, FlowRunFilterState,
                                                FlowRunFilterStateType)

    state = FlowRunFilterState(type=FlowRunFilterStateType(any_=list(state_types))) if state_types else None
    return client.read_flow_runs(flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id]), state=state))


def test_scheduled_deployment_beside_concurrent_runs(tmp_path, on_team_server, postgres, docker_client, busybox_image):
    """The server's scheduler creates a run every 8 s; a real worker runs them while four `algodock run`s go on."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType

    spec = _pipeline(tmp_path, busybox_image)
    worker = ProcessWorker(on_team_server, "team-pool")
    runs: list[CliRun] = []
    deployment_id = None
    try:
        deployment_id = _deploy_every(spec, worker.pool, 8)
        with get_client(sync_client=True) as client:
            wait_for(lambda: _deployment_runs(client, deployment_id, StateType.RUNNING, StateType.COMPLETED), timeout=180,
                     what="the worker to start the first scheduled run")
            runs = _start_runs(spec, on_team_server, "beside", 4)
            cli_started = datetime.now().astimezone()
            summaries = [run.finish(timeout=300) for run in runs]
            cli_ended = datetime.now().astimezone()
            completed = wait_for(lambda: (done := _deployment_runs(client, deployment_id, StateType.COMPLETED)) and len(done) >= 3 and done,
                                 timeout=180, what="three scheduled runs to complete")
    finally:
        for run in runs:
            run.stop()
        if deployment_id is not None:
            with get_client(sync_client=True) as client:
                client.pause_deployment(deployment_id)  # deletes the runs still Scheduled
                # A run the worker has taken finishes before the worker goes (no container outlives it).
                wait_for(lambda: not _deployment_runs(client, deployment_id, StateType.PENDING, StateType.RUNNING), timeout=180,
                         what="the deployment's started runs to end")
        worker.stop()

    with get_client(sync_client=True) as client:
        for flow_run in completed:
            assert flow_run.auto_scheduled, flow_run  # created by the server's scheduler, not by hand
            _assert_completed_with_tasks(client, flow_run.id)
        for summary in summaries:
            _assert_completed_with_tasks(client, summary["flow_run_id"])
        every = _deployment_runs(client, deployment_id)
    bad = [(r.name, r.state.name) for r in every if r.state and r.state.type in (StateType.FAILED, StateType.CRASHED)]
    assert not bad, bad
    # At least one scheduled run was running while the `algodock run`s were.
    assert any(r.start_time and r.start_time < cli_ended and (r.end_time is None or r.end_time > cli_started) for r in completed), \
        [(r.start_time, r.end_time) for r in completed]
    ids = [str(r.id) for r in completed] + [s["flow_run_id"] for s in summaries]
    assert _rows_in_postgres(postgres, "flow_run", "id", ids) == len(ids)
    log = worker.log.read_text(errors="replace")
    assert "database is locked" not in log, log[-3000:]
