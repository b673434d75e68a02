"""Pure logic without Docker: reading algo_output.json without trusting it, finding and hashing
outputs (CONTRACT.md §3), and staging inputs into a step's work folder (§2)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from algodock.contract.manifest import parse_manifest
from algodock.errors import InvalidInput, InvalidOutput, MissingOutput
from algodock.hashing import folder_digest, list_files, parquet_rows, sha256_file, sha256_path
from algodock.runtime.outputs import MAX_ALGO_OUTPUT_BYTES, collect_outputs, read_algo_output
from algodock.records import InputBinding
from algodock.runtime.staging import plan_inputs, prepare_work_dir


def manifest(outputs: list[dict[str, Any]] | None = None, inputs: list[dict[str, Any]] | None = None):
    return parse_manifest(
        {
            "manifest_version": "0.1",
            "name": "t",
            "version": "1",
            "container_parameters": {"image": "x:1", "command": ["true"]},
            "inputs": inputs or [],
            "outputs": outputs or [],
        }
    )


def write_parquet(path: Path, rows: int) -> Path:
    pq.write_table(pa.table({"id": list(range(rows)), "v": [float(i) for i in range(rows)]}), path)
    return path


def algo_output(out: Path, *entries: tuple[str, str, str], **extra: Any) -> None:
    doc = {"version": "0.1.0", "status": "success", "output_data": [{"name": n, "format": f, "path": p} for n, f, p in entries], **extra}
    (out / "algo_output.json").write_text(json.dumps(doc))


def collect(out: Path, *slots: dict[str, Any]):
    return collect_outputs(manifest(list(slots)), out, read_algo_output(out))


@pytest.fixture
def out(tmp_path: Path) -> Path:
    d = tmp_path / "output"
    d.mkdir()
    return d


# ------------------------------------------------------------------ algo_output.json itself


def test_absent_algo_output_is_none(out: Path) -> None:
    assert read_algo_output(out) is None


def test_valid_algo_output_is_read_with_metrics_and_extra_keys(out: Path) -> None:
    algo_output(out, ("visits", "csv", "v.csv"), metrics={"rows_in": 3}, message="ok", extra_key=1)
    got = read_algo_output(out)
    assert got is not None
    assert got.output_data[0].path == "v.csv" and got.metrics == {"rows_in": 3} and got.message == "ok"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"status": "success", "output_data": [', "algo_output.json is not valid JSON"),
        ("\xff\xfe garbage", "algo_output.json is not valid JSON"),
        ("[1, 2]", "algo_output.json: expected a JSON object, got list"),
        ('{"output_data": [{"name": "v", "format": "csv"}]}', "algo_output.json: output_data.0.path: required field is missing"),
        ('{"output_data": [{"name": "v", "format": "xlsx", "path": "v"}]}', "algo_output.json: output_data.0.format"),
        ('{"status": "maybe"}', "algo_output.json: status"),
        ('{"output_data": "v.csv"}', "algo_output.json: output_data: Input should be a valid list"),
    ],
    ids=["truncated", "not-utf8", "not-object", "entry-without-path", "bad-format", "bad-status", "output-data-not-list"],
)
def test_malformed_algo_output_is_invalid_output(out: Path, text: str, expected: str) -> None:
    (out / "algo_output.json").write_bytes(text.encode("latin-1") if text.startswith("\xff") else text.encode())
    with pytest.raises(InvalidOutput) as info:
        read_algo_output(out)
    assert expected in str(info.value)
    assert info.value.kind == "invalid_output"


def test_algo_output_symlink_is_rejected_even_when_it_points_inside(out: Path) -> None:
    (out / "real.json").write_text('{"status": "success"}')
    (out / "algo_output.json").symlink_to("real.json")
    with pytest.raises(InvalidOutput, match="must be a regular file"):
        read_algo_output(out)


def test_algo_output_symlink_to_host_file_is_rejected(out: Path) -> None:
    (out / "algo_output.json").symlink_to("/etc/passwd")
    with pytest.raises(InvalidOutput, match="must be a regular file"):
        read_algo_output(out)


def test_algo_output_folder_or_fifo_is_rejected(out: Path) -> None:
    (out / "algo_output.json").mkdir()
    with pytest.raises(InvalidOutput, match="must be a regular file"):
        read_algo_output(out)
    (out / "algo_output.json").rmdir()
    os.mkfifo(out / "algo_output.json")  # reading it would block forever
    with pytest.raises(InvalidOutput, match="must be a regular file"):
        read_algo_output(out)


def test_oversized_algo_output_is_rejected_without_reading_it(out: Path) -> None:
    with open(out / "algo_output.json", "wb") as fh:
        fh.truncate(MAX_ALGO_OUTPUT_BYTES + 1)
    with pytest.raises(InvalidOutput, match=f"the limit is {MAX_ALGO_OUTPUT_BYTES}"):
        read_algo_output(out)


# ------------------------------------------------------------------ path escapes


def test_absolute_path_is_rejected(out: Path) -> None:
    algo_output(out, ("v", "csv", "/etc/passwd"))
    with pytest.raises(InvalidOutput, match="path '/etc/passwd' must be relative to the output folder"):
        collect(out, {"name": "v", "format": "csv"})


@pytest.mark.parametrize("rel", ["../x.csv", "a/../../x.csv", "..", "./../x.csv"])
def test_dotdot_is_rejected(out: Path, rel: str) -> None:
    (out.parent / "x.csv").write_text("outside")
    (out / "a").mkdir()
    algo_output(out, ("v", "csv", rel))
    with pytest.raises(InvalidOutput, match="without '..'"):
        collect(out, {"name": "v", "format": "csv"})


def test_symlink_file_to_host_is_rejected(out: Path) -> None:
    (out / "v.csv").symlink_to("/etc/passwd")
    algo_output(out, ("v", "csv", "v.csv"))
    with pytest.raises(InvalidOutput, match="leads outside the output folder"):
        collect(out, {"name": "v", "format": "csv"})


def test_symlink_to_root_is_rejected(out: Path) -> None:
    (out / "v").symlink_to("/")
    algo_output(out, ("v", "binary", "v"))
    with pytest.raises(InvalidOutput, match="leads outside the output folder"):
        collect(out, {"name": "v", "format": "binary"})


def test_path_through_a_symlinked_folder_leading_out_is_rejected(out: Path) -> None:
    (out / "d").symlink_to("/etc")
    algo_output(out, ("v", "csv", "d/passwd"))
    with pytest.raises(InvalidOutput, match="leads outside the output folder"):
        collect(out, {"name": "v", "format": "csv"})


def test_folder_output_holding_a_symlink_out_is_rejected(out: Path) -> None:
    (out / "v").mkdir()
    (out / "v" / "part-0.csv").write_text("a\n")
    (out / "v" / "sub").mkdir()
    (out / "v" / "sub" / "leak").symlink_to("/etc/shadow")
    algo_output(out, ("v", "csv", "v"))
    with pytest.raises(InvalidOutput, match="v/sub/leak is a symlink leading outside"):
        collect(out, {"name": "v", "format": "csv", "multiple": True})


def test_folder_output_holding_a_symlinked_folder_out_is_rejected_in_fallback_too(out: Path) -> None:
    (out / "v").mkdir()
    (out / "v" / "etc").symlink_to("/etc")
    with pytest.raises(InvalidOutput, match="v/etc is a symlink leading outside"):
        collect(out, {"name": "v", "format": "csv", "multiple": True})


def test_fallback_symlink_out_is_rejected(out: Path) -> None:
    (out / "v.csv").symlink_to("/etc/passwd")
    with pytest.raises(InvalidOutput, match="leads outside the output folder"):
        collect(out, {"name": "v", "format": "csv"})


def test_fifo_in_a_folder_output_is_rejected(out: Path) -> None:
    (out / "v").mkdir()
    os.mkfifo(out / "v" / "pipe")
    with pytest.raises(InvalidOutput, match="v/pipe is not a regular file"):
        collect(out, {"name": "v", "format": "binary"})


@pytest.mark.parametrize(("target", "rel"), [("v.csv", "v.csv"), ("nowhere.csv", "v.csv"), ("d", "d/x.csv")], ids=["self-loop", "dangling", "looping-folder"])
def test_broken_symlinks_are_the_algorithms_fault(out: Path, target: str, rel: str) -> None:
    """Not an infrastructure failure (that would be retried): invalid output."""
    link = out / rel.split("/")[0]
    link.symlink_to(target)
    algo_output(out, ("v", "csv", rel))
    with pytest.raises(InvalidOutput, match="dangling or looping symlink"):
        collect(out, {"name": "v", "format": "csv"})


def test_path_below_a_file_is_missing(out: Path) -> None:
    (out / "f").write_text("x")
    algo_output(out, ("v", "csv", "f/v.csv"))
    with pytest.raises(MissingOutput, match="which does not exist"):
        collect(out, {"name": "v", "format": "csv"})


def test_absurdly_nested_algo_output_is_invalid_not_a_crash(out: Path) -> None:
    (out / "algo_output.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(InvalidOutput, match="not valid JSON"):
        read_algo_output(out)


def test_symlink_that_stays_inside_is_accepted(out: Path) -> None:
    (out / "data").mkdir()
    (out / "data" / "v.csv").write_text("a,b\n1,2\n")
    (out / "v.csv").symlink_to("data/v.csv")
    [rec] = collect(out, {"name": "v", "format": "csv"})
    assert rec.sha256 == hashlib.sha256(b"a,b\n1,2\n").hexdigest()


# ------------------------------------------------------------------ finding outputs


def test_listed_output_is_found_hashed_and_parquet_rows_counted(out: Path) -> None:
    write_parquet(out / "visits-final.parquet", 1234)
    algo_output(out, ("visits", "parquet", "visits-final.parquet"))
    [rec] = collect(out, {"name": "visits", "format": "parquet"})
    assert rec.name == "visits" and rec.format == "parquet" and rec.rows == 1234 and not rec.multiple
    assert rec.path == out / "visits-final.parquet"
    assert rec.sha256 == hashlib.sha256((out / "visits-final.parquet").read_bytes()).hexdigest()
    assert rec.as_dict() == {"name": "visits", "uri": str(rec.path), "sha256": rec.sha256, "format": "parquet", "rows": 1234}


def test_fallback_file_and_folder_when_algo_output_is_absent(out: Path) -> None:
    (out / "a.csv").write_text("x\n")
    (out / "parts").mkdir()
    write_parquet(out / "parts" / "part-0.parquet", 10)
    write_parquet(out / "parts" / "part-1.parquet", 5)
    (out / "parts" / "_SUCCESS").write_text("")
    recs = collect(out, {"name": "a", "format": "csv"}, {"name": "parts", "format": "parquet", "multiple": True})
    assert [(r.name, r.path.name, r.multiple) for r in recs] == [("a", "a.csv", False), ("parts", "parts", True)]
    assert recs[1].rows == 15  # non-parquet files in a parquet folder are not counted


def test_listed_entries_win_and_unlisted_outputs_fall_back(out: Path) -> None:
    (out / "a.csv").write_text("fallback\n")
    (out / "other.csv").write_text("listed\n")
    (out / "b.json").write_text("{}")
    algo_output(out, ("a", "csv", "other.csv"))
    recs = collect(out, {"name": "a", "format": "csv"}, {"name": "b", "format": "json"})
    assert [r.path.name for r in recs] == ["other.csv", "b.json"]


def test_missing_required_output(out: Path) -> None:
    (out / "v.parquet").write_text("wrong extension for a csv slot")
    with pytest.raises(MissingOutput) as info:
        collect(out, {"name": "v", "format": "csv"})
    assert "required output 'v' was not produced" in str(info.value) and "v.csv nor v/" in str(info.value)
    assert info.value.kind == "missing_output"


def test_listed_output_that_does_not_exist_is_missing(out: Path) -> None:
    algo_output(out, ("v", "csv", "nowhere.csv"))
    with pytest.raises(MissingOutput, match="names 'nowhere.csv', which does not exist"):
        collect(out, {"name": "v", "format": "csv"})


def test_optional_output_may_be_absent(out: Path) -> None:
    (out / "a.csv").write_text("x\n")
    recs = collect(out, {"name": "a", "format": "csv"}, {"name": "extra", "format": "json", "required": False})
    assert [r.name for r in recs] == ["a"]


def test_format_disagreeing_with_the_manifest_is_invalid(out: Path) -> None:
    (out / "v.csv").write_text("x\n")
    algo_output(out, ("v", "json", "v.csv"))
    with pytest.raises(InvalidOutput, match="says format 'json', the manifest declares 'csv'"):
        collect(out, {"name": "v", "format": "csv"})


def test_declared_parquet_that_is_not_parquet_is_invalid(out: Path) -> None:
    (out / "v.parquet").write_text("not,parquet\n")
    with pytest.raises(InvalidOutput, match="not a readable parquet file"):
        collect(out, {"name": "v", "format": "parquet"})


def test_undeclared_files_are_ignored(out: Path) -> None:
    (out / "v.csv").write_text("x\n")
    (out / "debug.log").write_text("noise")
    algo_output(out, ("v", "csv", "v.csv"), ("undeclared", "csv", "debug.log"))
    assert [r.name for r in collect(out, {"name": "v", "format": "csv"})] == ["v"]


# ------------------------------------------------------------------ hashing definition


def test_folder_hash_is_sha256sum_of_sorted_listing(tmp_path: Path) -> None:
    d = tmp_path / "f"
    (d / "b" / "c").mkdir(parents=True)
    (d / "empty").mkdir()
    (d / "a.txt").write_bytes(b"a")
    (d / "b" / "x y.bin").write_bytes(os.urandom(3000))
    (d / "b" / "c" / "z").write_bytes(b"")
    (d / "B.txt").write_bytes(b"upper")
    (d / "link").symlink_to("a.txt")  # never followed, never counted
    assert list_files(d) == ["B.txt", "a.txt", "b/c/z", "b/x y.bin"]
    listing = "".join(f"{hashlib.sha256((d / r).read_bytes()).hexdigest()}  {r}\n" for r in sorted(list_files(d)))
    assert sha256_path(d) == hashlib.sha256(listing.encode()).hexdigest()
    shell = subprocess.run(
        "find . -type f | sed 's|^\\./||' | LC_ALL=C sort | tr '\\n' '\\0' | xargs -0 sha256sum | sha256sum",
        shell=True, cwd=d, capture_output=True, text=True, check=True,
    )
    assert sha256_path(d) == shell.stdout.split()[0]
    assert folder_digest([(r, sha256_file(d / r)) for r in reversed(list_files(d))]) == sha256_path(d)


def test_parquet_rows_of_non_parquet_is_none(tmp_path: Path) -> None:
    (tmp_path / "x.parquet").write_bytes(b"PAR1 nope")
    assert parquet_rows(tmp_path / "x.parquet") is None
    assert parquet_rows(write_parquet(tmp_path / "y.parquet", 7)) == 7


# ------------------------------------------------------------------ staging


INPUTS = [
    {"name": "pings", "format": "parquet", "multiple": True},
    {"name": "config", "format": "json"},
    {"name": "extra", "format": "csv", "required": False},
]


def _bindings(**paths: Path) -> dict[str, InputBinding]:
    return {k: InputBinding(slot=k, path=v) for k, v in paths.items()}


@pytest.fixture
def data(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    (d / "pings" / "day=1").mkdir(parents=True)
    write_parquet(d / "pings" / "day=1" / "part-0.parquet", 3)
    write_parquet(d / "pings" / "part-1.parquet", 4)
    (d / "cfg.json").write_text('{"k": 1}')
    return d


def test_staging_hardlinks_writes_algo_input_and_hashes(tmp_path: Path, data: Path) -> None:
    work = tmp_path / "work"
    m = manifest(inputs=INPUTS)
    records = prepare_work_dir(work, m, _bindings(pings=data / "pings", config=data / "cfg.json"), {"n": 5})
    staged = work / "input" / "pings" / "day=1" / "part-0.parquet"
    assert staged.stat().st_ino == (data / "pings" / "day=1" / "part-0.parquet").stat().st_ino
    assert (work / "input" / "config" / "cfg.json").stat().st_ino == (data / "cfg.json").stat().st_ino
    assert (work / "input" / "extra").is_dir() and not any((work / "input" / "extra").iterdir())

    doc = json.loads((work / "algo_input.json").read_text())
    assert doc["version"] == "0.1.0" and doc["input_data_path"] == "/work/input" and doc["output_path"] == "/work/output"
    assert doc["config"] == {"parameters": {"n": 5}}
    by_name = {d["name"]: d for d in doc["input_data"]}
    assert set(by_name) == {"pings", "config"}
    assert by_name["pings"]["path"] == "/work/input/pings"
    assert by_name["pings"]["files"] == ["/work/input/pings/day=1/part-0.parquet", "/work/input/pings/part-1.parquet"]
    assert by_name["config"]["files"] == ["/work/input/config/cfg.json"]
    assert by_name["pings"]["sha256"] == sha256_path(data / "pings")
    assert by_name["config"]["sha256"] == hashlib.sha256(b'{"k": 1}').hexdigest()
    assert by_name["config"]["source_uri"] == str((data / "cfg.json").resolve())
    assert [(r.name, r.sha256) for r in records] == [("pings", by_name["pings"]["sha256"]), ("config", by_name["config"]["sha256"])]
    assert oct((work / "algo_input.json").stat().st_mode & 0o777) == "0o644"


def test_staging_copies_across_filesystems(tmp_path: Path, data: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem")
    import tempfile

    with tempfile.TemporaryDirectory(dir=shm) as other:
        work = Path(other) / "work"
        prepare_work_dir(work, manifest(inputs=INPUTS[1:2]), _bindings(config=data / "cfg.json"), {})
        staged = work / "input" / "config" / "cfg.json"
        assert staged.read_text() == '{"k": 1}'
        assert staged.stat().st_ino != (data / "cfg.json").stat().st_ino or staged.stat().st_dev != (data / "cfg.json").stat().st_dev


def test_staging_copies_a_file_others_cannot_read(tmp_path: Path, data: Path) -> None:
    secret = data / "cfg.json"
    os.chmod(secret, 0o600)
    work = tmp_path / "work"
    prepare_work_dir(work, manifest(inputs=INPUTS[1:2]), _bindings(config=secret), {})
    staged = work / "input" / "config" / "cfg.json"
    assert staged.stat().st_ino != secret.stat().st_ino, "hardlinking would make the container unable to read it"
    assert staged.stat().st_mode & 0o004
    assert oct(secret.stat().st_mode & 0o777) == "0o600", "the source's mode must not change"


def test_known_hash_is_trusted_not_recomputed(tmp_path: Path, data: Path) -> None:
    b = {"config": InputBinding(slot="config", path=data / "cfg.json", sha256="f" * 64, uri="s3://b/cfg.json", produced_by="up")}
    [rec] = prepare_work_dir(tmp_path / "w", manifest(inputs=INPUTS[1:2]), b, {})
    assert (rec.sha256, rec.uri, rec.produced_by) == ("f" * 64, "s3://b/cfg.json", "up")


@pytest.mark.parametrize(
    ("bindings", "expected"),
    [
        ({"config": "cfg.json"}, "inputs.pings: required input is missing"),
        ({"pings": "pings", "config": "cfg.json", "nope": "cfg.json"}, "inputs.nope: the manifest declares no input slot 'nope'"),
        ({"pings": "pings", "config": "absent.json"}, "inputs.config: "),
        ({"pings": "empty", "config": "cfg.json"}, "inputs.pings: "),
        ({"pings": "pings", "config": "pings"}, "inputs.config: the slot takes one file but"),
    ],
    ids=["required-missing", "unknown-slot", "path-absent", "empty-folder", "many-files-for-one"],
)
def test_bad_bindings_are_invalid_input_before_any_write(tmp_path: Path, data: Path, bindings: dict[str, str], expected: str) -> None:
    (data / "empty").mkdir()
    root = tmp_path / "work" / "input"
    with pytest.raises(InvalidInput) as info:
        plan_inputs(manifest(inputs=INPUTS), _bindings(**{k: data / v for k, v in bindings.items()}), root)
    assert any(e.startswith(expected) for e in info.value.errors), info.value.errors
    assert not root.exists()


def test_all_binding_errors_are_listed_together(tmp_path: Path, data: Path) -> None:
    with pytest.raises(InvalidInput) as info:
        plan_inputs(manifest(inputs=INPUTS), _bindings(nope=data / "cfg.json", config=data / "absent"), tmp_path)
    assert len(info.value.errors) == 3
