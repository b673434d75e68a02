"""`algodock cache explain`: for every kind of change of a step's cache key, the part named
(real runs through the engine's executor and cache, on a real Docker engine)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from algodock.lineage.explain import differences, explain
from algodock.store.backends import open_store
from tests.lineage_support import build_versioned, manifest, run_local, sh

pytestmark = pytest.mark.docker

TAG = "algodock-test/explain:1"
_SCRIPT = Path(sys.executable).parent / "algodock"
ALGODOCK = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "algodock.cli"]


def _pipeline(folder: Path, *, command: str = "cat /work/input/raw/* > /work/output/out.binary", env: dict | None = None, raw: str = "raw") -> Path:
    manifest(
        folder / "count.json", name="count", image=TAG, command=sh(command), env=env,
        inputs=[{"name": "raw", "format": "binary", "multiple": True}], outputs=[{"name": "out", "format": "binary"}],
        parameters={"type": "object", "properties": {"k": {"type": "integer", "default": 1}}, "additionalProperties": False},
    )
    spec = folder / "pipeline.json"
    spec.write_text(json.dumps({"pipeline_version": "0.1", "name": "explained", "inputs": {"raw": raw}, "steps": [{"id": "count", "manifest": "count.json", "inputs": {"raw": "inputs.raw"}}]}))
    return spec


def _parts(result: dict) -> list[tuple]:
    return [(c["part"], c.get("name") or c.get("slot"), c.get("change")) for c in result["differences"]]


def test_explain_names_the_changed_part_of_the_key_for_every_kind_of_change(tmp_path, docker_client, busybox_image) -> None:
    first_id = build_versioned(docker_client, TAG, "explain-1")
    store = open_store(str(tmp_path / "store"))
    folder = tmp_path / "p"
    (folder / "raw").mkdir(parents=True)
    (folder / "raw" / "a.bin").write_bytes(b"alpha\n")
    spec = _pipeline(folder)
    runs: dict[str, dict] = {}

    def run(run_id: str, **kwargs) -> dict:
        doc = run_local(spec, store, run_id, docker_client, **kwargs)
        assert doc.status == "succeeded", [(s.id, s.failure) for s in doc.steps]
        runs[run_id] = explain(store, run_id, "count")
        return runs[run_id]

    assert run("first")["verdict"] == "no_earlier_entry"
    cached = run("again")
    assert cached["verdict"] == "cached" and cached["reused"] == {"run_id": "first", "step": "count"}
    changed = run("param", overrides={"count": {"k": 2}})
    assert changed["compared_with"]["run_id"] == "again" and _parts(changed) == [("parameter", "k", None)]
    assert (changed["differences"][0]["old"], changed["differences"][0]["new"]) == (1, 2)
    second_id = build_versioned(docker_client, TAG, "explain-2")
    moved = run("moved", overrides={"count": {"k": 2}})
    assert _parts(moved) == [("image_id", None, None)]
    assert moved["differences"][0].items() >= {"old": first_id, "new": second_id, "old_tag": TAG, "new_tag": TAG}.items()
    spec = _pipeline(folder, command="cat /work/input/raw/* > /work/output/out.binary; true")
    assert _parts(run("command", overrides={"count": {"k": 2}})) == [("command", None, None)]
    spec = _pipeline(folder, command="cat /work/input/raw/* > /work/output/out.binary; true", env={"MODE": "fast"})
    assert _parts(run("env", overrides={"count": {"k": 2}})) == [("env", "MODE", None)]
    (folder / "raw" / "a.bin").write_bytes(b"beta\n")
    assert _parts(run("bytes", overrides={"count": {"k": 2}})) == [("input", "raw", "sha256")]
    (folder / "raw" / "a.bin").rename(folder / "raw" / "b.bin")
    renamed = run("renamed", overrides={"count": {"k": 2}})
    assert ("input", "raw", "renamed") in _parts(renamed)
    [rename] = [c for c in renamed["differences"] if c.get("change") == "renamed"]
    assert (rename["old"], rename["new"]) == (["/work/input/raw/a.bin"], ["/work/input/raw/b.bin"])
    shutil.copytree(folder / "raw", folder / "elsewhere")
    spec = _pipeline(folder, command="cat /work/input/raw/* > /work/output/out.binary; true", env={"MODE": "fast"}, raw="elsewhere")
    assert _parts(run("moved_input", overrides={"count": {"k": 2}})) == [("input", "raw", "source_uri")]
    forced = run("forced", overrides={"count": {"k": 2}}, use_cache=False)
    assert forced["verdict"] == "no_cache" and _parts(forced) == [("no_cache", None, None)]
    build_versioned(docker_client, TAG, "explain-1")


def test_differences_of_gpu_and_of_inputs_added_or_removed() -> None:
    old = {"image_id": "sha256:a", "gpu": 0, "inputs": {"a": {"sha256": "1", "source_uri": "/x", "files": ["f"]}}}
    new = {"image_id": "sha256:a", "gpu": 1, "inputs": {"b": {"sha256": "2", "source_uri": "/y", "files": ["f"]}}}
    assert [(c["part"], c.get("slot"), c.get("change")) for c in differences(old, new)] == [("gpu", None, None), ("input", "a", "removed"), ("input", "b", "added")]


def test_explain_command_text_json_and_bad_input(tmp_path, docker_client, busybox_image) -> None:
    build_versioned(docker_client, TAG, "explain-1")
    store = open_store(str(tmp_path / "store"))
    folder = tmp_path / "p"
    (folder / "raw").mkdir(parents=True)
    (folder / "raw" / "a.bin").write_bytes(b"alpha\n")
    spec = _pipeline(folder)
    run_local(spec, store, "one", docker_client)
    run_local(spec, store, "two", docker_client, overrides={"count": {"k": 5}})

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*ALGODOCK, "cache", "explain", *args, "--store", store.uri()], capture_output=True, text=True, timeout=120)

    text = cli("two", "count")
    assert text.returncode == 0 and "parameter k: 1 -> 5" in text.stdout, text.stdout + text.stderr
    doc = json.loads(cli("two", "count", "--json").stdout)
    assert doc["verdict"] == "key_changed" and doc["compared_with"]["run_id"] == "one"
    for args, named in ((("nope", "count"), "nope"), (("two", "nope"), "nope")):
        bad = cli(*args)
        assert bad.returncode == 2 and named in bad.stderr and not bad.stdout
