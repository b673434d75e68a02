"""Pure logic without Docker: reading algo_output.json without trusting it, finding and hashing
outputs (docs/contract.md §3), and staging inputs into a step's work folder (§2)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from algodock.contract.documents import MAX_NESTING
from algodock.contract.manifest import parse_manifest
from algodock.errors import InvalidInput, InvalidOutput, MissingOutput
from algodock.hashing import folder_digest, list_files, parquet_rows, sha256_file, sha256_path
from algodock.runtime.outputs import MAX_ALGO_OUTPUT_BYTES, collect_outputs, copy_regular_tree, parse_algo_output, read_algo_output
from algodock.records import InputBinding
from algodock.runtime.staging import hash_input, plan_inputs, prepare_work_dir
from tests.conftest import unmet


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
    with pytest.raises(InvalidOutput, match="v/pipe is a FIFO, not a regular file"):
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


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"metadata": ' * 50_000, "[" * 1_000_000])
def test_absurdly_nested_algo_output_is_invalid_not_a_crash(out: Path, text: str) -> None:
    """Nesting is bounded before ``json.loads`` recurses: a RecursionError deep in the stack also
    broke whatever finalizer the garbage collector ran there (seen in CI as an unraisable exception)."""
    (out / "algo_output.json").write_text(text)
    with pytest.raises(InvalidOutput, match=f"algo_output.json is nested deeper than {MAX_NESTING} levels"):
        read_algo_output(out)


def test_algo_output_nested_up_to_the_limit_is_read(out: Path) -> None:
    deep: object = "leaf"
    for _ in range(MAX_NESTING - 3):
        deep = {"k": deep}
    (out / "algo_output.json").write_text(json.dumps({"status": "success", "metadata": deep}))
    assert read_algo_output(out).status == "success"


def test_symlink_that_stays_inside_is_rejected_too(out: Path) -> None:
    """docs/contract.md §3 (0.2): only regular files and folders count; a symlink is never followed, even inward."""
    (out / "data").mkdir()
    (out / "data" / "v.csv").write_text("a,b\n1,2\n")
    (out / "v.csv").symlink_to("data/v.csv")
    with pytest.raises(InvalidOutput, match="v.csv is a symlink .*even a symlink that stays inside"):
        collect(out, {"name": "v", "format": "csv"})


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


SHELL_LINE = next(line.strip() for line in sys.modules["algodock.hashing"].__doc__.splitlines() if line.strip().startswith("find . -type f"))


def _framed(d: Path) -> str:
    """The definition, written out independently of algodock.hashing."""
    h = hashlib.sha256()
    for r in sorted(list_files(d), key=os.fsencode):
        raw = os.fsencode(r)
        h.update(hashlib.sha256((d / r).read_bytes()).hexdigest().encode() + b" %d:" % len(raw) + raw + b"\n")
    return h.hexdigest()


def test_folder_hash_is_framed_and_the_documented_shell_line_reproduces_it(tmp_path: Path) -> None:
    d = tmp_path / "f"
    (d / "b" / "c").mkdir(parents=True)
    (d / "empty").mkdir()
    (d / "a.txt").write_bytes(b"a")
    (d / "a.txt.d").mkdir()
    (d / "a.txt.d" / "x").write_bytes(b"sorted by bytes: '.' < '/'")
    (d / "b" / "x y.bin").write_bytes(os.urandom(3000))
    (d / "b" / "c" / "z").write_bytes(b"")
    (d / "B.txt").write_bytes(b"upper")
    (d / "with\nnewline  and %s").write_bytes(b"inputs may have such names")
    (d / "\u00e9t\u00e9.csv").write_bytes(b"utf-8")
    (d / "link").symlink_to("a.txt")  # never followed, never counted
    os.mkfifo(d / "fifo")  # never opened, never counted
    assert list_files(d) == ["B.txt", "a.txt", "a.txt.d/x", "b/c/z", "b/x y.bin", "with\nnewline  and %s", "\u00e9t\u00e9.csv"]
    assert sha256_path(d) == _framed(d)
    shell = subprocess.run(["bash", "-c", SHELL_LINE], cwd=d, capture_output=True, text=True, check=True, timeout=60)
    assert shell.stdout.split()[0] == sha256_path(d), SHELL_LINE
    assert folder_digest([(r, sha256_file(d / r)) for r in reversed(list_files(d))]) == sha256_path(d)


def test_a_file_name_cannot_forge_a_folder_hash(tmp_path: Path) -> None:
    """Before framing, {a, b} hashed like one file named "a\n<sha256 of b>  b" holding a's bytes."""
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir()
    one.mkdir()
    (two / "a").write_bytes(b"A")
    (two / "b").write_bytes(b"B")
    forged = "a\n" + hashlib.sha256(b"B").hexdigest() + "  b"
    (one / forged).write_bytes(b"A")
    unframed = lambda d: hashlib.sha256("".join(f"{sha256_file(d / r)}  {r}\n" for r in sorted(list_files(d))).encode()).hexdigest()  # noqa: E731
    assert unframed(two) == unframed(one), "the forgery the framing prevents"
    assert sha256_path(two) != sha256_path(one)


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
        unmet("needs /dev/shm on another filesystem than the temporary folder")
    import tempfile

    with tempfile.TemporaryDirectory(dir=shm) as other:
        work = Path(other) / "work"
        prepare_work_dir(work, manifest(inputs=INPUTS[1:2]), _bindings(config=data / "cfg.json"), {})
        staged = work / "input" / "config" / "cfg.json"
        assert stat.S_ISREG(staged.lstat().st_mode), "a regular file, not a link back to the source"
        assert staged.lstat().st_dev == os.stat(other).st_dev, "the bytes are on the work folder's filesystem"
        assert staged.read_text() == '{"k": 1}'


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


