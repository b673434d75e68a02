"""Retention and garbage collection of a store (``algodock gc``), safe beside running pipelines.

What goes: the runs outside the retention (:class:`Retention`: the last N runs of each
pipeline and/or the runs younger than a duration, plus runs named with ``--keep``), and in
every run kept, the files under ``steps/`` its lineage does not name (failed attempts, their
``failed-outputs/``, attempts a retry superseded, ``.tmp-…`` leftovers); the ``.work/``
folders of runs nobody writes; cache entries whose run goes or is gone; content-object
records (``cache/objects/``) and pins whose target or owner goes.

What stays, always: every run whose lease a live process holds (untouched, with everything
its lineage names); every file a kept run's lineage names (its outputs, its inputs that live
in the store, wherever in the store they are, its container logs); the outputs a kept cache
entry points to; whatever a pin of a run that is not collected names; everything outside
``runs/``, ``cache/`` and ``.work/``.

Concurrency, in three parts:

* **Leases.** gc holds ``gc/lease.json`` (one gc at a time) and the lease of every run whose
  files it deletes (:class:`~algodock.store.lease.RunLease`), so a run resumed under the same
  id waits for it, and a run that got its lease first is left alone.
* **Pins and the plan** (a Dekker handshake over the store). A cache hit, or an output that
  reuses bytes already stored, *pins* the stored files it is about to reuse
  (``cache/pins/<id>.json``, naming the run that reuses them) and only then reads the plan
  ``gc/plan.json``; when the plan covers a pinned file the reuse is a miss (the step runs or
  its bytes are stored again). gc writes the plan first and only then reads the pins; every
  pinned file of a run it does not collect stays. Either the reader sees the plan, or gc sees
  the pin: a run that starts during gc never reuses bytes that gc removes.
* **Order.** A run to remove is first marked in its ``run.json`` (``collected`` with
  ``complete: false``), then its cache records go, then its ``lineage.json``, then its bytes.
  Killed at any point, every run that still has a lineage document has all the bytes it
  names (``lineage verify`` passes), and the next gc finishes a run that was marked, whatever
  the retention says then. ``run.json`` is kept as the record that the run was collected.

>>> import tempfile
>>> from algodock.store.backends import open_store
>>> store = open_store(tempfile.mkdtemp())
>>> collect(store, Retention(keep_last=1), dry_run=True).as_json()["runs_removed"]
[]
>>> parse_duration("30d"), parse_duration("12h")
(datetime.timedelta(days=30), datetime.timedelta(seconds=43200))
"""

from __future__ import annotations

import logging
import re
import socket
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from algodock.errors import InvalidInput
from algodock.store.base import Store, StoredFile
from algodock.store.content import store_rel
from algodock.store.layout import MARKER_SUFFIX, WORK_DIR, lease_rel, lineage_rel, run_json_rel
from algodock.store.lease import RunBusy, RunLease, holder_alive

log = logging.getLogger("algodock.store.gc")

GC_LEASE = "gc/lease.json"
"""Held by the one gc that may run on a store."""
PLAN = "gc/plan.json"
"""What the running gc is about to delete (``prefixes``); a reuse that pins a covered file misses."""
PINS = "cache/pins"
"""``cache/pins/<id>.json``: ``{"by": run_id, "rels": [...], "at": ...}``, files a run reuses from elsewhere in the store."""

_RUN_KEEP = {"run.json", "lease.json", ".lock-lease.json", ".lock-run.json"}
"""What stays of a removed run: the record that it was collected, and its lease."""
_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}

_READERS = 16
"""Records read (and written) at once: on S3 each is a request, and gc reads a few per run."""

Phase = Callable[[str], None]
"""Told as gc enters each phase: ``listed``, ``planned``, ``marked``, ``unlinked``, ``deleted``, ``recorded``."""


def parse_duration(text: str) -> timedelta:
    """``30d``, ``12h``, ``90m``, ``45s``, ``2w`` as a timedelta; :class:`InvalidInput` otherwise."""
    m = _DURATION.match(text or "")
    if not m:
        raise InvalidInput(f"--older-than {text!r}: not a duration; write a number and a unit, e.g. 30d, 12h, 90m, 45s or 2w")
    return timedelta(**{_UNITS[m[2]]: int(m[1])})


