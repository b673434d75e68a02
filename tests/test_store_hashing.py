"""Hashes measured, not trusted (issue 7, item 5), on a real moto S3 server over HTTP.

The commit marker records each file's size and sha256 as measured from the bytes uploaded;
a download is hashed as it streams in and checked against the marker, or against the
producer's recorded sha256; a mismatch is an ``infrastructure`` error naming the object.
Nothing but a regular file is ever uploaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from algodock.errors import InfrastructureError, InvalidOutput
from algodock.hashing import list_files, sha256_file, sha256_path
from algodock.store.backends import MARKER_SUFFIX, S3Store, fetch_input, output_rel, s3_filesystem


@pytest.fixture
def store(bucket: str) -> S3Store:
    return S3Store(f"s3://{bucket}/st")


@pytest.fixture
def parts(tmp_path: Path) -> Path:
    src = tmp_path / "parts"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 17))  # several read chunks
    (src / "sub" / "b.bin").write_bytes(b"b")
    (src / "empty.bin").write_bytes(b"")
    return src


def test_the_marker_records_each_files_size_and_sha256(store: S3Store, parts: Path) -> None:
    rel = output_rel("r1", "s", "parts")
    store.put_output(parts, rel)
    marker = store.read_json(rel + MARKER_SUFFIX)
    assert marker["files"] == [{"path": r, "size": (parts / r).stat().st_size, "sha256": sha256_file(parts / r)} for r in list_files(parts)]
    assert marker["sha256"] == sha256_path(parts)


def test_a_download_is_hashed_as_it_streams_and_checked_against_the_marker(store: S3Store, parts: Path, tmp_path: Path) -> None:
    rel = output_rel("r1", "s", "parts")
    uri = store.put_output(parts, rel)
    got = store.fetch_input(uri, tmp_path / "in", expected_sha256=sha256_path(parts))
    assert got.sha256 == sha256_path(parts) == sha256_path(got.path) and got.files == tuple(list_files(parts))
    # The object changes after it was committed (another writer, bit rot): the download says which.
    store.fs.pipe_file(f"{store.root}/{rel}/sub/b.bin", b"B")
    with pytest.raises(InfrastructureError, match=r"s3://\S+/parts/sub/b.bin: the downloaded bytes have sha256 .* producer recorded"):
        store.fetch(uri, tmp_path / "in2")
    assert not (tmp_path / "in2" / "parts").exists(), "a download that fails its check is never put in place"


def test_the_producers_recorded_sha256_is_checked(store: S3Store, bucket: str, tmp_path: Path) -> None:
    fs = s3_filesystem()
    fs.pipe_file(f"{bucket}/raw/x.json", b'{"a": 1}')
    got = fetch_input(f"s3://{bucket}/raw/x.json", tmp_path / "in")
    assert got.sha256 == sha256_file(got.path) and got.files is None
    with pytest.raises(InfrastructureError, match=rf"s3://{bucket}/raw/x.json: the downloaded bytes"):
        store.fetch(f"s3://{bucket}/raw/x.json", tmp_path / "in2", expected_sha256="0" * 64)


def test_a_symlink_is_never_uploaded(store: S3Store, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("host secret")
    (tmp_path / "link.csv").symlink_to(secret)
    with pytest.raises(InvalidOutput, match="symlink is never uploaded"):
        store.put_output(tmp_path / "link.csv", output_rel("r1", "s", "v.csv"))
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "ok.csv").write_text("ok")
    (folder / "leak.csv").symlink_to(secret)
    os.mkfifo(folder / "fifo")
    store.put_output(folder, output_rel("r1", "s", "f"))
    keys = store.fs.find(f"{store.root}/runs")
    assert all("leak" not in k and "fifo" not in k and "v.csv" not in k for k in keys), keys
    assert not any(b"host secret" in store.fs.cat_file(k) for k in keys)