# ------------------------------------------------------------------ docs/contract.md §3 (0.2): only regular files and folders


def test_a_symlink_anywhere_in_the_output_folder_is_invalid_even_undeclared(out: Path) -> None:
    (out / "v.csv").write_text("x\n")
    (out / "debug").mkdir()
    (out / "debug" / "passwd").symlink_to("/etc/passwd")
    with pytest.raises(InvalidOutput, match="debug/passwd is a symlink leading outside"):
        collect(out, {"name": "v", "format": "csv"})


def test_special_files_are_invalid_and_never_opened(out: Path) -> None:
    """A FIFO opened for hashing would block forever: the test returning at all shows it was not opened."""
    import socket

    (out / "v").mkdir()
    (out / "v" / "ok.bin").write_bytes(b"1")
    os.mkfifo(out / "v" / "fifo")
    with pytest.raises(InvalidOutput, match="v/fifo is a FIFO"):
        collect(out, {"name": "v", "format": "binary"})
    os.unlink(out / "v" / "fifo")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(out / "v" / "sock"))
        with pytest.raises(InvalidOutput, match="v/sock is a socket"):
            collect(out, {"name": "v", "format": "binary"})
    os.unlink(out / "v" / "sock")
    try:
        os.mknod(out / "v" / "null", 0o600 | 0o020000, os.makedev(1, 3))  # a character device, as /dev/null
    except PermissionError:
        unmet("a device file needs root to make")
    with pytest.raises(InvalidOutput, match="v/null is a device file"):
        collect(out, {"name": "v", "format": "binary"})


@pytest.mark.parametrize("name", ["a\nb.csv", "tab\there", "bell\x07", "del\x7f", "c1\x85"], ids=["newline", "tab", "bell", "del", "c1"])
def test_control_characters_in_names_are_invalid(out: Path, name: str) -> None:
    (out / "v").mkdir()
    (out / "v" / name).write_text("x")
    with pytest.raises(InvalidOutput, match="has a control character in its name"):
        collect(out, {"name": "v", "format": "binary"})


def test_names_that_are_not_utf8_are_invalid(out: Path) -> None:
    (out / "v").mkdir()
    with open(os.path.join(os.fsencode(out / "v"), b"\xff\xfe.bin"), "wb") as fh:
        fh.write(b"x")
    with pytest.raises(InvalidOutput, match="not valid UTF-8"):
        collect(out, {"name": "v", "format": "binary"})


def test_a_listed_path_with_a_newline_is_invalid(out: Path) -> None:
    (out / "v.csv").write_text("x\n")
    algo_output(out, ("v", "csv", "v.csv\n"))
    with pytest.raises(InvalidOutput, match="control character"):
        collect(out, {"name": "v", "format": "csv"})


