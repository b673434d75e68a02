"""Usage accounting against known loads: the figures come from the kernel, so they must match."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from algodock.contract.manifest import parse_manifest
from algodock.runtime.runner import run_step
from algodock.runtime.usage import Usage, cgroup_files, output_totals, sizing_hint, suggest_memory_gb
from tests.conftest import REPO

pytestmark = pytest.mark.docker

MiB = 1024 * 1024


@pytest.fixture(scope="session")
def base_image(docker_client: Any) -> str:
    """The project's base image (python3 inside): no build needed for these loads."""
    path = REPO / ".build" / "base-image"
    name = path.read_text().strip() if path.exists() else "python:3.11-slim"
    docker_client.images.get(name)  # make base-image must have run
    return name


def _run(client: Any, image: str, code: str, out: Path, memory_gb: float = 1) -> Any:
    m = parse_manifest(
        {
            "manifest_version": "0.1",
            "name": "load",
            "version": "1",
            "container_parameters": {
                "image": image,
                "command": ["python3", "-c", code],
                "resource_request": {"cpu_millicore": 1000, "memory_gb": memory_gb},
                "timeout_seconds": 120,
            },
        }
    )
    return run_step(m, output_dir=out, client=client)


def test_peak_memory_of_300_mib_touched(docker_client: Any, base_image: str, tmp_path: Path) -> None:
    code = "import time; b = b'\\x01' * (300 * 1024 * 1024); time.sleep(0.3); print(len(b))"
    result = _run(docker_client, base_image, code, tmp_path / "out")
    assert result.ok, result.failure
    peak = result.usage.peak_memory_bytes
    assert peak is not None and abs(peak - 300 * MiB) <= 30 * MiB, peak
    assert result.step_summary()["usage"]["peak_memory_bytes"] == peak


def test_cpu_seconds_of_a_two_second_burn(docker_client: Any, base_image: str, tmp_path: Path) -> None:
    code = "import time\nwhile time.process_time() < 2.0: pass\nopen('/work/output/x.txt', 'w').write('a' * 1000)"
    result = _run(docker_client, base_image, code, tmp_path / "out")
    assert result.ok, result.failure
    u = result.usage
    assert u.cpu_seconds is not None and abs(u.cpu_seconds - 2.0) <= 0.3, u
    assert u.wall_seconds is not None and u.wall_seconds >= 2.0
    assert (u.output_bytes, u.output_files) == (1000, 1)


