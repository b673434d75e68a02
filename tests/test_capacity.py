"""Resource packing with real threads; events and queues synchronise, never sleeps."""

from __future__ import annotations

import queue
import random
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from algodock.pipeline import capacity as capacity_module
from algodock.pipeline.capacity import Cancelled, Capacity, ResourcePool
from algodock.contract.manifest import ResourceRequest
from algodock.errors import InvalidInput

WAIT = 10  # seconds; only a bound for a broken implementation, never a synchronisation


def spawn(target: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def test_parse() -> None:
    assert Capacity.parse("cpu_millicore=2000,memory_gb=4") == Capacity(2000, 4.0, 0)
    assert Capacity.parse(" cpu_millicore=500 , memory_gb=0.5, gpu=1 ") == Capacity(500, 0.5, 1)
    assert str(Capacity(2000, 4)) == "cpu_millicore=2000,memory_gb=4,gpu=0"
    for bad, why in [
        ("cpu_millicore=2000", "memory_gb missing"),
        ("cpu=2000,memory_gb=4", "'cpu=2000' is not one of them"),
        ("cpu_millicore=2.5,memory_gb=4", "cpu_millicore='2.5' is not an integer"),
        ("cpu_millicore=1000,memory_gb=lots", "memory_gb='lots' is not a number"),
        ("cpu_millicore=1000,memory_gb=1,cpu_millicore=2", "cpu_millicore is given twice"),
        ("cpu_millicore=0,memory_gb=1", "must be > 0"),
        ("", "cpu_millicore and memory_gb missing"),
    ]:
        with pytest.raises(InvalidInput) as info:
            Capacity.parse(bad)
        assert f"--capacity {bad!r}: expected cpu_millicore=N,memory_gb=M[,gpu=G]" in str(info.value)
        assert why in str(info.value)


def test_fits_and_excess() -> None:
    cap = Capacity(2000, 4)
    assert cap.fits(ResourceRequest(cpu_millicore=2000, memory_gb=4))
    assert not cap.fits(ResourceRequest(cpu_millicore=2001))
    assert not cap.fits(ResourceRequest(gpu=1))
    assert cap.excess(ResourceRequest(cpu_millicore=4000, memory_gb=8, gpu=1)) == [
        "cpu_millicore 4000 > 2000",
        "memory_gb 8 > 4",
        "gpu 1 > 0",
    ]
    # Sums of float GB do not drift: ten 0.1 GB requests fill 1 GB exactly.
    pool = ResourcePool(Capacity(10_000, 1))
    for _ in range(10):
        pool.acquire(Capacity(1, 0.1))
    assert pool.available().memory_gb < 1e-6
    with pytest.raises(Cancelled):  # an eleventh does not fit: it would wait (cancel is already set)
        cancelled = threading.Event()
        cancelled.set()
        pool.acquire(Capacity(1, 0.1), cancel=cancelled)


def test_from_engine() -> None:
    class Engine:  # the one call Capacity makes on a docker.DockerClient
        def info(self) -> dict[str, int]:
            return {"NCPU": 8, "MemTotal": 16 * 1024**3}

    assert Capacity.from_engine(Engine()) == Capacity(8000, 16.0, 0)


def test_request_larger_than_capacity_fails_at_once() -> None:
    pool = ResourcePool(Capacity(2000, 4))
    with pytest.raises(ValueError, match="can never fit the capacity cpu_millicore=2000,memory_gb=4,gpu=0: memory_gb 8 > 4"):
        pool.acquire(ResourceRequest(memory_gb=8))
    with pytest.raises(ValueError, match="never acquired"):
        pool.release(ResourceRequest())
    assert pool.available() == Capacity(2000, 4)


def test_reserve_releases_on_error() -> None:
    pool = ResourcePool(Capacity(2000, 4))
    with pytest.raises(KeyError):
        with pool.reserve(ResourceRequest(cpu_millicore=1500)):
            assert pool.available() == Capacity(500, 3)
            raise KeyError("boom")
    assert pool.available() == Capacity(2000, 4)


def test_eight_jobs_of_1000_on_2000_run_two_at_a_time() -> None:
    pool = ResourcePool(Capacity(2000, 64))
    request = ResourceRequest(cpu_millicore=1000, memory_gb=1)
    started: queue.Queue[int] = queue.Queue()
    queued = threading.Semaphore(0)
    finish = [threading.Event() for _ in range(8)]
    lock = threading.Lock()
    held = peak = 0

    def job(i: int) -> None:
        nonlocal held, peak
        pool.acquire(request, on_wait=queued.release)
        with lock:
            held += 1
            peak = max(peak, held)
        started.put(i)
        assert finish[i].wait(WAIT)
        with lock:
            held -= 1
        pool.release(request)

    threads = [spawn(lambda i=i: job(i)) for i in range(8)]
    running = {started.get(timeout=WAIT), started.get(timeout=WAIT)}
    for _ in range(6):
        assert queued.acquire(timeout=WAIT)
    assert started.empty() and pool.waiting == 6
    order = sorted(running)
    while running:
        done = min(running)
        running.remove(done)
        finish[done].set()
        if len(order) < 8:  # one release: exactly one waiter takes the freed place
            nxt = started.get(timeout=WAIT)
            order.append(nxt)
            running.add(nxt)
            assert len(running) == 2 and started.empty()
            assert pool.waiting == 8 - len(order)
    for t in threads:
        t.join(WAIT)
    assert sorted(order) == list(range(8)) and peak == 2
    assert pool.available() == Capacity(2000, 64)


def test_concurrent_requests_never_exceed_capacity() -> None:
    cap = Capacity(4000, 8, 2)
    pool = ResourcePool(cap)
    lock = threading.Lock()
    held = [0, 0.0, 0]
    violations: list[list[float]] = []
    rng = random.Random(7)
    plans = [
        [ResourceRequest(cpu_millicore=rng.choice([250, 1000, 2500, 4000]), memory_gb=rng.choice([0.25, 1, 3.5, 8]), gpu=rng.choice([0, 0, 1, 2])) for _ in range(20)]
        for _ in range(16)
    ]

    def worker(plan: list[ResourceRequest]) -> None:
        for req in plan:
            with pool.reserve(req):
                with lock:
                    held[0] += req.cpu_millicore
                    held[1] += req.memory_gb
                    held[2] += req.gpu
                    if held[0] > cap.cpu_millicore or held[1] > cap.memory_gb + 1e-9 or held[2] > cap.gpu:
                        violations.append(list(held))
                with lock:
                    held[0] -= req.cpu_millicore
                    held[1] -= req.memory_gb
                    held[2] -= req.gpu

    threads = [spawn(lambda p=p: worker(p)) for p in plans]
    for t in threads:
        t.join(60)
        assert not t.is_alive()
    assert violations == []
    assert pool.available() == cap and pool.waiting == 0


def test_small_request_overtakes_a_big_one_that_does_not_fit() -> None:
    pool = ResourcePool(Capacity(2000, 4))
    pool.acquire(ResourceRequest(cpu_millicore=1000))
    big_queued, big_started = threading.Event(), threading.Event()

    def big() -> None:
        pool.acquire(ResourceRequest(cpu_millicore=2000), on_wait=big_queued.set)
        big_started.set()

    thread = spawn(big)
    assert big_queued.wait(WAIT)
    pool.acquire(ResourceRequest(cpu_millicore=1000), on_wait=lambda: pytest.fail("the small request had to wait"))
    assert pool.waiting == 1 and not big_started.is_set()
    pool.release(ResourceRequest(cpu_millicore=1000))
    assert not big_started.is_set()
    pool.release(ResourceRequest(cpu_millicore=1000))
    assert big_started.wait(WAIT)
    thread.join(WAIT)


def test_a_starving_request_stops_later_ones_from_overtaking() -> None:
    pool = ResourcePool(Capacity(3000, 8), patience=1)
    a, c1, c2, b = (ResourceRequest(cpu_millicore=n) for n in (1000, 1000, 500, 2500))
    pool.acquire(a)
    got: queue.Queue[str] = queue.Queue()
    queued: queue.Queue[str] = queue.Queue()

    def wait_for(name: str, req: ResourceRequest) -> threading.Thread:
        return spawn(lambda: (pool.acquire(req, on_wait=lambda: queued.put(name)), got.put(name)))

    tb = wait_for("b", b)
    assert queued.get(timeout=WAIT) == "b"
    pool.acquire(c1, on_wait=lambda: pytest.fail("c1 fits and b is not starving yet"))  # overtakes b once
    tc2 = wait_for("c2", c2)  # would fit (1000 free), but b has been overtaken `patience` times
    assert queued.get(timeout=WAIT) == "c2"
    pool.release(a)  # 2000 free: b (2500) still does not fit, and c2 waits behind it
    assert pool.waiting == 2 and got.empty()
    pool.release(c1)  # 3000 free: b starts, then c2 fits beside it
    assert {got.get(timeout=WAIT), got.get(timeout=WAIT)} == {"b", "c2"}
    tb.join(WAIT)
    tc2.join(WAIT)
    assert pool.available() == Capacity(0, 6)


def test_cancelled_waiter_leaves_the_queue_and_unblocks_those_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(capacity_module, "CANCEL_CHECK_SECONDS", 3600)  # only wake_all() can wake it in time
    pool = ResourcePool(Capacity(2000, 4), patience=0)  # patience 0: strict arrival order
    pool.acquire(ResourceRequest(cpu_millicore=1000))
    cancel = threading.Event()
    queued: queue.Queue[str] = queue.Queue()
    outcome: queue.Queue[str] = queue.Queue()

    def big() -> None:
        try:
            pool.acquire(ResourceRequest(cpu_millicore=2000), cancel=cancel, on_wait=lambda: queued.put("big"))
            outcome.put("big acquired")
        except Cancelled as exc:
            outcome.put(f"big cancelled: {exc}")

    def small() -> None:
        pool.acquire(ResourceRequest(cpu_millicore=1000), on_wait=lambda: queued.put("small"))
        outcome.put("small acquired")

    spawn(big)
    assert queued.get(timeout=WAIT) == "big"
    spawn(small)
    assert queued.get(timeout=WAIT) == "small"  # fits, but strict order keeps it behind big
    assert pool.waiting == 2 and outcome.empty()
    cancel.set()
    pool.wake_all()
    results = {outcome.get(timeout=WAIT), outcome.get(timeout=WAIT)}
    assert results == {"big cancelled: cancelled while waiting for resources (cpu_millicore=2000,memory_gb=1,gpu=0)", "small acquired"}
    assert pool.waiting == 0 and pool.available() == Capacity(0, 2)


def test_cancel_is_noticed_without_wake_all(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(capacity_module, "CANCEL_CHECK_SECONDS", 0.01)  # the safety net
    pool = ResourcePool(Capacity(1000, 1))
    pool.acquire(ResourceRequest())
    cancel, queued = threading.Event(), threading.Event()
    outcome: queue.Queue[str] = queue.Queue()

    def waiter() -> None:
        try:
            pool.acquire(ResourceRequest(), cancel=cancel, on_wait=queued.set)
            outcome.put("acquired")
        except Cancelled:
            outcome.put("cancelled")

    spawn(waiter)
    assert queued.wait(WAIT)
    cancel.set()  # nobody calls wake_all()
    assert outcome.get(timeout=WAIT) == "cancelled"
    assert pool.waiting == 0
    cancel.clear()
    with pytest.raises(Cancelled):  # already set: no wait at all
        cancel.set()
        pool.acquire(ResourceRequest(), cancel=cancel)


# ------------------------------------------------------------------ GPUs of the engine (recorded `docker info`)

RUNC_ONLY = {"NCPU": 8, "MemTotal": 16 * 1024**3, "Runtimes": {"io.containerd.runc.v2": {"path": "runc"}, "runc": {"path": "runc"}}, "DefaultRuntime": "runc"}
NVIDIA_RUNTIME = {**RUNC_ONLY, "Runtimes": {**RUNC_ONLY["Runtimes"], "nvidia": {"path": "nvidia-container-runtime"}}}


def _dev(tmp_path: Path, *names: str) -> Path:
    for name in names:
        (tmp_path / name).touch()
    return tmp_path


@pytest.mark.parametrize(
    ("info", "local", "devices", "smi", "hook", "expected"),
    [
        (RUNC_ONLY, True, [], None, None, 0),
        (RUNC_ONLY, True, ["nvidia0", "nvidia1", "nvidiactl"], None, None, 0),  # devices, but nothing hands them to containers
        (NVIDIA_RUNTIME, True, ["nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm", "nvidia-modeset"], None, None, 2),
        (RUNC_ONLY, True, ["nvidia0", "nvidiactl"], None, "/usr/bin/nvidia-container-runtime-hook", 1),  # the toolkit, --gpus
        ({**RUNC_ONLY, "DefaultRuntime": "nvidia"}, True, ["nvidia0"], None, None, 1),
        (NVIDIA_RUNTIME, True, [], None, None, 0),  # a runtime without devices
        (NVIDIA_RUNTIME, False, ["nvidia0"], None, None, 0),  # remote: this host's devices are not the engine's
        ({**RUNC_ONLY, "GenericResources": [{"DiscreteResourceSpec": {"Kind": "NVIDIA-GPU", "Value": 4}}]}, False, [], None, None, 4),
        ({**RUNC_ONLY, "GenericResources": [{"NamedResourceSpec": {"Kind": "NVIDIA-GPU", "Value": "GPU-a"}},
                                            {"NamedResourceSpec": {"Kind": "NVIDIA-GPU", "Value": "GPU-b"}}]}, True, [], None, None, 2),
    ],
    ids=["runc-only", "devices-without-toolkit", "nvidia-runtime-two-gpus", "toolkit-hook", "nvidia-default-runtime",
         "runtime-without-devices", "remote-engine", "generic-resources-discrete", "generic-resources-named"],
)
def test_engine_gpus(tmp_path: Path, info: dict, local: bool, devices: list[str], smi: str | None, hook: str | None, expected: int) -> None:
    from algodock.runtime.engine import engine_gpus

    assert engine_gpus(info, local=local, dev=_dev(tmp_path, *devices), nvidia_smi=smi, hook=hook) == expected


def test_engine_gpus_counts_nvidia_smi_when_no_device_files(tmp_path: Path) -> None:
    from algodock.runtime.engine import engine_gpus

    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA A100 (UUID: GPU-1)'\necho 'GPU 1: NVIDIA A100 (UUID: GPU-2)'\necho 'GPU 2: NVIDIA A100 (UUID: GPU-3)'\n")
    smi.chmod(0o755)
    assert engine_gpus(NVIDIA_RUNTIME, local=True, dev=tmp_path / "nodev", nvidia_smi=str(smi)) == 3


def test_from_engine_detects_gpus_and_a_gpu_step_on_an_engine_without_them_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import algodock.runtime.engine as engine

    class Engine:
        def __init__(self, info: dict) -> None:
            self._info = info

        def info(self) -> dict:
            return self._info

    real = engine.engine_gpus
    monkeypatch.setattr(engine, "engine_gpus", lambda info, **kw: real(info, **{**kw, "dev": _dev(tmp_path, "nvidia0", "nvidia1")}))
    assert Capacity.from_engine(Engine(NVIDIA_RUNTIME)) == Capacity(8000, 16.0, 2)
    without = Capacity.from_engine(Engine(RUNC_ONLY))
    assert without.gpu == 0
    with pytest.raises(ValueError, match="can never fit the capacity .*gpu 1 > 0"):
        ResourcePool(without).acquire(ResourceRequest(gpu=1))
