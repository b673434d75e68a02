"""`algodock run-step` as a user runs it: a subprocess, real Docker, one JSON document on stdout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from algodock.runtime.engine import LABEL
from tests.conftest import write_manifest

pytestmark = pytest.mark.docker

REPO = Path(__file__).resolve().parents[1]
_SCRIPT = Path(sys.executable).parent / "algodock"
ALGODOCK = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "algodock.cli"]

SUMMARY_KEYS = {"status", "failure", "image", "image_id", "repo_digest", "outputs", "started_at", "finished_at", "usage"}
USAGE_KEYS = {"peak_memory_bytes", "cpu_seconds", "wall_seconds", "output_bytes", "output_files"}
OUTPUT_KEYS = {"name", "uri", "sha256", "format", "rows"}


def run_step(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ALGODOCK, "run-step", *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def one_json_document(stdout: str) -> dict[str, Any]:
    """stdout holds exactly one JSON document and nothing else."""
    doc, end = json.JSONDecoder().raw_decode(stdout.lstrip())
    assert stdout.lstrip()[end:].strip() == "", f"more than one document on stdout: {stdout!r}"
    return doc


def assert_iso_with_zone(text: str) -> datetime:
    t = datetime.fromisoformat(text)
    assert t.tzinfo is not None and t.utcoffset() is not None, f"{text} has no time zone"
    return t


@pytest.fixture
def no_container_left(docker_client: Any):
    """Containers of the step names a test used must all be gone afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        left = docker_client.containers.list(all=True, filters={"label": f"{LABEL}.step_id={name}"})
        for c in left:
            c.remove(force=True)
        assert not left, f"containers left behind by `algodock run-step`: {[c.name for c in left]}"


def test_success_prints_one_json_document(busybox_image: str, tmp_path: Path, no_container_left: list[str]) -> None:
    name = "cli-ok"
    no_container_left.append(name)
    (tmp_path / "pings.csv").write_text("device,t\na,1\n")
    m = write_manifest(
        tmp_path / "manifest.json",
        name=name,
        image="algodock-test/busybox:1",
        command=["sh", "-c", "echo to-the-log; wc -l < /work/input/pings/pings.csv > /work/output/count.csv; cp $ALGORITHM_INPUT_PATH /work/output/seen.json"],
        parameters={"type": "object", "properties": {"n": {"type": "integer"}, "label": {"type": "string"}, "flag": {"type": "boolean"}, "limit": {"default": 10}}},
        inputs=[{"name": "pings", "format": "csv"}],
        outputs=[{"name": "count", "format": "csv"}, {"name": "seen", "format": "json"}],
    )
    out = tmp_path / "out"
    proc = run_step(m, "--input", f"pings={tmp_path / 'pings.csv'}", "--param", "n=5", "--param", "label=abc", "--param", "flag=true", "--output", out, "--json")
    assert proc.returncode == 0, proc.stderr
    doc = one_json_document(proc.stdout)
    assert set(doc) == SUMMARY_KEYS
    assert set(doc["usage"]) == USAGE_KEYS and doc["usage"]["output_files"] >= 1
    assert doc["status"] == "succeeded" and doc["failure"] is None
    assert doc["image"] == "algodock-test/busybox:1" and doc["image_id"] == busybox_image and doc["repo_digest"] is None
    assert assert_iso_with_zone(doc["started_at"]) <= assert_iso_with_zone(doc["finished_at"])
    count, seen = doc["outputs"]
    assert set(count) == OUTPUT_KEYS and count["name"] == "count" and count["rows"] is None
    assert Path(count["uri"]) == out / "count.csv" and (out / "count.csv").read_text().strip() == "2"
    params = json.loads((out / "seen.json").read_text())["config"]["parameters"]
    assert params == {"n": 5, "label": "abc", "flag": True, "limit": 10}, "n=5 is the integer 5; defaults filled"
    assert "to-the-log" in proc.stderr and "to-the-log" not in proc.stdout, "container logs go to stderr"


def test_without_json_prints_outputs_and_exit_0(busybox_image: str, tmp_path: Path, no_container_left: list[str]) -> None:
    no_container_left.append("cli-plain")
    m = write_manifest(tmp_path / "m.json", name="cli-plain", image=busybox_image, command=["sh", "-c", "echo hi > /work/output/o.csv"], outputs=[{"name": "o", "format": "csv"}])
    proc = run_step(m, "--output", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"o: {tmp_path / 'out' / 'o.csv'} (csv) sha256:")
    assert f"= {busybox_image}" in proc.stderr


