"""Named-volume staging (for engines that cannot see this host's folders), against the real engine."""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
from pathlib import Path

import pytest

from algodock.contract.manifest import parse_manifest
from algodock.errors import InvalidOutput, StepFailure
from algodock.runtime.runner import run_step
from algodock.runtime.volumes import extract_output_tar


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


@pytest.mark.docker
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


@pytest.mark.docker
def test_volume_mode_rejects_a_symlink_leading_out(tmp_path, docker_client, busybox_image, volume_mode):
    (tmp_path / "d.csv").write_text("1\n")
    result = run_step(_manifest(busybox_image, "ln -s /etc/passwd /work/output/out.csv"), inputs={"data": tmp_path / "d.csv"}, output_dir=tmp_path / "out", client=docker_client)
    assert result.failure is not None and result.failure.kind == "invalid_output"
    assert not docker_client.volumes.list(filters={"label": "io.algodock.step_id=vol"})


# ------------------------------------------------------------------ hostile outputs read back through the archive API


def _run(tmp_path, docker_client, busybox_image, script, outputs=None):
    m = parse_manifest({
        "manifest_version": "0.1", "name": "vol", "version": "1",
        "container_parameters": {"image": busybox_image, "command": ["sh", "-c", script], "timeout_seconds": 60},
        "outputs": outputs or [{"name": "out", "format": "csv"}],
    })
    return run_step(m, output_dir=tmp_path / "out", client=docker_client)


@pytest.mark.docker
def test_volume_mode_hard_link_is_kept_as_a_local_hard_link_not_a_traceback(tmp_path, docker_client, busybox_image, volume_mode):
    """Today: ``KeyError: linkname 'output/out.csv' not found`` escaped run_step."""
    result = _run(tmp_path, docker_client, busybox_image, "echo 1 > /work/output/out.csv; mkdir /work/output/d; ln /work/output/out.csv /work/output/d/again.csv")
    assert result.ok, result.failure
    out = tmp_path / "out"
    assert (out / "d" / "again.csv").read_text() == "1\n"
    assert os.stat(out / "d" / "again.csv").st_ino == os.stat(out / "out.csv").st_ino  # as the bind mode sees it
    assert not docker_client.volumes.list(filters={"label": "io.algodock.step_id=vol"})


@pytest.mark.docker
@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("echo 1 > /work/output/out.csv; mkfifo /work/output/pipe", "pipe is a FIFO"),
        ("echo 1 > /work/output/out.csv; ln -s out.csv /work/output/inside", "inside is a symlink"),
        ("echo 1 > /work/output/out.csv; echo 2 > \"/work/output/new\nline\"", "control character"),
    ],
    ids=["fifo", "symlink-inside", "newline-name"],
)
def test_volume_mode_special_entries_are_invalid_output(tmp_path, docker_client, busybox_image, volume_mode, script, expected):
    result = _run(tmp_path, docker_client, busybox_image, script)
    assert result.failure is not None and result.failure.kind == "invalid_output", result.failure
    assert expected in result.failure.message
    assert not any(p.is_symlink() or not (p.is_file() or p.is_dir()) for p in (tmp_path / "out").rglob("*"))


# ------------------------------------------------------------------ the extraction itself, on crafted archives


