"""Local staging: hardlink (what algodock does on one filesystem) against copying, by size.

For each size one input file is written once (incompressible bytes, on the filesystem of
the repository), then timed:

* ``stage (link)``: what a pipeline step pays: ``prepare_work_dir`` (``plan_inputs``, the
  hardlink, ``algo_input.json``) with the input's sha256 already known (upstream outputs and
  external inputs are hashed once, when produced or first read);
* ``copy``: ``shutil.copyfile`` of the same file into the same place (the baseline);
* ``sha256``: hashing the file, what staging adds when no hash is known.

Target (issue 3, item 4, as a same-run ratio): the 2 GB input (1 GB with ``--quick``) stages
in at most 1 % of the time copying it takes (median staging / median copy <= 0.01).

    .venv/bin/python bench/staging.py [--quick]
"""

from __future__ import annotations

import _util  # noqa: F401  (environment and sys.path first)

import os
import shutil
import sys
from pathlib import Path

from _util import best_and_median, exit_status, fmt_s, print_table, quick, scratch_dir, timed, verdict

from algodock.contract.manifest import parse_manifest
from algodock.hashing import sha256_file
from algodock.records import InputBinding
from algodock.runtime.staging import prepare_work_dir

MB = 1024 * 1024
TARGET_SIZE, TARGET_RATIO = 2048 * MB, 0.01


def _write(path: Path, size: int) -> None:
    """Incompressible-looking bytes (a random MiB, each copy perturbed) so nothing is sparse."""
    block = bytearray(os.urandom(MB))
    with open(path, "wb") as fh:
        for i in range(size // MB):
            block[:8] = i.to_bytes(8, "little")
            fh.write(block)
        fh.write(os.urandom(size % MB))


def _manifest(multiple: bool):
    return parse_manifest(
        {
            "manifest_version": "0.1",
            "name": "bench",
            "version": "1",
            "container_parameters": {"image": "algodock-bench/busybox:1", "command": ["true"]},
            "inputs": [{"name": "data", "format": "binary", "multiple": multiple}],
        }
    )


def _bench_one(root: Path, label: str, source: Path, nbytes: int, reps: int, copy_reps: int, hash_reps: int) -> tuple[list[object], float]:
    """One size's table row, and median staging / median copy."""
    multiple = source.is_dir()
    manifest = _manifest(multiple)
    digest = "0" * 64  # known: what matters is that staging does not hash
    binding = {"data": InputBinding(slot="data", path=source, sha256=digest)}
    files = sorted(p for p in source.rglob("*") if p.is_file()) if multiple else [source]

    link_times = []
    for i in range(reps):
        work = root / f"work-link-{label}-{i}"
        link_times.append(timed(lambda: prepare_work_dir(work, manifest, binding, {})))
        staged = work / "input" / "data" / (files[0].relative_to(source) if multiple else source.name)
        assert os.path.samefile(staged, files[0]), "staging copied instead of hardlinking"
        shutil.rmtree(work)

    copy_times = []
    for i in range(copy_reps):
        dest = root / f"work-copy-{label}-{i}"
        dest.mkdir()

        def copy() -> None:
            for f in files:
                target = dest / f.relative_to(source.parent)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, target)

        copy_times.append(timed(copy))
        shutil.rmtree(dest)

    hash_times = [timed(lambda: [sha256_file(f) for f in files]) for _ in range(hash_reps)]
    link_best, link_med = best_and_median(link_times)
    copy_best, copy_med = best_and_median(copy_times)
    hash_best, _ = best_and_median(hash_times)
    row = [label, fmt_s(link_best), fmt_s(link_med), fmt_s(copy_best), fmt_s(copy_med), f"{link_med / copy_med:.2g}x", fmt_s(hash_best), f"{nbytes / hash_best / MB:,.0f} MB/s"]
    return row, link_med / copy_med


def main() -> int:
    sizes = [1 * MB, 100 * MB, 1024 * MB] + ([] if quick() else [TARGET_SIZE])
    reps = 10 if quick() else 20
    rows = []
    staged: dict[int, float] = {}  # size -> median staging / median copy
    with scratch_dir("staging") as root:
        print(f"work folder: {root} (one filesystem with the source files)")
        for size in sizes:
            src_dir = root / f"src-{size // MB}"
            src_dir.mkdir()
            source = src_dir / f"input-{size // MB}MB.bin"
            _write(source, size)
            big = size >= 1024 * MB
            row, staged[size] = _bench_one(root, f"{size // MB} MB", source, size, reps, 2 if big else 5, 1 if big else 3)
            rows.append(row)
            shutil.rmtree(src_dir)
        # A folder of parts: the per-file cost of planning and linking.
        parts = root / "src-parts" / "parts"
        parts.mkdir(parents=True)
        nparts = 64 if quick() else 256
        for i in range(nparts):
            _write(parts / f"part-{i:05d}.parquet", MB)
        rows.append(_bench_one(root, f"{nparts} x 1 MB folder", parts, nparts * MB, reps, 3, 1)[0])

    print()
    print_table(["input", "stage (link) best", "median", "copy best", "median", "link/copy (medians)", "sha256", "sha256 rate"], rows)
    print()
    print("stage (link) = prepare_work_dir with the sha256 known: plan_inputs + hardlink + algo_input.json")
    largest = max(staged)
    verdict(f"staging a {largest // MB} MB input / copying it (medians)", staged[largest], TARGET_RATIO)
    return exit_status()


if __name__ == "__main__":
    sys.exit(main())