def test_failure_exits_1_with_kind_and_log_tail(busybox_image: str, tmp_path: Path, no_container_left: list[str]) -> None:
    no_container_left.append("cli-fail")
    m = write_manifest(tmp_path / "m.json", name="cli-fail", image=busybox_image, command=["sh", "-c", "echo 'cannot parse pings' >&2; exit 2"])
    proc = run_step(m, "--output", tmp_path / "out", "--json")
    assert proc.returncode == 1
    doc = one_json_document(proc.stdout)
    assert doc["status"] == "failed" and doc["outputs"] == []
    assert doc["failure"]["kind"] == "exit_code" and doc["failure"]["exit_code"] == 2
    assert "cannot parse pings" in doc["failure"]["message"]
    assert_iso_with_zone(doc["finished_at"])
    assert "failed (exit_code)" in proc.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--input", "pings"], "--input 'pings': expected NAME=PATH"),
        (["--input", "=x.csv"], "--input '=x.csv': expected NAME=PATH"),
        (["--input", "pings="], "--input 'pings=': expected NAME=PATH"),
        (["--input", "pings=a.csv", "--input", "pings=b.csv"], "--input pings: given twice"),
        (["--input", "nope=a.csv"], "inputs.nope: the manifest declares no input slot 'nope'"),
        (["--param", "n"], "--param 'n': expected KEY=VALUE"),
        (["--param", "n=five"], "parameters.n: 'five' is not of type 'integer'"),
    ],
    ids=["no-equals", "no-name", "no-path", "twice", "unknown-slot", "param-no-equals", "param-type"],
)
def test_bad_command_line_is_invalid_input(busybox_image: str, tmp_path: Path, args: list[str], expected: str) -> None:
    (tmp_path / "a.csv").write_text("x\n")
    m = write_manifest(
        tmp_path / "m.json",
        name="cli-bad",
        image=busybox_image,
        command=["true"],
        parameters={"type": "object", "properties": {"n": {"type": "integer"}}},
        inputs=[{"name": "pings", "format": "csv", "required": False}],
    )
    proc = subprocess.run([*ALGODOCK, "run-step", str(m), *args, "--output", str(tmp_path / "out"), "--json"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 1
    doc = one_json_document(proc.stdout)
    assert doc["status"] == "failed" and doc["failure"]["kind"] == "invalid_input"
    assert expected in doc["failure"]["message"]
    assert "Traceback" not in proc.stderr

    plain = subprocess.run([*ALGODOCK, "run-step", str(m), *args, "--output", str(tmp_path / "out2")], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert plain.returncode == 1 and plain.stdout == ""
    assert f"error: {expected}" in plain.stderr and "failed (invalid_input)" in plain.stderr


def test_invalid_manifest_is_reported_in_json(tmp_path: Path) -> None:
    m = tmp_path / "m.json"
    m.write_text(json.dumps({"manifest_version": "0.1", "name": "x", "version": "1", "container_parameters": {"image": "x:1", "command": []}}))
    proc = run_step(m, "--output", tmp_path / "out", "--json")
    assert proc.returncode == 1
    doc = one_json_document(proc.stdout)
    assert doc["failure"]["kind"] == "invalid_manifest"
    assert f"{m}: container_parameters.command" in doc["failure"]["message"]


def test_sigterm_removes_the_running_container(busybox_image: str, tmp_path: Path, docker_client: Any, no_container_left: list[str]) -> None:
    no_container_left.append("cli-term")
    m = write_manifest(tmp_path / "m.json", name="cli-term", image=busybox_image, command=["sh", "-c", "echo READY; exec sleep 120"])
    proc = subprocess.Popen([*ALGODOCK, "run-step", str(m), "--output", str(tmp_path / "out")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # the container printed READY: it is running
            if "READY" in line:
                break
        # all=True: the engine's list can lag behind a just-started container; inspect does not.
        found = docker_client.containers.list(all=True, filters={"label": f"{LABEL}.step_id=cli-term"})
        assert [c.status for c in found] == ["running"]
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) != 0
        assert time.monotonic() - t0 < 20
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert docker_client.containers.list(all=True, filters={"label": f"{LABEL}.step_id=cli-term"}) == []


PEAK_RSS = r"""
import json, resource, subprocess, sys, time
t0 = time.monotonic()
proc = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
print(json.dumps({
    "returncode": proc.returncode,
    "stdout": proc.stdout.decode(),
    "seconds": time.monotonic() - t0,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
}))
"""


def test_400_mb_log_flood_through_run_step_keeps_its_head_and_tail(busybox_image: str, tmp_path: Path, no_container_left: list[str]) -> None:
    no_container_left.append("cli-flood")
    size = 400_000_000
    m = write_manifest(
        tmp_path / "m.json",
        name="cli-flood",
        image=busybox_image,
        command=["sh", "-c", f"yes 0123456789012345678901234567890123456789 | head -c {size}; echo; echo flood-done"],
        container={"timeout_seconds": 600},
    )
    log_file = tmp_path / "flood.log"
    wrapper = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, *ALGODOCK, "run-step", str(m), "--output", str(tmp_path / "out"), "--log-file", str(log_file), "--json"],
        capture_output=True, text=True, timeout=900, cwd=REPO,
    )
    assert wrapper.returncode == 0, wrapper.stderr
    report = json.loads(wrapper.stdout)
    print(f"\n400 MB log flood: {report['seconds']:.1f} s, peak RSS {report['peak_rss_mb']:.0f} MB")
    assert report["returncode"] == 0, report["stdout"]
    assert one_json_document(report["stdout"])["status"] == "succeeded"
    # Its memory and time against a quiet step and raw `docker run` are bench/log_flood.py's.
    # The log keeps its head and its tail, 64 MiB in all, and says what it dropped (docs/contract.md §6).
    assert log_file.stat().st_size <= 64 * 1024 * 1024
    with open(log_file, "rb") as fh:
        assert fh.read(41) == b"0123456789012345678901234567890123456789\n"
        fh.seek(-len("flood-done\n"), os.SEEK_END)
        assert fh.read() == b"flood-done\n"
    with open(log_file, "rb") as fh:
        fh.seek(32 * 1024 * 1024 - 1024)
        middle = fh.read(4096)
    dropped = size + len("\nflood-done\n") - (log_file.stat().st_size - len(middle.split(b"\n[algodock] ")[1].split(b"\n")[0]) - len("\n[algodock] \n"))
    assert f"[algodock] {dropped} bytes of log dropped here".encode() in middle
