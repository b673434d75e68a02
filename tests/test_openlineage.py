"""OpenLineage events through openlineage-python's file transport, validated against the spec.

The events are read back from the file the transport appends to, and each is validated
against the vendored OpenLineage 2-0-2 JSON Schema (``tests/fixtures/openlineage/``), each
standard facet against its facet schema and each custom facet against
``algodock.lineage.openlineage.FACET_SCHEMAS``. Unconfigured, no client is even created.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator, FormatChecker
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from algodock.lineage import openlineage
from algodock.lineage.openlineage import FACET_SCHEMAS, configured, dataset_name, get_client
from algodock.store.backends import local_path_of, open_store
from tests.lineage_support import MOVED, STABLE, build_versioned, five_step_pipeline, manifest, run_local, sh, statuses

FIXTURES = Path(__file__).parent / "fixtures" / "openlineage"
CORE = "https://openlineage.io/spec/2-0-2/OpenLineage.json"
STANDARD_FACETS = {  # facet key -> (vendored file, $defs name); see tests/fixtures/openlineage/README.md
    "schema": ("SchemaDatasetFacet.json", "SchemaDatasetFacet"),
    "version": ("DatasetVersionDatasetFacet.json", "DatasetVersionDatasetFacet"),
    "outputStatistics": ("OutputStatisticsOutputDatasetFacet.json", "OutputStatisticsOutputDatasetFacet"),
    "parent": ("ParentRunFacet.json", "ParentRunFacet"),
    "errorMessage": ("ErrorMessageRunFacet.json", "ErrorMessageRunFacet"),
    "tags": ("TagsRunFacet.json", "TagsRunFacet"),  # added by the client itself (its version)
}
CUSTOM_FACETS = {"algodock_image": "AlgodockImageRunFacet", "algodock_step": "AlgodockStepRunFacet"}
ALL = {"stamp", "copy", "after_stamp", "after_copy", "side"}


def _registry() -> Registry:
    core = Resource.from_contents(json.loads((FIXTURES / "OpenLineage-2-0-2.json").read_text()), default_specification=DRAFT202012)
    # the facet files refer to the base facets of older core versions: resolve them to 2-0-2 (same required fields)
    registry = Registry().with_resources([(CORE, core), ("https://openlineage.io/spec/1-0-1/OpenLineage.json", core), ("https://openlineage.io/spec/1-0-2/OpenLineage.json", core)])
    for path in sorted((FIXTURES / "facets").glob("*.json")):
        doc = json.loads(path.read_text())
        registry = registry.with_resource(doc["$id"], Resource.from_contents(doc, default_specification=DRAFT202012))
    for schema_id, doc in FACET_SCHEMAS.items():
        registry = registry.with_resource(schema_id, Resource.from_contents(doc, default_specification=DRAFT202012))
    return registry


REGISTRY = _registry()


def _validator(ref: str) -> Draft202012Validator:
    return Draft202012Validator({"$ref": ref}, registry=REGISTRY, format_checker=FormatChecker())


def _facet_schema_ref(key: str, facet: dict[str, Any]) -> str:
    if key in CUSTOM_FACETS:
        ref = facet["_schemaURL"]
        assert ref.endswith(f"#/$defs/{CUSTOM_FACETS[key]}") and ref.split("#")[0] in FACET_SCHEMAS
        return ref
    assert key in STANDARD_FACETS, f"facet {key!r} has no vendored schema; add one to tests/fixtures/openlineage"
    file, name = STANDARD_FACETS[key]
    assert facet["_schemaURL"].startswith("https://openlineage.io/spec/") and facet["_schemaURL"].endswith(f"#/$defs/{name}")
    return json.loads((FIXTURES / "facets" / file).read_text())["$id"] + f"#/$defs/{name}"


def validate_event(event: dict[str, Any]) -> None:
    """The event against the core schema, then every facet against its own schema."""
    assert event["schemaURL"] == f"{CORE}#/$defs/RunEvent"
    _validator(CORE).validate(event)
    bags = [event["run"].get("facets", {}), event["job"].get("facets", {})]
    for ds in event.get("inputs", []) + event.get("outputs", []):
        bags += [ds.get("facets", {}), ds.get("inputFacets", {}), ds.get("outputFacets", {})]
    for bag in bags:
        for key, facet in bag.items():
            _validator(_facet_schema_ref(key, facet)).validate(facet)


def read_events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def images(docker_client, busybox_image) -> dict[str, str]:
    return {MOVED: build_versioned(docker_client, MOVED, "v1"), STABLE: build_versioned(docker_client, STABLE, "stable")}


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No OpenLineage configuration at all: no variables, no openlineage.yml in cwd or ~."""
    import os

    for key in list(os.environ):
        if key.startswith("OPENLINEAGE"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    return monkeypatch


@pytest.fixture
def file_transport(clean_env, tmp_path) -> Path:
    events = tmp_path / "openlineage.jsonl"
    clean_env.setenv("OPENLINEAGE__TRANSPORT__TYPE", "file")
    clean_env.setenv("OPENLINEAGE__TRANSPORT__LOG_FILE_PATH", str(events))
    clean_env.setenv("OPENLINEAGE__TRANSPORT__APPEND", "true")
    return events


# ------------------------------------------------------------------ pure


def test_dataset_names_follow_the_naming_spec() -> None:
    assert dataset_name("s3://bucket/store/runs/r1/steps/a/outputs/t.parquet") == ("s3://bucket", "store/runs/r1/steps/a/outputs/t.parquet")
    assert dataset_name("s3://bucket/prefix/") == ("s3://bucket", "prefix")
    assert dataset_name("file:///data/x.parquet") == ("file", "/data/x.parquet")
    assert dataset_name("/data/parts/") == ("file", "/data/parts")


def test_configuration_is_openlineage_pythons_own(clean_env, tmp_path) -> None:
    assert not configured() and get_client() is None
    clean_env.setenv("OPENLINEAGE_URL", "http://localhost:5000")
    assert configured()
    clean_env.setenv("OPENLINEAGE_DISABLED", "true")
    assert not configured()
    clean_env.delenv("OPENLINEAGE_DISABLED")
    clean_env.delenv("OPENLINEAGE_URL")
    (tmp_path / "openlineage.yml").write_text("transport:\n  type: console\n")
    assert configured()


def test_custom_facet_schemas_are_valid_json_schemas() -> None:
    for doc in FACET_SCHEMAS.values():
        Draft202012Validator.check_schema(doc)
    image_facet, step_facet = openlineage.facet_classes()
    from openlineage.client.serde import Serde

    facet = Serde.to_dict(image_facet(image="x:1", image_id="sha256:" + "a" * 64))
    _validator(facet["_schemaURL"]).validate(facet)
    bad = {**facet, "image_id": "x:1"}
    assert list(_validator(facet["_schemaURL"]).iter_errors(bad)), "a tag is not an image id"


# ------------------------------------------------------------------ with the engine


@pytest.mark.docker
def test_nothing_is_emitted_or_created_when_unconfigured(clean_env, tmp_path, docker_client, images) -> None:
    import openlineage.client as ol_client

    created = []

    class Forbidden:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            created.append(True)
            raise AssertionError("no OpenLineage client may be created when OpenLineage is not configured")

    clean_env.setattr(ol_client, "OpenLineageClient", Forbidden)
    doc = run_local(five_step_pipeline(tmp_path), open_store(str(tmp_path / "store")), "quiet", docker_client)
    assert statuses(doc) == dict.fromkeys(ALL, "succeeded")
    assert created == [] and not list(tmp_path.glob("*.jsonl"))


@pytest.mark.docker
def test_step_events_validate_against_the_spec(file_transport, tmp_path, docker_client, images) -> None:
    spec = five_step_pipeline(tmp_path)
    store = open_store(str(tmp_path / "store"))
    flow_run_id = str(uuid.uuid4())
    first = run_local(spec, store, "r1", docker_client, flow_run_id=flow_run_id)
    assert statuses(first) == dict.fromkeys(ALL, "succeeded")
    # make after_stamp fail: a changed command is a new cache key, so it runs (and fails); the rest is cached
    manifest(
        tmp_path / "manifests" / "pass-bin.json",
        name="pass-bin",
        image=STABLE,
        command=sh("echo no >&2; exit 4"),
        inputs=[{"name": "data", "format": "binary"}],
        outputs=[{"name": "out", "format": "binary"}],
    )
    second = run_local(spec, store, "r2", docker_client)
    assert statuses(second) == {**dict.fromkeys(ALL, "cached"), "after_stamp": "failed"}

    events = read_events(file_transport)
    assert len(events) == 20, "START and COMPLETE/FAIL for each of 5 steps in 2 runs"
    for event in events:
        validate_event(event)

    by_run: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for event in events:
        by_run[event["run"]["runId"]].append(event)
    assert len(by_run) == 10, "one OpenLineage run per step attempt"
    ends: dict[tuple[str, str], dict[str, Any]] = {}
    for run_events in by_run.values():
        assert [e["eventType"] for e in run_events][0] == "START" and len(run_events) == 2
        end = run_events[1]
        assert end["eventType"] in ("COMPLETE", "FAIL") and end["job"] == run_events[0]["job"]
        step = end["run"]["facets"]["algodock_step"]
        ends[(step["run_id"], step["step_id"])] = end
    assert {(r, s) for r, s in ends} == {(r, s) for r in ("r1", "r2") for s in ALL}

    # a succeeded step: parquet schema from the footers, hash as the dataset version, row count, image identity, parent
    copy = ends[("r1", "copy")]
    assert copy["eventType"] == "COMPLETE" and (copy["job"]["namespace"], copy["job"]["name"]) == ("algodock", "five.copy")
    (inp,) = copy["inputs"]
    assert (inp["namespace"], inp["name"]) == ("file", str(tmp_path / "raw.parquet"))
    assert [(f["name"], f["type"]) for f in inp["facets"]["schema"]["fields"]] == [("id", "int64"), ("label", "string")]
    assert inp["facets"]["version"]["datasetVersion"] == "sha256:" + first.step("copy").inputs[0].sha256
    (out,) = copy["outputs"]
    recorded = first.step("copy").outputs[0]
    assert (out["namespace"], out["name"]) == ("file", str(local_path_of(recorded.uri)))
    assert out["facets"]["version"]["datasetVersion"] == f"sha256:{recorded.sha256}"
    assert [f["name"] for f in out["facets"]["schema"]["fields"]] == ["id", "label"]
    assert out["outputFacets"]["outputStatistics"]["rowCount"] == 3
    image = copy["run"]["facets"]["algodock_image"]
    assert image == {**image, "image": MOVED, "image_id": docker_client.images.get(MOVED).id}
    parent = copy["run"]["facets"]["parent"]
    assert parent["run"]["runId"] == flow_run_id and (parent["job"]["namespace"], parent["job"]["name"]) == ("algodock", "five")

    # a binary output has no schema facet, but still its version
    stamp_out = ends[("r1", "stamp")]["outputs"][0]
    assert "schema" not in stamp_out["facets"] and stamp_out["facets"]["version"]["datasetVersion"].startswith("sha256:")

    # a cached step completes with the reused outputs; without a flow run, the parent is derived from the run id
    cached = ends[("r2", "after_copy")]
    assert cached["eventType"] == "COMPLETE"
    assert cached["run"]["facets"]["algodock_step"]["status"] == "cached" and cached["run"]["facets"]["algodock_step"]["cached_from"] == "r1"
    assert cached["outputs"][0]["name"] == str(local_path_of(first.step("after_copy").outputs[0].uri))
    assert cached["run"]["facets"]["parent"]["run"]["runId"] == str(uuid.uuid5(uuid.NAMESPACE_URL, "algodock:run:r2"))

    # a failed step: FAIL with the failure kind and the container's message
    failed = ends[("r2", "after_stamp")]
    assert failed["eventType"] == "FAIL" and failed["outputs"] == []
    assert failed["run"]["facets"]["errorMessage"]["message"].startswith("exit_code: the container exited with code 4")
    assert failed["run"]["facets"]["algodock_step"]["exit_code"] == 4
    assert failed["inputs"][0]["name"] == str(local_path_of(first.step("stamp").outputs[0].uri))


@pytest.mark.docker
def test_a_broken_transport_never_fails_a_step(clean_env, tmp_path, docker_client, images, caplog) -> None:
    """Every event is tried, fails in the transport (its folder does not exist), is logged, and the steps succeed."""
    clean_env.setenv("OPENLINEAGE__TRANSPORT__TYPE", "file")
    clean_env.setenv("OPENLINEAGE__TRANSPORT__LOG_FILE_PATH", str(tmp_path / "no-such-dir" / "events.jsonl"))
    clean_env.setenv("OPENLINEAGE__TRANSPORT__APPEND", "true")
    caplog.set_level(logging.WARNING, logger=openlineage.log.name)
    doc = run_local(five_step_pipeline(tmp_path), open_store(str(tmp_path / "store")), "r1", docker_client)
    assert statuses(doc) == dict.fromkeys(ALL, "succeeded")
    tried = {(m.group(1), m.group(2)) for r in caplog.records if (m := re.match(r"could not emit the OpenLineage (\w+) event of step (\S+): ", r.getMessage()))}
    assert tried == {(event, s) for event in ("START", "COMPLETE") for s in ALL}, [r.getMessage() for r in caplog.records]
    assert not (tmp_path / "no-such-dir").exists()


@pytest.mark.s3
def test_parquet_schema_facets_are_read_from_s3_footers(tmp_path, s3_endpoint) -> None:
    import boto3

    from tests.lineage_support import write_table

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="ol-schema")
    body = write_table(tmp_path / "t.parquet", [1, 2]).read_bytes()
    s3.put_object(Bucket="ol-schema", Key="one/t.parquet", Body=body)
    s3.put_object(Bucket="ol-schema", Key="parts/part-0.parquet", Body=body)
    for uri in ("s3://ol-schema/one/t.parquet", "s3://ol-schema/parts"):
        facets = openlineage._dataset_facets(uri, "parquet", "ab" * 32, open_store("s3://ol-schema/store"))
        assert [f.name for f in facets["schema"].fields] == ["id", "label"], uri
        assert facets["version"].datasetVersion == "sha256:" + "ab" * 32
    assert "schema" not in openlineage._dataset_facets("s3://ol-schema/missing.parquet", "parquet", None, None)
