"""Containers created ahead: a step's container made while its upstream steps still run.

Everything about a step's container but its input bytes is known once the run is planned:
its image, command, environment, limits, labels and the mounts of its own work folder. When
an upstream step's container starts, :class:`CreatedAhead` creates, in a background thread,
the containers of the dependents whose other upstream steps have all started or ended, with
the very configuration :func:`~algodock.pipeline.execute.execute_step` would give them, on
work and output folders chosen now for their first attempt. When the dependent's
``execute_step`` begins it :meth:`~CreatedAhead.claim`\\ s its reservation (those folders),
stages its inputs into them, asks the cache, and at container creation adopts the created
container only if its configuration is exactly what it would create now (else removes it and
creates one). Only the input bytes, staged later into the mounted folder, differ; what starts
is what the lineage records.

Bounds: at most one created-ahead container per step that could start next (each dependent
at most once, only while one of its upstream steps is running), and the resource requests
of the containers created ahead together fit the run's capacity (never more of them than
could start at once). None on a remote engine (named-volume staging), in cluster mode, or
with ``ALGODOCK_CREATE_AHEAD=0``.

Removed (:meth:`Reservation.discard`, through the one removal routine
:func:`~algodock.runtime.leftovers.remove_container`) on a cache hit or any other end of the
step before its container starts, when an upstream step fails, when the run is cancelled
(``ctx.cancel``), when the run ends (:meth:`CreatedAhead.close`) or this process exits;
when the process is killed, the containers carry the step's labels with this process as
their owner, and the orphan sweep of the next run removes them.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import threading
import uuid
import weakref
from collections import deque
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from algodock.runtime.engine import container_labels
from algodock.runtime.images import resolve_image
from algodock.runtime.lifecycle import StepContainer
from algodock.runtime.volumes import staging_mode
from algodock.store.layout import WORK_DIR, attempt_rel, new_attempt_id

if TYPE_CHECKING:
    from algodock.records import ResolvedImage


class RunContext(Protocol):
    """What this module reads of :class:`algodock.pipeline.execute.RunContext` (named so, without importing it)."""

    pipeline: Any
    store: Any
    run_id: str
    client: Any
    pool: Any
    cancel: threading.Event
    flow_run_id: str | None
    create_ahead: bool
    pull_policy: str

    def known_image(self, ref: str, policy: str | None = None, step_id: str | None = None) -> ResolvedImage | None: ...
    def step_pull_policy(self, step_id: str) -> str | None: ...

log = logging.getLogger("algodock.pipeline.ahead")

ENV = "ALGODOCK_CREATE_AHEAD"
"""``0`` turns creating ahead off (A/B benches, or an engine where it does not pay)."""
CANCEL_CHECK_SECONDS = 0.2
"""How often the background thread looks at the run's cancel event while it holds containers."""


@dataclass(frozen=True)
class StepPaths:
    """Where one attempt of a step works: its scratch folder, the container's work folder and output folder."""

    scratch: Path
    """``<work root>/<step>-<attempt_id>``: staged inputs, the work folder, the container log (removed at the step's end)."""
    attempt_dir: Path | None
    """The attempt's folder in a local store (the outputs are written there), None for a remote store."""
    output_dir: Path
    """The folder mounted as ``/work/output``."""

    @property
    def work(self) -> Path:
        """The folder holding ``algo_input.json`` and ``input/``."""
        return self.scratch / "work"


def work_root(ctx: RunContext) -> Path:
    """Where the steps of this run keep their work folders: on a local store, ``<store>/.work/<run_id>``
    (the store's filesystem: staged inputs are hardlinks of stored outputs); else the run's scratch."""
    local = ctx.store.local_path(WORK_DIR, ctx.run_id) if ctx.store.is_local else None
    return local if local is not None else ctx.scratch


def step_paths(ctx: RunContext, step_id: str, attempt_id: str) -> StepPaths:
    """The folders of one attempt (nothing is made here)."""
    scratch = work_root(ctx) / f"{step_id}-{attempt_id}"
    attempt_dir = ctx.store.local_path(attempt_rel(ctx.run_id, step_id, attempt_id))
    if attempt_dir is not None:  # local store: the container writes into the store itself
        return StepPaths(scratch, attempt_dir, attempt_dir / f".tmp-outputs-{uuid.uuid4().hex[:6]}")
    return StepPaths(scratch, None, scratch / "outputs")


