"""`algodock lineage export RUN_ID --ro-crate`: a Provenance Run Crate that the `rocrate`
library loads, whose entities are what the lineage says (a real run on a real Docker engine)."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from rocrate.rocrate import ROCrate

from algodock.hashing import sha256_path
from algodock.lineage.crate import crate_id
from algodock.lineage.queries import read_document
from algodock.store.backends import local_path_of, open_store
from tests.lineage_support import STABLE, build_versioned, manifest, run_local, sh, write_table

pytestmark = pytest.mark.docker

_SCRIPT = Path(sys.executable).parent / "algodock"
ALGODOCK = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "algodock.cli"]
PROVENANCE = "https://w3id.org/ro/wfrun/provenance/0.5"


@pytest.fixture
def run(tmp_path, docker_client, busybox_image):
    build_versioned(docker_client, STABLE, "stable")
    folder = tmp_path / "p"
    folder.mkdir()
    write_table(folder / "raw.parquet", [1, 2, 3])
    manifest(folder / "copy.json", name="copy", image=STABLE, command=sh("cp /work/input/raw/* /work/output/table.parquet"),
             inputs=[{"name": "raw", "format": "parquet"}], outputs=[{"name": "table", "format": "parquet"}],
             parameters={"type": "object", "properties": {"label": {"type": "string", "default": "a"}, "n": {"type": "integer", "default": 3}}})
    manifest(folder / "stamp.json", name="stamp", image=STABLE, command=sh("cat /work/input/data/* /algo-version > /work/output/out.binary"),
             inputs=[{"name": "data", "format": "parquet"}], outputs=[{"name": "out", "format": "binary"}])
    spec = folder / "pipeline.json"
    spec.write_text(json.dumps({"pipeline_version": "0.1", "name": "crated", "inputs": {"raw": "raw.parquet"}, "steps": [
        {"id": "copy", "manifest": "copy.json", "inputs": {"raw": "inputs.raw"}, "parameters": {"label": "b"}},
        {"id": "stamp", "manifest": "stamp.json", "inputs": {"data": "copy.table"}}]}))
    store = open_store(str(tmp_path / "store"))
    assert run_local(spec, store, "rec", docker_client).status == "succeeded"
    return store


def _export(store, target: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ALGODOCK, "lineage", "export", "rec", "--ro-crate", str(target), "--store", store.uri(), *args], capture_output=True, text=True, timeout=120)


def _by_id(crate: ROCrate, entity_id: str):
    found = crate.get(entity_id)
    assert found is not None, f"no entity {entity_id} in the crate"
    return found


def _check_against_lineage(crate: ROCrate, store, *, with_data: bool) -> None:
    doc = read_document(store, "rec")
    root = crate.root_dataset
    assert PROVENANCE in [p["@id"] if isinstance(p, dict) else p.id for p in root["conformsTo"]]
    workflow = crate.mainEntity
    assert workflow["name"] == "crated" and "ComputationalWorkflow" in workflow.type
    assert [s["name"] for s in workflow["step"]] == ["copy", "stamp"]
    for step in doc.steps:
        action = _by_id(crate, f"#run-rec-{step.id}")
        assert action.type == "CreateAction" and action["instrument"]["name"] == step.algorithm
        image = action["containerImage"]
        assert image["sha256"] == step.image_id.removeprefix("sha256:") and image["tag"] == "1" and image["name"] == STABLE.split(":")[0]
        assert action["startTime"] == step.started_at.isoformat() and action["actionStatus"] == "http://schema.org/CompletedActionStatus"
        results = action["result"] if isinstance(action["result"], list) else [action["result"]]
        assert len(results) == len(step.outputs)
        for entity, out in zip(results, step.outputs):
            assert entity["sha256"] == out.sha256
            assert entity["contentSize"] == local_path_of(out.uri).stat().st_size
            if with_data:
                same = entity["sameAs"]
                assert getattr(same, "id", same) == crate_id(out.uri)
                assert entity.id == f"outputs/{step.id}/{out.uri.rsplit('/', 1)[-1]}"
            else:
                assert entity.id == crate_id(out.uri)
        objects = action["object"] if isinstance(action["object"], list) else [action["object"]]
        values = {o["name"]: o["value"] for o in objects if o.type == "PropertyValue"}
        assert values == {k: v for k, v in step.parameters.items()}
        inputs = [o for o in objects if o.type == "File"]
        assert [i["sha256"] for i in inputs] == [i.sha256 for i in step.inputs]
    assert _by_id(crate, "#run-rec-copy")["object"]  # parameters {"label": "b", "n": 3} after defaults
    assert {o["name"]: o["value"] for o in _by_id(crate, "#run-rec-copy")["object"] if o.type == "PropertyValue"} == {"label": "b", "n": 3}


def test_the_crate_loads_and_says_what_the_lineage_says(run, tmp_path) -> None:
    target = tmp_path / "crate"
    proc = _export(run, target)
    assert proc.returncode == 0, proc.stderr
    _check_against_lineage(ROCrate(str(target)), run, with_data=False)


def test_a_zip_with_data_carries_the_outputs(run, tmp_path) -> None:
    target = tmp_path / "crate.zip"
    proc = _export(run, target, "--with-data")
    assert proc.returncode == 0, proc.stderr
    with zipfile.ZipFile(target) as zf:
        names = zf.namelist()
        zf.extractall(tmp_path / "unzipped")
    assert "ro-crate-metadata.json" in names and "outputs/copy/table.parquet" in names and "outputs/stamp/out.binary" in names
    crate = ROCrate(str(target))
    _check_against_lineage(crate, run, with_data=True)
    doc = read_document(run, "rec")
    assert sha256_path(tmp_path / "unzipped" / "outputs/copy/table.parquet") == doc.step("copy").outputs[0].sha256


def test_export_bad_input_touches_nothing(run, tmp_path) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    proc = _export(run, taken)
    assert proc.returncode == 2 and str(taken) in proc.stderr and "exists" in proc.stderr
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    proc = subprocess.run([*ALGODOCK, "lineage", "export", "nope", "--ro-crate", str(tmp_path / "c"), "--store", run.uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "nope" in proc.stderr and not (tmp_path / "c").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("algodock-crate-")]
