"""Named-volume staging (for engines that cannot see this host's folders), against the real engine."""

from __future__ import annotations

import hashlib

import pytest

from algodock.contract.manifest import parse_manifest
from algodock.runtime.runner import run_step

pytestmark = pytest.mark.docker


def _manifest(image: str, script: str):
    return parse_manifest({
        "manifest_version": "0.1", "name": "vol", "version": "1",
        "container_parameters": {"image": image, "command": ["sh", "-c", script], "timeout_seconds": 60},
        "inputs": [{"name": "data", "format": "csv", "multiple": True}],
        "outputs": [{"name": "out", "format": "csv"}],
    })


@pytest.fixture
def volume_mode(monkeypatch):
    monkeypatch.setenv("ALGODOCK_STAGING", "volume")


def test_volume_mode_round_trip(tmp_path, docker_client, busybox_image, volume_mode):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.csv").write_text("1\n")
    (data / "sub" / "b.csv").write_text("2\n")
    script = "id -u > /work/output/uid; cat /work/input/data/a.csv /work/input/data/sub/b.csv > /work/output/out.csv; touch /work/input/x 2>/dev/null && echo WROTE-INPUT; true"
    result = run_step(_manifest(busybox_image, script), inputs={"data": data}, output_dir=tmp_path / "out", client=docker_client, on_log=print)
    assert result.ok, result.failure
    out = tmp_path / "out" / "out.csv"
    assert out.read_text() == "1\n2\n"
    assert result.outputs[0].sha256 == hashlib.sha256(b"1\n2\n").hexdigest()
    assert (tmp_path / "out" / "uid").read_text().strip() == "10001"  # never root, owns the output volume
    assert "WROTE-INPUT" not in "\n".join(result.log_tail)  # inputs read-only in volume mode too
    assert not docker_client.volumes.list(filters={"label": "io.algodock.step_id=vol"})


def test_volume_mode_rejects_a_symlink_leading_out(tmp_path, docker_client, busybox_image, volume_mode):
    (tmp_path / "d.csv").write_text("1\n")
    result = run_step(_manifest(busybox_image, "ln -s /etc/passwd /work/output/out.csv"), inputs={"data": tmp_path / "d.csv"}, output_dir=tmp_path / "out", client=docker_client)
    assert result.failure is not None and result.failure.kind == "invalid_output"
    assert not docker_client.volumes.list(filters={"label": "io.algodock.step_id=vol"})