@pytest.mark.parametrize(
    ("entries", "files", "expected"),
    [
        ([("a", "csv", "t.csv"), ("b", "csv", "t.csv")], ["t.csv"], "both name 't.csv'"),
        ([("a", "csv", "t.csv"), ("b", "csv", "./t.csv")], ["t.csv"], "both name 't.csv'"),
        ([("a", "binary", "d"), ("b", "csv", "d/x.csv")], ["d/x.csv"], "'d/x.csv' is inside 'd'"),
        ([("b", "csv", "a/x.csv")], ["a/x.csv"], "'a/x.csv' is inside 'a'"),  # a falls back to a/
    ],
    ids=["same-path", "same-path-spelled-differently", "nested", "nested-with-fallback"],
)
def test_overlapping_outputs_are_invalid(out: Path, entries: list[tuple[str, str, str]], files: list[str], expected: str) -> None:
    for f in files:
        (out / f).parent.mkdir(parents=True, exist_ok=True)
        (out / f).write_text("x\n")
    algo_output(out, *entries)
    with pytest.raises(InvalidOutput, match=expected):
        collect(out, {"name": "a", "format": "binary" if any(e[1] == "binary" for e in entries) or len(entries) == 1 else "csv"}, {"name": "b", "format": "csv"})


def test_an_output_listed_twice_or_naming_the_folder_itself_is_invalid(out: Path) -> None:
    (out / "x.csv").write_text("x\n")
    algo_output(out, ("v", "csv", "x.csv"), ("v", "csv", "x.csv"))
    with pytest.raises(InvalidOutput, match="lists output 'v' more than once"):
        collect(out, {"name": "v", "format": "csv"})
    algo_output(out, ("v", "binary", "."))
    with pytest.raises(InvalidOutput, match="names the output folder itself"):
        collect(out, {"name": "v", "format": "binary"})


def test_algo_output_over_1_mib_is_invalid_even_when_valid_json(out: Path) -> None:
    assert MAX_ALGO_OUTPUT_BYTES == 1024 * 1024
    (out / "v.csv").write_text("x\n")
    doc = json.dumps({"status": "success", "message": "m" * (MAX_ALGO_OUTPUT_BYTES - 40)})
    assert len(doc) <= MAX_ALGO_OUTPUT_BYTES
    (out / "algo_output.json").write_text(doc)
    assert read_algo_output(out) is not None  # at the limit: fine
    (out / "algo_output.json").write_text(doc + " " * (MAX_ALGO_OUTPUT_BYTES - len(doc) + 1))
    with pytest.raises(InvalidOutput, match="the limit is 1048576"):
        read_algo_output(out)


@pytest.mark.parametrize(
    "raw",
    [b'{"metrics": {"x": NaN}}', b'{"message": "\\ud800"}', b'{"metrics": {"x": 1e999999}}', b"9" * 5000, b'{"a": ' * 50_000, b"\x00"],
    ids=["nan", "lone-surrogate", "infinite-float", "huge-int", "deep", "nul"],
)
def test_hostile_algo_output_bytes_are_invalid_output(raw: bytes) -> None:
    with pytest.raises(InvalidOutput):
        parse_algo_output(raw)


def test_read_algo_output_never_raises_anything_else_for_any_bytes(out: Path) -> None:
    """A seeded fuzz of mutations of a valid document: parses, or InvalidOutput; never another exception."""
    import random

    rng = random.Random(7)
    seed = json.dumps({"version": "0.1.0", "status": "success", "output_data": [{"name": "v", "format": "csv", "path": "v.csv"}], "metrics": {"n": 1}, "message": "ok"}).encode()
    tokens = [b"{", b"}", b"[", b"]", b'"', b"\\u0000", b"\\ud83d", b"NaN", b"-0", b"1e400", b"null", b",", b":", b"\xff", b"\x00"]
    for _ in range(1500):
        raw = bytearray(seed)
        for _ in range(rng.randint(1, 6)):
            i = rng.randrange(len(raw) + 1)
            if rng.random() < 0.5 and raw:
                del raw[i : i + rng.randint(1, 4)]
            else:
                raw[i:i] = rng.choice(tokens) if rng.random() < 0.7 else bytes(rng.randrange(256) for _ in range(rng.randint(1, 3)))
        (out / "algo_output.json").write_bytes(bytes(raw))
        try:
            read_algo_output(out)
        except (InvalidOutput, MissingOutput):
            pass


