"""Property tests: whatever a manifest, pipeline spec, parameter or algo_output.json holds,
algodock either accepts it or raises the error docs/contract.md §4 names for it; never another
exception (a traceback is a bug).

Profiles: ``ci`` (the default, bounded: runs in ``make test``) and ``fuzz`` (long: ``make fuzz``,
``HYPOTHESIS_PROFILE=fuzz``). Generators: arbitrary JSON values, documents generated from the
exported JSON Schemas (hypothesis-jsonschema), and valid documents with one field replaced.
"""

from __future__ import annotations

import copy
import json
import os
import re
import string
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema
from jsonschema import Draft202012Validator
from pydantic import ValidationError

from algodock.contract.documents import TOO_DEEP
from algodock.contract.manifest import AlgoOutput, Manifest, load_manifest, parse_manifest
from algodock.contract.params import parse_assignments, resolve_parameters
from algodock.errors import InvalidInput, InvalidManifest, InvalidOutput, MissingOutput
from algodock.pipeline import build_pipeline, parse_overrides
from algodock.pipeline.spec import PipelineSpec
from algodock.runtime.outputs import MAX_ALGO_OUTPUT_BYTES, read_algo_output

REPO = Path(__file__).resolve().parents[1]
SCHEMAS = REPO / "schemas"

settings.register_profile(
    "ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large]
)
settings.register_profile(
    "fuzz", max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large]
)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)

SCHEMA_EXAMPLES = min(settings.default.max_examples, 500)
"""Examples of a test whose documents hypothesis-jsonschema generates from an exported schema:
0.1-1 s each (the pipeline schema the slowest; 1000 took 17 min on a loaded machine), so the
fuzz profile's 5000 would run for hours; 500 keep ``make fuzz`` to about 20 min, ``ci`` keeps its 60."""

schema_generated = pytest.mark.timeout(1800 if PROFILE == "fuzz" else 600)
"""Their per-test timeout: pyproject's 600 s is for ``make test``; 500 generated documents on a
loaded machine can take longer, and a fuzz run that stops at a timeout has shown nothing."""

VALID_MANIFEST: dict[str, Any] = {
    "manifest_version": "0.1",
    "name": "fuzz",
    "version": "1.0.0",
    "container_parameters": {
        "image": "busybox:1",
        "command": ["true"],
        "resource_request": {"cpu_millicore": 1000, "memory_gb": 1, "gpu": 0},
        "timeout_seconds": 60,
    },
    "parameters": {"type": "object", "properties": {"k": {"type": "integer", "default": 1}}, "additionalProperties": False},
    "inputs": [{"name": "data", "format": "parquet", "required": True}],
    "outputs": [{"name": "result", "format": "parquet", "required": True}],
}

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)


def _local(schema: Any) -> Any:
    """``schema`` with remote ``$ref``s (the JSON Schema meta-schema of ``parameters``) replaced
    by ``{"type": "object"}``: the generator fetches nothing."""
    if isinstance(schema, dict):
        if str(schema.get("$ref", "")).startswith("http"):
            return {"type": "object"}
        return {k: _local(v) for k, v in schema.items()}
    if isinstance(schema, list):
        return [_local(v) for v in schema]
    return schema


def _schema(name: str) -> dict[str, Any]:
    schema = _local(json.loads((SCHEMAS / f"{name}.schema.json").read_text()))
    schema.pop("$id", None)  # a urn: id would become the base of the local "#/$defs/…" references
    return schema


