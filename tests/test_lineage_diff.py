"""`algodock lineage diff RUN_A RUN_B`: two runs side by side, step by step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from algodock.records import InputRecord, LineageDocument, OutputRecord, StepRecord, Usage
from algodock.store.backends import lineage_rel, open_store

_SCRIPT = Path(sys.executable).parent / "algodock"
ALGODOCK = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "algodock.cli"]


def _step(step_id: str, *, image: str = "1", k: int = 1, out: str = "a", status: str = "succeeded") -> StepRecord:
    return StepRecord(
        id=step_id, status=status, image="t:1", image_id="sha256:" + image * 64, parameters={"k": k},
        inputs=[InputRecord(name="raw", uri="/data/raw", sha256="f" * 64)],
        outputs=[OutputRecord(name="out", uri=f"/store/{step_id}", sha256=out * 64, format="binary")],
        usage=Usage(peak_memory_bytes=2**20, cpu_seconds=0.1, wall_seconds=1.0),
    )


def _store(tmp_path: Path):
    store = open_store(str(tmp_path / "store"))
    docs = {
        "a": LineageDocument(run_id="a", pipeline="p", spec_sha256="0", store=store.uri(), status="succeeded", steps=[_step("same"), _step("changed"), _step("gone")]),
        "b": LineageDocument(run_id="b", pipeline="p", spec_sha256="0", store=store.uri(), status="succeeded",
                             steps=[_step("same"), _step("changed", image="2", k=2, out="b", status="succeeded"), _step("new", status="cached")]),
    }
    for run_id, doc in docs.items():
        store.write_json(lineage_rel(run_id), doc.model_dump(mode="json"))
    return store


def test_lineage_diff_side_by_side(tmp_path) -> None:
    from algodock.lineage.diff import diff_runs

    result = diff_runs(_store(tmp_path), "a", "b")
    rows = {r["step"]: r for r in result["steps"]}
    assert [r["step"] for r in result["steps"]] == ["same", "changed", "gone", "new"]
    assert rows["same"]["same"] == {"image_id": True, "parameters": True, "inputs": True, "outputs": True, "status": True}
    assert rows["changed"]["same"] == {"image_id": False, "parameters": False, "inputs": True, "outputs": False, "status": True}
    assert (rows["changed"]["a"]["parameters"], rows["changed"]["b"]["parameters"]) == ({"k": 1}, {"k": 2})
    assert (rows["gone"]["in"], rows["gone"]["b"], rows["new"]["in"], rows["new"]["a"]) == ("a", None, "b", None)
    assert rows["new"]["b"]["status"] == "cached" and rows["same"]["a"]["usage"]["wall_seconds"] == 1.0
    assert result["identical_outputs"] is False


def test_lineage_diff_command(tmp_path) -> None:
    store = _store(tmp_path)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*ALGODOCK, "lineage", "diff", *args, "--store", store.uri()], capture_output=True, text=True, timeout=120)

    text = cli("a", "b")
    assert text.returncode == 0, text.stderr
    assert "gone: only in a (succeeded)" in text.stdout and "new: only in b (cached)" in text.stdout
    assert "parameters  ≠ k: 1 | 2" in text.stdout and "image id    = " in text.stdout
    doc = json.loads(cli("a", "b", "--json").stdout)
    assert doc["run_a"] == "a" and len(doc["steps"]) == 4
    bad = cli("a", "nope")
    assert bad.returncode == 2 and "nope" in bad.stderr
