#!/usr/bin/env python3
"""Generate realistic sample GPS pings for the device-visits example.

Each device has a home, a workplace and a few favourite shops (shops are shared between
devices) around a city centre. Every day it stays home until the morning, travels to
work, stays there, sometimes stops at a shop on the way back, and goes home. While it
stays somewhere it pings every ~`--interval` seconds with GPS noise (`--outlier-rate` adds bad fixes);
while it travels it pings along the straight line at 6-14 m/s.

    python examples/generate_pings.py --devices 20 --hours 24 --parts 4 --out DIR --seed 42

writes DIR/part-000.parquet ... part-(K-1).parquet: the pings sorted by time and cut into
K consecutive pieces (like an hourly ingest), so one device spans several parts. Columns:
device_id (string), ts (timestamp[us, UTC]; int64 epoch seconds with --epoch-seconds),
lat, lon (float64 degrees). `--truth FILE` also writes the planned stays (device_id,
place, start_ts, end_ts, lat, lon) to check visit detection against.

The output depends only on the arguments (same seed, same files). Needs pyarrow.
"""
from __future__ import annotations

import argparse
import math
import random
import sys
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

CITY = (52.5200, 13.4050)  # lat, lon of the city centre
M_PER_DEG_LAT = 111_320.0
US = 1_000_000


def offset(lat: float, lon: float, north_m: float, east_m: float) -> tuple[float, float]:
    """The point north_m / east_m metres away (flat-earth approximation, fine for a city)."""
    return (lat + north_m / M_PER_DEG_LAT, lon + east_m / (M_PER_DEG_LAT * math.cos(math.radians(lat))))


def distance_m(a: tuple[float, float], b: tuple[float, float]) -> float:
    north = (b[0] - a[0]) * M_PER_DEG_LAT
    east = (b[1] - a[1]) * M_PER_DEG_LAT * math.cos(math.radians(a[0]))
    return math.hypot(north, east)


def random_place(rng: random.Random, max_km: float) -> tuple[float, float]:
    r = max_km * 1000 * math.sqrt(rng.random())
    a = rng.uniform(0, 2 * math.pi)
    return offset(*CITY, r * math.cos(a), r * math.sin(a))


def plan_stays(rng: random.Random, home: tuple, work: tuple, shops: list, start_s: int, end_s: int) -> list:
    """[(place_name, (lat, lon), start_s, end_s)] in time order, clipped to [start_s, end_s].
    The gaps between consecutive stays are the trips."""

    def trip_s(a: tuple, b: tuple) -> int:
        return int(distance_m(a, b) / rng.uniform(6, 14)) + rng.randint(30, 180)

    stays = []
    since = start_s  # at home since
    day = start_s - start_s % 86400
    while since < end_s:
        leave_home = day + int(rng.gauss(7.5, 0.6) * 3600)
        leave_work = day + int(rng.gauss(17.0, 0.8) * 3600)
        day += 86400
        if leave_home <= since:  # started after this morning's commute: stay home today
            continue
        stays.append(("home", home, since, leave_home))
        t = leave_home + trip_s(home, work)
        stays.append(("work", work, t, max(leave_work, t + 3600)))
        here, t = work, stays[-1][3]
        if rng.random() < 0.6:  # shopping on the way back, 10-60 min
            name, shop = rng.choice(shops)
            t += trip_s(here, shop)
            stays.append((name, shop, t, t + rng.randint(10, 60) * 60))
            here, t = shop, stays[-1][3]
        since = t + trip_s(here, home)
    stays.append(("home", home, since, end_s))
    return [(n, w, max(s, start_s), min(e, end_s)) for n, w, s, e in stays if e > start_s and s < end_s]


