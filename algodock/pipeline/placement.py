"""Which worker of a Dask cluster takes a step, and when (no Prefect here).

Dask alone places every step as it arrives, by its guess of the steps' durations per thread: a
step queued behind a busy worker stays there while another worker idles. So a run holds its
steps until the steps they wait for ended and a worker has room for their resource request
(:class:`Placement`, from what the scheduler counts as taken), then sends each naming that worker
as its preferred one (:class:`Dispatcher`). A step whose worker leaves still runs elsewhere: the
preference is loose, and a step Dask holds for a worker that left is let go (:func:`unpin`).
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("algodock.placement")

WORKERS_REFRESH_SECONDS = 1.0
"""How often a run with steps waiting for room looks for workers that joined."""


def step_resources(request: Any) -> dict[str, float]:
    """A manifest's ``resource_request`` as Dask resources (zero-valued ones left out)."""
    values = {
        "cpu_millicore": int(request.cpu_millicore),
        "memory_gb": float(request.memory_gb),
        "gpu": int(request.gpu),
    }
    return {k: v for k, v in values.items() if v}


class Placement:
    """Which worker has room for a step now (pure bookkeeping, no Dask): each worker's resources
    less what the scheduler counts as taken there (the steps of every run it assigned to it),
    less the requests of the steps this run sent there that the scheduler has not assigned yet.

    A step goes to the worker with the most free ``cpu_millicore`` among those where every
    resource it asks for fits (then the most free memory, then the address), so the first
    steps spread over the workers and each later one takes the room the last one left.

    >>> p = Placement()
    >>> p.update({"a": {"cpu_millicore": 4000}, "b": {"cpu_millicore": 2000}})
    >>> [p.place(f"s{i}", {"cpu_millicore": 1000}) for i in range(7)]
    ['a', 'a', 'a', 'b', 'a', 'b', None]
    >>> p.release("s3"); p.place("s6", {"cpu_millicore": 1000})
    'b'
    """

    def __init__(self) -> None:
        self.workers: dict[str, dict[str, float]] = {}
        self.used: dict[str, dict[str, float]] = {}
        self.placed: dict[str, tuple[str, dict[str, float]]] = {}
        self.seen: set[str] = set()

    def update(self, workers: dict[str, dict[str, float]], used: dict[str, dict[str, float]] | None = None, seen: Any = ()) -> None:
        """The workers now in the cluster and their resources; ``used``: what the scheduler counts
        as taken on each; ``seen``: this run's steps the scheduler has assigned (counted in ``used``)."""
        self.workers = {addr: dict(res) for addr, res in workers.items()}
        self.used = {addr: dict(res) for addr, res in (used or {}).items()}
        self.seen = set(seen) & set(self.placed)

    def free(self, worker: str) -> dict[str, float]:
        left = dict(self.workers.get(worker, {}))
        for name, amount in self.used.get(worker, {}).items():
            left[name] = left.get(name, 0) - amount
        for step, (where, request) in self.placed.items():
            if where == worker and step not in self.seen:
                for name, amount in request.items():
                    left[name] = left.get(name, 0) - amount
        return left

    def place(self, step_id: str, request: dict[str, float]) -> str | None:
        """The worker ``step_id`` goes to (now charged with ``request``), or None while none has room."""
        best: tuple[float, float, str] | None = None
        for worker in self.workers:
            left = self.free(worker)
            if all(left.get(name, 0) >= amount for name, amount in request.items()):
                rank = (-left.get("cpu_millicore", 0), -left.get("memory_gb", 0), worker)
                best = rank if best is None or rank < best else best
        if best is None:
            return None
        self.placed[step_id] = (best[2], dict(request))
        return best[2]

    def release(self, step_id: str) -> None:
        """``step_id`` ended: its worker has its room back."""
        self.placed.pop(step_id, None)
        self.seen.discard(step_id)

    def orphans(self) -> list[str]:
        """The steps placed on workers that left (no longer counted: Dask runs them where it can)."""
        lost = [step for step, (where, _) in self.placed.items() if where not in self.workers]
        for step in lost:
            self.release(step)
        return lost


class UpstreamNotDone(Exception):
    """A step was never sent: a step it depends on did not succeed (its record says ``skipped``)."""

    def __init__(self, message: str, upstream: str | None = None) -> None:
        super().__init__(message)
        self.upstream = upstream
        """The step it depends on that did not succeed; None when the run ended before it was placed."""


class QueuedStep:
    """A step held by the :class:`Dispatcher`: its resources, the steps it waits for, and
    ``ended`` (True when it succeeded), set once it ended or will never run."""

    def __init__(self, step_id: str, resources: dict[str, float], upstream: list[QueuedStep]) -> None:
        self.step_id, self.resources, self.upstream = step_id, resources, upstream
        self.ended: concurrent.futures.Future[bool] = concurrent.futures.Future()
        self.key: str | None = None
        """Its Dask key, once sent."""

    def waiting(self) -> bool:
        """True while a step it waits for has not ended."""
        return any(not u.ended.done() for u in self.upstream)

    def failed_upstream(self) -> str | None:
        """A step it waits for that ended without succeeding (they all ended)."""
        return next((u.step_id for u in self.upstream if not u.ended.result()), None)


