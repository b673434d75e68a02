"""The lineage document, the ``algodock lineage`` commands, and what a run shows in Prefect.

Hashes are checked against hashlib over the stored bytes, image ids against the engine, and
folder hashes against their definition (``sha256sum``-style listing of the files).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from algodock.cli import main
from algodock.hashing import list_files
from algodock.lineage.queries import read_document, trace, verify_run
from algodock.store.backends import lineage_rel, local_path_of, open_store, output_rel
from tests.lineage_support import MOVED, STABLE, build_versioned, five_step_pipeline, manifest, run_local, sh, statuses, write_table

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def images(docker_client, busybox_image) -> dict[str, str]:
    return {MOVED: build_versioned(docker_client, MOVED, "v1"), STABLE: build_versioned(docker_client, STABLE, "stable")}


def folder_pipeline(folder: Path) -> Path:
    """``split`` writes a folder of two parquet parts; ``join`` concatenates them into one file."""
    m = folder / "manifests"
    m.mkdir(parents=True, exist_ok=True)
    manifest(
        m / "split.json",
        name="split",
        image=STABLE,
        command=sh("mkdir /work/output/parts && cp /work/input/raw/* /work/output/parts/part-0.parquet && cp /work/input/raw/* /work/output/parts/part-1.parquet"),
        inputs=[{"name": "raw", "format": "parquet"}],
        outputs=[{"name": "parts", "format": "parquet", "multiple": True}],
        parameters={"type": "object", "properties": {"n": {"type": "integer", "default": 2}}},
    )
    manifest(
        m / "join.json",
        name="join",
        image=MOVED,
        command=sh("cat /work/input/parts/part-0.parquet /work/input/parts/part-1.parquet > /work/output/joined.binary"),
        inputs=[{"name": "parts", "format": "parquet", "multiple": True}],
        outputs=[{"name": "joined", "format": "binary"}],
    )
    write_table(folder / "raw.parquet", [7, 8, 9, 10])
    spec = {
        "pipeline_version": "0.1",
        "name": "folders",
        "inputs": {"raw": "raw.parquet"},
        "steps": [
            {"id": "split", "manifest": "manifests/split.json", "inputs": {"raw": "inputs.raw"}},
            {"id": "join", "manifest": "manifests/join.json", "inputs": {"parts": "split.parts"}},
        ],
    }
    (folder / "pipeline.json").write_text(json.dumps(spec))
    return folder / "pipeline.json"


def sha256_bytes(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sha256sum_folder(path: Path) -> str:
    """The folder hash as documented: sha256 of framed ``<hex> <length>:<path>\\n`` entries over the sorted files."""
    listing = "".join(f"{sha256_bytes(path / rel)} {len(rel.encode())}:{rel}\n" for rel in sorted(list_files(path)))
    return hashlib.sha256(listing.encode()).hexdigest()


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.output


# ------------------------------------------------------------------ the document


def test_document_records_what_produced_what(tmp_path, docker_client, images) -> None:
    store = open_store(str(tmp_path / "store"))
    doc = run_local(folder_pipeline(tmp_path), store, "r1", docker_client)
    assert statuses(doc) == {"split": "succeeded", "join": "succeeded"}
    assert read_document(store, "r1").model_dump(mode="json") == doc.model_dump(mode="json")  # what was written

    split, join = doc.step("split"), doc.step("join")
    assert split.image == STABLE and split.image_id == docker_client.images.get(STABLE).id
    assert join.image_id == docker_client.images.get(MOVED).id
    assert (split.algorithm, split.algorithm_version) == ("split", "1.0.0")
    assert split.parameters == {"n": 2}, "parameters after defaults"
    assert split.command[:2] == ["/bin/sh", "-c"] and split.resource_request["cpu_millicore"] == 1000
    assert split.exit_code == 0 and split.failure is None and split.started_at <= split.finished_at

    # external input: its uri, its bytes' hash, no producer, parquet rows
    (raw,) = split.inputs
    assert raw.produced_by is None and raw.uri == str(tmp_path / "raw.parquet")
    assert raw.sha256 == sha256_bytes(tmp_path / "raw.parquet") and raw.rows == 4

    # a folder output: hashed over its files as documented, rows summed over the parts
    (parts,) = split.outputs
    parts_dir = local_path_of(parts.uri)
    assert parts_dir.is_dir() and sorted(list_files(parts_dir)) == ["part-0.parquet", "part-1.parquet"]
    assert parts.sha256 == sha256sum_folder(parts_dir) and parts.rows == 8 and parts.format == "parquet"

    # the consumer names its producer and reads exactly what was produced
    (inp,) = join.inputs
    assert (inp.produced_by, inp.uri, inp.sha256) == ("split", parts.uri, parts.sha256)
    (joined,) = join.outputs
    joined_path = local_path_of(joined.uri)
    assert joined.sha256 == sha256_bytes(joined_path)
    assert joined_path.read_bytes() == (parts_dir / "part-0.parquet").read_bytes() * 2
    assert re.fullmatch(re.escape(str(store.local_path("runs/r1/steps/join/attempts"))) + r"/1-[0-9a-f]{12}/outputs/joined\.binary", joined.uri)


def test_lineage_schema_is_exported() -> None:
    from algodock.lineage.queries import LineageDocument
    from algodock.records import LineageDocument as Model
    from algodock.schemas import build_schemas

    assert LineageDocument is Model
    schema = build_schemas()["lineage.schema.json"]
    assert "steps" in schema["properties"] and "StepRecord" in schema["$defs"]


# ------------------------------------------------------------------ the commands


def test_show_trace_and_verify(tmp_path, docker_client, images) -> None:
    store_dir = tmp_path / "store"
    store = open_store(str(store_dir))
    doc = run_local(folder_pipeline(tmp_path), store, "r1", docker_client)
    joined = doc.step("join").outputs[0]

    code, out = cli("lineage", "r1", "--store", str(store_dir))
    assert code == 0 and "split" in out and "join" in out and doc.step("join").image_id[7:19] in out
    code, out = cli("lineage", "--store", str(store_dir), "r1", "--json")
    assert code == 0 and json.loads(out) == doc.model_dump(mode="json")
    code, out = cli("lineage", "show", "r1", "--store", str(store_dir), "--json")
    assert code == 0 and json.loads(out)["run_id"] == "r1"
    code, out = cli("lineage", "nope", "--store", str(store_dir))
    assert code == 1

    # trace: the joined file back to the external parquet, through split, with both image ids
    code, out = cli("lineage", "trace", joined.uri, "--store", str(store_dir), "--json")
    assert code == 0
    result = json.loads(out)
    tree = result["tree"]
    assert tree["producer"]["step"] == "join" and tree["producer"]["image_id"] == docker_client.images.get(MOVED).id
    (parts_in,) = tree["inputs"]
    assert parts_in["external"] is False and parts_in["from"]["producer"]["step"] == "split"
    (raw,) = parts_in["from"]["inputs"]
    assert raw["external"] is True and raw["sha256"] == sha256_bytes(tmp_path / "raw.parquet")
    assert result["external_inputs"] == [{"name": "raw", "uri": str(tmp_path / "raw.parquet"), "sha256": raw["sha256"]}]
    assert {i["step"]: i["image_id"] for i in result["images"]} == {"join": images[MOVED], "split": images[STABLE]}
    code, out = cli("lineage", "trace", joined.uri, "--store", str(store_dir))
    assert code == 0 and "external raw" in out and images[STABLE] in out

    # a file inside a folder output, as a file:// URI; and a copy found by its sha256
    part = local_path_of(doc.step("split").outputs[0].uri) / "part-1.parquet"
    assert trace(store, f"file://{part}")["tree"]["member"] == "part-1.parquet"
    copy = tmp_path / "elsewhere.binary"
    shutil.copyfile(local_path_of(joined.uri), copy)
    assert trace(store, str(copy))["tree"]["producer"]["step"] == "join"
    code, out = cli("lineage", "trace", str(tmp_path / "raw.parquet"), "--store", str(store_dir))
    assert code == 1 and "no run" in out

    # verify: all good, then one changed byte is named, exit 1
    code, out = cli("lineage", "verify", "r1", "--store", str(store_dir))
    assert code == 0 and out.count("ok") == 2
    with open(part, "ab") as fh:
        fh.write(b"\0")
    code, out = cli("lineage", "verify", "r1", "--store", str(store_dir), "--json")
    assert code == 1
    report = json.loads(out)
    assert {(c["step"], c["output"], c["status"]) for c in report["outputs"]} == {("split", "parts", "changed"), ("join", "joined", "ok")}
    code, out = cli("lineage", "verify", "r1", "--store", str(store_dir))
    assert code == 1 and "changed     split.parts" in out
    local_path_of(joined.uri).unlink()
    assert {c.output: c.status for c in verify_run(store, "r1")} == {"parts": "changed", "joined": "missing"}


def test_cached_run_traces_to_the_run_that_produced_the_bytes(tmp_path, docker_client, images) -> None:
    store = open_store(str(tmp_path / "store"))
    spec = five_step_pipeline(tmp_path)
    run_local(spec, store, "r1", docker_client)
    second = run_local(spec, store, "r2", docker_client)
    out = second.step("after_copy").outputs[0]
    result = trace(store, out.uri)
    assert result["run_id"] == "r1" and result["tree"]["producer"]["status"] == "succeeded"
    assert [c.status for c in verify_run(store, "r2")] == ["ok"] * 5


@pytest.mark.s3
def test_verify_and_trace_on_s3(tmp_path, docker_client, images, s3_endpoint) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="lineage-test")
    store = open_store("s3://lineage-test/st")
    doc = run_local(folder_pipeline(tmp_path), store, "r1", docker_client)
    assert statuses(doc) == {"split": "succeeded", "join": "succeeded"}
    parts = doc.step("split").outputs[0]
    assert re.fullmatch(r"s3://lineage-test/st/runs/r1/steps/split/attempts/1-[0-9a-f]{12}/outputs/parts", parts.uri)
    local = tmp_path / "raw.parquet"
    assert parts.sha256 == hashlib.sha256(f"{sha256_bytes(local)} 14:part-0.parquet\n{sha256_bytes(local)} 14:part-1.parquet\n".encode()).hexdigest()  # framed

    assert all(c.ok for c in verify_run(store, "r1"))
    result = trace(store, doc.step("join").outputs[0].uri)
    assert result["tree"]["inputs"][0]["from"]["producer"]["step"] == "split"
    assert trace(store, parts.uri + "/part-0.parquet")["tree"]["member"] == "part-0.parquet"

    s3.put_object(Bucket="lineage-test", Key=parts.uri.removeprefix("s3://lineage-test/") + "/part-0.parquet", Body=b"tampered")
    code, out = cli("lineage", "verify", "r1", "--store", "s3://lineage-test/st")
    assert code == 1 and "changed     split.parts" in out


# ------------------------------------------------------------------ the flow and the Prefect UI


@pytest.mark.prefect
def test_flow_run_writes_lineage_artifacts_and_asset_events(tmp_path, docker_client, images, prefect_harness) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    from algodock.flows.pipeline import run_pipeline

    spec = folder_pipeline(tmp_path)
    store_dir = tmp_path / "store"
    state = run_pipeline(spec=str(spec), store=str(store_dir), run_id="flow-1", capacity="cpu_millicore=4000,memory_gb=4", return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    doc = read_document(open_store(str(store_dir)), "flow-1")
    assert summary["lineage_uri"] == str(store_dir / lineage_rel("flow-1"))
    assert doc.status == "succeeded" and doc.flow_run_id == str(state.state_details.flow_run_id)
    assert all(s.task_run_id for s in doc.steps)
    assert [s["outputs"] for s in summary["steps"]] == [[o.model_dump(mode="json") for o in s.outputs] for s in doc.steps]

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[doc.flow_run_id])))
        by_key = {a.key: a for a in artifacts}
        table = by_key["algodock-folders-steps"]
        rows = json.loads(table.data) if isinstance(table.data, str) else table.data
        assert [r["step"] for r in rows] == ["split", "join"]
        assert rows[0]["image_id"] == images[STABLE] and doc.step("split").outputs[0].sha256 in rows[0]["outputs"]
        run_md = by_key["algodock-folders-run"].data  # markdown the UI renders (the DAG is the run graph)
        assert "```" not in run_md and "parts ← split.parts" in run_md and "raw ← input raw" in run_md
        assert f"[split](/runs/task-run/{doc.step('split').task_run_id})" in run_md

        # An output's asset key names it in the run (runs/<run>/steps/<step>/outputs/<file>); the
        # bytes are in the attempt's own folder, which the event's metadata gives as `uri`.
        joined_key = "file://" + str(store_dir / output_rel("flow-1", "join", Path(doc.step("join").outputs[0].uri).name))
        parts_key = "file://" + str(store_dir / output_rel("flow-1", "split", Path(doc.step("split").outputs[0].uri).name))
        events = []
        for _ in range(60):  # events reach the server asynchronously
            page = client.read_events(
                filter=EventFilter(event=EventNameFilter(name=["prefect.asset.materialization.succeeded"]), resource=EventResourceFilter(id=[joined_key, parts_key])),
                limit=50,  # the client defaults to 100, the server allows 50
            )
            events = page.events
            if len(events) >= 2:
                break
            time.sleep(0.5)
    by_resource = {e.resource.id: e for e in events}
    assert set(by_resource) == {joined_key, parts_key}
    joined_event = by_resource[joined_key]
    related = {(r.id, r.role) for r in joined_event.related}
    assert (parts_key, "asset") in related, "the step's input is the upstream asset"
    assert ("algodock", "asset-materialized-by") in related
    assert joined_event.payload["sha256"] == doc.step("join").outputs[0].sha256
    assert joined_event.payload["uri"] == doc.step("join").outputs[0].uri  # where the bytes of this attempt are
    assert joined_event.payload["image_id"] == images[MOVED]
    assert ("file://" + str(tmp_path / "raw.parquet"), "asset") in {(r.id, r.role) for r in by_resource[parts_key].related}

    code, out = cli("lineage", "flow-1", "--store", str(store_dir))
    assert code == 0 and "join" in out