PIPELINE_SCHEMA = Draft202012Validator(_schema("pipeline"))


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path inside ``doc`` (dict keys and list indexes)."""
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def mutated(draw: st.DrawFn, base: dict[str, Any]) -> dict[str, Any]:
    """``base`` with one value replaced by an arbitrary JSON value, or one key removed."""
    doc = copy.deepcopy(base)
    path = draw(st.sampled_from(_paths(doc)))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if isinstance(parent, dict) and draw(st.booleans()):
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(json_values)
    return doc


SCHEMA_SAMPLES = [
    {"type": "object"},
    VALID_MANIFEST["parameters"],
    {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "string", "default": "x"}}, "default": {}}}},
    {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "number"}, "default": [1]}}, "required": ["a"]},
    {"type": "object", "properties": {"a": {"$ref": "#/$defs/n"}}, "$defs": {"n": {"type": "integer", "minimum": 0, "default": 3}}},
    {"type": "object", "properties": {"a": {"pattern": "^[a-z]+$", "default": 5}}},
    {"type": "object", "properties": {"a": {"format": "date-time"}}},
]


# ---------------------------------------------------------------- manifests


@given(json_values)
def test_any_json_value_as_a_manifest(doc: Any) -> None:
    try:
        parse_manifest(doc, "fuzz.json")
    except InvalidManifest as exc:
        assert str(exc).startswith("fuzz.json")


@given(mutated(VALID_MANIFEST))
def test_a_manifest_with_one_field_changed(doc: dict[str, Any]) -> None:
    try:
        m = parse_manifest(doc, "fuzz.json")
    except InvalidManifest as exc:
        assert all(line.startswith("fuzz.json: ") for line in exc.errors), exc.errors
        return
    # Accepted: its parameters schema must be usable on any given parameters.
    _resolve_never_crashes(m, {"k": 1})


def _within_the_rules_beyond_the_schema(doc: dict[str, Any], parameters: dict[str, Any]) -> dict[str, Any]:
    """``doc`` made to keep the manifest rules a JSON Schema does not state: slot names unique
    within inputs and within outputs, no ``ALGORITHM_INPUT_PATH`` in ``env``, ``parameters``
    a valid JSON Schema (the generator reads its meta-schema as ``{"type": "object"}``), and a
    slot ``schema`` only on a parquet slot of a 0.3 manifest, its column names unique and its
    types in pyarrow's grammar (its structure, ``nullable`` and ``extra_columns`` stay as
    generated; the grammar is tested on its own in tests/test_slot_schema.py)."""
    doc = copy.deepcopy(doc)
    for key in ("inputs", "outputs"):
        if key in doc:
            firsts = {slot["name"]: slot for slot in reversed(doc[key])}
            doc[key] = [slot for slot in doc[key] if firsts[slot["name"]] is slot]
            for slot in doc[key]:
                if slot.get("schema") is None:
                    continue
                if doc.get("manifest_version") != "0.3" or slot.get("format", "parquet") != "parquet":
                    del slot["schema"]
                    continue
                columns = {c["name"]: c for c in reversed(slot["schema"].get("columns", []))}
                slot["schema"]["columns"] = [dict(c, type="int64") for c in slot["schema"].get("columns", []) if columns[c["name"]] is c]
    doc["container_parameters"].get("env", {}).pop("ALGORITHM_INPUT_PATH", None)
    if "parameters" in doc:
        doc["parameters"] = parameters
    return doc


@schema_generated
@settings(max_examples=SCHEMA_EXAMPLES, suppress_health_check=list(HealthCheck))
@given(from_schema(_schema("manifest")), st.sampled_from(SCHEMA_SAMPLES))
def test_documents_the_manifest_schema_allows_are_manifests(doc: dict[str, Any], parameters: dict[str, Any]) -> None:
    """schemas/manifest.schema.json and the model agree: what the schema accepts parses (an editor
    that checks a manifest against the schema never passes one algodock refuses)."""
    parse_manifest(_within_the_rules_beyond_the_schema(doc, parameters), "gen.json")


@given(data=st.binary(max_size=400), suffix=st.sampled_from([".json", ".yaml", ".yml"]))
def test_any_bytes_as_a_manifest_file(tmp_path_factory: pytest.TempPathFactory, data: bytes, suffix: str) -> None:
    path = tmp_path_factory.mktemp("m") / f"manifest{suffix}"
    path.write_bytes(data)
    with pytest.raises(InvalidManifest) as info:
        load_manifest(path)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------- parameters


def _resolve_never_crashes(manifest: Manifest, given_params: Any) -> None:
    try:
        resolve_parameters(manifest.parameters, given_params, source="fuzz: parameters")
    except InvalidInput as exc:
        assert all(line.startswith("fuzz: parameters") for line in exc.errors), exc.errors


@given(st.sampled_from(SCHEMA_SAMPLES), st.dictionaries(st.text(max_size=4), json_values, max_size=4))
def test_any_parameters_against_a_valid_schema(schema: dict[str, Any], params: dict[str, Any]) -> None:
    manifest = parse_manifest({**VALID_MANIFEST, "parameters": schema}, "fuzz.json")
    _resolve_never_crashes(manifest, params)


@given(st.dictionaries(st.text(max_size=4), json_values, max_size=4))
def test_any_parameters_against_a_schema_that_refers_outside_itself(params: dict[str, Any]) -> None:
    """Refused in a manifest; through the Python API, an ``invalid_input``, never a fetch or a traceback."""
    schema = {"type": "object", "properties": {"a": {"$ref": "https://example.invalid/remote.json"}}}
    with pytest.raises(InvalidManifest, match="never fetches"):
        parse_manifest({**VALID_MANIFEST, "parameters": schema}, "fuzz.json")
    try:
        resolve_parameters(schema, params, source="fuzz: parameters")
    except InvalidInput as exc:
        assert all(line.startswith("fuzz: parameters") for line in exc.errors), exc.errors


@given(st.dictionaries(st.text(max_size=6), json_values, max_size=4), st.dictionaries(st.text(max_size=4), json_values, max_size=3))
def test_any_dict_as_a_parameters_schema(schema: dict[str, Any], params: dict[str, Any]) -> None:
    try:
        manifest = parse_manifest({**VALID_MANIFEST, "parameters": schema}, "fuzz.json")
    except InvalidManifest:
        return
    _resolve_never_crashes(manifest, params)


@given(st.lists(st.text(alphabet=string.printable, max_size=20), max_size=5))
def test_command_line_assignments(items: list[str]) -> None:
    try:
        parse_assignments(items)
    except InvalidInput:
        pass
    try:
        parse_overrides(items)
    except InvalidInput:
        pass


# ---------------------------------------------------------------- pipeline specs

VALID_PIPELINE: dict[str, Any] = {
    "pipeline_version": "0.1",
    "name": "fuzz",
    "inputs": {"data": "data/"},
    "steps": [
        {"id": "a", "manifest": "m.json", "inputs": {"data": "inputs.data"}, "parameters": {"k": 2}},
        {"id": "b", "manifest": "m.json", "inputs": {"data": "a.result"}, "retries": 1, "after": ["a"]},
    ],
}


@pytest.fixture(scope="module")
def manifest_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pipeline")
    (d / "m.json").write_text(json.dumps(VALID_MANIFEST))
    return d


def _build(doc: Any, base: Path) -> None:
    try:
        build_pipeline(doc, base_dir=base, source="fuzz.yaml")
    except InvalidManifest as exc:
        assert all(line.startswith("fuzz.yaml") for line in exc.errors), exc.errors


def test_the_valid_pipeline_builds(manifest_dir: Path) -> None:
    p = build_pipeline(VALID_PIPELINE, base_dir=manifest_dir, source="fuzz.yaml")
    assert p.topological_order() == ["a", "b"] and p.steps["a"].parameters == {"k": 2}


@settings(suppress_health_check=list(HealthCheck))
@given(doc=mutated(VALID_PIPELINE))
def test_a_pipeline_with_one_field_changed(manifest_dir: Path, doc: dict[str, Any]) -> None:
    _build(doc, manifest_dir)


@settings(suppress_health_check=list(HealthCheck))
@given(doc=json_values)
def test_any_json_value_as_a_pipeline(manifest_dir: Path, doc: Any) -> None:
    _build(doc, manifest_dir)


@schema_generated
@settings(max_examples=SCHEMA_EXAMPLES, suppress_health_check=list(HealthCheck))
@given(doc=from_schema(_schema("pipeline")))
def test_documents_the_pipeline_schema_allows_are_specs(manifest_dir: Path, doc: dict[str, Any]) -> None:
    """schemas/pipeline.schema.json and the model agree one way: what the schema accepts parses;
    building it (which reads manifests and checks references) fails only with a clear error."""
    PipelineSpec.model_validate(doc)
    _build(doc, manifest_dir)


BLOCK_PIPELINE: dict[str, Any] = {**VALID_PIPELINE, "steps": [{"id": "a", "block": "fuzz-block", "inputs": {"data": "inputs.data"}}]}


@settings(suppress_health_check=list(HealthCheck))
@given(doc=mutated(VALID_PIPELINE) | mutated(BLOCK_PIPELINE))
def test_a_spec_the_model_refuses_the_pipeline_schema_refuses(doc: dict[str, Any]) -> None:
    """... and the other way: a spec PipelineSpec refuses is refused by the schema too (an editor
    never passes a spec algodock refuses). Not the converse: the model reads YAML leniently
    (``retries: "2"`` or ``retries: false`` pass as numbers) where the schema states the type."""
    try:
        PipelineSpec.model_validate(doc)
    except ValidationError as exc:
        assert list(PIPELINE_SCHEMA.iter_errors(doc)), f"the model refuses ({exc.errors()[0]['msg']}), the schema accepts: {doc}"


# ---------------------------------------------------------------- algo_output.json


def _read(folder: Path, data: bytes) -> None:
    (folder / "algo_output.json").write_bytes(data)
    try:
        out = read_algo_output(folder)
    except (InvalidOutput, MissingOutput):
        return
    assert out is None or isinstance(out, AlgoOutput)


@settings(suppress_health_check=list(HealthCheck))
@given(data=st.binary(max_size=300))
def test_any_bytes_as_algo_output(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    _read(tmp_path_factory.mktemp("o"), data)


@settings(suppress_health_check=list(HealthCheck))
@given(doc=json_values)
def test_any_json_as_algo_output(tmp_path_factory: pytest.TempPathFactory, doc: Any) -> None:
    _read(tmp_path_factory.mktemp("o"), json.dumps(doc).encode())


@schema_generated
@settings(max_examples=SCHEMA_EXAMPLES, suppress_health_check=list(HealthCheck))
@given(doc=from_schema(_schema("algo_output")))
def test_documents_the_algo_output_schema_allows_are_read(tmp_path_factory: pytest.TempPathFactory, doc: Any) -> None:
    """schemas/algo_output.schema.json and the model agree: what the schema accepts is read, never invalid_output."""
    folder = tmp_path_factory.mktemp("o")
    (folder / "algo_output.json").write_text(json.dumps(doc))
    out = read_algo_output(folder)
    assert isinstance(out, AlgoOutput) and out.status == doc.get("status", "success")


def test_deeply_nested_algo_output_is_invalid_output(tmp_path: Path) -> None:
    """Well under the 1 MiB limit, refused for its depth before the parser recurses."""
    deep = b'{"status": "success", "metrics": {"m": ' + b"[" * 200_000 + b"]" * 200_000 + b"}}"
    assert len(deep) < MAX_ALGO_OUTPUT_BYTES
    (tmp_path / "algo_output.json").write_bytes(deep)
    with pytest.raises(InvalidOutput, match=re.escape(f"algo_output.json is {TOO_DEEP}")):
        read_algo_output(tmp_path)