def test_copy_regular_tree_keeps_only_regular_files_and_folders(tmp_path: Path) -> None:
    src = tmp_path / "failed"
    (src / "d" / "e").mkdir(parents=True)
    (src / "a.csv").write_text("a")
    (src / "d" / "e" / "b.bin").write_bytes(b"b")
    (src / "passwd").symlink_to("/etc/passwd")
    (src / "d" / "inside").symlink_to("../a.csv")
    (src / "d" / "etc").symlink_to("/etc")
    os.mkfifo(src / "d" / "fifo")
    (src / "bad\nname").write_text("x")
    dropped = copy_regular_tree(src, tmp_path / "kept")
    assert sorted(dropped) == ["bad\nname", "d/etc", "d/fifo", "d/inside", "passwd"]
    kept = tmp_path / "kept"
    assert sorted(str(p.relative_to(kept)) for p in kept.rglob("*")) == ["a.csv", "d", "d/e", "d/e/b.bin"]
    assert all(not p.is_symlink() for p in kept.rglob("*"))
    assert (kept / "a.csv").stat().st_ino == (src / "a.csv").stat().st_ino, "hardlinked, no bytes copied"


# ------------------------------------------------------------------ inputs: listed once


def test_a_folder_is_listed_once_and_a_file_added_later_is_not_staged(tmp_path: Path, data: Path) -> None:
    digest, files = hash_input(data / "pings")
    assert files == ("day=1/part-0.parquet", "part-1.parquet") and digest == sha256_path(data / "pings")
    write_parquet(data / "pings" / "part-2.parquet", 9)  # arrives between hashing and staging
    binding = {"pings": InputBinding(slot="pings", path=data / "pings", sha256=digest, files=files)}
    [rec] = prepare_work_dir(tmp_path / "w", manifest(inputs=INPUTS[:1]), binding, {})
    assert list_files(tmp_path / "w" / "input" / "pings") == list(files)
    assert rec.sha256 == digest == sha256_path(tmp_path / "w" / "input" / "pings"), "what was hashed is what is staged"


def test_a_listed_input_file_swapped_for_a_symlink_is_refused(tmp_path: Path, data: Path) -> None:
    digest, files = hash_input(data / "pings")
    os.unlink(data / "pings" / "part-1.parquet")
    (data / "pings" / "part-1.parquet").symlink_to("/etc/passwd")
    binding = {"pings": InputBinding(slot="pings", path=data / "pings", sha256=digest, files=files)}
    with pytest.raises(InvalidInput, match="no longer a regular file"):
        prepare_work_dir(tmp_path / "w", manifest(inputs=INPUTS[:1]), binding, {})


# ------------------------------------------------------------------ the framing is injective (property)

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from algodock.hashing import folder_entry  # noqa: E402

_names = st.text(alphabet=st.characters(min_codepoint=1, max_codepoint=0x2FF, exclude_characters="/"), min_size=1, max_size=12)
_digests = st.sampled_from([hashlib.sha256(bytes([i])).hexdigest() for i in range(4)])
_folders = st.dictionaries(st.lists(_names, min_size=1, max_size=3).map("/".join), _digests, max_size=4)


def _listing(folder: dict[str, str]) -> bytes:
    return b"".join(folder_entry(rel, folder[rel]) for rel in sorted(folder, key=os.fsencode))


@settings(max_examples=300, deadline=None)
@given(a=_folders, b=_folders)
def test_two_different_folders_never_share_a_framed_listing(a: dict[str, str], b: dict[str, str]) -> None:
    """Names may hold newlines, spaces, digits and colons: the length prefix still tells entries apart."""
    if a != b:
        assert _listing(a) != _listing(b)
    assert folder_digest(a.items()) == hashlib.sha256(_listing(a)).hexdigest()