@dataclass(frozen=True)
class Retention:
    """Which runs to keep. A run is kept when any rule keeps it; with no rule at all, every run is."""

    keep_last: int | None = None
    """Keep the newest N runs of each pipeline (by start time)."""
    older_than: timedelta | None = None
    """Keep the runs that started less than this long ago."""
    keep: frozenset[str] = frozenset()
    """Run ids kept whatever the rules say."""

    @property
    def removes_runs(self) -> bool:
        return self.keep_last is not None or self.older_than is not None


@dataclass
class RunState:
    """What gc knows of one run folder."""

    run_id: str
    pipeline: str | None
    started_at: datetime | None
    busy: bool
    """A live process holds its lease: untouchable."""
    lineage: dict[str, Any] | None
    summary: dict[str, Any] | None
    marked: bool
    """An earlier gc decided to remove it (``run.json`` ``collected``): finish it."""
    finished: bool
    """That gc completed the removal (whatever is left was still named by a kept run then)."""
    terminal: bool
    """Its lease is not held and its lineage says it ended: its lineage names everything it reused."""


@dataclass
class GcReport:
    """What one gc removed (or, with ``dry_run``, would remove)."""

    gc_id: str
    dry_run: bool
    runs_removed: list[str] = field(default_factory=list)
    runs_kept: list[str] = field(default_factory=list)
    runs_busy: list[str] = field(default_factory=list)
    files: int = 0
    bytes: int = 0
    cache_entries: int = 0
    objects: int = 0
    pins: int = 0
    work_folders: int = 0
    listed: int = 0
    """Files listed to decide (the cost of a gc)."""

    def as_json(self) -> dict[str, Any]:
        """The ``algodock gc --json`` document."""
        return {
            "gc_id": self.gc_id,
            "dry_run": self.dry_run,
            "runs_removed": self.runs_removed,
            "runs_kept": self.runs_kept,
            "runs_busy": self.runs_busy,
            "files": self.files,
            "bytes": self.bytes,
            "cache_entries_removed": self.cache_entries,
            "objects_removed": self.objects,
            "pins_removed": self.pins,
            "work_folders_removed": self.work_folders,
            "files_listed": self.listed,
        }


# ---------------------------------------------------------------- the reader's side: pins


def covered(rel: str, prefixes: Iterable[str]) -> bool:
    """True when ``rel`` is one of ``prefixes`` or lies under one."""
    return any(rel == p or rel.startswith(p.rstrip("/") + "/") for p in prefixes)


def pin(store: Store, by_run: str | None, rels: list[str]) -> bool:
    """Pin ``rels`` (files about to be reused by run ``by_run``) against gc; False when a running gc removes one of them.

    Call it before checking the files are there and intact: the pin is written first, then
    the plan is read (see the module docstring). On False the pin is withdrawn: treat it as a miss.
    """
    rel = f"{PINS}/{uuid.uuid4().hex}.json"
    store.write_json(rel, {"by": by_run, "rels": rels, "at": _now().isoformat(), "host": socket.gethostname()})
    plan = store.read_json(PLAN)
    if isinstance(plan, dict) and any(covered(r, plan.get("prefixes") or []) for r in rels):
        log.info("gc %s is removing %s; not reusing it", plan.get("gc_id"), ", ".join(r for r in rels if covered(r, plan.get("prefixes") or [])))
        store.remove([rel])
        return False
    return True


