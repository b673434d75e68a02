"""The JSON Schemas in schemas/ are exactly what the pydantic models export, and they work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from algodock.contract.manifest import CONTRACT_VERSION, parse_manifest
from algodock.schemas import DRAFT, build_schemas, export_schemas, render, stale_schemas
from tests.test_contract import GOOD as CONTRACT_EXAMPLE

REPO = Path(__file__).resolve().parents[1]
SCHEMAS = REPO / "schemas"
EXAMPLE_MANIFESTS = sorted((REPO / "examples").glob("*/manifest.json"))

# docs/contract.md §1's example manifest.
GOOD = CONTRACT_EXAMPLE


def _validator(name: str) -> Draft202012Validator:
    return Draft202012Validator(json.loads((SCHEMAS / name).read_text()))


def test_committed_schemas_equal_a_fresh_export(tmp_path: Path) -> None:
    written = export_schemas(tmp_path)
    assert {p.name for p in written} >= {"manifest.schema.json", "algo_input.schema.json", "algo_output.schema.json"}
    for path in written:
        committed = SCHEMAS / path.name
        assert committed.exists(), f"{committed} is missing: run `python -m algodock.schemas`"
        assert committed.read_text() == path.read_text(), f"{committed} is stale: run `python -m algodock.schemas`"
    assert stale_schemas(SCHEMAS) == []


def test_export_is_deterministic_and_well_formed(tmp_path: Path) -> None:
    first = {p.name: p.read_text() for p in export_schemas(tmp_path / "a")}
    second = {p.name: p.read_text() for p in export_schemas(tmp_path / "b")}
    assert first == second
    for name, text in first.items():
        assert text.endswith("}\n") and not text.endswith("\n\n")
        doc = json.loads(text)
        assert text == render(doc)  # sorted keys, indent 2
        assert doc["$schema"] == DRAFT
        assert CONTRACT_VERSION in doc["$id"] and CONTRACT_VERSION in doc["title"]
        Draft202012Validator.check_schema(doc)


def test_every_document_has_a_schema() -> None:
    assert set(build_schemas()) == {f"{n}.schema.json" for n in ("manifest", "algo_input", "algo_output", "pipeline", "lineage")}


def test_the_lineage_schema_is_what_is_written() -> None:
    """Fields kept only in memory while a step runs (local paths, the log tail) are not in it."""
    text = render(build_schemas()["lineage.schema.json"])
    for private in ('"container_id"', '"log_tail"', '"multiple"', '"files"'):
        assert private not in text

def test_check_names_stale_files_and_exits_1(tmp_path: Path) -> None:
    export_schemas(tmp_path)
    cmd = [sys.executable, "-m", "algodock.schemas", "--check", "--dest", str(tmp_path)]
    ok = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0, ok.stderr

    (tmp_path / "manifest.schema.json").write_text("{}\n")
    (tmp_path / "algo_input.schema.json").unlink()
    (tmp_path / "old.schema.json").write_text("{}\n")
    bad = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 1
    assert "manifest.schema.json: differs" in bad.stderr
    assert "algo_input.schema.json: missing" in bad.stderr
    assert "old.schema.json: no model exports it" in bad.stderr

    fix = subprocess.run([sys.executable, "-m", "algodock.schemas", "--dest", str(tmp_path)], capture_output=True, text=True, cwd=REPO)
    assert fix.returncode == 0 and "manifest.schema.json" in fix.stdout
    assert stale_schemas(tmp_path) == [f"{tmp_path / 'old.schema.json'}: no model exports it any more"]


def test_manifest_schema_accepts_the_contract_example_and_rejects_what_the_model_rejects() -> None:
    v = _validator("manifest.schema.json")
    assert list(v.iter_errors(GOOD)) == []
    parse_manifest(GOOD)  # the model agrees
    bad_cases = [
        {**GOOD, "nmae": "typo"},
        {**GOOD, "name": "Bad Name"},
        {**GOOD, "manifest_version": "0.4"},
        {**GOOD, "container_parameters": {**GOOD["container_parameters"], "command": []}},
        {**GOOD, "container_parameters": {**GOOD["container_parameters"], "env": {"ALGORITHM_INPUT_PATH": "/x"}}},
        {**GOOD, "container_parameters": {**GOOD["container_parameters"], "resource_request": {"cpu_millicore": 0}}},
        {**GOOD, "parameters": {"type": "nope"}},
        {**GOOD, "outputs": [{"name": "v", "format": "xlsx"}]},
    ]
    for doc in bad_cases:
        assert list(v.iter_errors(doc)), f"schema accepted {doc}"


def test_algo_io_schemas_accept_what_the_contract_shows() -> None:
    algo_input = {
        "version": "0.1.0",
        "input_data_path": "/work/input",
        "output_path": "/work/output",
        "config": {"parameters": {"look_back_time": 3600}},
        "input_data": [
            {
                "name": "pings",
                "format": "parquet",
                "path": "/work/input/pings",
                "files": ["/work/input/pings/part-000.parquet"],
                "source_uri": "s3://raw/pings/2026-11-27/",
                "sha256": "0" * 64,
            }
        ],
    }
    algo_output = {
        "version": "0.1.0",
        "status": "success",
        "output_data": [{"name": "visits", "format": "parquet", "path": "visits.parquet"}],
        "metrics": {"rows_in": 1000000, "visits": 5231},
        "message": "optional human-readable text",
    }
    assert list(_validator("algo_input.schema.json").iter_errors(algo_input)) == []
    out = _validator("algo_output.schema.json")
    assert list(out.iter_errors(algo_output)) == []
    assert list(out.iter_errors({**algo_output, "output_data": [{"name": "v", "format": "parquet"}]}))


@pytest.mark.parametrize("path", EXAMPLE_MANIFESTS, ids=lambda p: p.parent.name)
def test_example_manifests_validate_against_the_schema(path: Path) -> None:
    doc = json.loads(path.read_text())
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in _validator("manifest.schema.json").iter_errors(doc)]
    assert errors == []
    parse_manifest(doc, str(path))


def test_manifest_schema_knows_contract_0_2() -> None:
    v = _validator("manifest.schema.json")
    good = {**GOOD, "manifest_version": "0.2", "container_parameters": {**GOOD["container_parameters"], "output_mb": 100, "output_files": 10, "shm_mb": 64}}
    assert not list(v.iter_errors(good))
    for bad in ({"timeout_seconds": 604801}, {"output_mb": 0}, {"output_files": 0}, {"shm_mb": -1}):
        doc = {**GOOD, "container_parameters": {**GOOD["container_parameters"], **bad}}
        assert list(v.iter_errors(doc)), f"schema accepted {bad}"


PIPELINE = {
    "pipeline_version": "0.1",
    "name": "daily",
    "inputs": {"pings": "s3://raw/pings/"},
    "steps": [
        {"id": "visits", "manifest": "m.json", "inputs": {"pings": "inputs.pings"}},
        {"id": "stats", "block": "dwell-stats", "inputs": {"visits": "visits.visits"}, "after": ["visits"]},
    ],
}


def _step(**changed: object) -> dict[str, object]:
    """PIPELINE with its first step changed (a value of None removes the key)."""
    step = {k: v for k, v in {**PIPELINE["steps"][0], **changed}.items() if v is not None}  # type: ignore[dict-item]
    return {**PIPELINE, "steps": [step, PIPELINE["steps"][1]]}


def test_pipeline_schema_refuses_what_the_model_refuses() -> None:
    """An editor checking a spec against schemas/pipeline.schema.json must not pass one
    PipelineSpec refuses: input names (the pipeline's and a step's) and exactly one of
    manifest or block per step are in the schema too."""
    from pydantic import ValidationError

    from algodock.pipeline.spec import PipelineSpec

    v = _validator("pipeline.schema.json")
    assert list(v.iter_errors(PIPELINE)) == []
    PipelineSpec.model_validate(PIPELINE)  # the model agrees
    block_with_null_manifest = _step(manifest=None, block="visits")
    block_with_null_manifest["steps"][0]["manifest"] = None  # type: ignore[index]
    assert list(v.iter_errors(block_with_null_manifest)) == []  # null is "not given", for both
    PipelineSpec.model_validate(block_with_null_manifest)
    bad_cases = {
        "pipeline input named Pings": {**PIPELINE, "inputs": {"Pings": "s3://raw/pings/"}},
        "pipeline input named 'a b'": {**PIPELINE, "inputs": {"a b": "x/"}},
        "step input named -x": _step(inputs={"-x": "inputs.pings"}),
        "both manifest and block": _step(block="visits"),
        "neither manifest nor block": _step(manifest=None),
        "block null, manifest missing": _step(manifest=None, block=None) | {"steps": [{"id": "visits", "block": None}]},
    }
    for what, doc in bad_cases.items():
        with pytest.raises(ValidationError):
            PipelineSpec.model_validate(doc)
        assert list(v.iter_errors(doc)), f"the schema accepted a spec with {what}"
