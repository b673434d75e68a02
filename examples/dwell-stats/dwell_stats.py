#!/usr/bin/env python3
"""dwell-stats: per-device statistics of visits (the output of device-visits).

Contract (see the platform's docs/contract.md): reads the descriptor named by
ALGORITHM_INPUT_PATH, reads the parquet file(s) of the `visits` input slot (columns
device_id, dwell_s; other columns are ignored), writes `stats.parquet` and
`algo_output.json` into the descriptor's output_path, exits 0 on success and non-zero
(with a message on stderr) on bad input.

Parameters:     min_visits (devices with fewer visits are left out).
Output columns: device_id (string), visits (int64), total_dwell_s, mean_dwell_s,
                max_dwell_s (float64), sorted by device_id.

Only pyarrow is needed.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

NAME = "dwell-stats"
INPUT_SLOT = "visits"
OUTPUT_SLOT = "stats"
OUTPUT_FILE = "stats.parquet"
DEFAULTS = {"min_visits": 1}
REQUIRED_COLUMNS = ("device_id", "dwell_s")

STATS_SCHEMA = pa.schema(
    [
        ("device_id", pa.string()),
        ("visits", pa.int64()),
        ("total_dwell_s", pa.float64()),
        ("mean_dwell_s", pa.float64()),
        ("max_dwell_s", pa.float64()),
    ]
)


class InputError(Exception):
    """Bad input: reported on stderr, exit code 2."""


def log(msg: str) -> None:
    print(msg, flush=True)


def load_descriptor() -> dict:
    path = os.environ.get("ALGORITHM_INPUT_PATH") or "/work/algo_input.json"
    try:
        with open(path, encoding="utf-8") as f:
            desc = json.load(f)
    except FileNotFoundError:
        raise InputError(f"input descriptor not found: {path} (set ALGORITHM_INPUT_PATH)")
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read input descriptor {path}: {e}")
    if not isinstance(desc, dict):
        raise InputError(f"input descriptor {path} is not a JSON object")
    return desc


def parameters(desc: dict) -> dict:
    given = (desc.get("config") or {}).get("parameters") or {}
    if not isinstance(given, dict):
        raise InputError("config.parameters must be an object")
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise InputError(f"unknown parameter(s): {', '.join(unknown)}")
    params = {**DEFAULTS, **given}
    v = params["min_visits"]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise InputError(f"parameter min_visits must be an integer >= 1, got {v!r}")
    return params


def slot_files(desc: dict, slot: str) -> list[Path]:
    """The parquet file(s) staged for an input slot: `files` when listed, else `path`
    (a file, or a folder whose *.parquet files are read)."""
    entries = [d for d in desc.get("input_data") or [] if isinstance(d, dict) and d.get("name") == slot]
    if not entries:
        raise InputError(f"input slot '{slot}' is missing from input_data")
    entry = entries[0]
    base = Path(desc.get("input_data_path") or "/work/input")

    def resolve(p: str) -> Path:
        q = Path(p)
        return q if q.is_absolute() else base / q

    listed = entry.get("files") or []
    if listed:
        files = [resolve(p) for p in listed]
    else:
        root = resolve(entry.get("path") or slot)
        if root.is_file():
            files = [root]
        elif root.is_dir():
            files = sorted(p for p in root.rglob("*.parquet") if p.is_file())
        else:
            raise InputError(f"input slot '{slot}': {root} does not exist")
    files = [p for p in files if not p.name.startswith(("_", "."))]
    if not files:
        raise InputError(f"input slot '{slot}' holds no parquet files")
    return files


def read_visits(files: list[Path]) -> pa.Table:
    parts = []
    for path in files:
        try:
            schema = pq.read_schema(path)
            missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
            if missing:
                raise InputError(f"{path}: missing column(s) {', '.join(missing)} (has {', '.join(schema.names)})")
            table = pq.read_table(path, columns=list(REQUIRED_COLUMNS))
            table = pa.table(
                {"device_id": table.column("device_id").cast(pa.string()),
                 "dwell_s": table.column("dwell_s").cast(pa.float64())}
            )
        except (OSError, pa.ArrowException) as e:
            raise InputError(f"cannot read {path}: {e}")
        log(f"read {table.num_rows} visits from {path.name}")
        parts.append(table)
    return pa.concat_tables(parts)


def dwell_stats(visits: pa.Table, min_visits: int) -> pa.Table:
    visits = visits.drop_null()
    if visits.num_rows == 0:
        return STATS_SCHEMA.empty_table()
    agg = visits.group_by("device_id").aggregate(
        [("dwell_s", "count"), ("dwell_s", "sum"), ("dwell_s", "mean"), ("dwell_s", "max")]
    )
    stats = pa.table(
        {
            "device_id": agg.column("device_id"),
            "visits": agg.column("dwell_s_count").cast(pa.int64()),
            "total_dwell_s": agg.column("dwell_s_sum"),
            "mean_dwell_s": agg.column("dwell_s_mean"),
            "max_dwell_s": agg.column("dwell_s_max"),
        },
        schema=STATS_SCHEMA,
    )
    stats = stats.filter(pc.greater_equal(stats.column("visits"), min_visits))
    return stats.sort_by("device_id")


def run() -> None:
    started = time.monotonic()
    desc = load_descriptor()
    params = parameters(desc)
    log(f"parameters: {json.dumps(params, sort_keys=True)}")
    out_dir = Path(desc.get("output_path") or "/work/output")

    files = slot_files(desc, INPUT_SLOT)
    visits = read_visits(files)
    stats = dwell_stats(visits, params["min_visits"])
    devices_in = len(pc.unique(visits.column("device_id").drop_null()))
    log(f"{stats.num_rows} of {devices_in} device(s) have >= {params['min_visits']} visit(s)")

    out_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(stats, out_dir / OUTPUT_FILE)
    result = {
        "version": "0.1.0",
        "status": "success",
        "output_data": [{"name": OUTPUT_SLOT, "format": "parquet", "path": OUTPUT_FILE}],
        "metrics": {"rows_in": visits.num_rows, "devices_in": devices_in, "devices": stats.num_rows},
        "message": f"dwell statistics of {stats.num_rows} devices from {visits.num_rows} visits",
    }
    with open(out_dir / "algo_output.json", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    log(f"wrote {out_dir / OUTPUT_FILE} and algo_output.json in {time.monotonic() - started:.2f}s")


def main() -> int:
    try:
        run()
    except InputError as e:
        print(f"{NAME}: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
