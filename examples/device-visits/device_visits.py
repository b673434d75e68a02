#!/usr/bin/env python3
"""device-visits: turn GPS pings into visits.

Contract (see the platform's docs/contract.md): reads the descriptor named by
ALGORITHM_INPUT_PATH, reads every parquet file of the `pings` input slot, writes
`visits.parquet` and `algo_output.json` into the descriptor's output_path, exits 0 on
success and non-zero (with a message on stderr) on bad input.

Input columns:  device_id (string), ts (timestamp, any unit; no time zone means UTC; or
                integer epoch seconds), lat, lon (degrees). Other columns are ignored.
Parameters:     look_back_time (s, keep pings with ts >= max(ts) - look_back_time),
                radius_m (a visit is a run of consecutive pings of one device within
                radius_m of the run's first ping), min_dwell_s (shorter runs are dropped).
Output columns: device_id, start_ts, end_ts (timestamp[us, UTC]), lat, lon (mean of the
                visit's pings), n_pings, dwell_s (end_ts - start_ts, seconds).

Only pyarrow is needed.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

NAME = "device-visits"
INPUT_SLOT = "pings"
OUTPUT_SLOT = "visits"
OUTPUT_FILE = "visits.parquet"
DEFAULTS = {"look_back_time": 3600, "radius_m": 100.0, "min_dwell_s": 300}
REQUIRED_COLUMNS = ("device_id", "ts", "lat", "lon")
EARTH_RADIUS_M = 6_371_008.8
US = 1_000_000  # microseconds per second

VISITS_SCHEMA = pa.schema(
    [
        ("device_id", pa.string()),
        ("start_ts", pa.timestamp("us", tz="UTC")),
        ("end_ts", pa.timestamp("us", tz="UTC")),
        ("lat", pa.float64()),
        ("lon", pa.float64()),
        ("n_pings", pa.int64()),
        ("dwell_s", pa.float64()),
    ]
)


class InputError(Exception):
    """Bad input: reported on stderr, exit code 2."""


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------- input


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
    """The parameters with defaults filled in, checked like the manifest's schema."""
    given = (desc.get("config") or {}).get("parameters") or {}
    if not isinstance(given, dict):
        raise InputError("config.parameters must be an object")
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise InputError(f"unknown parameter(s): {', '.join(unknown)}")
    params = {**DEFAULTS, **given}

    def number(name: str, integer: bool, minimum: float, exclusive: bool = False):
        v = params[name]
        ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
        if isinstance(v, bool) or not ok_type or (isinstance(v, float) and not math.isfinite(v)):
            kind = "an integer" if integer else "a number"
            raise InputError(f"parameter {name} must be {kind}, got {v!r}")
        if v < minimum or (exclusive and v == minimum):
            rel = ">" if exclusive else ">="
            raise InputError(f"parameter {name} must be {rel} {minimum}, got {v!r}")

    number("look_back_time", integer=True, minimum=1)
    number("radius_m", integer=False, minimum=0, exclusive=True)
    number("min_dwell_s", integer=True, minimum=0)
    return params


def slot_files(desc: dict, slot: str) -> list[Path]:
    """The parquet files staged for an input slot."""
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
    # skip markers such as _SUCCESS or .crc files that some writers leave next to parts
    files = [p for p in files if not p.name.startswith(("_", "."))]
    if not files:
        raise InputError(f"input slot '{slot}' holds no parquet files")
    return files


def normalize(table: pa.Table, source: Path) -> pa.Table:
    """device_id string, ts int64 microseconds since the epoch (UTC), lat/lon float64."""
    ts = table.column("ts")
    t = ts.type
    if pa.types.is_timestamp(t):
        # the int64 value of a timestamp is UTC whatever its time zone; naive means UTC
        ts = pc.cast(ts, pa.timestamp("us", tz=t.tz), safe=False).cast(pa.int64())
    elif pa.types.is_integer(t):
        ts = pc.multiply(ts.cast(pa.int64()), US)
    elif pa.types.is_floating(t):
        ts = pc.round(pc.multiply(ts.cast(pa.float64()), float(US))).cast(pa.int64(), safe=False)
    else:
        raise InputError(f"{source}: column ts has type {t}; expected a timestamp or epoch seconds")
    cols = {"ts": ts}
    for name, typ in (("device_id", pa.string()), ("lat", pa.float64()), ("lon", pa.float64())):
        try:
            cols[name] = table.column(name).cast(typ)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise InputError(f"{source}: column {name} of type {table.column(name).type} is not usable as {typ}: {e}")
    return pa.table({k: cols[k] for k in REQUIRED_COLUMNS})