def test_the_output_watcher_asks_for_the_containers_pid_only_once_an_output_nears_its_limit(tmp_path: Path) -> None:
    """The pid a disk-limit kill signals costs an engine call: made only past a quarter of a
    limit, at most once; a step whose output stays small never makes it."""
    import time

    from algodock.runtime.limits import OutputLimits, OutputWatcher

    asked: list[str] = []

    def watch(folder: Path) -> None:
        watcher = OutputWatcher(folder, OutputLimits.of(1, 100), kill=lambda: None, host_pid=lambda: asked.append(folder.name)).start()  # type: ignore[func-returns-value]
        deadline = time.monotonic() + 30
        while watcher.walks < 5 and time.monotonic() < deadline:
            time.sleep(0.005)  # polling the watcher's walk count with a deadline
        watcher.stop()
        assert watcher.walks >= 5 and watcher.failure is None

    (tmp_path / "small").mkdir()
    (tmp_path / "small" / "a.csv").write_bytes(b"x" * 100_000)
    watch(tmp_path / "small")
    assert asked == []
    (tmp_path / "nearing").mkdir()
    (tmp_path / "nearing" / "a.csv").write_bytes(b"x" * 300_000)  # over 1 MiB / 4, under 1 MiB
    watch(tmp_path / "nearing")
    assert asked == ["nearing"]


def test_a_walk_that_waited_for_a_core_does_not_stretch_the_output_watchers_rest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The watcher rests 40 x what its walk cost in CPU. On a loaded host a walk of a tiny folder
    can take tens of ms of wall time waiting for a core; charged as cost, that made the watcher
    rest for seconds while a writer went far past the limit. Here every walk waits 50 ms (a
    sleep standing for a busy machine) while a host writer adds 1 MiB every 10 ms up to
    100 MiB: the watcher must stop it near its 20 MiB limit, not after all of it."""
    import threading
    import time

    from algodock.runtime import limits

    real_measure = limits.measure

    def slow_measure(root: Path, stop_at: limits.OutputLimits | None = None) -> limits.Usage:
        time.sleep(0.05)  # waiting for a core: wall time, no CPU
        return real_measure(root, stop_at)

    monkeypatch.setattr(limits, "measure", slow_measure)
    folder = tmp_path / "output"
    folder.mkdir()
    stop = threading.Event()
    watcher = limits.OutputWatcher(folder, limits.OutputLimits.of(20, 100), kill=stop.set).start()
    chunk = b"\0" * limits.MIB
    with open(folder / "big", "wb") as fh:
        for _ in range(100):
            if stop.wait(0.01):  # the pace of the writer; set when the watcher "kills" it
                break
            fh.write(chunk)
            fh.flush()
    watcher.stop()
    written = (folder / "big").stat().st_size // limits.MIB
    assert watcher.failure is not None, f"never stopped; {written} MiB written"
    assert written < 40, f"stopped only after {written} MiB (limit 20 MiB): the watcher rested as if each walk had cost 50 ms of CPU"


def test_the_output_watcher_waits_for_the_first_entry_without_walking_then_walks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A step's output folder starts empty and nothing is written below it before an entry
    appears in it: the watcher waits for that entry (inotify), without a walk, where it walked
    every 10 ms; then it walks and stops a writer past the limit as before. stop() wakes a
    watcher still waiting at once. Without inotify the walks start at once."""
    import threading
    import time

    from algodock.errors import DiskLimitFailure
    from algodock.runtime import limits
    from tests.waiting import poll

    folder = tmp_path / "output"
    folder.mkdir()
    stopped = threading.Event()
    watcher = limits.OutputWatcher(folder, limits.OutputLimits.of(1, 100), kill=stopped.set).start()
    watcher._thread.join(0.3)  # long enough for 30 walks at 10 ms
    assert watcher._thread.is_alive() and watcher.walks == 0, f"{watcher.walks} walks of an empty folder"
    (folder / "big").write_bytes(b"\0" * (2 * limits.MIB))
    poll("the watcher to stop the writer past 1 MiB", stopped.is_set, deadline=30)
    watcher.stop()
    assert watcher.walks >= 1 and isinstance(watcher.failure, DiskLimitFailure)

    (tmp_path / "empty").mkdir()
    idle = limits.OutputWatcher(tmp_path / "empty", limits.OutputLimits.of(1, 100), kill=lambda: None).start()
    began = time.monotonic()
    idle.stop()
    assert not idle._thread.is_alive() and time.monotonic() - began < limits.MAX_INTERVAL, "stop() must wake a watcher waiting for its first entry"
    assert idle.walks == 0

    monkeypatch.setattr(limits, "_watch_entries", lambda folder: None)  # no inotify here
    (tmp_path / "plain").mkdir()
    plain = limits.OutputWatcher(tmp_path / "plain", limits.OutputLimits.of(1, 100), kill=lambda: None).start()
    poll("walks of an empty folder without inotify", lambda: plain.walks >= 2, deadline=30)
    plain.stop()
