"""S3 staging: ``algodock.store.backends.fetch_uri`` of a prefix of parts against s3fs's own ``get``.

A moto server (``tests/s3server.start_moto_server``, over HTTP on loopback) runs in a child
process, so its request handling does not share this process's GIL with the client being
timed. A prefix of N parquet-like parts (incompressible bytes) is uploaded once, then
downloaded in rounds by each of these, alternating which goes first (A B, B A, ...):

* ``fetch_uri``: what a step does for an ``s3://`` input (info, list, concurrent get,
  into a temporary folder renamed into place);
* ``s3fs get``: ``fs.get(prefix, dest, recursive=True)`` on the same filesystem object.

The upload of a step's output folder is timed the same way: ``S3Store.put_output`` (data,
then the commit marker) against ``fs.put(folder, prefix, recursive=True)``.

Targets, ours / s3fs (medians): download <= 1.05 (ours also hashes the bytes as they stream,
in a thread beside the network reads, and puts the folder in place by one rename); upload
<= 1.5 (ours also hashes each file while it goes up, and writes a conditional commit marker).

    .venv/bin/python bench/s3_staging.py [--quick]
"""

from __future__ import annotations

import _util  # noqa: F401  (environment and sys.path first)

import multiprocessing as mp
import os
import shutil
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

from _util import best_and_median, exit_status, fmt_s, print_table, quick, scratch_dir, timed, verdict

MB = 1024 * 1024
DOWNLOAD_TARGET = 1.05
UPLOAD_TARGET = 1.5
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _serve(conn) -> None:  # child process
    import logging

    from tests.s3server import start_moto_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request

    endpoint, stop = start_moto_server()
    conn.send(endpoint)
    conn.recv()  # until the parent says stop
    stop()


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> int:
    nparts, part_mb, reps = (8, 4, 3) if quick() else (16, 8, 9)
    total = nparts * part_mb * MB
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    os.environ.update(AWS_ENV)
    server = ctx.Process(target=_serve, args=(child,), daemon=True)
    server.start()
    try:
        endpoint = parent.recv()
        os.environ["AWS_ENDPOINT_URL"] = endpoint
        return _run(endpoint, nparts, part_mb, reps, total)
    finally:
        parent.send("stop")
        server.join(10)
        if server.is_alive():
            server.terminate()


def _run(endpoint: str, nparts: int, part_mb: int, reps: int, total: int) -> int:
    from algodock.store.backends import S3Store, fetch_uri, s3_filesystem

    fs = s3_filesystem()
    fs.mkdir("bench")
    print(f"moto server {endpoint}; prefix s3://bench/parts/ of {nparts} x {part_mb} MB = {total // MB} MB")
    rows = []
    with scratch_dir("s3") as root:
        src = root / "parts"
        src.mkdir()
        for i in range(nparts):
            (src / f"part-{i:05d}.parquet").write_bytes(os.urandom(part_mb * MB))
        fs.put(str(src), "bench/parts", recursive=True)
        assert len(fs.find("bench/parts")) == nparts

        def fetch(i: int) -> float:
            dest = root / f"fetch-{i}"
            took = timed(lambda: fetch_uri("s3://bench/parts/", dest, fs=fs))
            assert _tree_bytes(dest / "parts") == total
            shutil.rmtree(dest)
            return took

        def get(i: int) -> float:
            dest = root / f"get-{i}"
            took = timed(lambda: fs.get("bench/parts/", str(dest) + "/", recursive=True))
            assert _tree_bytes(dest) == total, "s3fs get did not fetch everything"
            shutil.rmtree(dest)
            return took

        ours, theirs = _alternating(fetch, get, reps)
        rows.append(_row("download", ours, theirs, total, "fetch_uri", "fs.get(recursive)"))
        download = _ratio(ours, theirs)

        store = S3Store("s3://bench/store", fs=fs)
        ours, theirs = _alternating(
            lambda i: timed(lambda: store.put_output(src, f"runs/r/steps/s{i}/outputs/parts")),
            lambda i: timed(lambda: fs.put(str(src), f"bench/plain/p{i}", recursive=True)),
            reps,
        )
        rows.append(_row("upload", ours, theirs, total, "S3Store.put_output", "fs.put(recursive)"))
        upload = _ratio(ours, theirs)

    print()
    print_table(["direction", "ours", "best", "median", "rate", "s3fs", "best", "median", "ours/s3fs (median)"], rows)
    verdict("download: fetch_uri / s3fs get (medians)", download, DOWNLOAD_TARGET)
    verdict("upload: S3Store.put_output / s3fs put (medians)", upload, UPLOAD_TARGET)
    return exit_status()


def _alternating(ours: Callable[[int], float], theirs: Callable[[int], float], reps: int) -> tuple[list[float], list[float]]:
    """``reps`` rounds of both, alternating which goes first, so drift in the server hits both alike."""
    a: list[float] = []
    b: list[float] = []
    for i in range(reps):
        pair = [(a, ours), (b, theirs)]
        for samples, fn in pair if i % 2 == 0 else reversed(pair):
            samples.append(fn(i))
    return a, b


def _ratio(ours: list[float], theirs: list[float]) -> float:
    return statistics.median(ours) / statistics.median(theirs)


def _row(direction: str, ours: list[float], theirs: list[float], total: int, ours_name: str, theirs_name: str) -> list[object]:
    ob, om = best_and_median(ours)
    tb, tm = best_and_median(theirs)
    return [direction, ours_name, fmt_s(ob), fmt_s(om), f"{total / om / MB:,.0f} MB/s", theirs_name, fmt_s(tb), fmt_s(tm), f"{om / tm:.2f}x"]


if __name__ == "__main__":
    sys.exit(main())