def device_pings(rng: random.Random, device_id: str, stays: list, interval: float, noise_m: float,
                 outlier_rate: float, start_s: int, end_s: int):
    rows = []
    timeline = []  # (t0, t1, from, to): a stay has from == to
    for k, (_, where, s, e) in enumerate(stays):
        timeline.append((s, e, where, where))
        if k + 1 < len(stays) and stays[k + 1][2] > e:
            timeline.append((e, stays[k + 1][2], where, stays[k + 1][1]))
    t = start_s + rng.uniform(0, interval)
    seg = 0
    while t < end_s and seg < len(timeline):
        t0, t1, a, b = timeline[seg]
        if t >= t1:
            seg += 1
            continue
        if t >= t0:
            f = 0.0 if t1 == t0 else (t - t0) / (t1 - t0)
            lat = a[0] + (b[0] - a[0]) * f
            lon = a[1] + (b[1] - a[1]) * f
            sigma = noise_m * (1.0 if a == b else 1.5)
            if rng.random() < outlier_rate:
                sigma = rng.uniform(150, 400)  # a bad fix (multipath, cell-tower location)
            lat, lon = offset(lat, lon, rng.gauss(0, sigma), rng.gauss(0, sigma))
            rows.append((device_id, int(t * 1000) * 1000, round(lat, 7), round(lon, 7)))
        t += max(5.0, rng.expovariate(1.0 / interval))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=20, help="number of devices (default 20)")
    ap.add_argument("--hours", type=float, default=24, help="hours of data (default 24)")
    ap.add_argument("--out", required=True, type=Path, help="output folder for part-NNN.parquet")
    ap.add_argument("--parts", type=int, default=4, help="number of part files (default 4)")
    ap.add_argument("--seed", type=int, default=42, help="random seed (default 42)")
    ap.add_argument("--start", default="2026-11-26T00:00:00Z", help="first timestamp, ISO 8601 UTC")
    ap.add_argument("--interval", type=float, default=60.0, help="mean seconds between pings (default 60)")
    ap.add_argument("--noise-m", type=float, default=12.0, help="GPS noise sigma in metres (default 12)")
    ap.add_argument("--outlier-rate", type=float, default=0.0,
                    help="share of bad fixes 150-400 m off (default 0: each one splits a visit)")
    ap.add_argument("--epoch-seconds", action="store_true", help="write ts as int64 epoch seconds")
    ap.add_argument("--truth", type=Path, help="also write the planned stays to this parquet file")
    args = ap.parse_args(argv)
    if args.devices < 1 or args.parts < 1 or args.hours <= 0 or args.interval <= 0:
        ap.error("--devices, --parts, --hours and --interval must be positive")

    start_s = int(datetime.fromisoformat(args.start.replace("Z", "+00:00")).astimezone(timezone.utc).timestamp())
    end_s = start_s + int(args.hours * 3600)
    world = random.Random(args.seed)
    shops = [(f"shop-{k}", random_place(world, 4)) for k in range(8)]

    rows, truth = [], []
    for d in range(args.devices):
        rng = random.Random(args.seed * 1_000_003 + d)
        device_id = f"dev-{d:04d}"
        home, work = random_place(rng, 9), random_place(rng, 5)
        stays = plan_stays(rng, home, work, rng.sample(shops, 3), start_s, end_s)
        rows += device_pings(rng, device_id, stays, args.interval, args.noise_m, args.outlier_rate, start_s, end_s)
        truth += [(device_id, n, s * US, e * US, w[0], w[1]) for n, w, s, e in stays]
    rows.sort(key=lambda r: (r[1], r[0]))

    ts_type = pa.int64() if args.epoch_seconds else pa.timestamp("us", tz="UTC")
    schema = pa.schema([("device_id", pa.string()), ("ts", ts_type), ("lat", pa.float64()), ("lon", pa.float64())])
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("part-*.parquet"):
        old.unlink()  # a previous run with more parts must not leave extra files behind
    per_part = math.ceil(len(rows) / args.parts) if rows else 0
    for k in range(args.parts):
        chunk = rows[k * per_part:(k + 1) * per_part]
        cols = list(zip(*chunk)) if chunk else [[], [], [], []]
        ts = [v // US for v in cols[1]] if args.epoch_seconds else list(cols[1])
        table = pa.table([pa.array(cols[0], pa.string()), pa.array(ts, ts_type),
                          pa.array(cols[2], pa.float64()), pa.array(cols[3], pa.float64())], schema=schema)
        pq.write_table(table, args.out / f"part-{k:03d}.parquet")
    if args.truth:
        cols = list(zip(*truth))
        ts = pa.timestamp("us", tz="UTC")
        pq.write_table(pa.table({"device_id": pa.array(cols[0], pa.string()), "place": pa.array(cols[1], pa.string()),
                                 "start_ts": pa.array(cols[2], ts), "end_ts": pa.array(cols[3], ts),
                                 "lat": pa.array(cols[4], pa.float64()), "lon": pa.array(cols[5], pa.float64())}),
                       args.truth)
    print(f"wrote {len(rows)} pings of {args.devices} devices over {args.hours:g} h "
          f"into {args.parts} part(s) in {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
