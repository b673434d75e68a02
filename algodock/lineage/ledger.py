"""A run's lineage document in the store, rewritten as its steps change (no Prefect here).

Both ways a run is made use it: a pipeline flow (``algodock.flows.pipeline``) and a run
composed in Python (``algodock.pipeline.composed``).
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timezone
from typing import Any

from algodock.records import LineageDocument, StepRecord
from algodock.store.base import Store
from algodock.store.layout import lineage_rel, run_json_rel


class Ledger:
    """The run's lineage document, rewritten in the store whenever a step changes.

    After :meth:`start`, a writer thread writes the latest document whenever it changed
    (a burst of changes is one write), so recording a step never delays the next step;
    :meth:`finish` stops it and writes the final document itself. Writes are at least
    ``max(LEDGER_MIN_INTERVAL, LEDGER_INTERVAL_PER_STEP x steps)`` apart: the document grows
    with the steps, so a 1000-step run writes about every 10 s instead of on every change
    (bytes written per run grow with the run's duration, not with steps x changes).
    """

    LEDGER_MIN_INTERVAL = 0.5
    LEDGER_INTERVAL_PER_STEP = 0.01

    def __init__(self, doc: LineageDocument, store: Store, on_change: Any = None, writes: bool = True) -> None:
        self.doc = doc
        self.store = store
        self.on_change = on_change
        self.writes = writes
        """False: the records are kept here only (a step run away from its run's process: that process writes the document)."""
        self._lock = threading.Lock()
        self._changed = threading.Event()
        self._closing = False
        self._stop = threading.Event()
        self._writer: threading.Thread | None = None
        self._index = {s.id: i for i, s in enumerate(doc.steps)}
        self.interval = max(self.LEDGER_MIN_INTERVAL, self.LEDGER_INTERVAL_PER_STEP * len(doc.steps))

    def update(self, record: StepRecord) -> None:
        """Record ``record`` (a step of the run; a step not seen before is appended, as in a composed run)."""
        with self._lock:
            if record.id in self._index:
                self.doc.steps[self._index[record.id]] = record  # O(1): a 1000-step run updates thousands of times
            else:
                self._index[record.id] = len(self.doc.steps)
                self.doc.steps.append(record)
            if self._writer is None or self._closing:
                self._write()
        self._changed.set()
        if self.on_change:
            self.on_change(record)

    def record(self, step_id: str) -> StepRecord | None:
        """The latest record of ``step_id`` (None: not a step of the run)."""
        with self._lock:
            i = self._index.get(step_id)
            return None if i is None else self.doc.steps[i]

    def start(self) -> None:
        with self._lock:
            self._write()
        self._writer = threading.Thread(target=self._write_behind, name="algodock-ledger", daemon=True)
        self._writer.start()
        for s in self.doc.steps:
            self.on_change and self.on_change(s)

    def finish(self, status: str) -> None:
        if self._writer is not None:
            self._closing = True
            self._stop.set()
            self._changed.set()
            self._writer.join()
        with self._lock:
            self.doc.status = status  # type: ignore[assignment]
            self.doc.finished_at = datetime.now(timezone.utc)
            self._write()

    def _write_behind(self) -> None:
        while True:
            self._changed.wait()
            if self._closing:
                return  # finish() writes the final document
            self._changed.clear()
            with self._lock:  # a consistent snapshot; the I/O is done without the lock
                snapshot = (self.doc.model_dump(mode="json"), self.summary())
            try:
                self._write(snapshot)
            except Exception as exc:  # the next change or finish() tries again
                logging.getLogger("algodock").warning("could not write the lineage of run %s: %s", self.doc.run_id, exc)
            if self._stop.wait(self.interval):  # batch the changes of the next interval into one write
                return

    def summary(self) -> dict[str, Any]:
        return {
            "run_id": self.doc.run_id,
            "status": self.doc.status,
            "flow_run_id": self.doc.flow_run_id,
            "lineage_uri": self.store.uri(lineage_rel(self.doc.run_id)),
            "steps": [s.summary() for s in self.doc.steps],
        }

    def _write(self, snapshot: tuple[dict[str, Any], dict[str, Any]] | None = None) -> None:
        if not self.writes:
            return
        lineage, summary = snapshot or (self.doc.model_dump(mode="json"), self.summary())
        self.store.write_json(lineage_rel(self.doc.run_id), lineage)
        self.store.write_json(run_json_rel(self.doc.run_id), summary)


__all__ = ["Ledger"]
