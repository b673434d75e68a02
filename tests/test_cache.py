"""Step caching against a real engine: hits and misses for parameters, input bytes and a moved tag.

The five-step pipeline of ``tests/lineage_support.py`` runs through ``execute_step`` (the
engine the flow uses) into a local store; one test repeats it on the moto S3 server, and one
goes through the Prefect flow to show that a retried flow run re-runs only what failed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from algodock.lineage.cache import StoreCache, cache_key
from algodock.records import StepRecord
from algodock.records import InputBinding
from algodock.store.backends import cache_rel, lineage_rel, open_store
from tests.lineage_support import MOVED, STABLE, build_versioned, five_step_pipeline, manifest, run_local, sh, statuses, write_table

pytestmark = pytest.mark.docker

ALL = {"stamp", "copy", "after_stamp", "after_copy", "side"}


@pytest.fixture(scope="module")
def images(docker_client, busybox_image) -> dict[str, str]:
    return {MOVED: build_versioned(docker_client, MOVED, "v1"), STABLE: build_versioned(docker_client, STABLE, "stable")}


# ------------------------------------------------------------------ pure key


def _manifest(gpu: int = 0, env: dict | None = None):
    from algodock.contract.manifest import Manifest

    return Manifest.model_validate({
        "manifest_version": "0.1", "name": "a", "version": "1.0.0",
        "container_parameters": {"image": "x:1", "command": ["run"], "env": env or {}, "resource_request": {"gpu": gpu}},
        "inputs": [{"name": "raw", "format": "csv", "multiple": True}], "outputs": [{"name": "out", "format": "csv"}],
    })


def test_cache_key_covers_everything_the_container_sees(tmp_path) -> None:
    """docs/contract.md §6: image id, command, env, parameters, GPU, the whole algo_input.json (file names
    and source_uri included) and every input byte; never the tag."""
    one, two = tmp_path / "one", tmp_path / "two"
    for folder, name in ((one, "raw.csv"), (two, "renamed.csv")):
        folder.mkdir()
        (folder / name).write_text("a,b\n")
    rec = StepRecord(id="a", image="x:1", image_id="sha256:" + "1" * 64, command=["run"], parameters={"n": 1})
    m = _manifest()
    a = {"raw": InputBinding(slot="raw", path=one, uri="s3://b/raw/", sha256="ab" * 32)}
    key = cache_key(rec, a, m)
    assert key == cache_key(rec, {"raw": InputBinding(slot="raw", path=one, uri="s3://b/raw/", sha256="ab" * 32)}, m)
    assert key == cache_key(rec.model_copy(update={"image": "x:2"}), a, m), "the tag is never part of the key"
    different = {
        "parameters": cache_key(rec.model_copy(update={"parameters": {"n": 2}}), a, m),
        "image id": cache_key(rec.model_copy(update={"image_id": "sha256:" + "2" * 64}), a, m),
        "command": cache_key(rec.model_copy(update={"command": ["run", "-v"]}), a, m),
        "env": cache_key(rec, a, _manifest(env={"MODE": "fast"})),
        "gpu": cache_key(rec, a, _manifest(gpu=1)),
        "input bytes": cache_key(rec, {"raw": InputBinding(slot="raw", path=one, uri="s3://b/raw/", sha256="cd" * 32)}, m),
        "source_uri": cache_key(rec, {"raw": InputBinding(slot="raw", path=one, uri="s3://b/other/", sha256="ab" * 32)}, m),
        "file names": cache_key(rec, {"raw": InputBinding(slot="raw", path=two, uri="s3://b/raw/", sha256="ab" * 32)}, m),
    }
    assert {what for what, k in different.items() if k == key} == set(), "the key misses what the container can see"
    assert len(set(different.values())) == len(different)


# ------------------------------------------------------------------ engine


def test_second_run_is_cached_and_reuses_outputs_in_place(tmp_path, docker_client, images) -> None:
    spec = five_step_pipeline(tmp_path)
    store = open_store(str(tmp_path / "store"))
    first = run_local(spec, store, "r1", docker_client)
    assert statuses(first) == dict.fromkeys(ALL, "succeeded")
    second = run_local(spec, store, "r2", docker_client)
    assert statuses(second) == dict.fromkeys(ALL, "cached")
    for step in second.steps:
        earlier = first.step(step.id)
        assert step.cached_from == "r1"
        assert step.cache_key == earlier.cache_key and step.cache_key
        assert [o.uri for o in step.outputs] == [o.uri for o in earlier.outputs], "cached outputs are reused in place"
        assert [o.sha256 for o in step.outputs] == [o.sha256 for o in earlier.outputs]
        assert step.image_id == earlier.image_id
        assert step.exit_code is None and step.started_at is not None
        assert store.exists(cache_rel(step.cache_key))
    # producers are recorded for cached steps too, with this run's view of its inputs
    assert second.step("after_copy").inputs[0].produced_by == "copy"
    assert second.step("after_copy").inputs[0].uri == first.step("copy").outputs[0].uri


def test_changed_parameters_and_input_bytes_miss(tmp_path, docker_client, images) -> None:
    spec = five_step_pipeline(tmp_path)
    store = open_store(str(tmp_path / "store"))
    run_local(spec, store, "r1", docker_client)

    doc = run_local(spec, store, "r2", docker_client, overrides={"side": {"label": "b"}})
    assert statuses(doc) == {**dict.fromkeys(ALL, "cached"), "side": "succeeded"}

    # The same bytes written again (new mtime, new inode) are the same input.
    raw = tmp_path / "raw.parquet"
    raw.write_bytes(raw.read_bytes())
    assert statuses(run_local(spec, store, "r3", docker_client)) == dict.fromkeys(ALL, "cached")

    write_table(raw, [1, 2, 3, 4])
    doc = run_local(spec, store, "r4", docker_client)
    assert statuses(doc) == dict.fromkeys(ALL, "succeeded"), "every step reads raw, directly or through its producer"


def test_moved_tag_reruns_its_steps_and_only_the_downstream_whose_inputs_changed(tmp_path, docker_client, images) -> None:
    spec = five_step_pipeline(tmp_path)
    store = open_store(str(tmp_path / "store"))
    old_id = build_versioned(docker_client, MOVED, "v1")
    first = run_local(spec, store, "r1", docker_client)
    assert first.step("stamp").image_id == old_id

    new_id = build_versioned(docker_client, MOVED, "v2")
    assert new_id != old_id
    try:
        doc = run_local(spec, store, "r2", docker_client)
        assert statuses(doc) == {
            "stamp": "succeeded",  # new image id: runs again; its output embeds /algo-version, so its bytes change
            "copy": "succeeded",  # new image id: runs again, but writes the same bytes
            "after_stamp": "succeeded",  # its input changed
            "after_copy": "cached",  # its input hash did not change
            "side": "cached",  # the stable image, the same input
        }
        assert doc.step("stamp").image_id == doc.step("copy").image_id == docker_client.images.get(MOVED).id == new_id
        assert doc.step("stamp").image == MOVED, "the tag as written is kept beside the id"
        assert doc.step("stamp").outputs[0].sha256 != first.step("stamp").outputs[0].sha256
        assert doc.step("copy").outputs[0].sha256 == first.step("copy").outputs[0].sha256
        assert doc.step("after_copy").cached_from == "r1"
    finally:
        build_versioned(docker_client, MOVED, "v1")  # leave the tag where the module's other tests expect it


def test_no_cache_runs_everything_but_records_keys(tmp_path, docker_client, images) -> None:
    spec = five_step_pipeline(tmp_path)
    store = open_store(str(tmp_path / "store"))
    first = run_local(spec, store, "r1", docker_client)
    doc = run_local(spec, store, "r2", docker_client, use_cache=False)
    assert statuses(doc) == dict.fromkeys(ALL, "succeeded")
    # the same key where the container saw the same; downstream, the inputs' source_uri is this run's new outputs
    assert {s.id for s in doc.steps if s.cache_key == first.step(s.id).cache_key} == {"stamp", "copy", "side"}


def test_missing_earlier_outputs_are_a_miss(tmp_path, docker_client, images) -> None:
    import shutil

    spec = five_step_pipeline(tmp_path)
    store = open_store(str(tmp_path / "store"))
    first = run_local(spec, store, "r1", docker_client)
    shutil.rmtree(store.local_path("runs/r1/steps/stamp"))
    doc = run_local(spec, store, "r2", docker_client)
    assert doc.step("stamp").status == "succeeded"
    assert doc.step("copy").status == "cached"
    # and the entry now points at the new run's outputs
    entry = json.loads(store.local_path(cache_rel(first.step("stamp").cache_key)).read_text())
    assert entry["run_id"] == "r2"


def test_identical_bytes_are_stored_once_and_keep_downstream_cached(tmp_path, docker_client, images) -> None:
    """``copy``, ``after_copy`` and ``side`` all write the bytes of raw.parquet as table.parquet: one stored copy."""
    spec = five_step_pipeline(tmp_path)
    store = open_store(str(tmp_path / "store"))
    first = run_local(spec, store, "r1", docker_client)
    uris = {first.step(s).outputs[0].uri for s in ("copy", "after_copy", "side")}
    assert len(uris) == 1 and "/runs/r1/steps/copy/attempts/" in uris.pop()


@pytest.mark.s3
def test_cache_is_shared_through_an_s3_store(tmp_path, docker_client, images, s3_endpoint) -> None:
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="cache-test")
    spec = five_step_pipeline(tmp_path)
    first = run_local(spec, open_store("s3://cache-test/store"), "r1", docker_client)
    assert statuses(first) == dict.fromkeys(ALL, "succeeded")
    assert all(o.uri.startswith("s3://cache-test/store/runs/r1/") for s in first.steps for o in s.outputs)
    # another StoreCache, another store object: only the bucket is shared (as between hosts)
    second = run_local(spec, open_store("s3://cache-test/store"), "r2", docker_client)
    assert statuses(second) == dict.fromkeys(ALL, "cached")
    assert second.step("after_copy").outputs[0].uri == first.step("after_copy").outputs[0].uri


def test_an_earlier_attempt_of_the_same_run_is_kept_even_without_cache(tmp_path, docker_client, images) -> None:
    spec = five_step_pipeline(tmp_path)
    store = open_store(str(tmp_path / "store"))
    first = run_local(spec, store, "r1", docker_client, use_cache=False)
    again = run_local(spec, store, "r1", docker_client, use_cache=False)
    assert statuses(again) == dict.fromkeys(ALL, "succeeded")
    for step in again.steps:
        assert step.started_at == first.step(step.id).started_at, f"{step.id} ran again"
    # a changed parameter is not the same step: it runs
    third = run_local(spec, store, "r1", docker_client, overrides={"side": {"label": "z"}}, use_cache=False)
    assert third.step("side").started_at != first.step("side").started_at
    assert third.step("copy").started_at == first.step("copy").started_at


def test_lookup_without_resolved_image_is_an_error(tmp_path) -> None:
    cache = StoreCache(open_store(str(tmp_path)))
    with pytest.raises(ValueError, match="resolved"):
        cache.lookup(StepRecord(id="a"), {})


# ------------------------------------------------------------------ the flow


@pytest.mark.prefect
def test_retried_flow_run_reruns_only_failed_and_skipped_steps(tmp_path, docker_client, images, prefect_harness) -> None:
    """A flow run retried (same run id) keeps the steps that succeeded, re-runs the failed one and the skipped ones."""
    from algodock.flows.pipeline import run_pipeline

    spec = five_step_pipeline(tmp_path)
    # make `copy` fail the first time: its manifest is rewritten before the retry
    copy_manifest = tmp_path / "manifests" / "copy.json"
    good = copy_manifest.read_text()
    manifest(copy_manifest, name="copy", image=MOVED, command=sh("echo broken >&2; exit 3"), inputs=[{"name": "raw", "format": "parquet"}], outputs=[{"name": "table", "format": "parquet"}])
    store_dir = tmp_path / "store"
    kwargs = dict(spec=str(spec), store=str(store_dir), run_id="retry-me", capacity="cpu_millicore=4000,memory_gb=4", no_cache=True)

    state = run_pipeline(**kwargs, return_state=True)
    assert state.is_failed()
    store = open_store(str(store_dir))
    first = json.loads(store.local_path(lineage_rel("retry-me")).read_text())
    first_status = {s["id"]: s["status"] for s in first["steps"]}
    assert first_status == {"stamp": "succeeded", "copy": "failed", "after_stamp": "succeeded", "after_copy": "skipped", "side": "succeeded"}
    assert {s["id"]: s["failure"]["kind"] for s in first["steps"] if s["failure"]} == {"copy": "exit_code"}

    copy_manifest.write_text(good)
    state = run_pipeline(**kwargs, return_state=True)
    assert state.is_completed(), state.message
    second = json.loads(store.local_path(lineage_rel("retry-me")).read_text())
    assert {s["id"]: s["status"] for s in second["steps"]} == dict.fromkeys(ALL, "succeeded")
    started = {s["id"]: s["started_at"] for s in first["steps"]}
    for s in second["steps"]:
        if first_status[s["id"]] == "succeeded":
            assert s["started_at"] == started[s["id"]], f"{s['id']} succeeded before and must not run again"
        else:
            assert s["started_at"] and s["started_at"] != started[s["id"]]
    assert second["status"] == "succeeded" and second["flow_run_id"]