def test_stats_api_fallback_reports_figures_or_none(docker_client: Any, base_image: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A remote engine has no local cgroup: the stats API answers (samples about once a second)."""
    import algodock.runtime.usage as usage

    monkeypatch.setattr(usage, "cgroup_files", lambda pid: None)
    monkeypatch.setattr(usage, "container_cgroup_files", lambda container_id: None)
    code = "import time\nb = b'\\x01' * (200 * 1024 * 1024)\nwhile time.process_time() < 2.5: pass"
    result = _run(docker_client, base_image, code, tmp_path / "out")
    assert result.ok, result.failure
    u = result.usage
    # The last sample may be up to ~1 s before the exit: loose bounds, but figures, not guesses.
    assert u.cpu_seconds is not None and 1.0 <= u.cpu_seconds <= 2.8, u
    assert u.peak_memory_bytes is not None and u.peak_memory_bytes >= 150 * MiB, u


def test_a_short_container_is_measured_too(docker_client: Any, base_image: str, tmp_path: Path) -> None:
    result = _run(docker_client, base_image, "x = 1", tmp_path / "out")
    assert result.ok, result.failure
    assert result.usage.peak_memory_bytes and result.usage.cpu_seconds is not None, result.usage


def test_oom_reports_the_peak_and_the_limit(docker_client: Any, base_image: str, tmp_path: Path) -> None:
    code = "b = b'\\x01' * (400 * 1024 * 1024)"
    result = _run(docker_client, base_image, code, tmp_path / "out", memory_gb=0.25)
    assert result.failure is not None and result.failure.kind == "oom", result.failure
    assert "peak" in result.failure.message and "256 MiB" in result.failure.message, result.failure
    assert result.usage.peak_memory_bytes >= 200 * MiB


def test_cgroup_of_an_unknown_pid_is_none() -> None:
    assert cgroup_files(2**22 + 12345) is None


def test_output_totals_count_files_and_folders(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a").write_bytes(b"12345")
    (tmp_path / "b").write_bytes(b"xy")
    (tmp_path / "link").symlink_to("/etc/passwd")
    assert output_totals(tmp_path) == (7, 4)


def test_sizing_hints() -> None:
    assert sizing_hint(Usage(peak_memory_bytes=600 * MiB), 1) is None
    assert "would do" in sizing_hint(Usage(peak_memory_bytes=100 * MiB), 1)
    assert "raise" in sizing_hint(Usage(peak_memory_bytes=1000 * MiB), 1)
    assert sizing_hint(Usage(), 1) is None
    assert suggest_memory_gb(1) == 0.25 and suggest_memory_gb(1024**3) == 1.5


# ---------------------------------------------------------------- records, artifacts, history (no engine)


def _doc(run_id: str, peaks: list[int], started: int) -> Any:
    from datetime import datetime, timezone

    from algodock.records import LineageDocument, StepRecord

    steps = [
        StepRecord(
            id="visits",
            status="succeeded",
            algorithm="device-visits",
            image="algodock/device-visits:1.0.0",
            image_id="sha256:" + "ab" * 32,
            resource_request={"cpu_millicore": 1000, "memory_gb": 1, "gpu": 0},
            started_at=datetime(2026, 11, 1, started, tzinfo=timezone.utc),
            usage=Usage(peak_memory_bytes=p, cpu_seconds=1.0 + i, wall_seconds=2.0, output_bytes=100, output_files=2),
        )
        for i, p in enumerate(peaks)
    ]
    steps.append(StepRecord(id="stats", status="cached"))
    return LineageDocument(run_id=run_id, pipeline="p", spec_sha256="0" * 64, store="/s", steps=steps)


def test_usage_reaches_the_record_the_summary_and_the_table_artifact() -> None:
    from algodock.flows.artifacts import steps_table
    from algodock.records import StepRecord, record_from_result

    usage = Usage(peak_memory_bytes=300 * MiB, cpu_seconds=2.0, wall_seconds=2.5, output_bytes=1000, output_files=1)
    result = StepRecord(id="s", status="succeeded", image="x", usage=usage)
    record = record_from_result(StepRecord(id="s"), result)
    assert record.usage is not None and record.usage.peak_memory_bytes == 300 * MiB
    assert record.summary()["usage"] == usage.as_dict() == result.step_summary()["usage"]
    assert record.model_dump(mode="json")["usage"] == usage.as_dict()  # in the lineage document
    doc = _doc("r1", [300 * MiB], 1)
    row = steps_table(doc)[0]
    assert row["usage"] == "mem 300 MiB, cpu 1.00 s, wall 2.0 s, out 100 B/2"
    assert steps_table(doc)[1]["usage"] == ""


def test_usage_history_median_and_max_over_the_last_runs(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from algodock.authoring.history import usage_history
    from algodock.cli import main
    from algodock.store.backends import LocalStore, lineage_rel

    store = LocalStore(tmp_path)
    store.write_json(lineage_rel("r1"), _doc("r1", [100 * MiB], 1).model_dump(mode="json"))
    store.write_json(lineage_rel("r2"), _doc("r2", [300 * MiB], 2).model_dump(mode="json"))
    store.write_json(lineage_rel("r3"), _doc("r3", [200 * MiB], 3).model_dump(mode="json"))
    for target in ("visits", "device-visits", "algodock/device-visits:1.0.0", "sha256:" + "ab" * 8):
        summary = usage_history(store, target)
        assert summary["runs"] == 3, target
    peak = summary["figures"]["peak_memory_bytes"]
    assert (peak["median"], peak["max"]) == (200 * MiB, 300 * MiB)
    assert usage_history(store, "visits", last=2)["figures"]["peak_memory_bytes"]["median"] == 250 * MiB
    assert "would do" in summary["hint"]
    out = CliRunner().invoke(main, ["usage", "visits", "--store", str(tmp_path)])
    assert out.exit_code == 0 and "300 MiB" in out.output and "200 MiB" in out.output, out.output
    missing = CliRunner().invoke(main, ["usage", "nope", "--store", str(tmp_path)])
    assert missing.exit_code == 1 and "no run" in missing.output


def test_cgroup_v2_files_under_a_systemd_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import algodock.runtime.usage as usage

    monkeypatch.setattr(usage, "CGROUP_ROOT", tmp_path)
    d = tmp_path / "system.slice" / "docker-abc.scope"
    d.mkdir(parents=True)
    (d / "cgroup.controllers").write_text("cpu memory pids\n")
    (d / "memory.current").write_text("1000\n")
    (d / "cpu.stat").write_text("usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n")
    files = usage.cgroup_files_of("0::/system.slice/docker-abc.scope\n")
    assert files is not None and files.version == 2 and files.memory_peak is None  # a kernel without memory.peak
    sampler = usage.UsageSampler()
    assert sampler._sample_cgroup(files)
    (d / "memory.current").write_text("5000\n")
    sampler._sample_cgroup(files)
    (d / "memory.current").write_text("3000\n")
    sampler._sample_cgroup(files)
    assert (sampler.peak, sampler.cpu) == (5000, 2.5)  # the highest sampled memory.current
    (d / "memory.peak").write_text("7000\n")
    files = usage.cgroup_files_of("0::/system.slice/docker-abc.scope\n")
    assert files.memory_peak is not None and usage._read_int(files.memory_peak) == 7000
    for name in ("memory.current", "cpu.stat", "memory.peak", "cgroup.controllers"):
        (d / name).unlink()
    assert not sampler._sample_cgroup(files)  # the cgroup is gone: the last figures stand
    assert (sampler.peak, sampler.cpu) == (5000, 2.5)


def test_cgroup_v1_files_with_joined_cpu_controllers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import algodock.runtime.usage as usage

    monkeypatch.setattr(usage, "CGROUP_ROOT", tmp_path)
    mem = tmp_path / "memory" / "docker" / "abc"
    cpu = tmp_path / "cpu,cpuacct" / "docker" / "abc"
    mem.mkdir(parents=True)
    cpu.mkdir(parents=True)
    (mem / "memory.max_usage_in_bytes").write_text("314572800\n")
    (mem / "memory.usage_in_bytes").write_text("1000\n")
    (cpu / "cpuacct.usage").write_text("2000000000\n")
    files = usage.cgroup_files_of("12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n")
    assert files is not None and files.version == 1
    sampler = usage.UsageSampler()
    sampler._sample_cgroup(files)
    assert (sampler.peak, sampler.cpu) == (314572800, 2.0)
