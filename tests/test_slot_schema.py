"""Manifest 0.3 slot schemas (docs/contract.md "Slot schemas"): every type pyarrow prints parses
back to the same type, the widenings allowed and refused, declarations compared, bad schemas
refused naming the field, and manifests 0.1/0.2 unchanged."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from algodock.contract.arrow_schema import SlotSchema, compare, feeds, parse_type
from algodock.contract.manifest import parse_manifest
from algodock.errors import InvalidManifest
from algodock.pipeline import build_pipeline

UNITS = ["s", "ms", "us", "ns"]
TIMEZONES = [None, "UTC", "Europe/Paris", "+05:30", "America/Argentina/Buenos_Aires"]

PRIMITIVES: list[pa.DataType] = [
    pa.null(), pa.bool_(),
    pa.int8(), pa.int16(), pa.int32(), pa.int64(), pa.uint8(), pa.uint16(), pa.uint32(), pa.uint64(),
    pa.float16(), pa.float32(), pa.float64(),
    pa.string(), pa.large_string(), pa.string_view(), pa.binary(), pa.large_binary(), pa.binary_view(),
    pa.binary(1), pa.binary(16),
    pa.date32(), pa.date64(), pa.time32("s"), pa.time32("ms"), pa.time64("us"), pa.time64("ns"),
    *[pa.timestamp(u, tz) for u in UNITS for tz in TIMEZONES],
    *[pa.duration(u) for u in UNITS],
    pa.month_day_nano_interval(),
    pa.decimal32(1, 0), pa.decimal32(9, 2), pa.decimal64(18, -3), pa.decimal128(10, 2), pa.decimal128(38, 38), pa.decimal256(76, 10),
]
"""Every leaf family of pyarrow.types (is_null … is_interval), each unit, width and a spread of parameters."""


def nested_of(leaf: pa.DataType) -> list[pa.DataType]:
    """Each nested constructor of pyarrow.types around ``leaf``."""
    return [
        pa.list_(leaf), pa.list_(pa.field("element", leaf, nullable=False)), pa.large_list(leaf), pa.list_(leaf, 3),
        pa.list_view(leaf), pa.large_list_view(leaf),
        pa.struct([("a", leaf), pa.field("b c", leaf, nullable=False)]),
        pa.map_(pa.string(), leaf), pa.map_(pa.int32(), leaf, keys_sorted=True), pa.map_(pa.field("k", pa.string(), False), pa.field("v", leaf)),
        pa.sparse_union([pa.field("x", leaf), pa.field("y", pa.string())]), pa.dense_union([pa.field("x", leaf)], [7]),
        pa.run_end_encoded(pa.int32(), leaf),
    ]


DICTIONARIES = [pa.dictionary(index, value, ordered) for index in (pa.int8(), pa.int16(), pa.int32(), pa.int64(), pa.uint8())
                for value in (pa.string(), pa.large_string(), pa.int64(), pa.binary()) for ordered in (False, True)]
EXTENSIONS = [pa.uuid(), pa.json_(), pa.bool8(), pa.opaque(pa.int64(), "geometry", "acme")]
EVERY_TYPE = PRIMITIVES + DICTIONARIES + EXTENSIONS + [t for leaf in PRIMITIVES + DICTIONARIES[:2] if not pa.types.is_null(leaf) for t in nested_of(leaf)]


@pytest.mark.parametrize("arrow_type", EVERY_TYPE, ids=str)
def test_every_printed_type_parses_back_to_itself(arrow_type: pa.DataType) -> None:
    parsed = parse_type(str(arrow_type))
    assert parsed.equals(arrow_type), (str(arrow_type), str(parsed))
    assert str(parsed) == str(arrow_type)


def _types(leaves: st.SearchStrategy[pa.DataType]) -> st.SearchStrategy[pa.DataType]:
    names = st.text(alphabet="abcxyz_ 0123456789-", min_size=1, max_size=8).filter(lambda n: ": " not in n and not n.endswith(" "))

    def extend(children: st.SearchStrategy[pa.DataType]) -> st.SearchStrategy[pa.DataType]:
        field = st.builds(pa.field, names, children, st.booleans())
        return st.one_of(
            st.builds(pa.list_, field), st.builds(pa.large_list, field), st.builds(pa.list_, field, st.integers(1, 5)),
            st.builds(pa.list_view, field), st.builds(pa.large_list_view, field),
            st.lists(field, max_size=4, unique_by=lambda f: f.name).map(pa.struct),
            st.builds(pa.map_, st.sampled_from([pa.string(), pa.int64()]), children),
            st.builds(pa.run_end_encoded, st.sampled_from([pa.int16(), pa.int32(), pa.int64()]), children),
        )

    return st.recursive(leaves, extend, max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(_types(st.sampled_from(PRIMITIVES[1:] + DICTIONARIES[:4])))
def test_deeply_nested_types_round_trip(arrow_type: pa.DataType) -> None:
    assert parse_type(str(arrow_type)).equals(arrow_type), str(arrow_type)


def test_a_table_schema_as_printed_can_be_pasted() -> None:
    table = pa.table({"device_id": pa.array(["a"]), "ts": pa.array([0], pa.timestamp("us", "UTC")), "tags": pa.array([["x"]])})
    declared = SlotSchema.of(table.schema)
    assert [c.type for c in declared.columns] == ["string", "timestamp[us, tz=UTC]", "list<item: string>"]
    assert [parse_type(c.type) for c in declared.columns] == list(table.schema.types)


@pytest.mark.parametrize("text", ["int65", "list<int64>", "timestamp[xs]", "struct<a int64>", "decimal128(100, 2)", "int64 x", "", "Int64", "extension<acme.x>"])
def test_unknown_type_strings_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not an Arrow type"):
        parse_type(text)


ALLOWED = [
    ("int8", "int16"), ("int8", "int64"), ("int16", "int32"), ("int32", "int64"),
    ("uint8", "uint16"), ("uint16", "uint64"), ("uint8", "int16"), ("uint32", "int64"),
    ("halffloat", "float"), ("float", "double"), ("halffloat", "double"),
    ("string", "large_string"), ("binary", "large_binary"),
    ("time32[s]", "time32[ms]"), ("time32[ms]", "time64[ns]"), ("time64[us]", "time64[ns]"), ("date32[day]", "date64[ms]"),
    ("timestamp[us, tz=UTC]", "timestamp[us, tz=UTC]"), ("list<item: int64>", "list<element: int64>"),
]
REFUSED = [
    ("int64", "int32"), ("int16", "int8"), ("uint8", "int8"), ("uint64", "int64"), ("int8", "uint16"), ("int32", "double"),
    ("double", "float"), ("large_string", "string"), ("string", "binary"), ("time64[ns]", "time32[s]"),
    ("timestamp[ms]", "timestamp[us]"), ("timestamp[us]", "timestamp[ms]"), ("timestamp[us, tz=UTC]", "timestamp[us]"),
    ("duration[s]", "duration[ms]"), ("date64[ms]", "date32[day]"), ("list<item: int32>", "list<item: int64>"), ("string", "int64"),
]


@pytest.mark.parametrize(("producer", "consumer"), ALLOWED)
def test_safe_widenings_feed(producer: str, consumer: str) -> None:
    assert feeds(parse_type(producer), parse_type(consumer))


@pytest.mark.parametrize(("producer", "consumer"), REFUSED)
def test_unsafe_conversions_do_not_feed(producer: str, consumer: str) -> None:
    assert not feeds(parse_type(producer), parse_type(consumer))


def _schema(*columns: tuple[str, str] | tuple[str, str, bool], extra: str = "allow") -> SlotSchema:
    return SlotSchema.model_validate({"columns": [{"name": c[0], "type": c[1], "nullable": c[2] if len(c) > 2 else True} for c in columns], "extra_columns": extra})


def test_compare_names_every_mismatch_once() -> None:
    producer = _schema(("device_id", "string"), ("ts", "string"), ("n", "int32"), ("extra", "int8"))
    consumer = _schema(("deviceId", "string"), ("ts", "timestamp[us]"), ("n", "int64", False), extra="forbid")
    found = {(m.column, m.problem.split(":")[0]) for m in compare(producer, consumer)}
    assert found == {("deviceId", "missing"), ("ts", "type"), ("n", "nullable"), ("device_id", "extra"), ("extra", "extra")}
    assert compare(_schema(("a", "int32", False), ("b", "string")), _schema(("a", "int64", False))) == []


BASE: dict[str, Any] = {"manifest_version": "0.3", "name": "algo", "version": "1", "container_parameters": {"image": "busybox:latest", "command": ["true"]}}
COLUMNS = {"columns": [{"name": "x", "type": "int64"}]}


def _manifest(version: str = "0.3", **slot: Any) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    doc["manifest_version"] = version
    doc["outputs"] = [{"name": "out", "format": "parquet", **slot}]
    return doc


def test_a_03_manifest_declares_a_schema() -> None:
    m = parse_manifest(_manifest(schema={"columns": [{"name": "x", "type": "int64", "nullable": False}, {"name": "y", "type": "list<item: string>"}]}))
    schema = m.outputs[0].schema_
    assert schema is not None and schema.extra_columns == "allow" and [c.nullable for c in schema.columns] == [False, True]
    assert m.model_dump(mode="json")["outputs"][0]["schema"]["columns"][1]["type"] == "list<item: string>"


@pytest.mark.parametrize(
    ("slot", "where", "what"),
    [
        ({"schema": {"columns": [{"name": "x", "type": "int65"}]}}, "outputs.0.schema.columns.0.type", "not an Arrow type"),
        ({"format": "csv", "schema": COLUMNS}, "outputs.0.schema", "only for parquet"),
        ({"schema": {"columns": [{"name": "x", "type": "int64"}, {"name": "x", "type": "string"}]}}, "outputs.0.schema.columns", "used twice"),
        ({"schema": {"columns": []}}, "outputs.0.schema.columns", "at least 1"),
        ({"schema": {**COLUMNS, "extra_columns": "maybe"}}, "outputs.0.schema.extra_columns", "'allow' or 'forbid'"),
        ({"schema": {"columns": [{"name": "x", "type": "int64", "nulable": False}]}}, "outputs.0.schema.columns.0.nulable", "unknown key"),
        ({"schema_": COLUMNS}, "outputs.0.schema_", "unknown key"),
    ],
)
def test_bad_schemas_are_invalid_manifest_naming_the_field(slot: dict[str, Any], where: str, what: str) -> None:
    with pytest.raises(InvalidManifest) as err:
        parse_manifest(_manifest(**slot), "m.json")
    assert f"m.json: {where}: " in str(err.value) and what in str(err.value)


@pytest.mark.parametrize("version", ["0.1", "0.2"])
def test_old_manifests_are_unchanged(version: str) -> None:
    m = parse_manifest(_manifest(version))
    assert m.outputs[0].schema_ is None
    assert "schema" not in m.model_dump(mode="json")["outputs"][0]  # dumps as before 0.3
    with pytest.raises(InvalidManifest, match=r"outputs\.0\.schema: a slot schema needs manifest_version 0.3"):
        parse_manifest(_manifest(version, schema=COLUMNS))


# ---------------------------------------------------------------- declarations compared at validate time


def _algo(tmp_path: Path, name: str, *, inputs: list[dict[str, Any]] = (), outputs: list[dict[str, Any]] = (), version: str = "0.3") -> str:
    doc = {**copy.deepcopy(BASE), "manifest_version": version, "name": name, "inputs": list(inputs), "outputs": list(outputs)}
    (tmp_path / f"{name}.json").write_text(json.dumps(doc))
    return f"{name}.json"


def _two_steps(tmp_path: Path, produced: dict[str, Any] | None, wanted: dict[str, Any] | None, version: str = "0.3") -> dict[str, Any]:
    out = {"name": "table", "format": "parquet", **({"schema": produced} if produced else {})}
    inp = {"name": "rows", "format": "parquet", **({"schema": wanted} if wanted else {})}
    return {
        "pipeline_version": "0.1",
        "name": "p",
        "steps": [
            {"id": "make", "manifest": _algo(tmp_path, "maker", outputs=[out], version=version)},
            {"id": "use", "manifest": _algo(tmp_path, "user", inputs=[inp], version=version), "inputs": {"rows": "make.table"}},
        ],
    }


def _cols(*columns: tuple[Any, ...], extra: str = "allow") -> dict[str, Any]:
    return _schema(*columns, extra=extra).model_dump()


def test_validate_names_both_steps_slot_column_and_types(tmp_path: Path) -> None:
    spec = _two_steps(
        tmp_path,
        _cols(("device_id", "string"), ("ts", "string"), ("n", "int64")),
        _cols(("deviceId", "string"), ("ts", "timestamp[us, tz=UTC]"), ("n", "int32")),
    )
    with pytest.raises(InvalidManifest) as err:
        build_pipeline(spec, base_dir=tmp_path, source="p.yaml")
    lines = err.value.errors
    assert len(lines) == 3, lines
    for line in lines:
        assert line.startswith("p.yaml: step use: inputs.rows.schema: column ") and "step 'make' output 'table'" in line and "step 'use' input 'rows'" in line
    assert any("'ts'" in line and "string" in line and "timestamp[us, tz=UTC]" in line for line in lines)
    assert any("'n'" in line and "int64" in line and "int32" in line for line in lines)
    assert any("'deviceId'" in line and "missing" in line for line in lines)


def test_validate_nullable_into_non_nullable_and_extra_under_forbid(tmp_path: Path) -> None:
    spec = _two_steps(tmp_path, _cols(("a", "int64"), ("b", "string")), _cols(("a", "int64", False), extra="forbid"))
    with pytest.raises(InvalidManifest) as err:
        build_pipeline(spec, base_dir=tmp_path, source="p.yaml")
    assert len(err.value.errors) == 2
    assert "column 'a'" in err.value.errors[0] and "nullable" in err.value.errors[0]
    assert "column 'b'" in err.value.errors[1] and "forbids" in err.value.errors[1]


def test_validate_accepts_widenings_and_untyped_sides(tmp_path: Path) -> None:
    produced = _cols(("a", "int32", False), ("s", "string"), ("t", "time32[s]"), ("extra", "double"))
    build_pipeline(_two_steps(tmp_path, produced, _cols(("a", "int64", False), ("s", "large_string"), ("t", "time64[ns]"))), base_dir=tmp_path)
    build_pipeline(_two_steps(tmp_path, None, _cols(("a", "int64"))), base_dir=tmp_path)  # checked on the bytes instead
    build_pipeline(_two_steps(tmp_path, produced, None), base_dir=tmp_path)
    build_pipeline(_two_steps(tmp_path, None, None, version="0.1"), base_dir=tmp_path)  # an old pipeline is unchanged
