"""Stores: a local folder, and S3 through a real moto server over HTTP (no mocks).

The ``s3_endpoint`` session fixture comes from tests/s3server.py through tests/conftest.py.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from algodock.errors import InfrastructureError, InvalidInput
from algodock.hashing import list_files, sha256_path
from algodock.store.backends import (
    DEFAULT_STORE,
    MARKER_SUFFIX,
    LocalStore,
    S3Store,
    Store,
    cache_rel,
    fetch_uri,
    lease_rel,
    lineage_rel,
    local_path_of,
    new_attempt_id,
    retrying,
    log_rel,
    open_store,
    output_rel,
    run_json_rel,
    s3_filesystem,
)


def parquet_parts(folder: Path, parts: int = 3, rows: int = 4) -> Path:
    """A folder of parquet parts, one nested, like a Spark/pyarrow dataset."""
    folder.mkdir(parents=True)
    for i in range(parts):
        target = folder / (f"sub/part-{i:03d}.parquet" if i == parts - 1 else f"part-{i:03d}.parquet")
        target.parent.mkdir(exist_ok=True)
        pq.write_table(pa.table({"x": list(range(i * rows, (i + 1) * rows))}), target)
    return folder


def all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_layout() -> None:
    assert output_rel("r1", "visits", "visits.parquet", "2-abc") == "runs/r1/steps/visits/attempts/2-abc/outputs/visits.parquet"
    assert log_rel("r1", "visits", "2-abc") == "runs/r1/steps/visits/attempts/2-abc/container.log"
    assert lease_rel("r1") == "runs/r1/lease.json"
    assert new_attempt_id(3) != new_attempt_id(3) and new_attempt_id(3).startswith("3-")
    assert run_json_rel("r1") == "runs/r1/run.json"
    assert lineage_rel("r1") == "runs/r1/lineage.json"
    assert output_rel("r1", "visits", "visits.parquet") == "runs/r1/steps/visits/outputs/visits.parquet"
    assert log_rel("r1", "visits") == "runs/r1/steps/visits/container.log"
    assert cache_rel("abc") == "cache/abc.json"


# ---------------------------------------------------------------- open_store and URIs


def test_open_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3_endpoint: str) -> None:
    monkeypatch.chdir(tmp_path)
    default = open_store(None)
    assert isinstance(default, LocalStore) and default.root == tmp_path / DEFAULT_STORE
    assert open_store("").root == default.root  # type: ignore[attr-defined]
    assert open_store(f"file://{tmp_path}/st").root == tmp_path / "st"  # type: ignore[attr-defined]
    assert open_store("rel/st").root == tmp_path / "rel/st"  # type: ignore[attr-defined]
    s3 = open_store("s3://bucket/some/prefix/")
    assert isinstance(s3, S3Store) and not s3.is_local
    assert s3.uri("runs", "r1") == "s3://bucket/some/prefix/runs/r1" and s3.local_path("runs") is None
    assert open_store("s3://bucket").uri("x") == "s3://bucket/x"
    for bad, why in [("http://host/x", "unsupported URI scheme"), ("file://otherhost/x", "another host"), ("s3://", "needs a bucket")]:
        with pytest.raises(InvalidInput, match=why):
            open_store(bad)


def test_local_path_of() -> None:
    assert local_path_of("/a/b") == Path("/a/b")
    assert local_path_of("file:///a/b%20c") == Path("/a/b c")
    assert local_path_of("file://localhost/a") == Path("/a")
    assert local_path_of("s3://b/k") is None


def test_paths_must_stay_inside_the_store(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    for bad in ["../x", "/etc/passwd", "runs/../../x"]:
        with pytest.raises(ValueError, match="relative without"):
            store.write_json(bad, {})


# ---------------------------------------------------------------- local store


def test_local_json_round_trip_is_atomic(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "st")
    assert store.is_local and store.read_json("runs/r1/run.json") is None and not store.exists("runs/r1/run.json")
    store.write_json("runs/r1/run.json", {"status": "running", "n": [1, 2]})
    store.write_json("runs/r1/run.json", {"status": "succeeded"})
    assert store.read_json("runs/r1/run.json") == {"status": "succeeded"}
    assert store.exists("runs/r1/run.json") and store.list("runs") == ["r1"] and store.list("nothing") == []
    assert store.uri("runs/r1/run.json") == str(tmp_path / "st/runs/r1/run.json")
    # A write that fails half-way leaves the previous record whole, and no temporary file.
    circular: list = []
    circular.append(circular)
    with pytest.raises(ValueError, match="Circular reference"):
        store.write_json("runs/r1/run.json", {"bad": circular})
    assert store.read_json("runs/r1/run.json") == {"status": "succeeded"}
    assert all_files(tmp_path / "st") == ["runs", "runs/r1", "runs/r1/run.json"]


def test_local_put_output_file_is_hardlinked(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "st")
    src = tmp_path / "work" / "visits.parquet"
    src.parent.mkdir()
    pq.write_table(pa.table({"x": [1, 2, 3]}), src)
    rel = output_rel("r1", "visits", "visits.parquet")
    assert not store.output_exists(rel)
    uri = store.put_output(src, rel)
    dest = tmp_path / "st" / rel
    assert uri == str(dest) and store.output_exists(rel)
    assert dest.stat().st_ino == src.stat().st_ino  # same filesystem: no bytes copied
    assert store.fetch(uri, tmp_path / "unused") == dest  # local: the path itself
    assert not (tmp_path / "unused").exists()
    # Putting it again (a retry) replaces it; putting the destination itself is a no-op.
    assert store.put_output(src, rel) == uri
    assert store.put_output(dest, rel) == uri
    assert all_files(dest.parent) == ["visits.parquet"]


def test_local_put_output_folder_is_committed_whole_and_never_replaced(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "st")
    src = parquet_parts(tmp_path / "work" / "parts", parts=3)
    rel = output_rel("r1", "split", "parts", "1-aaaa")
    uri = store.put_output(src, rel)
    assert sorted(list_files(uri)) == ["part-000.parquet", "part-001.parquet", "sub/part-002.parquet"]
    assert sha256_path(uri) == sha256_path(src)
    assert pq.read_table(uri).num_rows == 12
    # A second attempt cannot write over it (a lineage document may point at it): it writes elsewhere.
    smaller = parquet_parts(tmp_path / "work2" / "parts", parts=1)
    with pytest.raises(FileExistsError, match="never replaced"):
        store.put_output(smaller, rel)
    assert sorted(list_files(uri)) == ["part-000.parquet", "part-001.parquet", "sub/part-002.parquet"]
    other = store.put_output(smaller, output_rel("r1", "split", "parts", "2-bbbb"))
    assert list_files(other) == ["sub/part-000.parquet"]
    # move=True renames the source into place.
    moved = parquet_parts(tmp_path / "work3" / "parts", parts=2)
    third = store.put_output(moved, output_rel("r1", "split", "parts", "3-cccc"), move=True)
    assert not moved.exists() and list_files(third) == ["part-000.parquet", "sub/part-001.parquet"]


def test_local_temporaries_are_never_seen_as_outputs(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    outputs = tmp_path / "runs/r1/steps/a/outputs"
    (outputs / ".tmp-visits.parquet-1234").mkdir(parents=True)  # what a crash mid-put leaves
    assert store.list("runs/r1/steps/a/outputs") == []
    assert not store.output_exists("runs/r1/steps/a/outputs/visits.parquet")


def test_local_fetch_of_local_uris_copies_nothing(tmp_path: Path) -> None:
    data = parquet_parts(tmp_path / "data")
    store = LocalStore(tmp_path / "st")
    assert store.fetch(str(data), tmp_path / "dest") == data
    assert store.fetch(f"file://{data}/part-000.parquet", tmp_path / "dest") == data / "part-000.parquet"
    assert not (tmp_path / "dest").exists()
    with pytest.raises(InvalidInput, match="no such file or folder"):
        store.fetch(str(tmp_path / "missing"), tmp_path / "dest")


# ---------------------------------------------------------------- S3 store (moto over HTTP)


@pytest.fixture
def s3_store(bucket: str) -> S3Store:
    return S3Store(f"s3://{bucket}/stores/main")


def test_s3_filesystem_uses_the_aws_environment(s3_endpoint: str) -> None:
    assert os.environ["AWS_ENDPOINT_URL"] == s3_endpoint
    assert s3_filesystem().client_kwargs["endpoint_url"] == s3_endpoint


def test_s3_json_round_trip(s3_store: S3Store) -> None:
    assert s3_store.read_json(run_json_rel("r1")) is None and not s3_store.exists(run_json_rel("r1"))
    s3_store.write_json(run_json_rel("r1"), {"status": "running"})
    s3_store.write_json(run_json_rel("r1"), {"status": "succeeded", "steps": [{"id": "a"}]})
    s3_store.write_json(cache_rel("k1"), {"hit": True})
    assert s3_store.read_json(run_json_rel("r1")) == {"status": "succeeded", "steps": [{"id": "a"}]}
    assert s3_store.exists(run_json_rel("r1")) and s3_store.exists("runs/r1")
    assert s3_store.list("runs") == ["r1"] and s3_store.list("") == ["cache", "runs"] and s3_store.list("nope") == []
    assert s3_store.uri(run_json_rel("r1")) == f"s3://{s3_store.root}/runs/r1/run.json"


def test_s3_put_and_fetch_a_file(s3_store: S3Store, tmp_path: Path) -> None:
    src = tmp_path / "work" / "visits.parquet"
    src.parent.mkdir()
    pq.write_table(pa.table({"x": [1, 2, 3]}), src)
    rel = output_rel("r1", "visits", "visits.parquet")
    assert not s3_store.output_exists(rel)
    uri = s3_store.put_output(src, rel)
    assert uri == f"s3://{s3_store.root}/{rel}" and s3_store.output_exists(rel)
    marker = s3_store.read_json(rel + MARKER_SUFFIX)
    assert marker["kind"] == "file" and marker["files"] == [{"path": "", "size": src.stat().st_size, "sha256": sha256_path(src)}]
    assert marker["sha256"] == sha256_path(src)
    assert s3_store.list("runs/r1/steps/visits/outputs") == ["visits.parquet"]  # markers hidden
    got = s3_store.fetch(uri, tmp_path / "staged")
    assert got == tmp_path / "staged" / "visits.parquet"
    assert got.read_bytes() == src.read_bytes()
    assert all_files(tmp_path / "staged") == ["visits.parquet"]  # no temporaries left


def test_s3_put_and_fetch_a_folder_of_parquet_parts(s3_store: S3Store, tmp_path: Path) -> None:
    src = parquet_parts(tmp_path / "work" / "parts", parts=5)
    rel = output_rel("r1", "split", "parts")
    uri = s3_store.put_output(src, rel)
    marker = s3_store.read_json(rel + MARKER_SUFFIX)
    assert marker["kind"] == "folder" and [f["path"] for f in marker["files"]] == list_files(src)
    got = s3_store.fetch(uri, tmp_path / "staged")
    assert got == tmp_path / "staged" / "parts"
    assert list_files(got) == list_files(src) and sha256_path(got) == sha256_path(src)
    assert pq.read_table(got).num_rows == 20
    # A retry cannot replace a committed output (nothing is deleted); it writes under its own attempt.
    smaller = parquet_parts(tmp_path / "work2" / "parts", parts=2)
    with pytest.raises(FileExistsError, match="never replaced"):
        s3_store.put_output(smaller, rel)
    assert sorted(s3_store.fs.find(s3_store.uri(rel))) == [f"{s3_store.root}/{rel}/{r}" for r in list_files(src)]
    rel2 = output_rel("r1", "split", "parts", "2-bbbb")
    again = s3_store.fetch(s3_store.put_output(smaller, rel2), tmp_path / "staged2")
    assert list_files(again) == list_files(smaller)
    assert all_files(tmp_path / "staged2") == ["parts", "parts/part-000.parquet", "parts/sub", "parts/sub/part-001.parquet"]


def test_s3_output_without_marker_reads_as_absent(s3_store: S3Store, tmp_path: Path) -> None:
    src = parquet_parts(tmp_path / "parts")
    rel = output_rel("r1", "split", "parts")
    # What a crash between the data upload and the marker leaves behind:
    s3_store.fs.put([str(src / r) for r in list_files(src)], [f"{s3_store.root}/{rel}/{r}" for r in list_files(src)])
    assert s3_store.exists(rel) and not s3_store.output_exists(rel)
    with pytest.raises(InvalidInput, match="not committed"):
        s3_store.fetch(s3_store.uri(rel), tmp_path / "staged")
    # Committing it (the same writer finishing its upload) makes it visible; removing the marker hides it again.
    s3_store.put_output(src, rel)
    assert s3_store.output_exists(rel)
    s3_store.fs.rm_file(s3_store.uri(rel) + MARKER_SUFFIX)
    assert not s3_store.output_exists(rel)


def test_s3_empty_folder_output(s3_store: S3Store, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    uri = s3_store.put_output(tmp_path / "empty", output_rel("r1", "a", "nothing"))
    assert s3_store.output_exists(output_rel("r1", "a", "nothing"))
    got = s3_store.fetch(uri, tmp_path / "staged")
    assert got.is_dir() and list_files(got) == []


def test_s3_log_upload(s3_store: S3Store, tmp_path: Path) -> None:
    log = tmp_path / "container.log"
    log.write_text("line 1\nline 2\n")
    uri = s3_store.put_output(log, log_rel("r1", "a"))
    assert s3_store.fs.cat_file(uri) == b"line 1\nline 2\n"


def test_fetch_uri_of_external_s3_inputs(bucket: str, tmp_path: Path) -> None:
    fs = s3_filesystem()
    src = parquet_parts(tmp_path / "pings")
    fs.put([str(src / r) for r in list_files(src)], [f"{bucket}/raw/pings/2026-11-27/{r}" for r in list_files(src)])
    fs.pipe_file(f"{bucket}/raw/single.json", b'{"a": 1}')
    # A local store fetching external S3 data: configured from the environment alone.
    store = LocalStore(tmp_path / "st")
    got = store.fetch(f"s3://{bucket}/raw/pings/2026-11-27/", tmp_path / "in")
    assert got == tmp_path / "in" / "2026-11-27" and sha256_path(got) == sha256_path(src)
    assert json.loads(fetch_uri(f"s3://{bucket}/raw/single.json", tmp_path / "in").read_text()) == {"a": 1}
    # An S3 store fetches inputs outside its runs/ without asking for markers.
    s3 = S3Store(f"s3://{bucket}/stores/x")
    assert sha256_path(s3.fetch(f"s3://{bucket}/raw/pings/2026-11-27", tmp_path / "in2")) == sha256_path(src)
    for missing in (f"s3://{bucket}/raw/nope", f"s3://{bucket}-missing/x"):
        with pytest.raises(InvalidInput, match="no such S3 object or prefix"):
            fetch_uri(missing, tmp_path / "in3")


def test_s3_missing_bucket_is_an_infrastructure_error(s3_endpoint: str, tmp_path: Path) -> None:
    store: Store = S3Store(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/p")
    with pytest.raises(InfrastructureError, match="does the bucket exist"):
        store.write_json("runs/r/run.json", {})
    (tmp_path / "f").write_text("x")
    with pytest.raises(InfrastructureError, match="cannot upload"):
        store.put_output(tmp_path / "f", "runs/r/steps/a/outputs/f.json")


def test_s3_unreachable_endpoint_is_an_infrastructure_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    store = S3Store("s3://bucket/p", fs=s3_filesystem(skip_instance_cache=True, config_kwargs={"retries": {"max_attempts": 1}, "connect_timeout": 1}))
    with pytest.raises(InfrastructureError, match="cannot write s3://bucket/p/x.json"):
        store.write_json("x.json", {})


# ---------------------------------------------------------------- conditional writes and retries


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_conditional_json_writes(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    store: Store = LocalStore(tmp_path / "st") if kind == "local" else request.getfixturevalue("s3_store")
    v1 = store.create_json("runs/r/lease.json", {"n": 1})
    with pytest.raises(FileExistsError):
        store.create_json("runs/r/lease.json", {"n": 2})
    doc, version = store.read_json_versioned("runs/r/lease.json")
    assert doc == {"n": 1} and version == v1
    v2 = store.replace_json("runs/r/lease.json", {"n": 3}, v1)
    with pytest.raises(FileExistsError):  # v1 is stale now: a compare-and-swap, not a blind write
        store.replace_json("runs/r/lease.json", {"n": 4}, v1)
    assert store.read_json_versioned("runs/r/lease.json") == ({"n": 3}, v2)
    assert store.read_json_versioned("runs/r/none.json") == (None, None)
    assert store.list("runs/r") == ["lease.json"]


def test_retrying_bounds_a_stalled_operation_and_backs_off() -> None:
    import threading

    calls: list[float] = []
    release = threading.Event()

    def stalls_once() -> str:
        calls.append(time.monotonic())
        if len(calls) == 1:
            release.wait(30)  # a stalled endpoint: no answer
        return "done"

    assert retrying(stalls_once, "uploading x", attempts=3, timeout=0.5, backoff=0.05) == "done"
    release.set()
    # A second call means the stalled first try was abandoned at its bound (unbounded, the
    # first call would have answered alone, after the 30 s stall).
    assert len(calls) == 2

    def always_fails() -> None:
        raise InfrastructureError("s3 down")

    with pytest.raises(InfrastructureError, match="uploading y failed 3 times; last error: s3 down"):
        retrying(always_fails, "uploading y", attempts=3, timeout=1, backoff=0.01)
    with pytest.raises(FileExistsError):  # a refused overwrite is an answer, not a fault: never retried
        retrying(lambda: (_ for _ in ()).throw(FileExistsError("x")), "z", attempts=3, timeout=1, backoff=0.01)


@pytest.mark.parametrize("obj", [
    {"run_id": "r", "steps": [{"id": "a", "outputs": [{"uri": "file:///x", "sha256": "0" * 64}]}, {"id": "b", "when": "2026-12-03"}], "empty": [], "meta": {"k": [1, 2]}},
    {}, [1, {"a": None}], {1: "a key that is not a string"}, "text",
])
def test_a_store_record_is_the_json_it_always_was_one_field_and_one_list_item_a_line(tmp_path, obj) -> None:
    """``encode_json`` (the C encoder, not ``indent=2``'s pure-Python one) reads back as the same
    JSON; a lineage document is one step a line, so it stays readable without a formatter."""
    from algodock.store.base import encode_json

    data = encode_json(obj)
    assert json.loads(data) == json.loads(json.dumps(obj, default=str))
    store = LocalStore(tmp_path / "store")
    store.write_json("runs/r/doc.json", obj)
    assert store.read_json("runs/r/doc.json") == json.loads(data)
    if isinstance(obj, dict) and "steps" in obj:
        lines = data.decode().splitlines()
        assert [json.loads(line.rstrip(","))["id"] for line in lines if line.startswith("    {")] == ["a", "b"], lines
