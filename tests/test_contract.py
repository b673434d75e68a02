"""The contract models (docs/contract.md §1) against a table of bad manifests, `algodock validate`,
and parameters: validation with defaults filled, and values parsed from the command line."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from algodock.contract.documents import MAX_NESTING, TOO_DEEP, nesting_depth, read_document
from algodock.contract.manifest import Manifest, load_manifest, parse_manifest, safe_relative
from algodock.errors import InvalidInput, InvalidManifest
from algodock.contract.params import parse_assignments, parse_value, resolve_parameters

REPO = Path(__file__).resolve().parents[1]

GOOD: dict[str, Any] = {
    "manifest_version": "0.1",
    "name": "device-visits",
    "version": "1.0.0",
    "description": "Turns GPS pings into visits.",
    "container_parameters": {
        "image": "myorg/device-visits:1.0.0",
        "command": ["python", "/app/device_visits.py"],
        "resource_request": {"cpu_millicore": 2000, "memory_gb": 4, "gpu": 0},
        "timeout_seconds": 3600,
        "env": {"LOG_LEVEL": "info"},
        "scratch_mb": 256,
    },
    "parameters": {
        "type": "object",
        "properties": {"look_back_time": {"type": "integer", "minimum": 1, "default": 3600}},
        "required": [],
        "additionalProperties": False,
    },
    "inputs": [{"name": "pings", "format": "parquet", "required": True, "multiple": False}],
    "outputs": [{"name": "visits", "format": "parquet", "required": True}],
}


def changed(edit: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    doc = copy.deepcopy(GOOD)
    edit(doc)
    return doc


def _cp(**kw: Any) -> Callable[[dict[str, Any]], None]:
    return lambda d: d["container_parameters"].update(kw)


def _rr(**kw: Any) -> Callable[[dict[str, Any]], None]:
    return lambda d: d["container_parameters"]["resource_request"].update(kw)


# (id, document, expected substring: the field path and what is wrong)
BAD_DOCUMENTS: list[tuple[str, Any, str]] = [
    ("unknown-top-level-key", changed(lambda d: d.update(desciption="typo")), "desciption: unknown key"),
    ("unknown-nested-key", changed(_rr(cpus=2)), "container_parameters.resource_request.cpus: unknown key"),
    ("unknown-slot-key", changed(lambda d: d["inputs"][0].update(optional=True)), "inputs.0.optional: unknown key"),
    ("missing-command", changed(lambda d: d["container_parameters"].pop("command")), "container_parameters.command: required field is missing"),
    ("missing-image", changed(lambda d: d["container_parameters"].pop("image")), "container_parameters.image: required field is missing"),
    ("missing-container-parameters", changed(lambda d: d.pop("container_parameters")), "container_parameters: required field is missing"),
    ("empty-command", changed(_cp(command=[])), "container_parameters.command: List should have at least 1 item"),
    ("command-as-string", changed(_cp(command="python x.py")), "container_parameters.command: Input should be a valid list"),
    ("cpu-millicore-0", changed(_rr(cpu_millicore=0)), "container_parameters.resource_request.cpu_millicore: Input should be greater than 0"),
    ("memory-gb-negative", changed(_rr(memory_gb=-1)), "container_parameters.resource_request.memory_gb: Input should be greater than 0"),
    ("gpu-negative", changed(_rr(gpu=-1)), "container_parameters.resource_request.gpu: Input should be greater than or equal to 0"),
    ("timeout-0", changed(_cp(timeout_seconds=0)), "container_parameters.timeout_seconds: Input should be greater than 0"),
    ("scratch-0", changed(_cp(scratch_mb=0)), "container_parameters.scratch_mb: Input should be greater than 0"),
    ("bad-image", changed(_cp(image="my image")), "container_parameters.image: String should match pattern"),
    ("bad-env-name", changed(_cp(env={"1X": "y"})), "container_parameters.env.1X.[key]: String should match pattern"),
    (
        "env-overrides-input-path",
        changed(_cp(env={"ALGORITHM_INPUT_PATH": "/elsewhere.json"})),
        "container_parameters.env: ALGORITHM_INPUT_PATH is set by the platform and cannot be overridden",
    ),
    ("bad-name-pattern", changed(lambda d: d.update(name="Device Visits")), "name: String should match pattern '^[a-z0-9][a-z0-9_-]{0,62}$'"),
    ("name-too-long", changed(lambda d: d.update(name="a" * 64)), "name: String should match pattern"),
    ("bad-input-slot-name", changed(lambda d: d["inputs"][0].update(name="-pings")), "inputs.0.name: String should match pattern"),
    ("bad-output-slot-name", changed(lambda d: d["outputs"][0].update(name="Visits")), "outputs.0.name: String should match pattern"),
    (
        "duplicate-output-slot",
        changed(lambda d: d["outputs"].append({"name": "visits", "format": "csv"})),
        "outputs: slot name 'visits' is used twice (outputs.0 and outputs.1)",
    ),
    (
        "duplicate-input-slot",
        changed(lambda d: d["inputs"].append({"name": "pings", "format": "csv"})),
        "inputs: slot name 'pings' is used twice (inputs.0 and inputs.1)",
    ),
    ("bad-format", changed(lambda d: d["inputs"][0].update(format="xlsx")), "inputs.0.format: Input should be 'parquet', 'csv', 'json' or 'binary'"),
    (
        "invalid-json-schema",
        changed(lambda d: d["parameters"]["properties"].update(n={"type": "int"})),
        "parameters: not a valid JSON Schema at properties/n/type",
    ),
    ("wrong-manifest-version", changed(lambda d: d.update(manifest_version="1.0")), "manifest_version: Input should be '0.1', '0.2' or '0.3'"),
    ("missing-manifest-version", changed(lambda d: d.pop("manifest_version")), "manifest_version: required field is missing"),
    ("non-mapping-root", ["a", "list"], "(root): expected a mapping, got list"),
    ("null-root", None, "(root): expected a mapping, got NoneType"),
]


@pytest.mark.parametrize(("doc", "expected"), [(d, e) for _, d, e in BAD_DOCUMENTS], ids=[i for i, _, _ in BAD_DOCUMENTS])
def test_bad_manifest_is_rejected_with_file_and_field(doc: Any, expected: str) -> None:
    with pytest.raises(InvalidManifest) as info:
        parse_manifest(doc, "algo/manifest.json")
    assert any(line.startswith("algo/manifest.json: ") and expected in line for line in info.value.errors), info.value.errors
    assert info.value.kind == "invalid_manifest"


def test_the_table_is_big_enough_and_the_good_manifest_passes() -> None:
    assert len(BAD_DOCUMENTS) >= 15
    m = parse_manifest(GOOD)
    assert m.container_parameters.resource_request.cpu_millicore == 2000
    assert m.input_slot("pings") and m.output_slot("visits") and m.input_slot("nope") is None


def test_every_error_is_reported_not_just_the_first() -> None:
    doc = changed(lambda d: (d.update(nmae=1), _rr(gpu=-1)(d), d["outputs"][0].update(format="xls")))
    with pytest.raises(InvalidManifest) as info:
        parse_manifest(doc, "m.json")
    joined = "\n".join(info.value.errors)
    assert len(info.value.errors) == 3
    for part in ("m.json: nmae:", "m.json: container_parameters.resource_request.gpu:", "m.json: outputs.0.format:"):
        assert part in joined


def test_defaults_of_the_contract() -> None:
    m = Manifest.model_validate(
        {"manifest_version": "0.1", "name": "x", "version": "1", "container_parameters": {"image": "sha256:" + "a" * 64, "command": ["run"]}}
    )
    rr = m.container_parameters.resource_request
    assert (rr.cpu_millicore, rr.memory_gb, rr.gpu) == (1000, 1, 0)
    assert rr.memory_bytes == 1024**3
    assert m.parameters == {"type": "object"} and m.inputs == [] and m.outputs == []


@pytest.mark.parametrize(
    ("image", "ok"),
    [
        ("myorg/device-visits:1.0.0", True),
        ("registry.example.com:5000/a/b@sha256:" + "0" * 64, True),
        ("sha256:" + "f" * 64, True),
        ("busybox", True),
        ("busy box", False),
        ("-rm", False),
        ("", False),
    ],
)
def test_image_reference_forms(image: str, ok: bool) -> None:
    doc = changed(_cp(image=image))
    if ok:
        assert parse_manifest(doc).container_parameters.image == image
    else:
        with pytest.raises(InvalidManifest, match="container_parameters.image"):
            parse_manifest(doc)


# ------------------------------------------------------------------ files: JSON and YAML


def test_yaml_and_json_files_load_the_same(tmp_path: Path) -> None:
    import yaml

    (tmp_path / "m.json").write_text(json.dumps(GOOD))
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(GOOD))
    assert load_manifest(tmp_path / "m.json") == load_manifest(tmp_path / "m.yaml")


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("m.json", '{"manifest_version": "0.1",, }', "m.json: not valid JSON: Expecting property name"),
        ("m.yaml", "name: [unclosed\nversion: 1\n", "m.yaml: not valid YAML"),
        ("m.yml", "a: b\n  c: d\n", "m.yml: not valid YAML"),
        ("m.yaml", "- just\n- a list\n", "m.yaml: (root): expected a mapping, got list"),
        ("m.yaml", "", "m.yaml: (root): expected a mapping, got NoneType"),
    ],
    ids=["invalid-json", "invalid-yaml-flow", "invalid-yaml-indent", "yaml-list-root", "empty-yaml"],
)
def test_unparseable_files_name_the_file(tmp_path: Path, name: str, text: str, expected: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(InvalidManifest) as info:
        load_manifest(path)
    assert expected in str(info.value)
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("deep.json", "[" * 100_000 + "]" * 100_000),
        ("deep.json", '{"a": ' * 5_000 + "1" + "}" * 5_000),
        ("deep.yaml", "a: " + "[" * 100_000 + "]" * 100_000 + "\n"),
        ("deep.yml", "".join(" " * i + f"k{i}:\n" for i in range(1_500)) + " " * 1_500 + "v\n"),
    ],
    ids=["json-arrays", "json-objects", "yaml-flow", "yaml-block"],
)
def test_a_file_nested_past_any_sense_is_invalid_manifest_not_a_recursion_error(tmp_path: Path, name: str, text: str) -> None:
    """Nesting is bounded before the parser recurses, so no RecursionError (and no finalizer run deep in the stack)."""
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(InvalidManifest, match=rf"{name}: nested deeper than {MAX_NESTING} levels"):
        load_manifest(path)


def test_nesting_up_to_the_limit_still_loads(tmp_path: Path) -> None:
    deep: Any = 1
    for _ in range(MAX_NESTING - 2):
        deep = [deep]
    doc = copy.deepcopy(GOOD)
    doc["description"] = "fine"
    (tmp_path / "m.json").write_text(json.dumps({**doc, "x-extra": deep}))
    assert read_document(tmp_path / "m.json")["x-extra"] == deep
    (tmp_path / "m.yaml").write_text(json.dumps({**doc, "x-extra": deep}))  # JSON is YAML
    assert read_document(tmp_path / "m.yaml")["x-extra"] == deep


def test_brackets_inside_strings_do_not_count_as_nesting(tmp_path: Path) -> None:
    text = json.dumps({"description": "[" * 5_000 + '\\"{' * 500})
    (tmp_path / "m.json").write_text(text)
    assert read_document(tmp_path / "m.json") == json.loads(text)
    assert nesting_depth(text) == 1


def test_validate_command_names_a_too_deep_file_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "deep.json"
    bad.write_text("[" * 100_000 + "]" * 100_000)
    proc = _validate(bad)
    assert proc.returncode == 1
    assert f"{bad}: nested deeper than {MAX_NESTING} levels" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_file_is_invalid_manifest(tmp_path: Path) -> None:
    with pytest.raises(InvalidManifest, match="nope.json: cannot read"):
        load_manifest(tmp_path / "nope.json")


# ------------------------------------------------------------------ algodock validate


def _validate(*files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "algodock.cli", "validate", *map(str, files)], capture_output=True, text=True, cwd=REPO, timeout=120)


def test_validate_command_prints_file_and_field_and_exits_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(changed(lambda d: (_rr(cpu_millicore=0)(d), d.update(colour="red")))))
    proc = _validate(bad)
    assert proc.returncode == 1
    assert f"{bad}: container_parameters.resource_request.cpu_millicore: Input should be greater than 0" in proc.stderr
    assert f"{bad}: colour: unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_validate_command_reports_yaml_syntax_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    proc = _validate(bad)
    assert proc.returncode == 1
    assert f"{bad}: not valid YAML" in proc.stderr and "Traceback" not in proc.stderr


def test_validate_command_accepts_a_good_manifest(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    import yaml

    good.write_text(yaml.safe_dump(GOOD))
    proc = _validate(good)
    assert proc.returncode == 0, proc.stderr
    assert f"{good}: valid manifest device-visits 1.0.0" in proc.stdout


def test_validate_command_exits_1_when_any_file_is_bad(tmp_path: Path) -> None:
    (tmp_path / "good.json").write_text(json.dumps(GOOD))
    (tmp_path / "bad.json").write_text(json.dumps(changed(lambda d: d.pop("outputs") and d.update(outputs="x"))))
    proc = _validate(tmp_path / "good.json", tmp_path / "bad.json")
    assert proc.returncode == 1
    assert "good.json: valid manifest" in proc.stdout
    assert "bad.json: outputs: Input should be a valid list" in proc.stderr


# ------------------------------------------------------------------ parameters

NESTED = {
    "type": "object",
    "properties": {
        "look_back_time": {"type": "integer", "minimum": 1, "default": 3600},
        "mode": {"type": "string", "enum": ["fast", "exact"], "default": "fast"},
        "grid": {
            "type": "object",
            "default": {},
            "properties": {
                "cell_m": {"type": "number", "default": 50.0},
                "snap": {"type": "object", "default": {}, "properties": {"enabled": {"type": "boolean", "default": True}}},
            },
            "additionalProperties": False,
        },
        "label": {"type": "string"},
    },
    "required": ["label"],
    "additionalProperties": False,
}


def test_defaults_are_filled_recursively() -> None:
    got = resolve_parameters(NESTED, {"label": "x"})
    assert got == {"label": "x", "look_back_time": 3600, "mode": "fast", "grid": {"cell_m": 50.0, "snap": {"enabled": True}}}


def test_given_values_win_over_defaults_and_nested_defaults_still_fill() -> None:
    given = {"label": "x", "look_back_time": 60, "grid": {"snap": {"enabled": False}}}
    got = resolve_parameters(NESTED, given)
    assert got == {"label": "x", "look_back_time": 60, "mode": "fast", "grid": {"cell_m": 50.0, "snap": {"enabled": False}}}
    assert given == {"label": "x", "look_back_time": 60, "grid": {"snap": {"enabled": False}}}, "the caller's dict was modified"


def test_defaults_are_not_shared_between_calls() -> None:
    a = resolve_parameters(NESTED, {"label": "a"})
    a["grid"]["snap"]["enabled"] = False
    assert resolve_parameters(NESTED, {"label": "b"})["grid"]["snap"]["enabled"] is True
    assert NESTED["properties"]["grid"]["default"] == {}


def test_every_parameter_error_is_listed_with_its_path() -> None:
    with pytest.raises(InvalidInput) as info:
        resolve_parameters(NESTED, {"look_back_time": 0, "mode": "slow", "grid": {"cell_m": "big", "x": 1}})
    errors = info.value.errors
    assert info.value.kind == "invalid_input"
    assert any(e.startswith("parameters: 'label' is a required property") for e in errors), errors
    assert any(e.startswith("parameters.look_back_time: 0 is less than the minimum of 1") for e in errors), errors
    assert any(e.startswith("parameters.mode: 'slow' is not one of") for e in errors), errors
    assert any(e.startswith("parameters.grid.cell_m: 'big' is not of type 'number'") for e in errors), errors
    assert any(e.startswith("parameters.grid: Additional properties are not allowed ('x'") for e in errors), errors


def test_unknown_parameter_is_rejected_when_the_schema_forbids_it() -> None:
    with pytest.raises(InvalidInput, match="Additional properties are not allowed"):
        resolve_parameters(GOOD["parameters"], {"look_back": 5})
    assert resolve_parameters(GOOD["parameters"], {}) == {"look_back_time": 3600}


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("5", 5),
        ("-2.5", -2.5),
        ("true", True),
        ("null", None),
        ('"5"', "5"),
        ("[1, 2]", [1, 2]),
        ('{"a": {"b": 1}}', {"a": {"b": 1}}),
        ("abc", "abc"),
        ("", ""),
        ("2026-11-27", "2026-11-27"),
        ("{not json", "{not json"),
    ],
)
def test_parse_value(text: str, value: Any) -> None:
    got = parse_value(text)
    assert got == value and type(got) is type(value)


def test_a_parameter_nested_past_any_sense_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match=f"nested deeper than {MAX_NESTING} levels"):
        parse_value("[" * 100_000 + "]" * 100_000)


def test_parse_assignments() -> None:
    assert parse_assignments(["n=5", "name=x=y", "empty="]) == {"n": 5, "name": "x=y", "empty": ""}
    with pytest.raises(InvalidInput, match="--param 'n': expected KEY=VALUE"):
        parse_assignments(["n"])
    with pytest.raises(InvalidInput, match="expected KEY=VALUE"):
        parse_assignments(["=5"])


@pytest.mark.parametrize(
    ("path", "ok"),
    [("visits.parquet", True), ("a/b/c.csv", True), ("a/..b", True), ("/etc/passwd", False), ("../x", False), ("a/../../x", False), ("a\\..\\x", False), ("C:x", False), ("", False)],
)
def test_safe_relative(path: str, ok: bool) -> None:
    assert safe_relative(path) is ok


# ------------------------------------------------------------------ contract 0.2


def test_manifest_version_0_2_is_read_and_0_1_stays_valid() -> None:
    assert parse_manifest(changed(lambda d: d.update(manifest_version="0.2"))).manifest_version == "0.2"
    assert parse_manifest(GOOD).manifest_version == "0.1"


def test_output_limits_and_shm_defaults() -> None:
    cp = parse_manifest(GOOD).container_parameters
    assert (cp.output_mb, cp.output_files, cp.shm_mb) == (10240, 100000, 0)
    cp = parse_manifest(changed(_cp(output_mb=100, output_files=10, shm_mb=64))).container_parameters
    assert (cp.output_mb, cp.output_files, cp.shm_mb) == (100, 10, 64)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (_cp(timeout_seconds=10_000_000_000), "container_parameters.timeout_seconds: Input should be less than or equal to 604800"),
        (_cp(timeout_seconds=604_800.5), "container_parameters.timeout_seconds: Input should be less than or equal to 604800"),
        (_cp(timeout_seconds=float("inf")), "container_parameters.timeout_seconds"),
        (_cp(output_mb=0), "container_parameters.output_mb: Input should be greater than 0"),
        (_cp(output_files=0), "container_parameters.output_files: Input should be greater than 0"),
        (_cp(shm_mb=-1), "container_parameters.shm_mb: Input should be greater than or equal to 0"),
        (_cp(output_mb="lots"), "container_parameters.output_mb"),
    ],
    ids=["timeout-1e10", "timeout-just-over-7-days", "timeout-inf", "output-mb-0", "output-files-0", "shm-negative", "output-mb-string"],
)
def test_contract_0_2_bounds(edit: Callable[[dict[str, Any]], None], expected: str) -> None:
    with pytest.raises(InvalidManifest) as info:
        parse_manifest(changed(edit), "m.json")
    assert any(expected in line for line in info.value.errors), info.value.errors


def test_seven_days_is_the_longest_timeout() -> None:
    assert parse_manifest(changed(_cp(timeout_seconds=604_800))).container_parameters.timeout_seconds == 604_800


# ------------------------------------------------------------------ nesting, found without recursion

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{}"\\ab\n\u00e9'),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(alphabet='[]{}"\\a', max_size=4), inner, max_size=3),
    max_leaves=30,
)


def _depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    return 0


@settings(max_examples=300, deadline=None)
@given(_JSON, st.booleans())
def test_nesting_depth_is_the_depth_json_loads_would_build(value: Any, ascii_only: bool) -> None:
    """Brackets and escaped quotes inside strings and keys never count."""
    assert nesting_depth(json.dumps(value, ensure_ascii=ascii_only)) == _depth(value)


@pytest.mark.parametrize(
    "text",
    ['"' + '\\"' * 500_000, '"' * 1_000_000, '"a\\' * 300_000, '["a",' * 200_000],
    ids=["escaped-quotes-never-closed", "quotes", "backslash-at-end", "many-strings"],
)
def test_nesting_scan_stays_linear_on_hostile_quoting(text: str) -> None:
    """A string pattern that could fail and be retried at every later quote would be quadratic
    here (hours for 1 MB); a subprocess bounds the test instead of letting it hang."""
    code = "import sys; from algodock.contract.documents import nesting_depth; print(nesting_depth(sys.stdin.read()))"
    proc = subprocess.run([sys.executable, "-c", code], input=text, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) == (200_000 if text.startswith("[") else 0)


# ------------------------------------------------------------------ YAML aliases, long messages

_LAUGHS = "".join(  # a: 9 strings; b: 9 times a; ...; i: 9 times h, 9**9 strings in all
    f"    {name}: &{name} [{', '.join([f'*{prev}' if prev else 'lol'] * 9)}]\n"
    for prev, name in zip([None, *"abcdefgh"], "abcdefghi")
)


def _yaml_manifest(parameters: str) -> str:
    head = 'manifest_version: "0.2"\nname: m\nversion: 1.0.0\ncontainer_parameters: {image: "busybox:latest", command: ["true"]}\n'
    return head + "parameters:\n  type: object\n" + parameters


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [
        (f"  $defs:\n{_LAUGHS}  properties:\n    p: {{default: *i}}\n", r"expands to 926,177,117 values through its aliases; the limit is 1,000,000"),
        ("  $defs:\n    r: &r [1, *r]\n", "it contains itself"),
        (
            "  $defs:\n"
            + "".join(f"    d{i}: &d{i} " + "[" * 60 + (f"*d{i - 1}" if i else "1") + "]" * 60 + "\n" for i in range(3)),
            f"{TOO_DEEP} once its aliases are expanded",
        ),
    ],
    ids=["billion-laughs", "recursive-alias", "deep-through-aliases"],
)
def test_yaml_aliases_cannot_blow_up_what_a_small_file_stands_for(tmp_path: Path, parameters: str, expected: str) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(_yaml_manifest(parameters))
    assert path.stat().st_size < 2000
    with pytest.raises(InvalidManifest, match=expected):
        load_manifest(path)


def test_ordinary_aliases_and_merge_keys_still_load(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(_yaml_manifest("  $defs:\n    base: &base {type: integer, minimum: 1}\n  properties:\n    a: *base\n    b: {<<: *base, default: 2}\n"))
    props = load_manifest(path).parameters["properties"]
    assert props["a"] == {"type": "integer", "minimum": 1} and props["b"] == {"type": "integer", "minimum": 1, "default": 2}


def test_a_huge_value_in_an_error_is_shortened(tmp_path: Path) -> None:
    doc = copy.deepcopy(GOOD)
    doc["parameters"] = {"type": "object", "properties": {"p": {"type": ["x" * 100_000]}}}
    (tmp_path / "m.json").write_text(json.dumps(doc))
    with pytest.raises(InvalidManifest) as info:
        load_manifest(tmp_path / "m.json")
    assert "not a valid JSON Schema" in str(info.value) and len(str(info.value)) < 1500
    assert "characters)" in str(info.value)


def test_parameter_errors_are_listed_up_to_a_bound() -> None:
    schema = {"type": "object", "properties": {"ids": {"type": "array", "items": {"type": "integer"}}}}
    with pytest.raises(InvalidInput) as info:
        resolve_parameters(schema, {"ids": ["x" * 10_000] * 5_000})
    lines = str(info.value).splitlines()
    assert len(lines) == 51 and lines[-1].endswith("… and 4950 more errors")
    assert all(len(line) < 400 for line in lines)


def test_an_unknown_key_of_any_length_is_named_shortened(tmp_path: Path) -> None:
    (tmp_path / "m.json").write_text(json.dumps({**GOOD, "k" * 1_000_000: 1}))
    proc = _validate(tmp_path / "m.json")
    assert proc.returncode == 1 and "unknown key" in proc.stderr and "kkkk" in proc.stderr
    assert len(proc.stderr) < 2000, len(proc.stderr)


# ------------------------------------------------------------------ $ref: never fetched, never dangling


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("https://example.invalid/remote.json", "only references inside the schema"),
        ("other.json#/x", "only references inside the schema"),
        ("#/$defs/missing", "points at nothing in the schema"),
    ],
)
def test_a_parameters_ref_outside_the_schema_or_to_nothing_is_invalid_manifest(ref: str, expected: str) -> None:
    doc = copy.deepcopy(GOOD)
    doc["parameters"] = {"type": "object", "$defs": {"n": {"type": "integer"}}, "properties": {"a": {"$ref": ref}}}
    with pytest.raises(InvalidManifest, match=rf"parameters: .*\$ref {re.escape(repr(ref))} at properties/a.*{expected}"):
        parse_manifest(doc)


def test_local_refs_and_anchors_still_validate_parameters() -> None:
    doc = copy.deepcopy(GOOD)
    doc["parameters"] = {
        "type": "object",
        "$defs": {"n": {"type": "integer", "minimum": 0}, "named": {"$anchor": "pos", "type": "integer", "minimum": 1}},
        "properties": {"a": {"$ref": "#/$defs/n"}, "b": {"$ref": "#pos"}},
    }
    schema = parse_manifest(doc).parameters
    assert resolve_parameters(schema, {"a": 0, "b": 1}) == {"a": 0, "b": 1}
    with pytest.raises(InvalidInput, match="parameters.b: 0 is less than the minimum of 1"):
        resolve_parameters(schema, {"a": 0, "b": 0})


def test_parameters_are_never_checked_against_a_fetched_schema() -> None:
    """Even a schema that did not come through a manifest (the Python API): the reference is an
    ``invalid_input``, and nothing is fetched (a server on 127.0.0.1 counts the requests)."""
    import http.server
    import threading

    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"type": "integer"}')

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        ref = f"http://127.0.0.1:{server.server_port}/remote.json"
        with pytest.raises(InvalidInput, match=rf"parameters: \$ref {re.escape(ref)} cannot be resolved \(algodock never fetches a schema\)"):
            resolve_parameters({"type": "object", "properties": {"a": {"$ref": ref}}}, {"a": "x"})
    finally:
        server.shutdown()
        server.server_close()
    assert hits == []
