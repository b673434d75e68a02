"""Shared fixtures: a real Docker engine, tiny test images, the moto S3 server, Prefect's harness.

A test that needs the engine skips on a developer machine without one, but FAILS when the
``CI`` environment variable is set: CI must exercise the sandbox for real.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.s3server import bucket, s3_endpoint  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[1]
BUSYBOX_IMAGE = "algodock-test/busybox:1"
RECORDER_FLUSH_SECONDS = 1  # how often the session's Prefect server records task runs (see prefect_harness)


def pytest_configure(config: pytest.Config) -> None:
    from tests import loopback

    loopback.install()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    from tests import loopback

    if loopback.refused:
        print("\nBinds off loopback, refused (tests listen on 127.0.0.1 only):\n  " + "\n  ".join(loopback.refused))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _need_engine(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but {reason}; the Docker tests must run in CI (`make engine`)", pytrace=False)
    pytest.skip(reason)


def unmet(reason: str) -> None:
    """A precondition this machine lacks: a failure under ``CI`` (where every check must run), a skip elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but this machine lacks what the test needs: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def docker_client():
    from algodock.runtime.engine import docker_client as connect
    from algodock.errors import InfrastructureError

    try:
        client = connect()
    except InfrastructureError as exc:
        _need_engine(f"no Docker engine answers: {exc}")
    yield client
    from algodock.runtime.engine import MANAGED_LABEL, _owner_alive
    from algodock.runtime.leftovers import list_containers, remove_container

    # Ours, or orphaned by a process that is gone (a concurrent session's live containers are not ours).
    left = [
        c
        for c in list_containers(client, f"{MANAGED_LABEL}=true")
        if c.labels.get("io.algodock.pid") == str(os.getpid()) or not _owner_alive(c.labels)
    ]
    for c in left:
        remove_container(client, c)
    assert not left, f"containers left behind by the suite: {[c.name for c in left]}"


def build_image(client, tag: str, dockerfile: str, files: dict[str, bytes | Path] | None = None) -> str:
    """Build ``tag`` from an in-memory context; returns the image id."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        entries: dict[str, bytes | Path] = {"Dockerfile": dockerfile.encode(), **(files or {})}
        for name, content in entries.items():
            if isinstance(content, Path):
                tar.add(str(content), arcname=name)
                continue
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mode = 0o755
            tar.addfile(info, io.BytesIO(content))
    buf.seek(0)
    image, _ = client.images.build(fileobj=buf, custom_context=True, tag=tag, rm=True, forcerm=True)
    return image.id


def _busybox_binary() -> Path:
    path = Path("/bin/busybox")
    if not path.exists():
        _need_engine("the static busybox (Debian's busybox-static, /bin/busybox) is not installed")
    return path


@pytest.fixture(scope="session")
def busybox_image(docker_client) -> str:
    """``FROM scratch`` plus a static busybox: builds in about a second; runs as root by default."""
    return build_image(
        docker_client,
        BUSYBOX_IMAGE,
        'FROM scratch\nCOPY busybox /bin/busybox\nRUN ["/bin/busybox", "--install", "-s", "/bin"]\n',
        {"busybox": _busybox_binary()},
    )


@pytest.fixture(scope="session")
def registry(docker_client, tmp_path_factory):
    """A private registry on 127.0.0.1 with htpasswd auth (see tests/registry.py), for the session."""
    from tests.registry import Registry, available

    why = available()
    if why:
        _need_engine(why)
    reg = Registry(tmp_path_factory.mktemp("registry")).start()
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One Prefect test server for the whole session (it takes seconds to start).

    The server records task runs and their states from the events the task engine sends, so
    they may trail a flow run's end (seen once in CI, under load). Here its recorder writes them
    once a second instead of as each arrives: a test that reads task runs without waiting for
    them (:func:`tests.waiting.settled_task_runs`) fails every time, not once in many runs."""
    from prefect.settings import (
        PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE,
        PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL,
        temporary_settings,
    )
    from prefect.testing.utilities import prefect_test_harness

    recorder_lags = {PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE: 100_000, PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL: RECORDER_FLUSH_SECONDS}
    with temporary_settings(updates=recorder_lags), prefect_test_harness(server_startup_timeout=120):
        yield


def write_manifest(path: Path, *, image: str, command: list[str], **extra) -> Path:
    """A small manifest file for tests."""
    import json

    doc = {
        "manifest_version": "0.1",
        "name": extra.pop("name", "t"),
        "version": "1.0.0",
        "container_parameters": {"image": image, "command": command, **extra.pop("container", {})},
        **extra,
    }
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """One real ``prefect server start`` process (UI included) for the session's UI and worker tests."""
    from tests.prefect_server import PrefectServer

    server = PrefectServer(tmp_path_factory.mktemp("prefect-server"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def process_worker(prefect_server):
    """A ``prefect worker start`` on the process work pool ``algodock-test`` of :func:`prefect_server`."""
    from tests.prefect_server import ProcessWorker

    worker = ProcessWorker(prefect_server, "algodock-test")
    yield worker
    worker.stop()


@pytest.fixture
def on_prefect_server(prefect_server):
    """This test's Prefect client talks to :func:`prefect_server` (not the harness)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_server.api_url, PREFECT_SERVER_ANALYTICS_ENABLED: False}):
        yield prefect_server
