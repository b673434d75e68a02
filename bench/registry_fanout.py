"""A fan-out of 20 steps on an image not yet present, against one pull of it (issue 18).

A private registry (Debian's docker-registry, `make registry`) runs on 127.0.0.1 with
htpasswd auth (tests/registry.py). Each round pushes a new image (busybox plus a layer of
random bytes, so nothing of it is on the engine) and measures, in alternating order:

* ``one pull``: the engine's pull API (what ``docker pull`` calls), consumed to its end;
* ``fan-out``: 20 threads that start together, each resolving the image as a step does before
  its container (``algodock.runtime.images.resolve_image`` with credentials), until every one
  has the image id.

Bytes are read from the registry's own access log: every blob download of the repository.
Targets: fan-out wall time <= 1.1 x one pull (median of the rounds), and the fan-out
downloads each blob once (its bytes within 1 % of the one pull's: each image is new random
bytes, whose compressed size differs by a few bytes). Exits 1 when either is missed.

    .venv/bin/python bench/registry_fanout.py [--quick]
"""

from __future__ import annotations

import _util  # noqa: F401  (environment and sys.path first)

import io
import os
import statistics
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from _util import busybox_image, exit_status, fmt_s, print_table, quick, verdict

from algodock.runtime.engine import docker_client
from algodock.runtime.images import RegistryAuth, resolve_image
from tests.registry import Registry, available, clean, remove_local

STEPS = 20
LAYER_MB = 16 if quick() else 64
ROUNDS = 3 if quick() else 7
TARGET = 1.1


def build(client: Any, base: str, tag: str) -> str:
    """``base`` plus one layer of LAYER_MB random bytes; returns the image id."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("Dockerfile", f"FROM {base}\nCOPY blob /blob\n".encode()), ("blob", os.urandom(LAYER_MB << 20))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    image, _ = client.images.build(fileobj=buf, custom_context=True, tag=tag, rm=True, forcerm=True)
    return image.id


def fresh(client: Any, registry: Registry, base: str) -> tuple[str, str, str]:
    """A new image pushed to the registry and absent from the engine: (ref, repository name, digest)."""
    tag = uuid.uuid4().hex[:10]
    local = f"algodock-bench/registry-{tag}:1"
    image_id = build(client, base, local)
    name = f"bench/fanout-{tag}"
    digest = registry.push(client, image_id, name, "1")
    ref = f"{registry.host}/{name}:1"
    remove_local(client, local, ref, f"{registry.host}/{name}@{digest}")
    return ref, name, digest


def one_pull(client: Any, registry: Registry, ref: str) -> float:
    started = time.perf_counter()
    for event in client.api.pull(ref, stream=True, decode=True, auth_config=registry.auth()):
        if event.get("error"):
            raise RuntimeError(event["error"])
    return time.perf_counter() - started


def fan_out(client: Any, registry: Registry, ref: str) -> float:
    auth = [RegistryAuth.of(registry.host, "algoteam", registry.password, "credentials block 'bench'")]
    gate = threading.Barrier(STEPS + 1)
    ids: list[str] = []
    errors: list[BaseException] = []

    def step() -> None:
        gate.wait()
        try:
            ids.append(resolve_image(client, ref, credentials=auth).id)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=step) for _ in range(STEPS)]
    for t in threads:
        t.start()
    gate.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    if errors or len(set(ids)) != 1:
        raise RuntimeError(f"the fan-out did not resolve one image: {errors or ids}")
    return elapsed


def main() -> int:
    why = available()
    if why:
        print(f"registry_fanout: {why}", file=sys.stderr)
        return 1
    client = docker_client()
    base = busybox_image(client)
    folder = Path(tempfile.mkdtemp(prefix="algodock-bench-registry-"))
    registry = Registry(folder).start()
    rows: list[list[Any]] = []
    ratios: list[float] = []
    bytes_ok = True
    refs: list[str] = []
    try:
        for round_ in range(ROUNDS):
            times: dict[str, float] = {}
            fetched: dict[str, int] = {}
            order = ("one pull", "fan-out") if round_ % 2 == 0 else ("fan-out", "one pull")
            for how in order:
                ref, name, _ = fresh(client, registry, base)
                refs.append(ref)
                times[how] = one_pull(client, registry, ref) if how == "one pull" else fan_out(client, registry, ref)
                blobs = registry.blob_fetches(name)
                fetched[how] = sum(size for _, size in blobs)
                if how == "fan-out" and len(blobs) != len({d for d, _ in blobs}):
                    bytes_ok = False
                remove_local(client, ref)
            ratio = times["fan-out"] / times["one pull"]
            ratios.append(ratio)
            # each round's image is new random bytes: its compressed layer differs from the other's by a few bytes
            bytes_ok = bytes_ok and fetched["fan-out"] <= fetched["one pull"] * 1.01
            rows.append([round_ + 1, " then ".join(order), fmt_s(times["one pull"]), fmt_s(times["fan-out"]), f"{ratio:.2f}x",
                         f"{fetched['one pull'] / 2**20:.1f} MiB", f"{fetched['fan-out'] / 2**20:.1f} MiB"])
    finally:
        registry.stop()
        remove_local(client, *refs)
        clean(folder)
    print(f"{STEPS} steps starting together on a {LAYER_MB} MiB image not yet present, against one pull ({ROUNDS} rounds, load average {os.getloadavg()[0]:.1f})")
    print_table(["round", "order", "one pull", f"fan-out ({STEPS})", "ratio", "one pull bytes", "fan-out bytes"], rows)
    median = statistics.median(ratios)
    print(f"each blob downloaded once by the fan-out: {bytes_ok}")
    verdict("fan-out wall / one pull (median)", median, TARGET)
    verdict("blobs the fan-out downloaded more than once", 0 if bytes_ok else 1, 0, unit="")
    return exit_status()


if __name__ == "__main__":
    sys.exit(main())
