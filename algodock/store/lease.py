"""One writer per run: a lease object in the store, ``runs/<run_id>/lease.json``.

Whoever runs a pipeline under a run id holds the run's lease while it writes. The lease
names its holder (host, pid, start time of the process) and an expiry that a heartbeat
thread pushes forward every ``ttl / 3`` seconds while the holder lives. A second writer
of the same run id is refused with :class:`RunBusy`, naming the holder; a lease whose
holder is gone (expired, released, or held by a dead process on this host) is taken over.

Every change is a conditional write, so acquisition is race-free: the first lease is
created with :meth:`Store.create_json` (``If-None-Match: *`` on S3, a hardlink on a local
folder) and a takeover, renewal or release replaces exactly the version that was read
(:meth:`Store.replace_json`: ``If-Match: <etag>`` on S3, a compare-and-swap under
``flock`` locally). Of two processes racing for a run, exactly one gets it.

>>> import tempfile
>>> from algodock.store.backends import open_store
>>> store = open_store(tempfile.mkdtemp())
>>> with RunLease(store, "r1", ttl=30) as lease:
...     store.read_json("runs/r1/lease.json")["holder"]["pid"] == os.getpid()
True
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

from algodock.errors import InvalidInput
from algodock.processes import process_start
from algodock.store.base import Store
from algodock.store.layout import lease_rel

log = logging.getLogger("algodock.store.lease")

DEFAULT_TTL = 60.0
"""Seconds a lease lasts without a heartbeat (``ALGODOCK_LEASE_SECONDS``)."""

_HELD: dict[tuple[str, str], RunLease] = {}
_HELD_LOCK = threading.Lock()


class RunBusy(InvalidInput):
    """Another live process writes this run; wait for it, or use another ``--run-id``."""


def _me() -> dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "pid_start": process_start(pid)}


def _now() -> datetime:
    return datetime.now(timezone.utc)


def holder_alive(doc: dict[str, Any] | None, now: datetime | None = None) -> bool:
    """True when the lease ``doc`` still binds: not released, not expired, and (on this host) its process lives."""
    if not doc or doc.get("released"):
        return False
    now = now or _now()
    try:
        if datetime.fromisoformat(doc["expires_at"]) <= now:
            return False
    except (KeyError, TypeError, ValueError):
        return False
    holder = doc.get("holder") or {}
    if holder.get("host") == socket.gethostname():
        try:
            start = process_start(int(holder.get("pid")))
        except (TypeError, ValueError):
            return False
        return bool(start) and start == str(holder.get("pid_start") or start)
    return True  # another host's process: trust its heartbeat until the lease expires


def describe(doc: dict[str, Any]) -> str:
    """``host pid N since T (renewed R, expires E)``."""
    h = doc.get("holder") or {}
    return f"{h.get('host')} pid {h.get('pid')} since {doc.get('since')} (renewed {doc.get('renewed_at')}, expires {doc.get('expires_at')})"


class RunLease:
    """The lease of one run; use as a context manager, or :meth:`acquire` / :meth:`release`.

    Re-entrant within a process: the CLI and the flow it runs may both acquire it; the
    lease is released when the last of them releases it.
    """

    def __init__(self, store: Store, run_id: str, ttl: float | None = None, *, rel: str | None = None) -> None:
        self.store = store
        self.run_id = run_id
        self.rel = rel or lease_rel(run_id)
        """The lease object; another ``rel`` leases something else than a run (``algodock gc`` holds ``gc/lease.json``)."""
        self.ttl = ttl or float(os.environ.get("ALGODOCK_LEASE_SECONDS", DEFAULT_TTL))
        self.token = uuid.uuid4().hex
        self.lost = threading.Event()
        """Set when the heartbeat found the lease taken over (this process stalled past its expiry)."""
        self._version: str | None = None
        self._since: str | None = None
        self._count = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _doc(self, released: bool = False) -> dict[str, Any]:
        now = _now()
        return {
            "run_id": self.run_id,
            "holder": {**_me(), "token": self.token},
            "since": self._since or now.isoformat(),
            "renewed_at": now.isoformat(),
            "expires_at": (now if released else now + timedelta(seconds=self.ttl)).isoformat(),
            "released": released,
        }

    def acquire(self) -> RunLease:
        """Take the run, or raise :class:`RunBusy` naming who holds it."""
        key = (self.store.uri(), self.rel)
        with _HELD_LOCK:
            held = _HELD.get(key)
            if held is not None and not held.lost.is_set():
                held._count += 1
                return held
            self._take()
            self._count = 1
            _HELD[key] = self
        self._thread = threading.Thread(target=self._heartbeat, name=f"algodock-lease-{self.run_id}", daemon=True)
        self._thread.start()
        return self

    def _take(self) -> None:
        for _ in range(10):  # each round loses only to a concurrent change: re-read and decide again
            doc, version = self.store.read_json_versioned(self.rel)
            self._since = _now().isoformat()
            try:
                if doc is None:
                    self._version = self.store.create_json(self.rel, self._doc())
                    return
                if holder_alive(doc):
                    raise RunBusy(
                        f"run {self.run_id!r} is held by another algodock process: {describe(doc)}; "
                        f"lease {self.store.uri(self.rel)}. Wait for it to finish, or choose another --run-id."
                    )
                assert version is not None
                self._version = self.store.replace_json(self.rel, self._doc(), version)
                if not doc.get("released"):
                    log.warning("run %s: took over the lease of a writer that is gone (%s)", self.run_id, describe(doc))
                return
            except FileExistsError:
                continue
        raise RunBusy(f"run {self.run_id!r}: could not take the lease {self.store.uri(self.rel)}; other processes keep changing it")

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            with self._lock:
                if self._stop.is_set():
                    return
                try:
                    assert self._version is not None
                    self._version = self.store.replace_json(self.rel, self._doc(), self._version)
                except FileExistsError:
                    self.lost.set()
                    log.error("run %s: lost its lease %s (another process took it over); this process must stop writing", self.run_id, self.store.uri(self.rel))
                    return
                except Exception as exc:  # a store hiccup: the next beat tries again, well before expiry
                    log.warning("run %s: could not renew the lease: %s", self.run_id, exc)

    def release(self) -> None:
        """Give the run back (the last holder in this process marks the lease released)."""
        key = (self.store.uri(), self.rel)
        with _HELD_LOCK:
            self._count -= 1
            if self._count > 0:
                return
            if _HELD.get(key) is self:
                del _HELD[key]
        self._stop.set()
        with self._lock:
            if self.lost.is_set() or self._version is None:
                return
            try:
                self.store.replace_json(self.rel, self._doc(released=True), self._version)
            except Exception as exc:  # the lease expires by itself
                log.warning("run %s: could not release the lease: %s", self.run_id, exc)
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> RunLease:
        self._entered = self.acquire()
        return self._entered

    def __exit__(self, *exc: object) -> None:
        self._entered.release()


def run_abandoned(store: Store, run_id: str) -> dict[str, Any] | None:
    """The lease of ``run_id`` when its writer died without releasing it (else None)."""
    doc = store.read_json(lease_rel(run_id))
    if doc and not doc.get("released") and not holder_alive(doc):
        return doc
    return None


__all__ = ["DEFAULT_TTL", "RunBusy", "RunLease", "describe", "holder_alive", "run_abandoned"]
