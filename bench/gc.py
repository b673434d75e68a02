"""`algodock gc` of a store of 1,000 runs of 10 files each, on a local folder and on S3 (moto).

Each run is what a finished run leaves (lineage, run.json, ten committed outputs, a log, a
cache entry). gc keeps the last 100 runs (``--keep-last 100``) and removes 900. Reported per
store: the gc's seconds, as a ratio to one plain listing of the whole store measured in the
same run (the floor: gc must list what it collects); objects listed per object removed; the
gc process's peak RSS (``algodock gc`` in a child process), against the peak RSS of a child
that only imports algodock and lists the store. The moto server runs in its own process.

    .venv/bin/python bench/gc.py [--quick]      # --quick: 200 runs
"""

from __future__ import annotations

import _util  # noqa: F401  (environment and sys.path first)

import hashlib
import json
import multiprocessing as mp
import os
import resource
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

from _util import REPO, exit_status, print_table, quick, scratch_dir, verdict

AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
FILES = 10
KEEP = 100
ALGODOCK = [sys.executable, "-m", "algodock.cli"]
LIST_ONLY = "import sys; from algodock.store.backends import open_store; print(len(open_store(sys.argv[1]).walk('')))"


def _serve(conn) -> None:  # child process
    import logging

    from tests.s3server import start_moto_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    endpoint, stop = start_moto_server()
    conn.send(endpoint)
    conn.recv()
    stop()


def build(uri: str, runs: int) -> None:
    """``runs`` finished runs of pipeline ``p``, one a day, written as the engine writes them."""
    from algodock.store.backends import MARKER_SUFFIX, cache_rel, lineage_rel, open_store, output_rel, run_json_rel

    store = open_store(uri)
    now = datetime.now(timezone.utc)
    blobs: dict[str, bytes] = {}
    for n in range(runs):
        run_id = f"r{n:05d}"
        started = now - timedelta(days=runs - n)
        outputs = []
        for i in range(FILES):
            data = f"{run_id} output {i}\n".encode() * 64
            rel = output_rel(run_id, "a", f"o{i}.binary", "1-000000000000")
            sha = hashlib.sha256(data).hexdigest()
            blobs[rel] = data
            if not store.is_local:
                blobs[rel + MARKER_SUFFIX] = json.dumps({"kind": "file", "sha256": sha, "files": [{"path": "", "size": len(data), "sha256": sha}]}).encode()
            outputs.append({"name": f"o{i}", "uri": store.uri(rel), "sha256": sha, "format": "binary"})
        step = {"id": "a", "status": "succeeded", "image_id": "sha256:" + "0" * 64, "outputs": outputs, "cache_key": hashlib.sha256(run_id.encode()).hexdigest()}
        doc = {"run_id": run_id, "pipeline": "p", "spec_sha256": "0", "status": "succeeded", "started_at": started.isoformat(), "store": store.uri(), "steps": [step]}
        blobs[lineage_rel(run_id)] = json.dumps(doc).encode()
        blobs[run_json_rel(run_id)] = json.dumps({"run_id": run_id, "status": "succeeded"}).encode()
        entry = {"cache_version": "3", "key": step["cache_key"], "run_id": run_id, "step_id": "a", "image_id": step["image_id"], "created_at": started.isoformat(),
                 "outputs": [{"name": o["name"], "rel": output_rel(run_id, "a", f"o{i}.binary", "1-000000000000"), "sha256": o["sha256"], "format": "binary"} for i, o in enumerate(outputs)]}
        blobs[cache_rel(step["cache_key"])] = json.dumps(entry).encode()
    if store.is_local:
        for rel, data in blobs.items():
            path = store.local_path(rel)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    else:
        store.fs.pipe({store._key(rel): data for rel, data in blobs.items()})


def child(argv: list[str]) -> tuple[float, int, str]:
    """Seconds, peak RSS (bytes) and stdout of a child process (its peak alone: one child at a time)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=os.environ)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{argv[:4]} failed: {proc.stderr[-2000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return seconds, max(peak, before) * 1024, proc.stdout


def measure(name: str, uri: str, runs: int) -> list[object]:
    build(uri, runs)
    list_s, list_rss, listed = child([sys.executable, "-c", LIST_ONLY, uri])
    gc_s, gc_rss, out = child([*ALGODOCK, "gc", "--store", uri, "--keep-last", str(KEEP), "--json"])
    doc = json.loads(out)
    assert len(doc["runs_removed"]) == runs - KEEP, doc["runs_removed"][:5]
    per_removed = doc["files_listed"] / max(doc["files"], 1)
    return [name, f"{runs} x {FILES}", int(listed), doc["files"], f"{gc_s:.2f} s", f"{list_s:.2f} s", f"{gc_s / list_s:.1f}x",
            f"{per_removed:.2f}", f"{gc_rss / 2**20:.0f} MiB", f"{list_rss / 2**20:.0f} MiB", f"{gc_rss / list_rss:.2f}x", round(doc["files_listed"] / int(listed), 2)]


def main() -> int:
    runs = 200 if quick() else 1000
    rows = []
    with scratch_dir("gc") as root:
        rows.append(measure("local", str(root / "store"), runs))
    ctx = mp.get_context("spawn")
    parent, conn = ctx.Pipe()
    os.environ.update(AWS_ENV)
    server = ctx.Process(target=_serve, args=(conn,), daemon=True)
    server.start()
    try:
        os.environ["AWS_ENDPOINT_URL"] = parent.recv()
        from algodock.store.backends import s3_filesystem

        s3_filesystem().mkdir("bench-gc")
        rows.append(measure("s3 (moto)", "s3://bench-gc/store", runs))
    finally:
        parent.send("stop")
        server.join(10)
    print_table(["store", "runs x files", "objects", "removed", "gc", "one listing", "gc/listing", "listed per removed", "gc peak RSS", "listing peak RSS", "RSS ratio", "listed / objects"], rows)
    for r in rows:
        verdict(f"{r[0]}: objects listed / objects in the store", float(r[-1]), 1.1)  # each object listed about once
        verdict(f"{r[0]}: gc peak RSS / a plain listing's", float(str(r[10]).rstrip("x")), 2.0)
    return exit_status()


if __name__ == "__main__":
    sys.exit(main())