class Dispatcher:
    """A run's steps, held until the steps they wait for ended and a worker has room, then given
    to ``send(step, worker)``; ``skip(step, error)`` for one that will never run (an upstream
    failed, or the run ended first). The caller reports each sent step's end with :meth:`ended`.

    A thread reads the workers' resources and what is taken of them from the scheduler
    (``client.run_on_scheduler``) when something changed, and every
    :data:`WORKERS_REFRESH_SECONDS` while steps wait (a worker may have joined or left).
    """

    def __init__(self, client: Any, send: Callable[[QueuedStep, str], None], skip: Callable[[QueuedStep, BaseException], None]) -> None:
        self.client, self._send, self._skip = client, send, skip
        self.placement = Placement()
        self._queue: list[QueuedStep] = []
        self._sent: dict[str, QueuedStep] = {}
        self._changed = threading.Condition()
        self._look = True
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="algodock-cluster-dispatch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def add(self, step: QueuedStep) -> None:
        with self._changed:
            self._queue.append(step)
            self._look = True
            self._changed.notify()

    def ended(self, step: QueuedStep, ok: bool) -> None:
        """A sent step ended: its worker has its room back, its dependents may go."""
        step.ended.done() or step.ended.set_result(ok)
        with self._changed:
            self.placement.release(step.step_id)
            self._sent.pop(step.step_id, None)
            self._look = True
            self._changed.notify()

    def stop(self) -> None:
        """No step is sent any more; the ones never sent are skipped (again: nothing more)."""
        with self._changed:
            self._stopping = True
            self._changed.notify()
            never, self._queue = self._queue, []
        for step in never:
            self._fail(step, UpstreamNotDone(f"step {step.step_id} was never placed: the run ended first"))

    def _fail(self, step: QueuedStep, error: BaseException) -> None:
        step.ended.done() or step.ended.set_result(False)
        self._skip(step, error)

    def _run(self) -> None:
        refreshed = float("-inf")
        while True:
            with self._changed:
                while not self._stopping and not (self._queue and self._look):
                    busy = bool(self._queue or self.placement.placed)
                    self._changed.wait(WORKERS_REFRESH_SECONDS if busy else None)
                    if busy and time.monotonic() - refreshed >= WORKERS_REFRESH_SECONDS:
                        break  # a worker may have joined or left: look again
                if self._stopping:
                    return
                self._look = False
                keys = {s.key: s.step_id for s in self._sent.values() if s.key and s.step_id in self.placement.placed}
            try:
                workers, used, seen = self.client.run_on_scheduler(cluster_view, list(keys))
                refreshed = time.monotonic()
                with self._changed:
                    self.placement.update(workers, used, {keys[k] for k in seen})
                    lost = set(self.placement.orphans())
                if lost:  # Dask would hold them for their worker: any worker with the resources may run them now
                    self.client.run_on_scheduler(unpin, [k for k, step_id in keys.items() if step_id in lost])
            except Exception as exc:  # the scheduler is away: keep what we knew
                log.warning("cluster: could not read the workers' resources from the scheduler: %s", exc)
            self._place_ready()

    def _place_ready(self) -> None:
        with self._changed:
            for step in list(self._queue):
                if step.waiting():
                    continue
                failed = step.failed_upstream()
                if failed is not None:  # its dependents may now be decided too
                    self._queue.remove(step)
                    self._fail(step, UpstreamNotDone(f"step {step.step_id} did not run: step {failed} did not succeed", upstream=failed))
                    self._look = True
                    continue
                where = self.placement.place(step.step_id, step.resources)
                if where is None:
                    continue
                self._queue.remove(step)
                self._sent[step.step_id] = step
                try:
                    self._send(step, where)
                except BaseException as exc:  # the step ends failed; the run goes on
                    self.placement.release(step.step_id)
                    self._fail(step, exc)


def cluster_view(keys: list[str], dask_scheduler: Any = None) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]], list[str]]:
    """On the scheduler (``client.run_on_scheduler``): each algodock worker's resources, what is
    taken of them (the tasks assigned there, of every run), and which of ``keys`` are counted so."""
    workers = {addr: dict(ws.resources) for addr, ws in dask_scheduler.workers.items() if "cpu_millicore" in ws.resources}
    used = {addr: dict(dask_scheduler.workers[addr].used_resources) for addr in workers}
    seen = [k for k in keys if k in dask_scheduler.tasks and (dask_scheduler.tasks[k].processing_on is not None or dask_scheduler.tasks[k].state in ("memory", "erred", "released"))]
    return workers, used, seen


def unpin(keys: list[str], dask_scheduler: Any = None) -> list[str]:
    """On the scheduler (``client.run_on_scheduler``): drop the preferred worker of ``keys``, whose
    worker left, and send those waiting for a worker to any worker with their resources.

    A loose worker restriction alone is not enough: Dask re-runs a lost task on another worker,
    but holds it (``no-worker``) when none is up at that moment, and a worker that joins later
    takes only the tasks that named it.
    """
    tasks = [dask_scheduler.tasks[k] for k in keys if k in dask_scheduler.tasks]
    dask_scheduler.set_restrictions({ts.key: None for ts in tasks})
    stuck = {ts.key: "processing" for ts in tasks if ts.state == "no-worker"}
    if stuck:
        dask_scheduler.transitions(stuck, stimulus_id=f"algodock-unpin-{time.time()}")
    return list(stuck)
