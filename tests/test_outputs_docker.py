"""Hostile outputs through a real container (docs/contract.md §3, 0.2), on the local store and on S3.

Each algorithm here is a busybox ``sh -c`` script that leaves something §3 forbids in its
output folder. The step must end as ``invalid_output``, nothing may be followed, hashed or
uploaded, and the failed attempt kept for debugging holds only regular files and folders.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import uuid
from pathlib import Path
from typing import Any

import pytest

from algodock.contract.manifest import parse_manifest
from algodock.runtime.runner import run_step
from algodock.store.backends import LocalStore, S3Store, s3_filesystem, step_rel
from tests.lineage_support import manifest as write_manifest
from tests.lineage_support import run_local, sh

pytestmark = pytest.mark.docker

ALGO_OUTPUT = "/work/output/algo_output.json"


def _entries(*entries: tuple[str, str, str]) -> str:
    doc = {"status": "success", "output_data": [{"name": n, "format": f, "path": p} for n, f, p in entries]}
    return f"echo '{json.dumps(doc)}' > {ALGO_OUTPUT}"


HOSTILE = {
    "symlink-to-etc-passwd-undeclared": ("echo x > /work/output/v.csv; ln -s /etc/passwd /work/output/notes", "notes is a symlink leading outside"),
    "symlink-inside": ("mkdir /work/output/d; echo x > /work/output/d/v.csv; ln -s d/v.csv /work/output/v.csv", "v.csv is a symlink"),
    "fifo": ("echo x > /work/output/v.csv; mkfifo /work/output/pipe", "pipe is a FIFO"),
    "newline-name": ("echo x > /work/output/v.csv; echo y > \"/work/output/a\nb\"", "control character"),
    "oversized-algo-output": (f"echo x > /work/output/v.csv; head -c 1100000 /dev/zero | tr '\\0' ' ' > {ALGO_OUTPUT}; echo '{{}}' >> {ALGO_OUTPUT}", "the limit is 1048576"),
    "two-outputs-one-path": ("echo x > /work/output/t.csv; " + _entries(("v", "csv", "t.csv"), ("w", "csv", "./t.csv")), "both name 't.csv'"),
    "one-output-inside-another": ("mkdir /work/output/d; echo x > /work/output/d/w.csv; " + _entries(("v", "csv", "d"), ("w", "csv", "d/w.csv")), "'d/w.csv' is inside 'd'"),
}


@pytest.mark.parametrize(("script", "expected"), list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_output_folders_are_invalid_output(docker_client: Any, busybox_image: str, tmp_path: Path, script: str, expected: str) -> None:
    outputs = [{"name": "v", "format": "csv"}, {"name": "w", "format": "csv", "required": False}]
    m = parse_manifest({
        "manifest_version": "0.1", "name": "hostile", "version": "1",
        "container_parameters": {"image": busybox_image, "command": ["sh", "-c", script], "timeout_seconds": 20},
        "outputs": outputs,
    })
    result = run_step(m, output_dir=tmp_path / "out", client=docker_client)
    assert result.failure is not None and result.failure.kind == "invalid_output", (result.failure, result.log_tail)
    assert expected in result.failure.message
    assert result.outputs == []


@pytest.mark.parametrize("staging", ["bind", "volume"])
def test_a_hard_link_inside_the_output_folder_is_two_regular_files(docker_client: Any, busybox_image: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, staging: str) -> None:
    monkeypatch.setenv("ALGODOCK_STAGING", staging)
    m = parse_manifest({
        "manifest_version": "0.1", "name": "hardlink", "version": "1",
        "container_parameters": {"image": busybox_image, "command": ["sh", "-c", "echo x > /work/output/v.csv; ln /work/output/v.csv /work/output/copy"], "timeout_seconds": 60},
        "outputs": [{"name": "v", "format": "csv"}],
    })
    result = run_step(m, output_dir=tmp_path / "out", client=docker_client)
    assert result.ok, result.failure
    out = tmp_path / "out"
    for name in ("v.csv", "copy"):
        assert stat.S_ISREG((out / name).lstat().st_mode) and (out / name).read_bytes() == b"x\n", name
    assert [(o.name, o.sha256) for o in result.outputs] == [("v", hashlib.sha256(b"x\n").hexdigest())]


LEAK = "echo x > /work/output/v.csv; mkdir /work/output/debug; ln -s /etc/passwd /work/output/debug/passwd; ln -s / /work/output/root; mkfifo /work/output/debug/pipe; echo keep > /work/output/debug/trace.txt"


def _pipeline(folder: Path, image: str) -> Path:
    write_manifest(folder / "leak.json", name="leak", image=image, command=sh(LEAK), inputs=[], outputs=[{"name": "v", "format": "csv"}])
    spec = folder / "pipeline.json"
    spec.write_text(json.dumps({"pipeline_version": "0.1", "name": "leaky", "inputs": {}, "steps": [{"id": "leak", "manifest": "leak.json"}]}))
    return spec


def test_symlinked_outputs_fail_alike_on_the_local_store_and_nothing_is_kept_but_regular_files(docker_client: Any, busybox_image: str, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    doc = run_local(_pipeline(tmp_path, busybox_image), store, "r1", docker_client)
    [step] = doc.steps
    assert step.failure is not None and step.failure.kind == "invalid_output", step.failure
    [kept] = store.local_path(step_rel("r1", "leak"), "attempts").glob("1-*/failed-outputs")
    found = sorted(str(p.relative_to(kept)) for p in kept.rglob("*"))
    assert found == ["debug", "debug/trace.txt", "v.csv"], found
    everything = list(store.root.rglob("*"))
    assert not [p for p in everything if p.is_symlink() or not (p.is_file() or p.is_dir())], "no symlink or special file anywhere in the store"


def test_symlinked_outputs_fail_alike_on_s3_and_no_host_file_is_uploaded(docker_client: Any, busybox_image: str, tmp_path: Path, s3_endpoint: str) -> None:
    bucket = f"algodock-o-{uuid.uuid4().hex[:10]}"
    fs = s3_filesystem()
    fs.mkdir(bucket)
    store = S3Store(f"s3://{bucket}/st")
    doc = run_local(_pipeline(tmp_path, busybox_image), store, "r1", docker_client)
    [step] = doc.steps
    assert step.failure is not None and step.failure.kind == "invalid_output", step.failure
    keys = [k for k in fs.find(f"{bucket}/st/runs/r1/steps/leak/attempts") if "/failed-outputs/" in k and not k.endswith("._COMMITTED.json")]
    assert sorted(k.rsplit("failed-outputs/", 1)[1] for k in keys) == ["debug/trace.txt", "v.csv"], keys
    assert not any(b"root:x:0" in fs.cat_file(k) for k in fs.find(f"{bucket}/st")), "/etc/passwd was never uploaded"
