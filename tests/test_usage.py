"""Usage accounting against known loads: the figures come from the kernel, so they must match."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from algodock.contract import parse_manifest
from algodock.runner import run_step
from algodock.usage import Usage, cgroup_files, output_totals, sizing_hint, suggest_memory_gb
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
    assert result.summary()["usage"]["peak_memory_bytes"] == peak


def test_cpu_seconds_of_a_two_second_burn(docker_client: Any, base_image: str, tmp_path: Path) -> None:
    code = "import time\nwhile time.process_time() < 2.0: pass\nopen('/work/output/x.txt', 'w').write('a' * 1000)"
    result = _run(docker_client, base_image, code, tmp_path / "out")
    assert result.ok, result.failure
    u = result.usage
    assert u.cpu_seconds is not None and abs(u.cpu_seconds - 2.0) <= 0.3, u
    assert u.wall_seconds is not None and u.wall_seconds >= 2.0
    assert (u.output_bytes, u.output_files) == (1000, 1)
    assert u.source in ("cgroup-v1", "cgroup-v2")


def test_stats_api_fallback_reports_figures_or_none(docker_client: Any, base_image: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A remote engine has no local cgroup: the stats API answers (samples about once a second)."""
    import algodock.usage as usage

    monkeypatch.setattr(usage, "cgroup_files", lambda pid: None)
    code = "import time\nb = b'\\x01' * (200 * 1024 * 1024)\nwhile time.process_time() < 2.5: pass"
    result = _run(docker_client, base_image, code, tmp_path / "out")
    assert result.ok, result.failure
    u = result.usage
    assert u.source == "stats-api"
    # The last sample may be up to ~1 s before the exit: loose bounds, but figures, not guesses.
    assert u.cpu_seconds is not None and 1.0 <= u.cpu_seconds <= 2.8, u
    assert u.peak_memory_bytes is not None and u.peak_memory_bytes >= 150 * MiB, u


def test_oom_reports_the_peak_and_the_limit(docker_client: Any, base_image: str, tmp_path: Path) -> None:
    code = "b = b'\\x01' * (400 * 1024 * 1024)"
    result = _run(docker_client, base_image, code, tmp_path / "out", memory_gb=0.25)
    assert result.failure is not None and result.failure.kind == "oom", result.failure
    assert "peak" in str(result.failure) and "256 MiB" in str(result.failure), str(result.failure)
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
