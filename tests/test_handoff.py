"""The hand-off check (docs/contract.md, slot schemas): parquet bytes against declared schemas.

Footer-level checks on real files first (no engine); then pipelines of busybox steps on a
real Docker engine: a producer whose bytes break its declaration is ``invalid_output`` naming
the file and column with its files kept; a consumer whose staged input breaks its
declaration is ``invalid_input`` and its container is never created (the engine's own
``create`` events, by the run's label, say which containers existed); widenings pass; a
cache hit is checked against today's declaration.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from algodock.contract.arrow_schema import SlotSchema
from algodock.runtime.engine import LABEL
from algodock.runtime.handoff import check_files, describe, null_count
from algodock.store.backends import LocalStore, S3Store, Store
from tests.conftest import BUSYBOX_IMAGE
from tests.lineage_support import run_local, sh

REPO = Path(__file__).resolve().parents[1]


def _schema(*columns: tuple[Any, ...], extra: str = "allow") -> dict[str, Any]:
    return {"columns": [{"name": c[0], "type": c[1], "nullable": c[2] if len(c) > 2 else True} for c in columns], "extra_columns": extra}


def _check(table: pa.Table, schema: dict[str, Any], tmp_path: Path, **write: Any) -> list[tuple[str, str]]:
    pq.write_table(table, tmp_path / "t.parquet", **write)
    return [(p.column, p.found) for p in check_files(SlotSchema.model_validate(schema), tmp_path, ["t.parquet"])]


PINGS = pa.table({"device_id": ["a", None, "c"], "ts": pa.array([1, 2, 3], pa.timestamp("us", "UTC")), "n": pa.array([1, 2, 3], pa.int32())})


def test_footer_check_finds_each_kind_of_mismatch(tmp_path: Path) -> None:
    assert _check(PINGS, _schema(("device_id", "string"), ("ts", "timestamp[us, tz=UTC]"), ("n", "int64")), tmp_path) == []
    found = _check(PINGS, _schema(("deviceId", "string"), ("ts", "string"), ("n", "int16"), ("device_id", "string", False), extra="forbid"), tmp_path)
    assert [c for c, _ in found] == ["deviceId", "ts", "n", "device_id"]
    assert found[0][1].startswith("missing (the file's columns: device_id, ts, n)")
    assert found[1][1] == "type timestamp[us, tz=UTC], the schema declares string"
    assert found[2][1] == "type int32, the schema declares int16"
    assert found[3][1] == "1 null value(s) in a column declared not nullable"
    only = _check(PINGS, _schema(("ts", "timestamp[us, tz=UTC]"), extra="forbid"), tmp_path)
    assert [c for c, _ in only] == ["device_id", "n"] and all("extra column" in f for _, f in only)


def test_nulls_come_from_statistics_and_a_column_without_them_is_read_alone(tmp_path: Path) -> None:
    table = pa.table({"a": pa.array([1, None, None, 4]), "s": pa.array([{"x": 1}, None, {"x": 3}, None])})
    pq.write_table(table, tmp_path / "stats.parquet", row_group_size=2)
    pq.write_table(table, tmp_path / "nostats.parquet", write_statistics=False)
    with_stats, without = pq.ParquetFile(tmp_path / "stats.parquet"), pq.ParquetFile(tmp_path / "nostats.parquet")
    assert with_stats.metadata.row_group(0).column(0).statistics.null_count == 1
    assert without.metadata.row_group(0).column(0).statistics is None
    assert null_count(with_stats, "a") == null_count(without, "a") == 2
    assert null_count(with_stats, "s") == 2  # nested: read alone
    schema = SlotSchema.model_validate(_schema(("a", "int64", False)))
    assert [p.found for p in check_files(schema, tmp_path, ["nostats.parquet"])] == ["2 null value(s) in a column declared not nullable"]


def test_not_parquet_is_a_finding_not_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "x.parquet").write_text("not parquet")
    [problem] = check_files(SlotSchema.model_validate(_schema(("a", "int64"))), tmp_path, ["x.parquet"])
    assert problem.file.endswith("x.parquet") and "not a readable parquet file" in problem.found


def test_describe_a_folder_whose_parts_agree_or_not(tmp_path: Path) -> None:
    pq.write_table(PINGS, tmp_path / "p-0.parquet")
    pq.write_table(PINGS, tmp_path / "p-1.parquet")
    assert [c.type for c in describe(tmp_path).columns] == ["string", "timestamp[us, tz=UTC]", "int32"]
    pq.write_table(PINGS.drop_columns(["n"]), tmp_path / "p-2.parquet")
    with pytest.raises(ValueError, match="the parts disagree: p-0.parquet has .* p-2.parquet has"):
        describe(tmp_path)


# ---------------------------------------------------------------- at hand-off, on a real engine


def _manifest(path: Path, name: str, *, command: list[str], inputs: list[dict] = (), outputs: list[dict] = ()) -> str:
    doc = {
        "manifest_version": "0.3",
        "name": name,
        "version": "1.0.0",
        "container_parameters": {"image": BUSYBOX_IMAGE, "command": command, "timeout_seconds": 60},
        "inputs": list(inputs),
        "outputs": list(outputs),
    }
    path.write_text(json.dumps(doc))
    return path.name


def _pipeline(tmp_path: Path, table: pa.Table, *, produced: dict | None, wanted: dict | None, direct: bool = False) -> Path:
    """``make`` copies the external input ``raw`` to its output ``table`` (declared ``produced``);
    ``use`` reads it (declared ``wanted``), from ``make`` or, with ``direct``, from ``raw`` itself."""
    pq.write_table(table, tmp_path / "raw.parquet")
    out = {"name": "table", "format": "parquet", **({"schema": produced} if produced else {})}
    inp = {"name": "rows", "format": "parquet", **({"schema": wanted} if wanted else {})}
    spec = {
        "pipeline_version": "0.1",
        "name": "handoff",
        "inputs": {"raw": "raw.parquet"},
        "steps": [
            {"id": "make", "manifest": _manifest(tmp_path / "make.json", "make", command=sh("cp /work/input/raw/* /work/output/table.parquet"),
                                                 inputs=[{"name": "raw", "format": "parquet"}], outputs=[out]), "inputs": {"raw": "inputs.raw"}},
            {"id": "use", "manifest": _manifest(tmp_path / "use.json", "use", command=sh("ls /work/input/rows"), inputs=[inp]),
             "inputs": {"rows": "inputs.raw" if direct else "make.table"}},
        ],
    }
    path = tmp_path / "pipeline.json"
    path.write_text(json.dumps(spec))
    return path


def _run(spec: Path, store: Store, client: Any) -> tuple[dict[str, Any], set[str]]:
    """Run it; the step records by id, and the steps whose container the engine created."""
    run_id = f"handoff-{uuid.uuid4().hex[:8]}"
    since = time.time() - 1
    doc = run_local(spec, store, run_id, client)
    events = client.api.events(since=since, until=time.time() + 1, decode=True, filters={"type": "container", "event": ["create"], "label": [f"{LABEL}.run_id={run_id}"]})
    created = {e["Actor"]["Attributes"][f"{LABEL}.step_id"] for e in events}
    return {s.id: s for s in doc.steps}, created


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


def test_producer_bytes_that_break_its_declaration_are_invalid_output_and_kept(docker_client: Any, busybox_image: str, tmp_path: Path, store: LocalStore) -> None:
    spec = _pipeline(tmp_path, PINGS, produced=_schema(("device_id", "string", False), ("ts", "string")), wanted=None)
    steps, created = _run(spec, store, docker_client)
    make = steps["make"]
    assert make.status == "failed" and make.failure.kind == "invalid_output"
    assert "output 'table': table.parquet: column 'ts': type timestamp[us, tz=UTC], the schema declares string" in make.failure.message
    assert "output 'table': table.parquet: column 'device_id': 1 null value(s)" in make.failure.message
    assert steps["use"].status == "skipped" and created == {"make"}
    kept = list((store.root / "runs").glob("*/steps/make/attempts/*/failed-outputs/table.parquet"))
    assert len(kept) == 1 and pq.read_schema(kept[0]).names == ["device_id", "ts", "n"]


def test_extra_column_under_forbid_is_invalid_output(docker_client: Any, busybox_image: str, tmp_path: Path, store: LocalStore) -> None:
    spec = _pipeline(tmp_path, PINGS, produced=_schema(("device_id", "string"), ("ts", "timestamp[us, tz=UTC]"), extra="forbid"), wanted=None)
    steps, _ = _run(spec, store, docker_client)
    assert steps["make"].failure.kind == "invalid_output"
    assert "table.parquet: column 'n': extra column (int32)" in steps["make"].failure.message


def test_untyped_producer_into_a_typed_consumer_fails_before_its_container(docker_client: Any, busybox_image: str, tmp_path: Path, store: LocalStore) -> None:
    spec = _pipeline(tmp_path, PINGS, produced=None, wanted=_schema(("deviceId", "string"), ("n", "int64")))
    steps, created = _run(spec, store, docker_client)
    use = steps["use"]
    assert steps["make"].status == "succeeded" and use.status == "failed" and use.failure.kind == "invalid_input"
    uri = steps["make"].outputs[0].uri
    assert f"input 'rows': {uri}: column 'deviceId': missing (the file's columns: device_id, ts, n)" in use.failure.message
    assert "column 'n'" not in use.failure.message  # int32 into int64 is a widening
    assert created == {"make"}  # the consumer's container never existed


def test_external_input_is_checked_before_any_container(docker_client: Any, busybox_image: str, tmp_path: Path, store: LocalStore) -> None:
    spec = _pipeline(tmp_path, PINGS, produced=None, wanted=_schema(("ts", "timestamp[ns, tz=UTC]")), direct=True)
    steps, created = _run(spec, store, docker_client)
    assert steps["use"].failure.kind == "invalid_input"
    assert "raw.parquet: column 'ts': type timestamp[us, tz=UTC], the schema declares timestamp[ns, tz=UTC]" in steps["use"].failure.message
    assert "use" not in created


def test_widenings_pass_and_the_actual_schema_is_in_the_lineage(docker_client: Any, busybox_image: str, tmp_path: Path, store: LocalStore) -> None:
    table = pa.table({"id": pa.array([1, 2], pa.int32()), "name": pa.array(["a", "b"]), "t": pa.array([1, 2], pa.time32("ms"))})
    produced = _schema(("id", "int32", False), ("name", "string"), ("t", "time32[ms]"))
    spec = _pipeline(tmp_path, table, produced=produced, wanted=_schema(("id", "int64", False), ("name", "large_string"), ("t", "time64[us]")))
    steps, created = _run(spec, store, docker_client)
    assert {s: r.status for s, r in steps.items()} == {"make": "succeeded", "use": "succeeded"} and created == {"make", "use"}
    recorded = steps["make"].outputs[0].schema_
    assert [(c["name"], c["type"]) for c in recorded["columns"]] == [("id", "int32"), ("name", "string"), ("t", "time32[ms]")]
    lineage = json.loads(next((store.root / "runs").glob("*/lineage.json")).read_text())
    assert lineage["steps"][0]["outputs"][0]["schema"] == recorded


@pytest.fixture(params=["local", "s3"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """A local store, and an S3 store on the moto server (a cache hit's footers are then read over S3)."""
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    bucket = request.getfixturevalue("bucket")
    return S3Store(f"s3://{bucket}/st")


def test_a_cache_hit_is_checked_against_todays_declaration(docker_client: Any, busybox_image: str, tmp_path: Path, any_store: Store) -> None:
    store = any_store
    spec = _pipeline(tmp_path, PINGS, produced=_schema(("n", "int32")), wanted=None)
    first, _ = _run(spec, store, docker_client)
    assert first["make"].status == "succeeded"
    make = json.loads((tmp_path / "make.json").read_text())
    make["outputs"][0]["schema"] = _schema(("n", "string"))  # the declaration changes, the bytes stay
    (tmp_path / "make.json").write_text(json.dumps(make))
    again, created = _run(spec, store, docker_client)
    assert again["make"].cached_from is not None and again["make"].failure.kind == "invalid_output" and "make" not in created
    assert "column 'n': type int32, the schema declares string" in again["make"].failure.message
    assert "served from the cache of run" in again["make"].failure.message


def test_validate_cli_names_both_steps_and_starts_nothing(tmp_path: Path) -> None:
    spec = _pipeline(tmp_path, PINGS, produced=_schema(("ts", "string")), wanted=_schema(("ts", "timestamp[us, tz=UTC]")))
    done = subprocess.run([sys.executable, "-m", "algodock.cli", "validate", str(spec)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode != 0
    assert "step use: inputs.rows.schema: column 'ts': step 'make' output 'table' does not feed step 'use' input 'rows'" in done.stderr + done.stdout
    assert "string" in done.stderr + done.stdout and "timestamp[us, tz=UTC]" in done.stderr + done.stdout


# ---------------------------------------------------------------- schemas wherever lineage goes


def test_schema_command_prints_a_slot_schema_ready_to_paste(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from algodock.cli import main

    pq.write_table(PINGS, tmp_path / "part-0.parquet")
    pq.write_table(PINGS, tmp_path / "part-1.parquet")
    done = CliRunner().invoke(main, ["schema", str(tmp_path), "--forbid-extra"])
    assert done.exit_code == 0, done.output
    printed = json.loads(done.stdout)
    assert printed == _schema(("device_id", "string"), ("ts", "timestamp[us, tz=UTC]"), ("n", "int32"), extra="forbid")
    SlotSchema.model_validate(printed)  # pastes into a manifest as it is
    pq.write_table(PINGS.drop_columns(["n"]), tmp_path / "part-2.parquet")
    done = CliRunner().invoke(main, ["schema", str(tmp_path)])
    assert done.exit_code == 1 and "the parts disagree" in done.output and "part-2.parquet" in done.output
    (tmp_path / "x.txt").write_text("x")
    assert CliRunner().invoke(main, ["schema", str(tmp_path / "x.txt")]).exit_code == 1


def _doc_with_schema(schema: dict[str, Any] | None):  # noqa: ANN202
    from algodock.records import LineageDocument, OutputRecord, StepRecord

    out = OutputRecord(name="table", uri="/store/runs/r/steps/make/table.parquet", sha256="a" * 64, format="parquet", rows=3, schema_=schema)
    return LineageDocument(run_id="r", pipeline="p", spec_sha256="b" * 64, store="/store", steps=[StepRecord(id="make", status="succeeded", outputs=[out])])


def test_lineage_table_and_markdown_artifact_show_the_recorded_schema() -> None:
    from io import StringIO

    from rich.console import Console

    from algodock.flows.artifacts import run_markdown
    from algodock.lineage.render import render_document

    doc = _doc_with_schema(_schema(("device_id", "string", False), ("ts", "timestamp[us, tz=UTC]")))
    out = StringIO()
    render_document(doc, Console(file=out, width=400))
    assert "device_id: string not null, ts: timestamp[us, tz=UTC]" in out.getvalue()
    assert "device_id: string not null, ts: timestamp[us, tz=UTC]" in run_markdown(doc)
    old = _doc_with_schema(None)  # a lineage document from before 0.3 reads and dumps as before
    assert "schema" not in old.model_dump(mode="json")["steps"][0]["outputs"][0]


def test_openlineage_schema_facet_comes_from_the_recorded_schema() -> None:
    from algodock.lineage.openlineage import _dataset_facets

    recorded = _schema(("id", "int64", False), ("tags", "list<item: string>"))
    facets = _dataset_facets("/nowhere/table.parquet", "parquet", "a" * 64, None, recorded)  # no file: the record alone
    assert [(f.name, f.type) for f in facets["schema"].fields] == [("id", "int64"), ("tags", "list<item: string>")]
