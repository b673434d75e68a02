"""Cold start: `algodock run-step` of a no-op step against a no-op `docker run` with the same flags.

    .venv/bin/python bench/cold_start.py [--repeat 5]

Both start a fresh process per run (the CLI's imports included) and run `true` in the
busybox test image with the sandbox's flags, built from the sandbox's own configuration
(network none, read-only root, non-root user, all capabilities dropped, no-new-privileges,
pids/CPU/memory limits, a /tmp tmpfs, the work and output mounts), interleaved and
alternating which goes first. Prints the medians, the CLI's import time (`python -X importtime`)
and the ratio of the medians (target: <= 1.5).
"""

from __future__ import annotations

import _util  # noqa: F401  (environment and sys.path first)

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _util import exit_status, verdict

REPO = Path(__file__).resolve().parents[1]
IMAGE = "algodock-test/busybox:1"


def _ensure_image() -> None:
    if subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True).returncode == 0:
        return
    sys.path.insert(0, str(REPO))
    import docker

    from tests.conftest import build_image

    build_image(docker.from_env(), IMAGE, 'FROM scratch\nCOPY busybox /bin/busybox\nRUN ["/bin/busybox", "--install", "-s", "/bin"]\n',
                {"busybox": Path("/bin/busybox")})


def _raw_argv(manifest_path: Path, tmp: Path, i: int) -> list[str]:
    """The baseline: `docker run` with the very flags of the sandbox (built from its own
    configuration, `algodock.runtime.sandbox.container_config`), on a work and output folder
    prepared as the runner prepares them (untimed)."""
    import os

    sys.path.insert(0, str(REPO))
    import docker

    from algodock.contract.manifest import load_manifest
    from algodock.runtime.engine import container_labels
    from algodock.runtime.sandbox import container_config, docker_run_argv, run_as
    from algodock.runtime.staging import prepare_work_dir

    m = load_manifest(manifest_path)
    work, out = tmp / f"raw-work-{i}", tmp / f"raw-out-{i}"
    out.mkdir()
    prepare_work_dir(work, m, {}, {})
    who = run_as("")
    os.chown(out, who.uid, who.gid)  # type: ignore[arg-type]
    image_id = docker.from_env().images.get(IMAGE).id
    cfg = container_config(m.container_parameters, image_id=image_id, user=who.user, work_dir=work, output_dir=out, labels=container_labels("bench", "cold", i))
    return docker_run_argv(cfg)


def _time(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {out.stderr[-2000:]}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    _ensure_image()
    tmp = Path(tempfile.mkdtemp(prefix="algodock-cold-"))
    manifest = tmp / "noop.json"
    manifest.write_text(json.dumps({
        "manifest_version": "0.1", "name": "noop", "version": "1.0.0",
        "container_parameters": {"image": IMAGE, "command": ["true"], "resource_request": {"cpu_millicore": 100, "memory_gb": 0.125}},
    }))
    algodock = str(REPO / ".venv/bin/algodock")
    raw, ours = [], []
    try:
        for i in range(args.repeat):  # interleaved, alternating which goes first, so both see the same load
            raw_argv = _raw_argv(manifest, tmp, i)  # prepared untimed
            runs = [(raw, raw_argv), (ours, [algodock, "run-step", str(manifest), "--output", str(tmp / f"out{i}")])]
            for samples, argv in runs if i % 2 == 0 else reversed(runs):
                samples.append(_time(argv))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    imports = subprocess.run([sys.executable, "-X", "importtime", "-c", "import algodock.cli, algodock.runtime.runner, algodock.contract"],
                             capture_output=True, text=True).stderr
    total_us = sum(int(m.group(1)) for m in re.finditer(r"import time:\s+(\d+) \|", imports))
    r, o = statistics.median(raw), statistics.median(ours)
    print(f"docker run (no-op, same flags)   median {r:.3f} s  ({', '.join(f'{x:.2f}' for x in raw)})")
    print(f"algodock run-step (no-op)        median {o:.3f} s  ({', '.join(f'{x:.2f}' for x in ours)})")
    print(f"run-step's imports: {total_us / 1e6:.2f} s (python -X importtime)")
    verdict("algodock run-step median / docker run median (no-op, fresh processes)", o / r, 1.5)
    return exit_status()


if __name__ == "__main__":
    sys.exit(main())