def _tar(*members: tuple[str, str, bytes | str]) -> list[bytes]:
    """A tar stream as the engine sends it (rooted at ``output/``), in small chunks."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                assert isinstance(data, bytes)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE, "chr": tarfile.CHRTYPE, "fifo": tarfile.FIFOTYPE}[kind]
            if kind in ("sym", "hard"):
                info.linkname = str(data)
            tar.addfile(info)
    raw = buf.getvalue()
    return [raw[i : i + 700] for i in range(0, len(raw), 700)]


def _extract(tmp_path, chunks, **limits):
    kw = {"max_bytes": 1 << 30, "max_entries": 1000, **limits}
    extract_output_tar(chunks, tmp_path / "x", **kw)
    return tmp_path / "x"


def test_extract_writes_regular_files_and_folders(tmp_path):
    out = _extract(tmp_path, _tar(("output", "dir", ""), ("output/a.csv", "file", b"a" * 5000), ("output/d/e/b.csv", "file", b"b"), ("output/d/h.csv", "hard", "output/a.csv")))
    assert (out / "a.csv").read_bytes() == b"a" * 5000 and (out / "d" / "e" / "b.csv").read_bytes() == b"b"
    assert os.stat(out / "d" / "h.csv").st_ino == os.stat(out / "a.csv").st_ino
    assert oct(os.stat(out / "a.csv").st_mode & 0o777) == "0o644"


@pytest.mark.parametrize(
    ("members", "expected"),
    [
        ([("output/l", "sym", "/etc/passwd")], "l is a symlink"),
        ([("output/null", "chr", "")], "null is a device file"),
        ([("output/p", "fifo", "")], "p is a FIFO"),
        ([("output/h", "hard", "/etc/passwd")], "hard link to '/etc/passwd'"),
        ([("output/h", "hard", "output/later"), ("output/later", "file", b"x")], "not a regular file of the output folder"),
        ([("output/d", "dir", ""), ("output/h", "hard", "output/d")], "not a regular file of the output folder"),
        ([("output/../../etc/cron.d/x", "file", b"x")], "outside the output folder"),
        ([("/etc/x", "file", b"x")], "outside output/"),
        ([("output/a\nb", "file", b"x")], "control character"),
        ([("output/a", "file", b"1"), ("output/a", "file", b"2")], "appears twice"),
        ([("output/a", "file", b"1"), ("output/a/b", "file", b"2")], "but it is a file"),
    ],
    ids=["symlink", "device", "fifo", "hardlink-out", "hardlink-forward", "hardlink-to-dir", "dotdot", "absolute", "newline", "duplicate", "file-as-folder"],
)
def test_extract_refuses_what_the_contract_forbids(tmp_path, members, expected):
    cell = tmp_path / "jail" / "cell"  # deep enough that "../../" from the output folder still lands in tmp_path
    with pytest.raises(InvalidOutput, match=re.escape(expected)):
        _extract(cell, _tar(*members))
    out = cell / "x"
    assert _written_outside(tmp_path, out) == [], "the refused archive wrote outside the output folder"
    for name, _, _ in members:  # where each name lands if taken as it is (an absolute one: this host's own path)
        landing = Path(os.path.normpath(out / name.removeprefix("output/")))
        assert landing.is_relative_to(out) or not os.path.lexists(landing), f"{name!r} was written to {landing}"
    assert not any(p.is_symlink() for p in out.rglob("*"))


def _written_outside(top: Path, out: Path) -> list[str]:
    """Every file, link or folder under ``top`` that is neither ``out``, inside it, nor a folder on the way to it."""
    on_the_way = {top, *(p for p in out.parents if p.is_relative_to(top))}
    found = []
    for folder, dirs, files in os.walk(top):  # never follows a symlink
        for name in dirs + files:
            path = Path(folder) / name
            if path not in on_the_way and not path.is_relative_to(out):
                found.append(str(path.relative_to(top)))
    return sorted(found)


def test_extract_is_bounded_by_output_mb_and_output_files(tmp_path):
    big = _tar(("output/a", "file", b"x" * 3000), ("output/b", "file", b"x" * 3000))
    with pytest.raises(StepFailure, match="more than output_mb") as info:
        extract_output_tar(big, tmp_path / "x", max_bytes=5000, max_entries=10)
    assert info.value.kind == "disk_limit"  # CONTRACT 0.2 on; invalid_output before it
    assert not (tmp_path / "x" / "b").exists(), "stopped before writing past the limit"
    many = _tar(*[(f"output/f{i}", "file", b"") for i in range(5)])
    with pytest.raises(StepFailure, match="more than output_files=3") as info:
        extract_output_tar(many, tmp_path / "y", max_bytes=5000, max_entries=3)
    assert info.value.kind == "disk_limit"


def test_extract_of_a_truncated_or_garbage_stream_is_invalid_output(tmp_path):
    chunks = _tar(("output/a", "file", b"x" * 3000))
    with pytest.raises(InvalidOutput):
        _extract(tmp_path, [b"".join(chunks)[:1000]])
    with pytest.raises(InvalidOutput):
        extract_output_tar([b"\x00garbage" * 100], tmp_path / "z", max_bytes=10, max_entries=10)
