"""The setup scripts over pids that belong to other processes now (a machine restart hands pids out again).

``scripts/ensure-docker.sh`` deciding whether to start the main engine: the main engine answers
during the tests, so the script is pointed at a socket nothing listens on and at a stand-in
``dockerd`` (a shell script of that name, which records its pid and sleeps); no real daemon is
started or signalled. ``scripts/pids.sh``: the pids ``make cluster`` records and ``make
cluster-down`` signals, and ``pid_runs`` the other scripts use. (``scripts/extra-engine.sh``: ``tests/test_engine_restart.py``.)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.waiting import poll

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
SCRIPT = SCRIPTS / "ensure-docker.sh"


def _stand_in(folder: Path) -> Path:
    """A ``dockerd`` that appends its pid to $STARTED and sleeps (its process name stays dockerd)."""
    folder.mkdir(parents=True, exist_ok=True)
    daemon = folder / "dockerd"
    daemon.write_text('#!/bin/bash\necho $$ >> "$STARTED"\nsleep 600 &\nwait\n')
    daemon.chmod(0o755)
    return daemon


@pytest.fixture
def processes() -> Iterator[list[int]]:
    """Pids to end (with their process groups) after the test."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        for kill in (os.killpg, os.kill):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                kill(pid, signal.SIGKILL)


def _ensure(tmp_path: Path, daemon: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "DOCKER_HOST": f"unix://{tmp_path}/nothing.sock",
        "ALGODOCK_DOCKERD": str(daemon),
        "ALGODOCK_DOCKERD_PIDFILE": str(tmp_path / "docker.pid"),
        "ALGODOCK_DOCKERD_EXEC_ROOT": str(tmp_path / "exec"),
        "ALGODOCK_DOCKERD_LOG": str(tmp_path / "dockerd.log"),
        "ALGODOCK_DOCKERD_WAIT": "1",
        "STARTED": str(tmp_path / "started"),
    }
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120)


def test_a_second_engine_s_daemon_and_pidfiles_naming_other_processes_do_not_stop_the_main_engine_starting(
        tmp_path: Path, processes: list[int]) -> None:
    """After a machine restart, docker.pid and containerd.pid may name live processes that are not the
    engine's, and an extra engine (``scripts/extra-engine.sh``) may already run a ``dockerd`` of its own.
    The script starts the main engine's daemon anyway, removes both stale pidfiles, and signals nothing."""
    daemon = _stand_in(tmp_path / "bin")
    other = subprocess.Popen(["sleep", "600"], start_new_session=True)
    processes.append(other.pid)
    extra = subprocess.Popen([str(daemon), "--exec-root", "/run/algodock-engines/x", "--pidfile", "/run/algodock-engines/x/docker.pid"],
                             env={**os.environ, "STARTED": str(tmp_path / "extra-started")}, start_new_session=True)
    processes.append(extra.pid)
    poll("the extra engine's stand-in runs", lambda: (tmp_path / "extra-started").exists())
    (tmp_path / "docker.pid").write_text(str(other.pid))
    (tmp_path / "exec" / "containerd").mkdir(parents=True)
    containerd_pid = tmp_path / "exec" / "containerd" / "containerd.pid"
    containerd_pid.write_text(str(other.pid))

    out = _ensure(tmp_path, daemon)

    started = (tmp_path / "started").read_text().split() if (tmp_path / "started").exists() else []
    processes.extend(int(p) for p in started)
    assert "does not answer yet; waiting" not in out.stderr, out.stderr
    assert len(started) == 1, f"the main engine's daemon was not started:\n{out.stderr}"
    assert not (tmp_path / "docker.pid").exists() and not containerd_pid.exists(), out.stderr
    assert other.poll() is None and extra.poll() is None, "a process that is not the engine's was signalled"
    assert out.returncode == 1 and "did not answer" in out.stderr, out.stderr  # the stand-in never answers


def test_a_live_main_daemon_is_waited_for_not_started_twice(tmp_path: Path, processes: list[int]) -> None:
    """A daemon the pidfile names (one starting, say) is left to come up: no second one is started."""
    daemon = _stand_in(tmp_path / "bin")
    first = subprocess.Popen([str(daemon), "--pidfile", str(tmp_path / "docker.pid")], env={**os.environ, "STARTED": str(tmp_path / "first")}, start_new_session=True)
    processes.append(first.pid)
    poll("the first stand-in runs", lambda: (tmp_path / "first").exists())
    (tmp_path / "docker.pid").write_text(str(first.pid))

    out = _ensure(tmp_path, daemon)

    assert not (tmp_path / "started").exists(), f"a second daemon was started:\n{out.stderr}"
    assert "does not answer yet; waiting" in out.stderr, out.stderr
    assert (tmp_path / "docker.pid").read_text() == str(first.pid) and first.poll() is None
    assert out.returncode == 1


def _pids(call: str) -> str:
    return subprocess.run(["bash", "-c", f'source "{SCRIPTS}/pids.sh"; {call}'], capture_output=True, text=True, timeout=30).stdout.strip()


def test_a_recorded_pid_counts_only_while_that_very_process_runs(tmp_path: Path, processes: list[int]) -> None:
    """``make cluster`` records each server's pid with its start time; ``make cluster-down`` signals
    the pid only while it still names that process, never the one the kernel gave the pid to since."""
    server = subprocess.Popen(["sleep", "600"], start_new_session=True)
    processes.append(server.pid)
    record = tmp_path / "server.pid"
    _pids(f'record_pid "{record}" {server.pid}')
    assert _pids(f'recorded_pid "{record}"') == str(server.pid)

    pid, started = record.read_text().split()
    record.write_text(f"{pid} {int(started) - 1}\n")  # the same pid, a process started at another time
    assert _pids(f'recorded_pid "{record}"') == ""
    record.write_text(f"{pid}\n")
    assert _pids(f'recorded_pid "{record}"') == ""
    assert _pids(f'recorded_pid "{tmp_path / "none.pid"}"') == ""
    server.kill()
    server.wait(10)
    record.write_text(f"{pid} {started}\n")
    assert _pids(f'recorded_pid "{record}"') == ""


def test_postgres_counts_as_running_only_when_its_pidfile_names_a_postgres(tmp_path: Path, processes: list[int]) -> None:
    """``make cluster`` starts its Postgres unless it runs, and ``make cluster-down`` stops it only
    then: ``pg_ctl`` alone takes any live pid in postmaster.pid for the server."""
    data = tmp_path / "pg"
    data.mkdir()
    shutil.copy("/bin/sleep", tmp_path / "postgres")  # a process named postgres
    server = subprocess.Popen([str(tmp_path / "postgres"), "600"], start_new_session=True)
    other = subprocess.Popen(["sleep", "600"], start_new_session=True)
    processes.extend([server.pid, other.pid])

    def runs() -> bool:
        return _pids(f'postgres_runs "{data}" && echo yes') == "yes"

    assert not runs()  # no postmaster.pid
    (data / "postmaster.pid").write_text(f"{other.pid}\n{data}\n")
    assert not runs()
    (data / "postmaster.pid").write_text(f"{server.pid}\n{data}\n")
    assert runs()
