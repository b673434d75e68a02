"""A 200 MB flood of short log lines through `algodock run`: how long after the container's
exit does the command return? (Target: within 10 s.)

    .venv/bin/python bench/log_flood.py [--mb 200]

The step prints 40-byte lines until it has written ``--mb`` MB. The store keeps 64 MiB of
the log (head and tail), Prefect gets at most 20,000 lines (in batches); the figure is the
time from the step's ``finished_at`` (the container's exit) to the process's exit.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGE = "algodock-test/busybox:1"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=200)
    args = parser.parse_args()
    if subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True).returncode != 0:
        sys.exit(f"bench: the image {IMAGE} is missing: run the test suite once (it builds it)")
    with tempfile.TemporaryDirectory(prefix="algodock-flood-") as tmp:
        root = Path(tmp)
        (root / "flood.json").write_text(json.dumps({
            "manifest_version": "0.2", "name": "flood", "version": "1",
            "container_parameters": {"image": IMAGE, "timeout_seconds": 900, "command": [
                "/bin/sh", "-c", f"yes 0123456789012345678901234567890123456789 | head -c {args.mb * 1_000_000}; echo the-end"]},
        }))
        (root / "p.yaml").write_text('pipeline_version: "0.1"\nname: flood\nsteps:\n  - {id: flood, manifest: flood.json}\n')
        t0 = time.time()
        proc = subprocess.run([str(REPO / ".venv/bin/algodock"), "run", str(root / "p.yaml"), "--store", str(root / "store"), "--json"],
                              capture_output=True, text=True)
        exited = time.time()
        if proc.returncode != 0:
            sys.exit(f"bench: algodock run failed: {proc.stderr[-2000:]}")
        step = json.loads(proc.stdout)["steps"][0]
        started = datetime.fromisoformat(step["started_at"]).timestamp()
        finished = datetime.fromisoformat(step["finished_at"]).timestamp()
        [log] = (root / "store").glob("runs/*/steps/flood/attempts/*/container.log")
        print(f"{args.mb} MB of 41-byte lines: container ran {finished - started:.1f} s; algodock run returned "
              f"{exited - finished:.2f} s after its exit (target <= 10 s); whole command {exited - t0:.1f} s; "
              f"stored log {log.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
