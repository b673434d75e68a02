"""Resource packing: the host's capacity, and a pool that running steps reserve from.

Steps reserve their manifest's ``resource_request`` before their container starts and give
it back when it ends, so the requests of running steps never exceed the capacity. The pool
never polls: waiters sleep on a :class:`threading.Condition` and every release hands out, in
arrival order, whatever now fits (first fit). A small request therefore overtakes a big one
that does not fit yet; to keep a big request from starving, a waiter that has been
overtaken ``patience`` times becomes a barrier: no later waiter starts before it does.

>>> pool = ResourcePool(Capacity.parse("cpu_millicore=2000,memory_gb=4"))
>>> with pool.reserve(Capacity(1000, 1)):
...     pool.available()
Capacity(cpu_millicore=1000, memory_gb=3.0, gpu=0)
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from algodock.errors import AlgodockError, InvalidInput

GIB = 1024**3
CANCEL_CHECK_SECONDS = 0.2
"""Safety net: how often a waiter with a cancel event looks at it when nobody calls wake_all()."""

RESOURCES = ("cpu_millicore", "memory_gb", "gpu")
"""The resources a step requests and a capacity holds (also a worker's Dask resources)."""

class Request(Protocol):
    """Anything with the three fields of a manifest's ``resource_request``."""

    @property
    def cpu_millicore(self) -> int: ...
    @property
    def memory_gb(self) -> float: ...
    @property
    def gpu(self) -> int: ...


class Cancelled(AlgodockError):
    """The cancel event was set while the request was still waiting for resources."""


def _units(request: Request) -> tuple[int, int, int]:
    # Integer units (millicores, bytes, GPUs) so that sums never drift like floats do.
    return int(request.cpu_millicore), round(float(request.memory_gb) * GIB), int(request.gpu)


@dataclass(frozen=True)
class Capacity:
    """What the running steps may use together (``--capacity cpu_millicore=N,memory_gb=M[,gpu=G]``)."""

    cpu_millicore: int
    memory_gb: float
    gpu: int = 0

    @classmethod
    def parse(cls, text: str) -> Capacity:
        """Parse ``cpu_millicore=N,memory_gb=M[,gpu=G]``.

        >>> Capacity.parse("cpu_millicore=4000, memory_gb=7.5")
        Capacity(cpu_millicore=4000, memory_gb=7.5, gpu=0)
        """
        usage = f"--capacity {text!r}: expected cpu_millicore=N,memory_gb=M[,gpu=G]"
        values: dict[str, Any] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, raw = item.partition("=")
            key = key.strip()
            if not sep or key not in RESOURCES:
                raise InvalidInput(f"{usage} ({item!r} is not one of them)")
            if key in values:
                raise InvalidInput(f"{usage} ({key} is given twice)")
            try:
                values[key] = float(raw) if key == "memory_gb" else int(raw)
            except ValueError:
                kind = "a number" if key == "memory_gb" else "an integer"
                raise InvalidInput(f"{usage} ({key}={raw.strip()!r} is not {kind})") from None
        missing = [k for k in ("cpu_millicore", "memory_gb") if k not in values]
        if missing:
            raise InvalidInput(f"{usage} ({' and '.join(missing)} missing)")
        if values["cpu_millicore"] <= 0 or values["memory_gb"] <= 0 or values.get("gpu", 0) < 0:
            raise InvalidInput(f"{usage} (cpu_millicore and memory_gb must be > 0, gpu >= 0)")
        return cls(**values)

    @classmethod
    def from_engine(cls, client: Any) -> Capacity:
        """The engine's CPUs x 1000 millicores, its total memory and the GPUs it can hand out.

        GPUs: see :func:`algodock.runtime.engine.engine_gpus` (an NVIDIA runtime or toolkit,
        and the devices of a local engine; a remote engine's count comes from ``--capacity``).
        """
        from algodock.runtime.engine import detect_gpus

        info = client.info()
        return cls(cpu_millicore=int(info["NCPU"]) * 1000, memory_gb=int(info["MemTotal"]) / GIB, gpu=detect_gpus(client, info))

    def fits(self, request: Request) -> bool:
        """True when ``request`` is no larger than this capacity in every dimension."""
        return all(r <= c for r, c in zip(_units(request), _units(self)))

    def excess(self, request: Request) -> list[str]:
        """The dimensions where ``request`` is larger, e.g. ``["cpu_millicore 4000 > 2000"]``."""
        return [
            f"{name} {getattr(request, name):g} > {getattr(self, name):g}"
            for name, r, c in zip(RESOURCES, _units(request), _units(self))
            if r > c
        ]

    def __str__(self) -> str:
        return f"cpu_millicore={self.cpu_millicore},memory_gb={self.memory_gb:g},gpu={self.gpu}"


@dataclass(eq=False)
class _Waiter:
    need: tuple[int, int, int]
    granted: bool = False
    overtaken: int = 0


@dataclass(eq=False)
class ResourcePool:
    """Thread-safe reservations against a :class:`Capacity`, packed tightly, without polling.

    ``patience``: how many later requests may overtake a waiting one before it becomes a
    barrier that later requests wait behind (starvation guard).
    """

    capacity: Capacity
    patience: int = 4
    _free: list[int] = field(init=False, repr=False)
    _queue: list[_Waiter] = field(default_factory=list, init=False, repr=False)
    _cond: threading.Condition = field(default_factory=threading.Condition, init=False, repr=False)

    def __post_init__(self) -> None:
        self._free = list(_units(self.capacity))

    def acquire(
        self,
        request: Request,
        cancel: threading.Event | None = None,
        on_wait: Callable[[], None] | None = None,
    ) -> None:
        """Block until ``request`` fits in what remains, then hold it until :meth:`release`.

        Raises ``ValueError`` at once when the request exceeds the whole capacity, and
        :class:`Cancelled` when ``cancel`` is set before the request was granted (call
        :meth:`wake_all` after setting it for an immediate wake-up). ``on_wait`` is called
        once, with the pool's lock held, when the request has to queue (keep it tiny).
        """
        if not self.capacity.fits(request):
            raise ValueError(
                f"request {_describe(request)} can never fit the capacity {self.capacity}: "
                + ", ".join(self.capacity.excess(request))
            )
        waiter = _Waiter(_units(request))
        with self._cond:
            self._queue.append(waiter)
            self._dispatch()
            if waiter.granted:
                return
            if on_wait is not None:
                on_wait()
            while not waiter.granted:
                if cancel is not None and cancel.is_set():
                    self._queue.remove(waiter)
                    self._dispatch()  # it may have been a barrier
                    raise Cancelled(f"cancelled while waiting for resources ({_describe(request)})")
                self._cond.wait(CANCEL_CHECK_SECONDS if cancel is not None else None)

    def release(self, request: Request) -> None:
        """Give back what :meth:`acquire` granted; waiters that now fit start."""
        with self._cond:
            free = [f + n for f, n in zip(self._free, _units(request))]
            if any(f > c for f, c in zip(free, _units(self.capacity))):
                raise ValueError(f"released {_describe(request)} that was never acquired")
            self._free = free
            self._dispatch()

    @contextmanager
    def reserve(self, request: Request, cancel: threading.Event | None = None) -> Iterator[None]:
        """``with pool.reserve(request):`` acquire, run the body, always release."""
        self.acquire(request, cancel)
        try:
            yield
        finally:
            self.release(request)

    def wake_all(self) -> None:
        """Wake every waiter so that it sees its cancel event now."""
        with self._cond:
            self._cond.notify_all()

    def available(self) -> Capacity:
        """What is free right now."""
        with self._cond:
            cpu, mem, gpu = self._free
            return Capacity(cpu, mem / GIB, gpu)

    @property
    def waiting(self) -> int:
        """How many requests are queued."""
        with self._cond:
            return len(self._queue)

    def _dispatch(self) -> None:
        """Grant, in arrival order, every queued request that fits (lock held)."""
        passed_over: list[_Waiter] = []
        granted = False
        for waiter in list(self._queue):
            if all(n <= f for n, f in zip(waiter.need, self._free)):
                self._free = [f - n for f, n in zip(self._free, waiter.need)]
                waiter.granted = granted = True
                self._queue.remove(waiter)
                for earlier in passed_over:
                    earlier.overtaken += 1
            elif waiter.overtaken >= self.patience:
                break  # a starving request: nobody behind it may start first
            else:
                passed_over.append(waiter)
        if granted:
            self._cond.notify_all()


def _describe(request: Request) -> str:
    return f"cpu_millicore={request.cpu_millicore},memory_gb={request.memory_gb:g},gpu={request.gpu}"