# ---------------------------------------------------------------- gc


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _parallel(fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
    """``[fn(x) for x in items]``, ``_READERS`` at a time, in order."""
    items = list(items)
    if len(items) < 2:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(_READERS, thread_name_prefix="algodock-gc") as pool:
        return list(pool.map(fn, items))


def _read_all(store: Store, rels: Iterable[str]) -> dict[str, Any]:
    """Every JSON record at ``rels`` (None for one that is gone), read concurrently."""
    rels = list(rels)
    return dict(zip(rels, _parallel(store.read_json, rels)))


def _when(value: Any) -> datetime | None:
    try:
        when = datetime.fromisoformat(str(value))
    except (TypeError, ValueError):
        return None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def rel_in(store: Store, uri: str | None) -> str | None:
    """``uri`` relative to the store's root, or None when it lives elsewhere (or is None)."""
    return store_rel(store, uri) if uri else None


def _is_live(rel: str, live: set[str]) -> bool:
    """``rel`` is a live rel, a file inside one, or a live rel's S3 commit marker."""
    if rel in live or (rel.endswith(MARKER_SUFFIX) and rel[: -len(MARKER_SUFFIX)] in live):
        return True
    parts = rel.split("/")
    return any("/".join(parts[:n]) in live for n in range(1, len(parts)))


class _Inventory:
    """One listing of the store, grouped: files per run, cache entries, object records, pins, work folders."""

    def __init__(self, files: list[StoredFile]) -> None:
        self.runs: dict[str, list[StoredFile]] = {}
        self.entries: list[StoredFile] = []
        self.objects: list[StoredFile] = []
        self.pins: list[StoredFile] = []
        self.work: dict[str, list[StoredFile]] = {}
        self.count = len(files)
        for f in files:
            parts = f.rel.split("/")
            if parts[0] == "runs" and len(parts) > 2:
                self.runs.setdefault(parts[1], []).append(f)
            elif parts[0] == WORK_DIR and len(parts) > 2:
                self.work.setdefault(parts[1], []).append(f)
            elif parts[0] == "cache" and len(parts) == 2 and f.rel.endswith(".json"):
                self.entries.append(f)
            elif f.rel.startswith("cache/objects/"):
                self.objects.append(f)
            elif f.rel.startswith(PINS + "/"):
                self.pins.append(f)


def _run_state(store: Store, run_id: str) -> RunState:
    summary = store.read_json(run_json_rel(run_id))
    lineage = store.read_json(lineage_rel(run_id))
    lease = store.read_json(lease_rel(run_id))
    busy = holder_alive(lease)
    history = [c for c in (summary.get("collected") or [] if isinstance(summary, dict) else []) if isinstance(c, dict) and c.get("removed")]
    started = _when((lineage or {}).get("started_at")) if isinstance(lineage, dict) else None
    if started is None and isinstance(lease, dict):
        started = _when(lease.get("since"))
    status = (lineage or {}).get("status") if isinstance(lineage, dict) else None
    return RunState(
        run_id=run_id,
        pipeline=(lineage or {}).get("pipeline") if isinstance(lineage, dict) else None,
        started_at=started,
        busy=busy,
        lineage=lineage if isinstance(lineage, dict) else None,
        summary=summary if isinstance(summary, dict) else None,
        marked=bool(history),
        finished=bool(history) and bool(history[-1].get("complete")),
        terminal=not busy and status in ("succeeded", "failed", "cancelled"),
    )


def _decide(states: dict[str, RunState], retention: Retention, now: datetime) -> set[str]:
    """The run ids to remove."""
    remove = {r for r, s in states.items() if s.marked and not s.busy}
    if not retention.removes_runs:
        return remove
    by_pipeline: dict[str | None, list[RunState]] = {}
    for s in states.values():
        if not s.busy and not s.marked:
            by_pipeline.setdefault(s.pipeline, []).append(s)
    oldest = datetime.min.replace(tzinfo=timezone.utc)
    for pipeline, runs in by_pipeline.items():
        runs.sort(key=lambda s: (s.started_at or oldest, s.run_id), reverse=True)
        for n, s in enumerate(runs):
            if s.run_id in retention.keep:
                continue
            if s.lineage is None and s.started_at is None:
                continue  # nothing says how old it is: never guessed away
            recent = retention.older_than is not None and s.started_at is not None and s.started_at > now - retention.older_than
            last = retention.keep_last is not None and pipeline is not None and n < retention.keep_last
            if not (recent or last):
                remove.add(s.run_id)
    return remove


def _named_by_lineage(store: Store, lineage: dict[str, Any]) -> set[str]:
    """Every store rel a lineage document names: outputs, inputs in the store, container logs."""
    named: set[str] = set()
    for step in lineage.get("steps") or []:
        uris = [o.get("uri") for o in step.get("outputs") or []] + [i.get("uri") for i in step.get("inputs") or []] + [step.get("log_uri")]
        for uri in uris:
            rel = rel_in(store, uri)
            if rel is not None:
                named.add(rel.rstrip("/"))
    return named


def _entry_rels(entry: dict[str, Any]) -> set[str]:
    rels = {o.get("rel") for o in entry.get("outputs") or [] if isinstance(o, dict)} | {entry.get("log_rel")}
    return {r.rstrip("/") for r in rels if isinstance(r, str)}


def _run_of(rel: str) -> str | None:
    parts = rel.split("/")
    return parts[1] if len(parts) > 2 and parts[0] == "runs" else None


@dataclass
class _Doomed:
    """What goes because of one run (or, under the key ``""``, what points at nothing)."""

    files: list[StoredFile] = field(default_factory=list)
    """Files of the run's folder."""
    entries: list[StoredFile] = field(default_factory=list)
    """Cache entries of the run."""
    objects: list[StoredFile] = field(default_factory=list)
    """Content-object records whose bytes are in the run's folder."""
    work: list[StoredFile] = field(default_factory=list)
    """Its ``.work/`` folder."""

    def all(self) -> list[StoredFile]:
        return self.files + self.entries + self.objects + self.work


@dataclass
class _Plan:
    """The decision, before anything is touched."""

    remove_runs: set[str]
    finished: set[str]
    """Removed runs an earlier gc finished: reported only when something of them is left to delete."""
    kept: list[str]
    busy: list[str]
    live: set[str]
    doomed: dict[str, _Doomed]
    pins: list[StoredFile]

    def prefixes(self, run_id: str) -> list[str]:
        """What a reader must not pin while ``run_id``'s files go: the whole run, or each file of a kept run."""
        if run_id in self.remove_runs:
            return [f"runs/{run_id}"]
        return [f.rel for f in self.doomed[run_id].files]


def _plan(store: Store, retention: Retention, now: datetime) -> tuple[_Plan, int]:
    pins_first = store.walk(PINS)  # before the lineages: a pin listed here is covered by its run's lineage once the run ended
    pin_docs = {rel: doc or {} for rel, doc in _read_all(store, [f.rel for f in pins_first]).items()}
    inventory = _Inventory(store.walk(""))
    run_ids = sorted(set(inventory.runs) | set(inventory.work))
    states = dict(zip(run_ids, _parallel(lambda r: _run_state(store, r), run_ids)))
    records = _read_all(store, [f.rel for f in inventory.entries + inventory.objects + inventory.pins if f.rel not in pin_docs])
    remove = _decide(states, retention, now)
    kept = [r for r in states if r not in remove]
    live: set[str] = set()
    for r in kept:
        live |= _named_by_lineage(store, states[r].lineage or {})

    def gone(run_id: Any) -> bool:
        return run_id in remove or (run_id not in states and not store.exists(f"runs/{run_id}"))

    doomed: dict[str, _Doomed] = {}
    for f in inventory.entries:
        entry = records.get(f.rel) if isinstance(records.get(f.rel), dict) else {}
        owner = entry.get("run_id")
        if gone(owner):
            doomed.setdefault(owner if owner in remove else "", _Doomed()).entries.append(f)
        else:
            live |= _entry_rels(entry)
    pins = []
    for f in inventory.pins:
        doc = pin_docs.get(f.rel) or records.get(f.rel) or {}
        by = doc.get("by")
        if by in remove or (f.rel in pin_docs and by in states and states[by].terminal):
            pins.append(f)  # its run goes, or its run's final lineage names what it reused
        else:
            live |= {r.rstrip("/") for r in doc.get("rels") or [] if isinstance(r, str)}
    for r, files in inventory.runs.items():
        if states[r].busy:
            continue
        if r in remove:
            going = [f for f in files if f.rel.split("/", 2)[2] not in _RUN_KEEP and not _is_live(f.rel, live)]
        else:
            going = [f for f in files if f.rel.startswith(f"runs/{r}/steps/") and not _is_live(f.rel, live)]
        if going or (r in remove and not states[r].finished):
            doomed.setdefault(r, _Doomed()).files = going
    going_rels = {f.rel for d in doomed.values() for f in d.files}
    present = {f.rel for files in inventory.runs.values() for f in files}
    present |= {rel.rsplit("/", n)[0] for rel in list(present) for n in range(1, rel.count("/"))}  # and every folder
    for f in inventory.objects:
        target = (records.get(f.rel) or {}).get("rel")
        owner = _run_of(target) if isinstance(target, str) else None
        there = isinstance(target, str) and target.rstrip("/") in present
        if owner is not None and states.get(owner) is not None and states[owner].busy:
            continue
        if not there or target in going_rels or (owner in remove and not _is_live(target, live)):
            doomed.setdefault(owner if owner in doomed else "", _Doomed()).objects.append(f)
    for r, files in inventory.work.items():
        if not states[r].busy:
            doomed.setdefault(r, _Doomed()).work = files
    plan = _Plan(
        remove_runs=remove,
        finished={r for r in remove if states[r].finished},
        kept=sorted(r for r in kept if states[r].lineage is not None or states[r].busy),
        busy=sorted(r for r, s in states.items() if s.busy),
        live=live,
        doomed=doomed,
        pins=pins,
    )
    return plan, inventory.count + len(pins_first)


def _report(plan: _Plan, report: GcReport) -> GcReport:
    everything = [f for d in plan.doomed.values() for f in d.all()] + plan.pins
    report.runs_removed = sorted(r for r in plan.remove_runs if r not in plan.finished or (r in plan.doomed and plan.doomed[r].all()))
    report.runs_kept = plan.kept
    report.runs_busy = plan.busy
    report.files = len(everything)
    report.bytes = sum(f.size for f in everything)
    report.cache_entries = sum(len(d.entries) for d in plan.doomed.values())
    report.objects = sum(len(d.objects) for d in plan.doomed.values())
    report.pins = len(plan.pins)
    report.work_folders = sum(1 for d in plan.doomed.values() if d.work)
    return report


CHUNK = 64
"""Runs collected together: their leases are held (and heartbeat) only while their files go."""


def collect(store: Store, retention: Retention, *, dry_run: bool = False, now: datetime | None = None, on_phase: Phase | None = None) -> GcReport:
    """Remove what ``retention`` lets go (see the module docstring); with ``dry_run`` only say what.

    Runs are collected in chunks of :data:`CHUNK`; for each chunk: its runs' leases are
    taken, the plan is written, pins are honoured, the runs are marked, their cache records
    unlinked, their files deleted and the mark completed. ``on_phase`` hears each phase.
    Raises :class:`~algodock.store.lease.RunBusy` when another gc runs on the store, and
    :class:`InvalidInput` when a ``keep`` run id names no run.
    """
    now = now or _now()
    phase = on_phase or (lambda _name: None)
    unknown = sorted(r for r in retention.keep if not store.exists(f"runs/{r}"))
    if unknown:
        raise InvalidInput(f"--keep {', '.join(unknown)}: no such run in {store.uri()}")
    report = GcReport(gc_id=f"{now.strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:8]}", dry_run=dry_run)
    if dry_run:
        plan, report.listed = _plan(store, retention, now)
        return _report(plan, report)
    lease = RunLease(store, "gc", rel=GC_LEASE).acquire()
    try:
        plan, report.listed = _plan(store, retention, now)
        _report(plan, report)
        phase("listed")
        runs = sorted(r for r in plan.doomed if r)
        for start in range(0, len(runs), CHUNK):
            _collect_runs(store, plan, runs[start : start + CHUNK], report, phase)
        dangling = plan.doomed.get("")
        if dangling is not None:  # records of runs that are gone: no lease to take, nothing to pin
            store.remove([f.rel for f in dangling.all()])
        store.remove([f.rel for f in plan.pins])
        store.remove([PLAN])
        _report(plan, report)  # pins honoured meanwhile kept some files: the figures are what went
    finally:
        lease.release()
    log.info("gc %s: removed %d runs, %d files, %d bytes; kept %d runs", report.gc_id, len(report.runs_removed), report.files, report.bytes, len(report.runs_kept))
    return report


def _collect_runs(store: Store, plan: _Plan, runs: list[str], report: GcReport, phase: Phase) -> None:
    held: list[RunLease] = []

    def take(run_id: str) -> RunLease | None:
        try:
            return RunLease(store, run_id).acquire()
        except RunBusy:
            log.info("run %s started meanwhile; gc leaves it alone", run_id)
            return None

    try:
        for run_id, lease in zip(runs, _parallel(take, runs)):
            if lease is None:
                _spare(plan, run_id)
            else:
                held.append(lease)
        runs = [r for r in runs if r in plan.doomed]
        if not runs:
            return
        store.write_json(PLAN, {"gc_id": report.gc_id, "holder": socket.gethostname(), "prefixes": [p for r in runs for p in plan.prefixes(r)]})
        _honour_pins(store, plan, runs)
        phase("planned")
        _mark(store, plan, runs, report.gc_id, complete=False)
        phase("marked")
        store.remove([f.rel for r in runs for f in plan.doomed[r].entries + plan.doomed[r].objects])
        phase("unlinked")
        store.remove([lineage_rel(r) for r in runs if r in plan.remove_runs])  # a run with a lineage document has all its bytes
        store.remove([f.rel for r in runs for f in plan.doomed[r].files + plan.doomed[r].work])
        phase("deleted")
        _mark(store, plan, runs, report.gc_id, complete=True)
        phase("recorded")
    finally:
        _parallel(lambda lease: lease.release(), held)


def _spare(plan: _Plan, run_id: str) -> None:
    """``run_id`` was taken by a writer after gc looked: nothing of it goes."""
    plan.doomed.pop(run_id, None)
    plan.remove_runs.discard(run_id)
    if run_id not in plan.busy:
        plan.busy.append(run_id)
    if run_id not in plan.kept:
        plan.kept.append(run_id)


def _honour_pins(store: Store, plan: _Plan, runs: list[str]) -> None:
    """After the plan is written: every file pinned by a run gc does not collect stays."""
    dropped = {f.rel for f in plan.pins}
    extra: set[str] = set()
    for rel, doc in _read_all(store, [f.rel for f in store.walk(PINS) if f.rel not in dropped]).items():
        doc = doc or {}
        if doc.get("by") in plan.remove_runs:
            continue
        extra |= {r.rstrip("/") for r in doc.get("rels") or [] if isinstance(r, str)}
    if not extra - plan.live:
        return
    plan.live |= extra
    for run_id in runs:
        d = plan.doomed[run_id]
        d.files = [f for f in d.files if not _is_live(f.rel, plan.live)]
        d.objects = [f for f in d.objects if (store.read_json(f.rel) or {}).get("rel") not in extra]


def _mark(store: Store, plan: _Plan, runs: list[str], gc_id: str, *, complete: bool) -> None:
    """Record in each run's ``run.json`` that gc collected it (wholly or partly), before and after."""
    _parallel(lambda run_id: _mark_one(store, plan, run_id, gc_id, complete=complete), runs)


def _mark_one(store: Store, plan: _Plan, run_id: str, gc_id: str, *, complete: bool) -> None:
    removed = run_id in plan.remove_runs
    d = plan.doomed[run_id]
    if d.files or (removed and run_id not in plan.finished):
        summary = store.read_json(run_json_rel(run_id))
        summary = summary if isinstance(summary, dict) else {"run_id": run_id}
        history = [c for c in summary.get("collected") or [] if isinstance(c, dict) and c.get("gc_id") != gc_id]
        history.append({"gc_id": gc_id, "at": _now().isoformat(), "removed": removed, "complete": complete, "files": len(d.files), "bytes": sum(f.size for f in d.files)})
        summary["collected"] = history
        store.write_json(run_json_rel(run_id), summary)


__all__ = ["GC_LEASE", "PINS", "PLAN", "GcReport", "Retention", "collect", "covered", "parse_duration", "pin", "rel_in"]
