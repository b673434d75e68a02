"""One step's overhead: algodock's runner against raw ``docker run`` with the same sandbox.

The step is a no-op-ish busybox command (``echo hi > /work/output/out.csv``). Each round
runs, in a rotating order so drift hits all alike:

* ``docker run``: ``docker run --rm`` with exactly the flags of
  ``algodock.runtime.sandbox.container_config`` (network none, read-only root, tmpfs /tmp, cap-drop
  ALL, no-new-privileges, pids limit, cpus, memory and memory-swap, user, the three bind
  mounts, labels, log driver) on a work folder prepared beforehand (not timed);
* ``run_step``: :func:`algodock.runtime.runner.run_step` in this process: parameters, staging,
  image resolution, create/attach/start/wait, reading and hashing outputs, removal;
* ``algodock run-step``: the command as a subprocess (adds Python start-up and imports).

Target (issue 2, item 7): ``run_step`` median <= 1.10 x the ``docker run`` median.
``--profile`` adds where ``run_step``'s time goes: each engine API call and each phase.

    .venv/bin/python bench/step_overhead.py [--repeats N] [--profile] [--quick]
"""

from __future__ import annotations

import _util  # noqa: F401  (environment and sys.path first)

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _util import busybox_image, exit_status, fmt_s, print_table, scratch_dir, verdict

from algodock.runtime import lifecycle, runner
from algodock.contract.manifest import Manifest, parse_manifest
from algodock.runtime.engine import container_labels, docker_client
from algodock.runtime.sandbox import container_config, docker_run_argv, run_as
from algodock.runtime.staging import prepare_work_dir

TARGET = 1.10
COMMAND = ["sh", "-c", "echo hi > /work/output/out.csv"]
_SCRIPT = Path(sys.executable).parent / "algodock"
ALGODOCK = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "algodock.cli"]


def _manifest(image: str) -> dict[str, Any]:
    return {
        "manifest_version": "0.1",
        "name": "overhead",
        "version": "1.0.0",
        "container_parameters": {"image": image, "command": COMMAND},
        "outputs": [{"name": "out", "format": "csv"}],
    }


def raw_docker_run(m: Manifest, image_id: str, root: Path, i: int) -> Callable[[], None]:
    """Prepare (untimed) a work and output folder as the runner would; return the timed ``docker run``."""
    work, out = root / f"raw-work-{i}", root / f"raw-out-{i}"
    out.mkdir()
    prepare_work_dir(work, m, {}, {})
    who = run_as("")
    os.chown(out, who.uid, who.gid)  # type: ignore[arg-type]
    cfg = container_config(m.container_parameters, image_id=image_id, user=who.user, work_dir=work, output_dir=out, labels=container_labels("bench", "raw", i))
    argv = docker_run_argv(cfg)

    def run() -> None:
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        if (out / "out.csv").read_text() != "hi\n":
            sys.exit("bench: docker run produced no output")

    return run


def in_process(m: Manifest, client: Any, root: Path, i: int) -> Callable[[], None]:
    def run() -> None:
        result = runner.run_step(m, output_dir=root / f"step-out-{i}", client=client, run_id="bench", step_id="step", attempt=i)
        if not result.ok:
            sys.exit(f"bench: run_step failed: {result.failure}")

    return run


def cli(manifest_path: Path, root: Path, i: int) -> Callable[[], None]:
    def run() -> None:
        proc = subprocess.run([*ALGODOCK, "run-step", str(manifest_path), "--output", str(root / f"cli-out-{i}"), "--json"], capture_output=True, text=True)
        if proc.returncode != 0 or json.loads(proc.stdout)["status"] != "succeeded":
            sys.exit(f"bench: algodock run-step failed: {proc.stdout} {proc.stderr[-2000:]}")

    return run


def _timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ---------------------------------------------------------------- --profile


