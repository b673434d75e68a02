"""`algodock gc`: retention, what it must keep, dry-run figures, a gc killed at each phase,
and gc beside running pipelines, on a local store and on S3 (moto over HTTP).

Most stores here are built from real store writes (``put_output``, the cache's own
``remember``), without containers, so every retention rule runs in a fraction of a second on
both backends; the tests at the end run real pipelines (Docker, the Prefect API) beside a gc.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from algodock.cache import StoreCache
from algodock.errors import InvalidInput
from algodock.lineage.queries import read_document, verify_run
from algodock.records import LineageDocument, OutputRecord, StepRecord
from algodock.store.backends import Store, lineage_rel, log_rel, new_attempt_id, open_store, output_rel, run_json_rel
from algodock.store.gc import GC_LEASE, PINS, PLAN, Retention, collect, parse_duration, pin
from algodock.store.lease import RunBusy, RunLease

REPO = Path(__file__).resolve().parents[1]
_SCRIPT = Path(sys.executable).parent / "algodock"
ALGODOCK = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "algodock.cli"]
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> Store:
    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    bucket = request.getfixturevalue("bucket")
    return open_store(f"s3://{bucket}/algodock")


def _put(store: Store, tmp: Path, rel: str, data: bytes) -> str:
    src = tmp / uuid.uuid4().hex
    src.write_bytes(data)
    return store.put_output(src, rel, move=True)


def fake_run(
    store: Store,
    tmp: Path,
    run_id: str,
    *,
    pipeline: str = "p",
    age: timedelta = timedelta(0),
    data: bytes | None = None,
    reuse: dict[str, Any] | None = None,
    failed_attempt: bool = False,
) -> LineageDocument:
    """A finished run of one step ``a`` as the engine writes it: output and log under an
    attempt, a cache entry and a content-object record; ``reuse`` (an earlier run's lineage)
    makes the step a cache hit of that run's output; ``failed_attempt`` adds a failed first attempt."""
    started = NOW - age
    tmp.mkdir(parents=True, exist_ok=True)
    cache = StoreCache(store)
    if failed_attempt:
        first = new_attempt_id(1)
        _put(store, tmp, log_rel(run_id, "a", first), b"first attempt died\n")
        _put(store, tmp, f"runs/{run_id}/steps/a/attempts/{first}/failed-outputs", b"half written")
    record = StepRecord(id="a", image="t:1", image_id="sha256:" + "1" * 64, command=["true"], started_at=started, finished_at=started)
    if reuse is not None:
        earlier = reuse.step("a")
        record = earlier.model_copy(update={"status": "cached", "cached_from": reuse.run_id}, deep=True)
    else:
        data = data if data is not None else f"output of {run_id}".encode()
        attempt = new_attempt_id(2 if failed_attempt else 1)
        uri = _put(store, tmp, output_rel(run_id, "a", "out.binary", attempt), data)
        record.log_uri = _put(store, tmp, log_rel(run_id, "a", attempt), b"log\n")
        record.outputs = [OutputRecord(name="out", uri=uri, sha256=hashlib.sha256(data).hexdigest(), format="binary")]
        record.status = "succeeded"
        record.cache_key = hashlib.sha256(data).hexdigest()
        cache.remember(run_id, record)
        cache.remember_bytes(record.outputs[0].sha256, "out.binary", uri)
    doc = LineageDocument(run_id=run_id, pipeline=pipeline, spec_sha256="0", status="succeeded", started_at=started, finished_at=started, store=store.uri(), steps=[record])
    store.write_json(lineage_rel(run_id), doc.model_dump(mode="json"))
    store.write_json(run_json_rel(run_id), {"run_id": run_id, "status": "succeeded"})
    return doc


def files(store: Store) -> dict[str, int]:
    """Every file of the store but the local store's lock files (``flock`` beside a lease)."""
    return {f.rel: f.size for f in store.walk("") if not f.rel.rsplit("/", 1)[-1].startswith(".lock-")}


def assert_verified(store: Store, run_ids: list[str]) -> None:
    for run_id in run_ids:
        bad = [c for c in verify_run(store, run_id) if not c.ok]
        assert not bad, f"lineage verify of kept run {run_id} failed: {bad}"


# ------------------------------------------------------------------ retention


def test_keep_last_is_per_pipeline_and_removes_everything_of_a_removed_run(store, tmp_path) -> None:
    for n in range(4):
        fake_run(store, tmp_path, f"p{n}", age=timedelta(days=10 - n))
    for n in range(2):
        fake_run(store, tmp_path, f"q{n}", pipeline="q", age=timedelta(days=10 - n))
    report = collect(store, Retention(keep_last=2), now=NOW)
    assert report.runs_removed == ["p0", "p1"]
    assert sorted(report.runs_kept) == ["p2", "p3", "q0", "q1"]
    assert_verified(store, report.runs_kept)
    left = files(store)
    for gone in ("p0", "p1"):
        assert sorted(rel for rel in left if rel.startswith(f"runs/{gone}/")) == [f"runs/{gone}/lease.json", f"runs/{gone}/run.json"]
        collected = store.read_json(run_json_rel(gone))["collected"]
        assert collected[-1]["removed"] is True and collected[-1]["complete"] is True and collected[-1]["files"] > 0
    entries = [store.read_json(rel)["run_id"] for rel in left if rel.startswith("cache/") and rel.count("/") == 1]
    assert sorted(entries) == ["p2", "p3", "q0", "q1"], "a cache entry of a removed run survived, or a kept one went"
    objects = [store.read_json(rel)["rel"] for rel in left if rel.startswith("cache/objects/")]
    assert all(not rel.startswith(("runs/p0/", "runs/p1/")) for rel in objects)
    assert len(objects) == 4
    assert not store.exists(PLAN)
    again = collect(store, Retention(keep_last=2), now=NOW)
    assert again.runs_removed == [] and again.files == 0, "a second gc found more to do"
    with pytest.raises(InvalidInput, match="removed by algodock gc"):
        read_document(store, "p0")


def test_older_than_and_keep_last_keep_the_union_and_keep_protects(store, tmp_path) -> None:
    for n, days in enumerate([40, 35, 20, 5, 1]):
        fake_run(store, tmp_path, f"r{n}", age=timedelta(days=days))
    assert collect(store, Retention(older_than=parse_duration("30d")), now=NOW, dry_run=True).runs_removed == ["r0", "r1"]
    assert collect(store, Retention(keep_last=1, older_than=parse_duration("10d")), now=NOW, dry_run=True).runs_removed == ["r0", "r1", "r2"]
    report = collect(store, Retention(keep_last=1, keep=frozenset({"r0"})), now=NOW)
    assert report.runs_removed == ["r1", "r2", "r3"]
    assert sorted(report.runs_kept) == ["r0", "r4"]
    assert_verified(store, ["r0", "r4"])


def test_a_dry_run_touches_nothing_and_its_figures_are_what_the_real_gc_frees(store, tmp_path) -> None:
    for n in range(5):
        fake_run(store, tmp_path, f"r{n}", age=timedelta(days=10 - n), failed_attempt=n % 2 == 0)
    before = files(store)
    dry = collect(store, Retention(keep_last=2), now=NOW, dry_run=True)
    assert files(store) == before, "a dry run changed the store"
    real = collect(store, Retention(keep_last=2), now=NOW)
    after = files(store)
    freed = {rel: size for rel, size in before.items() if rel not in after}
    rewritten = {rel for rel in before if rel.endswith("/run.json") or rel.endswith("/lease.json")}
    assert (dry.files, dry.bytes) == (real.files, real.bytes) == (len(freed), sum(freed.values())), (dry.as_json(), real.as_json())
    assert not rewritten & set(freed)
    assert dry.runs_removed == real.runs_removed == ["r0", "r1", "r2"]
    assert json.loads(json.dumps(real.as_json())).keys() >= {"dry_run", "runs_removed", "runs_kept", "files", "bytes"}


def test_what_a_kept_run_names_stays_and_its_failed_attempts_go(store, tmp_path) -> None:
    old = fake_run(store, tmp_path, "old", age=timedelta(days=9))
    fake_run(store, tmp_path, "mid", age=timedelta(days=8))
    new = fake_run(store, tmp_path, "new", age=timedelta(days=1), reuse=old, failed_attempt=True)
    report = collect(store, Retention(keep_last=1), now=NOW)
    assert report.runs_removed == ["mid", "old"]
    assert_verified(store, ["new"])
    reused = new.step("a").outputs[0].uri
    assert store.output_exists(reused.split(store.uri().rstrip("/") + "/", 1)[1]), "the output a kept run reuses was removed"
    left = files(store)
    assert not [rel for rel in left if "failed-outputs" in rel], "a failed attempt's outputs of a kept run survived"
    assert not store.exists(lineage_rel("old"))
    assert [c for c in store.read_json(run_json_rel("new"))["collected"] if not c["removed"]], "the kept run does not record that it was collected in part"
    # the kept cache entry of "new"? a cache hit writes none: the entry of "old" went with its run
    assert all(store.read_json(rel)["run_id"] != "old" for rel in left if rel.startswith("cache/") and rel.count("/") == 1)


def test_a_run_whose_lease_is_held_is_never_touched(store, tmp_path) -> None:
    fake_run(store, tmp_path, "live", age=timedelta(days=100), failed_attempt=True)
    fake_run(store, tmp_path, "new", age=timedelta(days=1))
    before = {rel: size for rel, size in files(store).items() if rel.startswith("runs/live/")}
    with RunLease(store, "live"):
        report = collect(store, Retention(keep_last=0), now=NOW)
        assert "live" in report.runs_busy and "live" not in report.runs_removed
        after = {rel: size for rel, size in files(store).items() if rel.startswith("runs/live/") and not rel.endswith("lease.json")}
        assert after == {rel: size for rel, size in before.items() if not rel.endswith("lease.json")}
    assert report.runs_removed == ["new"]


def test_one_gc_at_a_time(store, tmp_path) -> None:
    fake_run(store, tmp_path, "r", age=timedelta(days=3))
    holder = subprocess.Popen(  # another process holds the gc lease (a lease is re-entrant within one)
        [sys.executable, "-c", _HOLD, store.uri(), GC_LEASE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=os.environ
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(RunBusy, match="gc"):
            collect(store, Retention(keep_last=0), now=NOW)
        assert store.exists(lineage_rel("r"))
    finally:
        holder.communicate("", timeout=60)
    assert collect(store, Retention(keep_last=0), now=NOW).runs_removed == ["r"]


_HOLD = """
import sys
from algodock.store.backends import open_store
from algodock.store.lease import RunLease

with RunLease(open_store(sys.argv[1]), "gc", rel=sys.argv[2]):
    print("held", flush=True)
    sys.stdin.read()
"""


# ------------------------------------------------------------------ pins: gc beside a cache reader


def test_a_reuse_pinned_before_the_plan_is_kept_and_one_after_it_misses(store, tmp_path) -> None:
    old = fake_run(store, tmp_path, "old", age=timedelta(days=9))
    fake_run(store, tmp_path, "other", age=timedelta(days=8))
    fake_run(store, tmp_path, "new", age=timedelta(days=1))
    old_rel = old.step("a").outputs[0].uri.split(store.uri().rstrip("/") + "/", 1)[1]
    answers: dict[str, bool] = {}

    def reader(phase: str) -> None:
        if phase == "listed":  # a run that started after gc looked reuses old's output
            answers["listed"] = pin(store, "reader-1", [old_rel])
        if phase == "planned" and "planned" not in answers:
            answers["planned"] = pin(store, "reader-2", ["runs/other/steps/a"])

    collect(store, Retention(keep_last=1), now=NOW, on_phase=reader)
    assert answers == {"listed": True, "planned": False}
    assert store.output_exists(old_rel), "gc removed bytes a run pinned before the plan"
    assert store.read_json(lineage_rel("old")) is None
    assert not any(rel.startswith("runs/other/steps/") for rel in files(store))
    pins = [store.read_json(f.rel)["by"] for f in store.walk(PINS)]
    assert pins == ["reader-1"], "a pin withdrawn on a miss was left behind, or a live pin was removed"


# ------------------------------------------------------------------ a gc killed at each phase

_KILLED_GC = """
import os, signal, sys
from datetime import datetime, timezone
from algodock.store.backends import open_store
from algodock.store.gc import Retention, collect

def die(phase):
    if phase == sys.argv[2]:
        os.kill(os.getpid(), signal.SIGKILL)

collect(open_store(sys.argv[1]), Retention(keep_last=1), now=datetime(2026, 12, 1, 12, tzinfo=timezone.utc), on_phase=die)
"""


@pytest.mark.parametrize("phase", ["listed", "planned", "marked", "unlinked", "deleted", "recorded"])
def test_a_gc_killed_at_any_phase_leaves_kept_runs_verified_and_the_next_gc_finishes(store, tmp_path, phase) -> None:
    old = fake_run(store, tmp_path, "old", age=timedelta(days=9), failed_attempt=True)
    fake_run(store, tmp_path, "mid", age=timedelta(days=8), failed_attempt=True)
    fake_run(store, tmp_path, "new", age=timedelta(days=1), reuse=old, failed_attempt=True)
    dry = collect(store, Retention(keep_last=1), now=NOW, dry_run=True)
    proc = subprocess.run([sys.executable, "-c", _KILLED_GC, store.uri(), phase], capture_output=True, text=True, env=os.environ, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert_verified(store, ["new"])
    for run_id in ("old", "mid"):  # a run with a lineage document has every byte it names
        if store.exists(lineage_rel(run_id)):
            assert_verified(store, [run_id])
    report = collect(store, Retention(keep_last=1), now=NOW)  # takes over the dead gc's lease
    assert set(report.runs_removed) <= set(dry.runs_removed)
    assert_verified(store, ["new"])
    left = files(store)
    for run_id in ("old", "mid"):
        assert not store.exists(lineage_rel(run_id))
        assert store.read_json(run_json_rel(run_id))["collected"][-1]["complete"] is True
    assert not [rel for rel in left if rel.startswith("runs/mid/") and not rel.endswith(("run.json", "lease.json"))]
    assert not [rel for rel in left if "failed-outputs" in rel]
    assert not store.exists(PLAN)
    assert collect(store, Retention(keep_last=1), now=NOW).files == 0


# ------------------------------------------------------------------ the command


def test_gc_command_json_and_bad_input(tmp_path) -> None:
    store = open_store(str(tmp_path / "store"))
    for n in range(3):
        fake_run(store, tmp_path / "src", f"r{n}", age=timedelta(days=3 - n))

    def gc(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*ALGODOCK, "gc", "--store", store.uri(), *args], capture_output=True, text=True, timeout=120)

    bad = gc("--older-than", "30 days")
    assert bad.returncode == 2 and "--older-than '30 days'" in bad.stderr and "30d" in bad.stderr
    unknown = gc("--keep-last", "0", "--keep", "nope")
    assert unknown.returncode == 2 and "nope" in unknown.stderr
    assert store.exists(lineage_rel("r0")), "bad input touched the store"
    dry = gc("--keep-last", "1", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    doc = json.loads(dry.stdout)
    assert doc["dry_run"] is True and doc["runs_removed"] == ["r0", "r1"] and doc["runs_kept"] == ["r2"]
    real = json.loads(gc("--keep-last", "1", "--json").stdout)
    assert (real["files"], real["bytes"], real["runs_removed"]) == (doc["files"], doc["bytes"], doc["runs_removed"])


# ------------------------------------------------------------------ real pipelines beside a gc (Docker, Prefect API)


@pytest.fixture(scope="module")
def image(docker_client, busybox_image) -> str:
    from tests.lineage_support import STABLE, build_versioned

    return build_versioned(docker_client, STABLE, "stable")


@pytest.fixture(scope="module")
def prefect_env(prefect_harness) -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}


@pytest.mark.docker
@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("phase", ["listed", "planned"])
def test_a_pipeline_started_during_gc_gets_no_removed_byte(tmp_path, image, prefect_env, phase, where, request) -> None:
    """A run starts and ends while gc runs, and asks the cache for the outputs of a run gc
    removes: before the plan it reuses them (they stay), after it the step runs again."""
    from tests.test_run_store import algodock_run, k_pipeline, step

    uri = str(tmp_path / "store") if where == "local" else f"s3://{request.getfixturevalue('bucket')}/algodock"
    prefect_env = {**os.environ, "PREFECT_API_URL": prefect_env["PREFECT_API_URL"]}  # the S3 endpoint's environment too
    spec = k_pipeline(tmp_path / "p", image)
    for run_id, k in (("old", "1"), ("other", "2")):
        rc, _, err = algodock_run(spec, prefect_env, "--store", uri, "--run-id", run_id, "--set", f"make.k={k}")
        assert rc == 0, err[-3000:]
    store = open_store(uri)
    seen: dict[str, Any] = {}

    def start_a_run(now_phase: str) -> None:
        if now_phase == phase and "doc" not in seen:
            seen["rc"], seen["doc"], seen["err"] = algodock_run(spec, prefect_env, "--store", uri, "--run-id", "new")

    report = collect(store, Retention(keep_last=1), on_phase=start_a_run)
    assert seen["rc"] == 0, seen["err"][-3000:]
    assert "old" in report.runs_removed and "new" not in report.runs_removed
    made = step(seen["doc"], "make")
    assert made["status"] == ("cached" if phase == "listed" else "succeeded"), made
    assert_verified(store, ["new", "other"])
    assert not store.exists(lineage_rel("old"))
    again = collect(store, Retention(keep_last=2))
    assert_verified(store, again.runs_kept)


@pytest.mark.docker
def test_a_run_that_finishes_during_gc_keeps_everything_it_wrote(tmp_path, image, prefect_env) -> None:
    from tests.test_run_store import k_pipeline
    from tests.waiting import poll

    uri = str(tmp_path / "store")
    store = open_store(uri)
    fake_run(store, tmp_path / "src", "ancient", pipeline="k", age=timedelta(days=400), failed_attempt=True)
    spec = k_pipeline(tmp_path / "p", image, seconds=2, second_step=True)
    proc = subprocess.Popen([*ALGODOCK, "run", str(spec), "--store", uri, "--run-id", "running", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=prefect_env, cwd=spec.parent)
    try:
        from algodock.store.lease import holder_alive

        poll("the run to hold its lease", lambda: holder_alive(store.read_json("runs/running/lease.json")), deadline=120)

        def finish_the_run(now_phase: str) -> None:
            if now_phase == "listed":
                proc.wait(timeout=300)

        report = collect(store, Retention(keep_last=0), on_phase=finish_the_run)
    finally:
        out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "running" in report.runs_busy and "running" not in report.runs_removed
    assert report.runs_removed == ["ancient"]
    doc = json.loads(out)
    assert [s["status"] for s in doc["steps"]] == ["succeeded", "succeeded"]
    assert_verified(store, ["running"])
    assert not [f.rel for f in store.walk(".work")], "a work folder was left"