def read_pings(files: list[Path]) -> pa.Table:
    parts = []
    for path in files:
        try:
            schema = pq.read_schema(path)
        except (OSError, pa.ArrowException) as e:
            raise InputError(f"cannot read {path} as parquet: {e}")
        missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
        if missing:
            raise InputError(f"{path}: missing column(s) {', '.join(missing)} (has {', '.join(schema.names)})")
        try:
            table = pq.read_table(path, columns=list(REQUIRED_COLUMNS))
        except (OSError, pa.ArrowException) as e:
            raise InputError(f"cannot read {path} as parquet: {e}")
        log(f"read {table.num_rows} pings from {path.name}")
        parts.append(normalize(table, path))
    return pa.concat_tables(parts)


# --------------------------------------------------------------------------- algorithm


def haversine_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(a)))


def find_visits(pings: pa.Table, radius_m: float, min_dwell_s: float) -> pa.Table:
    """Per device, in time order: a visit starts at a ping and takes every following ping
    within radius_m of that first ping; the first ping outside starts the next visit.
    Visits that last at least min_dwell_s are kept."""
    pings = pings.sort_by([("device_id", "ascending"), ("ts", "ascending")])
    dev = pings.column("device_id").to_pylist()
    ts = pings.column("ts").to_pylist()
    lat = pings.column("lat").to_pylist()
    lon = pings.column("lon").to_pylist()

    out = {name: [] for name in VISITS_SCHEMA.names}
    n, i = len(dev), 0
    while i < n:
        j, sum_lat, sum_lon = i + 1, lat[i], lon[i]
        while j < n and dev[j] == dev[i] and haversine_m(lat[i], lon[i], lat[j], lon[j]) <= radius_m:
            sum_lat += lat[j]
            sum_lon += lon[j]
            j += 1
        dwell_s = (ts[j - 1] - ts[i]) / US
        if dwell_s >= min_dwell_s:
            count = j - i
            out["device_id"].append(dev[i])
            out["start_ts"].append(ts[i])
            out["end_ts"].append(ts[j - 1])
            out["lat"].append(sum_lat / count)  # visits are small: a plain mean is fine
            out["lon"].append(sum_lon / count)
            out["n_pings"].append(count)
            out["dwell_s"].append(dwell_s)
        i = j
    return pa.table({f.name: pa.array(out[f.name], f.type) for f in VISITS_SCHEMA}, schema=VISITS_SCHEMA)


# --------------------------------------------------------------------------- main


def run() -> None:
    started = time.monotonic()
    desc = load_descriptor()
    params = parameters(desc)
    log(f"parameters: {json.dumps(params, sort_keys=True)}")
    out_dir = Path(desc.get("output_path") or "/work/output")

    files = slot_files(desc, INPUT_SLOT)
    log(f"reading {len(files)} file(s) of slot '{INPUT_SLOT}'")
    pings = read_pings(files)
    rows_in = pings.num_rows

    # drop rows that cannot be placed: nulls, NaN or out-of-range coordinates
    pings = pings.drop_null()
    lat, lon = pings.column("lat"), pings.column("lon")
    ok = pc.and_(
        pc.and_(pc.greater_equal(lat, -90.0), pc.less_equal(lat, 90.0)),
        pc.and_(pc.greater_equal(lon, -180.0), pc.less_equal(lon, 180.0)),
    )
    pings = pings.filter(ok)
    rows_invalid = rows_in - pings.num_rows
    if rows_invalid:
        log(f"dropped {rows_invalid} ping(s) with missing or out-of-range values")

    if pings.num_rows:
        max_ts = pc.max(pings.column("ts")).as_py()
        cutoff = max_ts - params["look_back_time"] * US
        pings = pings.filter(pc.greater_equal(pings.column("ts"), cutoff))
        fmt = lambda us: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(us // US))  # noqa: E731
        log(f"window {fmt(cutoff)} .. {fmt(max_ts)}: {pings.num_rows} of {rows_in} pings")
    rows_in_window = pings.num_rows
    devices = len(pc.unique(pings.column("device_id"))) if rows_in_window else 0

    visits = find_visits(pings, float(params["radius_m"]), params["min_dwell_s"])
    devices_with_visits = len(pc.unique(visits.column("device_id"))) if visits.num_rows else 0
    log(f"found {visits.num_rows} visit(s) of {devices_with_visits} of {devices} device(s)")

    out_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(visits, out_dir / OUTPUT_FILE)
    result = {
        "version": "0.1.0",
        "status": "success",
        "output_data": [{"name": OUTPUT_SLOT, "format": "parquet", "path": OUTPUT_FILE}],
        "metrics": {
            "rows_in": rows_in,
            "rows_invalid": rows_invalid,
            "rows_in_window": rows_in_window,
            "visits": visits.num_rows,
            "devices": devices,
            "devices_with_visits": devices_with_visits,
        },
        "message": f"{visits.num_rows} visits from {rows_in_window} pings of {devices} devices "
        f"in the last {params['look_back_time']} s",
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
