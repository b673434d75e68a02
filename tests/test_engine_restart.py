"""Faults for real: a second Docker engine (scripts/extra-engine.sh) restarted under a running step.

``algodock run-step`` runs against the extra engine (``DOCKER_HOST`` pointing at it); the
engine is killed (SIGKILL, as a crash) and started again while the step's container runs.
The step must end as ``infrastructure`` (never ``timeout``), print its JSON, exit non-zero
without a traceback, and once the engine is back no container of the step may remain.
Every wait polls a state with a deadline.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from algodock.runtime.engine import LABEL
from tests.conftest import BUSYBOX_IMAGE, write_manifest

pytestmark = pytest.mark.docker

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "extra-engine.sh"
_CLI = Path(sys.executable).parent / "algodock"
ALGODOCK = [str(_CLI)] if _CLI.exists() else [sys.executable, "-m", "algodock.cli"]
NAME = f"rt{os.getpid() % 100000}"


def _engine(*args: str, timeout: float = 180) -> str:
    proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"extra-engine.sh {' '.join(args)} failed:\n{proc.stderr}"
    return proc.stdout


def _until(what: str, check: Callable[[], Any], seconds: float = 60) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"not within {seconds:g}s: {what}")


@pytest.fixture(scope="module")
def extra_engine(busybox_image: str) -> Iterator[str]:
    """A second engine with the busybox test image; yields its DOCKER_HOST."""
    if os.geteuid() != 0 or not shutil.which("dockerd"):
        reason = "a second dockerd needs root and dockerd"
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but {reason}", pytrace=False)
        pytest.skip(reason)
    _engine("start", NAME, "--load", BUSYBOX_IMAGE)
    host = _engine("env", NAME).strip().removeprefix("DOCKER_HOST=")
    assert host.startswith("unix://")
    try:
        yield host
    finally:
        _engine("stop", NAME)
        for folder in (f"/var/lib/algodock-engines/{NAME}", f"/run/algodock-engines/{NAME}"):  # this session's engine only
            shutil.rmtree(folder, ignore_errors=True)


def _client(host: str) -> Any:
    import docker

    return docker.DockerClient(base_url=host, timeout=10)


def _answers(host: str) -> bool:
    try:
        return bool(_client(host).ping())
    except Exception:
        return False


def _step_containers(host: str, step: str) -> list[Any]:
    """The step's containers on the engine at ``host``; raises when the engine does not answer (never an empty list for "unknown")."""
    return _client(host).containers.list(all=True, filters={"label": f"{LABEL}.step_id={step}"})


def _run_step(host: str, manifest: Path, out: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "DOCKER_HOST": host}
    return subprocess.Popen(
        [*ALGODOCK, "run-step", str(manifest), "--output", str(out), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
    )


def test_run_step_against_the_extra_engine(extra_engine: str, tmp_path: Path) -> None:
    m = write_manifest(tmp_path / "m.json", name="rt-ok", image=BUSYBOX_IMAGE, command=["sh", "-c", "echo 7 > /work/output/n.csv"],
                       outputs=[{"name": "n", "format": "csv"}])
    proc = _run_step(extra_engine, m, tmp_path / "out")
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert json.loads(stdout)["status"] == "succeeded"
    assert (tmp_path / "out" / "n.csv").read_text() == "7\n"
    assert _step_containers(extra_engine, "rt-ok") == []
    assert not _client("unix:///var/run/docker.sock").containers.list(all=True, filters={"label": f"{LABEL}.step_id=rt-ok"}), "ran on the extra engine only"


@pytest.mark.parametrize("how", ["kill", "graceful"])
def test_engine_restarted_mid_step_is_infrastructure(extra_engine: str, tmp_path: Path, how: str) -> None:
    """``kill``: the daemon crashes (SIGKILL); ``graceful``: it shuts down, stopping the container itself."""
    step = f"rt-restart-{how}"
    m = write_manifest(tmp_path / "m.json", name=step, image=BUSYBOX_IMAGE, command=["sh", "-c", "echo started; sleep 300"],
                       container={"timeout_seconds": 600})
    proc = _run_step(extra_engine, m, tmp_path / "out")
    try:
        _until("the step's container runs on the extra engine",
               lambda: any(c.status == "running" for c in _step_containers(extra_engine, step)))
        _engine("stop", NAME, *(["--kill"] if how == "kill" else []))  # a crash, or a shutdown that stops the container
        _until("the engine is down", lambda: not _answers(extra_engine), 30)
        _engine("start", NAME)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 1, (proc.returncode, stderr)
    assert "Traceback" not in stderr, stderr
    doc = json.loads(stdout)
    assert doc["status"] == "failed"
    assert doc["failure"]["kind"] == "infrastructure", doc["failure"]
    # The engine came back: whatever the step left (the restart leaves its container exited)
    # goes with the sweep, which removes containers whose owning process is gone.
    from algodock.runtime.leftovers import sweep_orphans

    sweep_orphans(_client(extra_engine))
    _until("no container of the step remains", lambda: _answers(extra_engine) and _step_containers(extra_engine, step) == [], 30)


def test_the_script_refuses_a_bad_name_and_prints_its_env() -> None:
    bad = subprocess.run(["bash", str(SCRIPT), "start", "Bad_Name"], capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0 and "NAME must be" in bad.stderr
    assert _engine("env", "abc").strip() == "DOCKER_HOST=unix:///run/algodock-engines/abc/docker.sock"


def test_a_crashed_engine_comes_back_over_pidfiles_whose_pids_now_name_another_process(extra_engine: str) -> None:
    """A machine restart hands pids out again: the pidfiles a crashed engine left (its daemon's, its
    containerd's) may name a live process that is not that engine's. ``start`` brings the engine back
    anyway, and neither ``start`` nor ``stop`` signals that process."""
    other = subprocess.Popen(["sleep", "600"])
    run = Path("/run/algodock-engines") / NAME
    try:
        for pidfiles in (["containerd/containerd.pid"], ["docker.pid"]):
            _engine("stop", NAME, "--kill")
            _until("the engine is down", lambda: not _answers(extra_engine), 30)
            for name in pidfiles:
                (run / name).write_text(str(other.pid))  # as the daemons write them: no newline
            _engine("start", NAME)
            assert _answers(extra_engine), pidfiles
            assert other.poll() is None, f"start signalled pid {other.pid}, named by {pidfiles}"
        _engine("stop", NAME, "--kill")
        for name in ("docker.pid", "containerd/containerd.pid"):
            (run / name).write_text(str(other.pid))  # as the daemons write them: no newline
        _engine("stop", NAME)
        assert other.poll() is None, f"stop signalled pid {other.pid}, named by both pidfiles"
        _engine("start", NAME)
        assert _answers(extra_engine)
    finally:
        other.kill()
        other.wait(10)
