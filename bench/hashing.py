"""Lineage hashing cost per GB against plain hashlib sha256 of the same bytes, in the same run.

Every stored output and every external input is hashed once for its lineage record
(:func:`algodock.hashing.sha256_path`, also what ``algodock lineage verify`` re-runs). This
bench writes incompressible bytes once, then times, interleaved round by round so both see
the same page cache and CPU:

* ``file``: ``sha256_path`` of one file, against ``hashlib.sha256`` fed the same file in 1 MiB
  reads (the plain loop anyone would write);
* ``folder``: ``sha256_path`` of a folder of parts (the framed folder hash: one
  sha256 per part, then one over the length-prefixed listing), against one ``hashlib.sha256`` over the bytes of
  every part in order, the same total.

Reported: seconds per GiB (median of the rounds) and the ratio algodock / hashlib.
Target (issue 4, item 7): ratio <= 1.10.

    .venv/bin/python bench/hashing.py [--quick] [--size-mb N] [--rounds N]
"""

from __future__ import annotations

import _util  # noqa: F401  (environment and sys.path first)

import argparse
import hashlib
import os
import statistics
import sys
from pathlib import Path

from _util import exit_status, fmt_s, print_table, quick, scratch_dir, timed, verdict

from algodock.hashing import list_files, sha256_path

MB = 1024 * 1024
GIB = 1024 * MB
TARGET_RATIO = 1.10
PARTS = 64


def _write(path: Path, size: int) -> None:
    """Incompressible bytes (a random MiB, each copy perturbed), so nothing is sparse or deduplicated."""
    block = bytearray(os.urandom(MB))
    with open(path, "wb") as fh:
        written = 0
        while written < size:
            block[written // MB % MB] ^= 0xFF
            n = min(MB, size - written)
            fh.write(block[:n])
            written += n


def plain_sha256(paths: list[Path]) -> str:
    """The baseline: one hashlib.sha256 fed every byte of ``paths`` in 1 MiB reads."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb", buffering=0) as fh:
            while chunk := fh.read(MB):
                h.update(chunk)
    return h.hexdigest()


def measure(name: str, target: Path, files: list[Path], size: int, rounds: int) -> tuple[str, float, float, float]:
    plain_sha256(files), sha256_path(target)  # warm the page cache; the first read is the disk's cost, not the hash's
    ours, base = [], []
    for i in range(rounds):  # interleaved, alternating which goes first
        pair = [("ours", lambda: sha256_path(target)), ("base", lambda: plain_sha256(files))]
        for label, fn in pair if i % 2 == 0 else reversed(pair):
            (ours if label == "ours" else base).append(timed(fn))
    per_gib = GIB / size
    ours_s, base_s = statistics.median(ours) * per_gib, statistics.median(base) * per_gib
    return name, ours_s, base_s, ours_s / base_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="256 MiB and 3 rounds")
    parser.add_argument("--size-mb", type=int, default=None, help="bytes hashed per measurement, in MiB [default 1024]")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per measurement [default 5]")
    args = parser.parse_args()
    size = (args.size_mb or (256 if quick() else 1024)) * MB
    rounds = args.rounds or (3 if quick() else 5)

    with scratch_dir("hashing") as root:
        single = root / "one.bin"
        _write(single, size)
        folder = root / "parts"
        folder.mkdir()
        for i in range(PARTS):
            _write(folder / f"part-{i:03d}.parquet", size // PARTS)
        parts = [folder / rel for rel in list_files(folder)]
        assert sha256_path(single) == plain_sha256([single]), "the file hash is the sha256 of the bytes"

        rows = []
        results = [
            measure("file", single, [single], size, rounds),
            measure(f"folder ({PARTS} parts)", folder, parts, size // PARTS * PARTS, rounds),
        ]
        for name, ours_s, base_s, ratio in results:
            rows.append([name, f"{size // MB} MiB", f"{fmt_s(ours_s)}/GiB", f"{fmt_s(base_s)}/GiB", f"{ratio:.3f}x"])
        print(f"lineage hashing vs hashlib sha256 of the same bytes (median of {rounds} rounds, warm page cache)")
        print_table(["what", "bytes", "algodock sha256_path", "hashlib sha256", "ratio"], rows)
        verdict("sha256_path / hashlib sha256, worst of file and folder (medians)", max(r[3] for r in results), TARGET_RATIO)
        return exit_status()


if __name__ == "__main__":
    sys.exit(main())
