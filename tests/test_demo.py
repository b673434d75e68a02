"""`make demo` itself, on a clean clone: its run succeeds and every link it prints answers.

README: "`make demo` starts a server on its own SQLite file … runs the example pipeline, and
ends with the UI address, the run's page and the lineage command." The clone is of this
checkout's commit plus its uncommitted changes to tracked files; its `.venv` is this
checkout's (a link), and the targets that install
things (venv, engine, base image, example images) are taken as made (`make -o`), so the test
runs the demo's own recipe: the sample pings, `scripts/demo.sh`, which starts its Prefect
server (on a free port of 127.0.0.1), registers the deployment and runs the pipeline.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.prefect_server import free_port, quiet_env

pytestmark = [pytest.mark.docker, pytest.mark.server]

EXAMPLE_IMAGES = ["algodock/device-visits:1.0.0", "algodock/dwell-stats:1.0.0"]


def _clone(dest: Path) -> Path:
    if not (REPO / ".git").exists() or not shutil.which("git") or not shutil.which("make"):
        reason = "`make demo` on a clean clone needs this checkout's git repository, git and make"
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but {reason}", pytrace=False)
        pytest.skip(reason)
    subprocess.run(["git", "clone", "-q", "--shared", str(REPO), str(dest)], check=True, timeout=120)
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    subprocess.run(["git", "-C", str(dest), "checkout", "-q", head], check=True, timeout=60)
    # What this checkout changed in tracked files since its commit is what is under test too.
    changes = subprocess.run(["git", "-C", str(REPO), "diff", "HEAD", "--binary"], capture_output=True, check=True).stdout
    if changes:
        subprocess.run(["git", "-C", str(dest), "apply", "--whitespace=nowarn"], input=changes, check=True, timeout=60)
    (dest / ".venv").symlink_to(Path(sys.executable).parents[1])
    return dest


def _get(url: str, accept: str = "application/json") -> tuple[int, bytes]:
    """GET ``url`` (redirects followed); the status and body, also for an error status."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"Accept": accept}), timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _stop_server(clone: Path) -> None:
    """The server the demo started (its pid file): it leads its own session (setsid)."""
    pid_file = clone / ".algodock" / "prefect-server.pid"
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text())
    try:
        os.killpg(pid, signal.SIGTERM) if os.getpgid(pid) == pid else os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for _ in range(300):  # up to 30 s for a clean shutdown, then SIGKILL
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        subprocess.run(["sleep", "0.1"])  # waiting for the process to exit, not synchronization
    os.killpg(pid, signal.SIGKILL)


def test_make_demo_on_a_clean_clone(tmp_path, docker_client) -> None:
    for image in EXAMPLE_IMAGES:
        try:
            docker_client.images.get(image)
        except Exception:
            message = f"the example image {image} is missing (`make images` builds it)"
            if os.environ.get("CI"):
                pytest.fail(message, pytrace=False)
            pytest.skip(message)
    clone = _clone(tmp_path / "clone")
    api = f"http://127.0.0.1:{free_port()}/api"
    env = {**quiet_env(tmp_path / "prefect-home", api), "PREFECT_LOGGING_LEVEL": "WARNING"}
    env.pop("VIRTUAL_ENV", None)
    try:
        demo = subprocess.run(["make", "-o", "venv", "-o", "engine", "-o", "base-image", "-o", "images", "demo"],
                              cwd=clone, env=env, capture_output=True, text=True, timeout=600)
        out = demo.stdout
        assert demo.returncode == 0, f"make demo exited {demo.returncode}:\n{out[-3000:]}\n{demo.stderr[-3000:]}"
        assert "starting a Prefect server" in out, "the demo should have started its own server (none answered)"
        assert (clone / ".algodock" / "prefect-demo.db").exists(), "the demo's server does not use its own SQLite file"

        summary = json.loads((clone / ".algodock" / "demo" / "run.json").read_text())
        assert summary["status"] == "succeeded" and [s["status"] for s in summary["steps"]] == ["succeeded", "succeeded"], summary
        assert f"run {summary['run_id']}: succeeded" in out

        ui = api.removesuffix("/api")
        links = dict(re.findall(r"^(Prefect UI|This run|The daily deployment)\b.*?(https?://\S+)", out, re.M))
        assert links.get("Prefect UI") == ui, out[-2000:]
        assert links.get("This run") == f"{ui}/runs/flow-run/{summary['flow_run_id']}", out[-2000:]
        deployment_id = links.get("The daily deployment", "").rsplit("/", 1)[-1]
        assert deployment_id, f"no deployment link:\n{out[-2000:]}"
        for name, url in links.items():  # opened as a browser does (the UI serves its pages to HTML navigation)
            status, body = _get(url, accept="text/html,application/xhtml+xml")
            assert status == 200 and b"<html" in body.lower(), f"{name} link {url} answered {status}"
        # The UI answers any of its paths with its app: the objects the pages show must exist in the API.
        status, body = _get(f"{api}/flow_runs/{summary['flow_run_id']}")
        assert status == 200 and json.loads(body)["state_type"] == "COMPLETED"
        status, body = _get(f"{api}/deployments/{deployment_id}")
        assert status == 200 and json.loads(body)["name"] == "device-visits-daily"

        command = re.search(r"^Lineage:\s+(.+)$", out, re.M)
        assert command, out[-2000:]
        lineage = subprocess.run(command.group(1).split(), cwd=clone, env=env, capture_output=True, text=True, timeout=120)
        assert lineage.returncode == 0 and "visits" in lineage.stdout and "stats" in lineage.stdout, lineage.stdout + lineage.stderr
    finally:
        _stop_server(clone)
