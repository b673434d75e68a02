"""A real ``prefect server start`` (and ``prefect worker start``) as child processes, for tests.

The test harness runs the API in-process; what a user sees (the UI, a worker running a
deployment, the API going away) needs the real server process. Everything binds 127.0.0.1;
analytics are off; each server has its own PREFECT_HOME and SQLite file.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.conftest import REPO

PREFECT = [sys.executable, "-m", "prefect"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quiet_env(home: Path, api_url: str | None = None) -> dict[str, str]:
    """The environment of a Prefect process of the tests: own home, no telemetry, no prompts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_CLI_PROMPT="false",
        PREFECT_LOGGING_LEVEL="WARNING",
    )
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def stop_group(proc: subprocess.Popen, grace: float = 30) -> None:
    """End ``proc``'s process group (started with ``start_new_session``): SIGTERM, then SIGKILL
    after ``grace`` seconds (at once with ``grace=0``)."""
    if proc.poll() is not None:
        return
    if grace:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            pass
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)


class PrefectServer:
    """``prefect server start`` on a free port of 127.0.0.1, until :meth:`stop`."""

    def __init__(self, home: Path, *, timeout: float = 120, env: dict[str, str] | None = None) -> None:
        """``env``: settings for the server on top of a clean environment (e.g. its database URL)."""
        home.mkdir(parents=True, exist_ok=True)
        self.home = home
        self.port = free_port()
        self.ui_url = f"http://127.0.0.1:{self.port}"
        self.api_url = f"{self.ui_url}/api"
        self.log = home / "server.log"
        server_env = {**quiet_env(home), "PREFECT_UI_API_URL": self.api_url, **(env or {})}
        self.proc = subprocess.Popen(
            [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=self.log.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=server_env, cwd=home,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"prefect server did not start on port {self.port}: {self.log.read_text()[-3000:]}")
            time.sleep(0.3)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL the server's process group: the API goes away at once."""
        stop_group(self.proc, grace=0)

    def stop(self) -> None:
        stop_group(self.proc)


class ProcessWorker:
    """``prefect worker start`` on a process work pool of ``server`` (created when missing)."""

    def __init__(self, server: PrefectServer, pool: str) -> None:
        self.server, self.pool = server, pool
        env = quiet_env(server.home, server.api_url)
        subprocess.run([*PREFECT, "work-pool", "create", pool, "--type", "process", "--overwrite"], env=env, cwd=REPO,
                       check=True, capture_output=True, timeout=120)
        self.log = server.home / f"worker-{pool}.log"
        env["PREFECT_WORKER_QUERY_SECONDS"] = "1"
        env["PREFECT_WORKER_PREFETCH_SECONDS"] = "1"
        env["PREFECT_LOGGING_LEVEL"] = "INFO"
        self.proc = subprocess.Popen(
            [*PREFECT, "worker", "start", "--pool", pool, "--type", "process"],
            stdout=self.log.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=REPO,
            start_new_session=True,
        )

    def stop(self) -> None:
        stop_group(self.proc)


def deploy_pipeline(name: str, pool: str, parameters: dict) -> str:
    """Register flows/algodock_flows.py:run_pipeline (prefect.yaml's entry point, from this checkout) as a deployment; returns ``flow/deployment``."""
    from algodock.flows.pipeline import run_pipeline

    def deploy() -> None:
        source = run_pipeline.from_source(source=str(REPO), entrypoint="flows/algodock_flows.py:run_pipeline")
        source.deploy(name=name, work_pool_name=pool, parameters=parameters, build=False, push=False, print_next_steps=False)

    off_loop(deploy)
    return f"algodock-pipeline/{name}"


def start_deployment(name: str):
    """``run_deployment(name, timeout=0)``: the new flow run, not waited for."""
    from prefect.deployments import run_deployment

    return off_loop(lambda: run_deployment(name, timeout=0))


def off_loop(fn):
    """Call ``fn`` in a thread without an event loop: Prefect's dual sync/async functions return
    coroutines when they see one (Playwright's sync API runs one in the test's thread)."""
    import concurrent.futures
    import contextvars

    ctx = contextvars.copy_context()  # the Prefect settings of the test go along
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(ctx.run, fn).result()


def wait_for(predicate, *, timeout: float, interval: float = 0.5, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout`` seconds (:func:`tests.waiting.poll`)."""
    from tests.waiting import poll

    return poll(what, predicate, deadline=timeout, every=interval)