def profile(m: Manifest, client: Any, root: Path, repeats: int) -> None:
    """Median time per engine API call and per runner phase over ``repeats`` runs of run_step."""
    samples: dict[str, list[float]] = defaultdict(list)
    api_request = client.api.request

    def timed_request(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        path = re.sub(r"^.*?/v1\.\d+", "", url.split("?", 1)[0])
        path = re.sub(r"/(sha256:)?[0-9a-f]{64}|/algodock-[\w.-]+|/[\w.-]+/[\w.-]+:[\w.-]+", "/{id}", path)
        t0 = time.perf_counter()
        try:
            return api_request(method, url, *args, **kwargs)
        finally:
            samples[f"engine {method} {path}"].append(time.perf_counter() - t0)

    def wrap(module: Any, name: str) -> Callable[[], None]:
        original = getattr(module, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                samples[f"phase {name}"].append(time.perf_counter() - t0)

        setattr(module, name, timed)
        return lambda: setattr(module, name, original)

    undo = [wrap(runner, n) for n in ("resolve_parameters", "plan_inputs", "resolve_image", "prepare_work_dir")]
    undo += [wrap(lifecycle, n) for n in ("_create", "_give_to", "_wait", "read_algo_output", "collect_outputs", "remove_container")]
    client.api.request = timed_request
    totals = []
    try:
        for i in range(repeats):
            totals.append(_timed(in_process(m, client, root, 10_000 + i)))
    finally:
        client.api.request = api_request
        for u in undo:
            u()
    total = statistics.median(totals)
    rows = [(k, f"{len(v) / repeats:g}", fmt_s(statistics.median(v)), f"{100 * statistics.median(v) * len(v) / repeats / total:.0f}%") for k, v in sorted(samples.items(), key=lambda kv: -sum(kv[1]))]
    print(f"\nwhere run_step's {fmt_s(total)} go (median of {repeats}; engine calls happen inside the phases):")
    print_table(["call", "per run", "median", "share"], rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10, help="Rounds (each runs all three once).")
    parser.add_argument("--quick", action="store_true", help="3 rounds.")
    parser.add_argument("--profile", action="store_true", help="Also show where run_step's time goes.")
    args = parser.parse_args()
    repeats = 3 if args.quick else args.repeats

    client = docker_client()
    image_id = busybox_image(client)
    m = parse_manifest(_manifest(image_id))
    with scratch_dir("overhead") as root:
        manifest_path = root / "manifest.json"
        manifest_path.write_text(json.dumps(_manifest(image_id)))
        modes: dict[str, Callable[[int], Callable[[], None]]] = {
            "docker run": lambda i: raw_docker_run(m, image_id, root, i),
            "run_step": lambda i: in_process(m, client, root, i),
            "algodock run-step": lambda i: cli(manifest_path, root, i),
        }
        names = list(modes)
        for name in names:  # warm-up: page cache, the engine's image metadata, imports
            modes[name](-1 - names.index(name))()
        times: dict[str, list[float]] = {n: [] for n in names}
        for i in range(repeats):
            order = names[i % len(names) :] + names[: i % len(names)]
            for name in order:
                times[name].append(_timed(modes[name](i)))
        if args.profile:
            profile(m, client, root, repeats)
        shutil.rmtree(root, ignore_errors=True)

    raw = statistics.median(times["docker run"])
    rows = []
    for name in names:
        med = statistics.median(times[name])
        rows.append((name, fmt_s(min(times[name])), fmt_s(med), fmt_s(max(times[name])), f"{med / raw:.2f}x"))
    print(f"\none no-op step, {repeats} interleaved rounds (image {image_id[:19]}, {os.cpu_count()} CPUs)")
    print_table(["", "best", "median", "worst", "vs docker run"], rows)
    print(f"\nalgodock run-step / docker run = {statistics.median(times['algodock run-step']) / raw:.3f} (includes Python start-up)")
    verdict("run_step median / docker run median", statistics.median(times["run_step"]) / raw, TARGET)
    return exit_status()


if __name__ == "__main__":
    sys.exit(main())