@dataclass(eq=False)
class Reservation:
    """One dependent step's first attempt, planned (and its container created) ahead."""

    step_id: str
    attempt: int
    attempt_id: str
    paths: StepPaths
    box: StepContainer | None = None
    """The created container, until :meth:`take` hands it to the step (or :meth:`discard` removes it)."""
    created: threading.Event = field(default_factory=threading.Event)
    """Set once the creation ended, made or not."""
    discarded: bool = False
    taken: bool = False
    """The step took the container (and with it the folders)."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def take(self) -> StepContainer | None:
        """The created container, now owned by the caller (who adopts or removes it, and owns the folders); None when there is none."""
        with self._lock:
            box, self.box, self.taken = self.box, None, True
            return box

    def discard(self) -> None:
        """Remove the container if still held and, unless the step took them, the folders made for it; idempotent."""
        with self._lock:
            self.discarded = True
            box, self.box = self.box, None
        if box is not None:
            box.discard()
        if self.taken:
            return
        shutil.rmtree(self.paths.scratch, ignore_errors=True)
        shutil.rmtree(self.paths.output_dir, ignore_errors=True)
        for folder in (self.paths.attempt_dir, self.paths.scratch.parent):  # each only when nothing else is in it
            if folder is not None:
                with suppress(OSError):
                    folder.rmdir()


_live: weakref.WeakSet[CreatedAhead] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for creator in list(_live):
        creator.close()


class CreatedAhead:
    """The containers created ahead for one run (see the module's docstring); thread-safe."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self._lock = threading.Lock()
        self._running: set[str] = set()
        self._ended: dict[str, bool] = {}
        self._seen: set[str] = set()  # steps reserved (or past the point where a reservation helps)
        self._reserved: dict[str, Reservation] = {}
        self._queue: deque[Reservation] = deque()
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()  # set when there is something to create (or the run ended)
        self._closed = False
        self._dependents: dict[str, list[str]] = {}
        self._known = -1
        _live.add(self)

    @staticmethod
    def enabled(ctx: RunContext) -> bool:
        """The rule: only on an engine that sees this host's folders (bind staging), unless turned off."""
        return ctx.create_ahead and os.environ.get(ENV, "1") != "0" and staging_mode(ctx.client) == "bind"

    # ---------------------------------------------------------------- events from execute_step

    def container_started(self, step_id: str) -> None:
        """``step_id``'s container runs: create its dependents' containers that may start next (not
        before: a create beside the start slows the start on the engine)."""
        with self._lock:
            self._running.add(step_id)
            self._plan(step_id)

    def step_ended(self, step_id: str, ok: bool) -> None:
        """``step_id`` ended; a failed step's dependents will not run: their containers go."""
        with self._lock:
            self._running.discard(step_id)
            self._ended[step_id] = ok
            self._seen.add(step_id)
            doomed = [] if ok else [r for d in self._dependents_of(step_id) if (r := self._reserved.pop(d, None)) is not None]
            if ok:
                self._plan(step_id)
        for reservation in doomed:
            reservation.discard()

    def claim(self, step_id: str, attempt: int) -> Reservation | None:
        """``step_id``'s reservation for ``attempt``, once its creation ended (the step now owns it); else None."""
        with self._lock:
            self._seen.add(step_id)
            reservation = self._reserved.pop(step_id, None)
            if reservation is not None and reservation in self._queue:  # not begun: the step creates its own, sooner
                self._queue.remove(reservation)
                reservation.created.set()
        if reservation is None:
            return None
        if reservation.attempt != attempt or self.ctx.cancel.is_set():
            reservation.discard()
            return None
        reservation.created.wait()
        return reservation

    def close(self) -> None:
        """The run ended: remove every container still created ahead; no more are made."""
        with self._lock:
            self._closed = True
            left = list(self._reserved.values())
            self._reserved.clear()
        self._wake.set()
        for reservation in left:
            reservation.discard()

    # ---------------------------------------------------------------- planning (lock held)

    def _dependents_of(self, step_id: str) -> list[str]:
        deps = self.ctx.pipeline.dependencies
        if len(deps) != self._known:  # a composed run grows step by step
            self._known = len(deps)
            self._dependents = {}
            for step, ups in deps.items():
                for up in ups:
                    self._dependents.setdefault(up, []).append(step)
        return self._dependents.get(step_id, [])

    def _plan(self, step_id: str) -> None:
        if self._closed or self.ctx.cancel.is_set():
            return
        deps = self.ctx.pipeline.dependencies
        for dependent in self._dependents_of(step_id):
            if dependent in self._seen:
                continue
            ups = deps.get(dependent, set())
            if any(self._ended.get(u) is False for u in ups):
                continue
            if not all(u in self._running or self._ended.get(u) for u in ups) or not any(u in self._running for u in ups):
                continue  # an upstream has not started, or none runs any more (the step starts now anyway)
            if not self._room_for(dependent) or self._typed_hand_off(dependent):
                continue
            self._seen.add(dependent)
            attempt_id = new_attempt_id(1)
            reservation = Reservation(dependent, 1, attempt_id, step_paths(self.ctx, dependent, attempt_id))
            self._reserved[dependent] = reservation
            self._queue.append(reservation)
        if self._queue:
            self._wake.set()  # a thread waiting beside the containers it holds creates this one now
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="algodock-create-ahead", daemon=True)
                self._thread.start()

    def _typed_hand_off(self, step_id: str) -> bool:
        """A slot of ``step_id``, or an upstream output it reads, declares a schema: the hand-off
        check may refuse its inputs, and then its container must never have existed
        (docs/contract.md, typed slots), so none is created ahead."""
        pipeline = self.ctx.pipeline
        if any(slot.schema_ is not None for slot in pipeline.manifests[step_id].inputs):
            return True
        for ref in pipeline.bindings.get(step_id, {}).values():
            if ref.kind == "step" and ref.name in pipeline.manifests:
                if any(o.schema_ is not None for o in pipeline.manifests[ref.name].outputs if o.name == ref.output):
                    return True
        return False

    def _room_for(self, step_id: str) -> bool:
        """The requests of the containers created ahead, this one's included, fit the run's capacity."""
        from algodock.pipeline.capacity import Capacity

        requests = [self.ctx.pipeline.manifests[s].container_parameters.resource_request for s in [*self._reserved, step_id]]
        total = Capacity(sum(r.cpu_millicore for r in requests), sum(r.memory_gb for r in requests), sum(r.gpu for r in requests))
        return self.ctx.pool.capacity.fits(total)

    # ---------------------------------------------------------------- the background thread

    def _work(self) -> None:
        while True:
            self._wake.clear()  # before looking at the queue: a reservation queued after the look sets it again
            with self._lock:
                reservation = self._queue.popleft() if self._queue else None
                if reservation is None and not self._reserved:
                    self._thread = None  # nothing to create or watch: the next reservation starts a new thread
                    return
            if reservation is not None:
                self._create(reservation)
                continue
            self._wake.wait(CANCEL_CHECK_SECONDS)  # woken by a reservation to create; looks at the cancel event meanwhile
            if self.ctx.cancel.is_set():
                self.close()
                return

    def _create(self, reservation: Reservation) -> None:
        box: StepContainer | None = None
        try:
            if not reservation.discarded and not self.ctx.cancel.is_set():
                box = self._make(reservation)
        except Exception as exc:  # creating ahead only ever saves time: the step creates its own
            log.debug("step %s: no container created ahead: %s", reservation.step_id, exc)
        finally:
            with reservation._lock:
                if not reservation.discarded:
                    reservation.box, box = box, None
            if reservation.discarded:  # discarded while it was being created: what was made goes too
                if box is not None:
                    box.discard()
                reservation.discard()
            reservation.created.set()

    def _make(self, reservation: Reservation) -> StepContainer | None:
        """Exactly the container ``execute_step`` would create for the reservation's attempt."""
        ctx, step_id = self.ctx, reservation.step_id
        manifest = ctx.pipeline.manifests[step_id]
        image = ctx.known_image(manifest.container_parameters.image, ctx.step_pull_policy(step_id), step_id)
        if image is None:
            if (ctx.step_pull_policy(step_id) or ctx.pull_policy) == "always":
                return None  # the step asks the registry itself; a local guess may be stale
            image = resolve_image(ctx.client, manifest.container_parameters.image, policy="never")  # no pull in the background
        paths = reservation.paths
        (paths.work / "input").mkdir(parents=True, exist_ok=True)
        (paths.work / "algo_input.json").touch()  # the engine checks that bind sources exist; the step writes it
        paths.output_dir.mkdir(parents=True, exist_ok=True)
        box = StepContainer(
            ctx.client, manifest, image, labels=container_labels(ctx.run_id, step_id, reservation.attempt, flow_run_id=ctx.flow_run_id),
            step_id=step_id, work=paths.work, output_dir=paths.output_dir,
        )
        box.prepare()
        try:
            box.create()
            box.attach()
        except BaseException:
            box.discard()
            raise
        return box
