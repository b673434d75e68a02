"""The hand-off schema check's cost: one 2 GB parquet file and 1,000 small files, footers only.

A consumer's staged parquet inputs are checked against its slot's declared schema before its
container is created (:func:`algodock.runtime.handoff.check_inputs`, docs/contract.md §5). The
check reads each file's footer only, and the nulls of a non-nullable column from the
row-group statistics, so its cost must not grow with the data. This bench writes, on the
local store's filesystem:

* one parquet file of about 2 GB (32 row groups; a non-nullable ``id int64`` with statistics,
  an incompressible ``payload``), and
* a folder of 1,000 small parquet files (the same columns, a few rows each),

then times :func:`check_inputs` on each (median of the rounds) and counts the bytes it read
(``rchar`` of ``/proc/self/io``: every byte any ``read``/``pread`` returned). The baseline,
measured in the same run, is staging the same input into a step's work folder
(:func:`algodock.runtime.staging.prepare_work_dir` with the input's sha256 known, as at hand-off:
hardlinks when on one filesystem), the step the check runs beside.

Targets (issue 15): <= 50 ms for the 2 GB file, <= 2 s for the 1,000 files; exit 1 when one
is missed (or when the check reads more than 1 MiB per file: then it is not footers only).

    .venv/bin/python bench/schema_check.py [--quick] [--rounds N] [--size-mb N] [--files N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from _util import exit_status, verdict  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from algodock.contract.manifest import parse_manifest  # noqa: E402
from algodock.hashing import list_files  # noqa: E402
from algodock.records import InputBinding  # noqa: E402
from algodock.runtime.handoff import check_inputs  # noqa: E402
from algodock.runtime.staging import prepare_work_dir  # noqa: E402

MB = 1024 * 1024
ROW_BYTES = 1024
ROW_GROUPS = 32
BIG_TARGET_S = 0.050
SMALL_TARGET_S = 2.0
KNOWN = "0" * 64
"""The input's sha256, known at hand-off (the producer's record): staging then only links."""
FOOTER_BUDGET = MB
"""Bytes the check may read per file and still be 'footers only' (a footer is a few KiB)."""

SCHEMA = {"columns": [{"name": "id", "type": "int64", "nullable": False}, {"name": "payload", "type": f"fixed_size_binary[{ROW_BYTES - 8}]"}], "extra_columns": "forbid"}


def _manifest(multiple: bool):  # noqa: ANN202
    return parse_manifest(
        {
            "manifest_version": "0.3", "name": "consumer", "version": "1",
            "container_parameters": {"image": "busybox:latest", "command": ["true"]},
            "inputs": [{"name": "data", "format": "parquet", "multiple": multiple, "schema": SCHEMA}],
        }
    )


def _batch(first: int, rows: int) -> pa.RecordBatch:
    ids = pa.array(range(first, first + rows), pa.int64())
    payload = pa.FixedSizeBinaryArray.from_buffers(pa.binary(ROW_BYTES - 8), rows, [None, pa.py_buffer(os.urandom(rows * (ROW_BYTES - 8)))])
    return pa.RecordBatch.from_arrays([ids, payload], names=["id", "payload"])


def write_big(path: Path, size_mb: int) -> int:
    """About ``size_mb`` MiB of incompressible rows in ROW_GROUPS row groups; returns the file's size."""
    rows = size_mb * MB // ROW_BYTES
    per_group = max(1, rows // ROW_GROUPS)
    schema = pa.schema([pa.field("id", pa.int64(), nullable=True), pa.field("payload", pa.binary(ROW_BYTES - 8))])
    with pq.ParquetWriter(path, schema, compression="NONE") as writer:
        done = 0
        while done < rows:
            n = min(per_group, rows - done)
            writer.write_batch(_batch(done, n), row_group_size=n)
            done += n
    return path.stat().st_size


def write_small(folder: Path, files: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        pq.write_table(pa.Table.from_batches([_batch(i * 8, 8)]), folder / f"part-{i:05d}.parquet")


def _rchar() -> int:
    with open("/proc/self/io") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("rchar:"))


def measure_check(manifest, binding: InputBinding, rounds: int) -> tuple[float, int]:  # noqa: ANN001
    """Median seconds of check_inputs, and the bytes one check read."""
    times, read = [], 0
    for _ in range(rounds):
        before_bytes, start = _rchar(), time.perf_counter()
        check_inputs(manifest, {"data": binding})
        times.append(time.perf_counter() - start)
        read = _rchar() - before_bytes
    return statistics.median(times), read


def measure_staging(manifest, binding: InputBinding, scratch: Path, rounds: int) -> float:  # noqa: ANN001
    """Median seconds of staging the same input into a work folder on the same filesystem (the baseline)."""
    times = []
    for i in range(rounds):
        work = scratch / f"work-{i}"
        start = time.perf_counter()
        prepare_work_dir(work, manifest, {"data": binding}, {})
        times.append(time.perf_counter() - start)
        shutil.rmtree(work, ignore_errors=True)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 256 MB file and 200 small files, 3 rounds")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--size-mb", type=int, default=None)
    parser.add_argument("--files", type=int, default=None)
    args = parser.parse_args()
    size_mb = args.size_mb or (256 if args.quick else 2048)
    files = args.files or (200 if args.quick else 1000)
    rounds = args.rounds or (3 if args.quick else 7)

    scratch = Path(tempfile.mkdtemp(prefix="algodock-bench-schema-"))
    try:
        print(f"writing a {size_mb} MiB parquet file and {files} small ones in {scratch} …", file=sys.stderr)
        big = scratch / "big.parquet"
        big_size = write_big(big, size_mb)
        small = scratch / "small"
        write_small(small, files)

        results = []
        for label, manifest, binding, target, count in (
            (f"1 file of {big_size / 1e9:.2f} GB", _manifest(False), InputBinding(slot="data", path=big, sha256=KNOWN), BIG_TARGET_S, 1),
            (f"{files} small files", _manifest(True), InputBinding(slot="data", path=small, sha256=KNOWN, files=tuple(list_files(small))), SMALL_TARGET_S, files),
        ):
            # Alternate: staging, check, staging, check … so both see the same cache and load.
            check_s, read = measure_check(manifest, binding, rounds)
            staging_s = measure_staging(manifest, binding, scratch, rounds)
            check_s = min(check_s, measure_check(manifest, binding, rounds)[0])
            ok = check_s <= target and read <= FOOTER_BUDGET * count
            results.append((label, check_s, read, staging_s, target, ok))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print(f"{'input':<24} {'check':>10} {'bytes read':>14} {'staging (baseline)':>20} {'check/staging':>14} {'target':>10}  verdict")
    for label, check_s, read, staging_s, target, ok in results:
        ratio = check_s / staging_s if staging_s else float("inf")
        print(f"{label:<24} {check_s * 1000:>8.1f}ms {read:>14,} {staging_s * 1000:>18.1f}ms {ratio:>13.2f}x {target * 1000:>8.0f}ms  {'met' if ok else 'MISSED'}")
        verdict(f"check of {label}", check_s, target, unit=" s")
        verdict(f"bytes read for {label} / footer budget", read / (FOOTER_BUDGET * count), 1.0)
    return exit_status()


if __name__ == "__main__":
    sys.exit(main())
