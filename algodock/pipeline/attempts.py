"""Attempt numbers claimed in the store, for a step run in another process than its run (a Dask
worker's). No Prefect here.

In the run's own process a step's attempt is its task run's count. A step sent to a Dask worker
may be lost with that worker and run again elsewhere by Dask, under the same task run: so each
attempt there claims the next number in the store (``runs/<run>/cluster/<step>/<n>.json``)
before it starts, and the lost attempt and its re-run are two attempts in the lineage, writing to
two locations. The document of an attempt that never ended stays ``running``: the step's
``attempt_history`` calls it ``lost``.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from algodock.records import StepRecord
from algodock.store.base import Store


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def attempts_rel(run_id: str, step_id: str) -> str:
    return f"runs/{run_id}/cluster/{step_id}"


class ClaimedAttempt:
    """One attempt of a step on a worker: claimed before the step runs, ended with its record.

    ``timeline`` (what the worker saw, as ISO times): ``task_started`` (its task began),
    ``claimed`` (this number was taken), ``executed`` (the step ended), and ``dask_key``.
    """

    def __init__(self, store: Store, run_id: str, step_id: str, n: int, doc: dict[str, Any]) -> None:
        self.store, self.run_id, self.step_id, self.n, self.doc = store, run_id, step_id, n, doc

    @classmethod
    def claim(cls, store: Store, run_id: str, step_id: str, engine: dict[str, str], worker: str, began: str, key: str) -> ClaimedAttempt:
        """The next attempt number of ``step_id`` (one at a time per step: Dask re-runs only a lost one)."""
        rel = attempts_rel(run_id, step_id)
        taken = [int(Path(n).stem) for n in store.list(rel) if Path(n).stem.isdigit()]
        n = max(taken, default=0) + 1
        doc = {"attempt": n, "engine": engine, "worker": worker, "status": "running", "started_at": _now(),
               "timeline": {"dask_key": key, "task_started": began}}
        store.write_json(f"{rel}/{n}.json", doc)
        doc["timeline"]["claimed"] = _now()
        return cls(store, run_id, step_id, n, doc)

    def end(self, record: StepRecord) -> list[dict[str, Any]]:
        """Write how the attempt ended; the step's ``attempt_history`` (every attempt, lost ones named)."""
        final = {**self.doc, "status": record.status, "finished_at": _now(),
                 "failure": record.failure.model_dump() if record.failure else None,
                 "timeline": {**self.doc["timeline"], "executed": _now()}}
        self.store.write_json(f"{attempts_rel(self.run_id, self.step_id)}/{self.n}.json", final)
        # A first attempt is the whole history: no listing and reading back (two store round trips
        # before the step's task ends and its worker takes the next step)
        return history(self.store, self.run_id, self.step_id) if self.n > 1 else [final]


def history(store: Store, run_id: str, step_id: str) -> list[dict[str, Any]]:
    """Every attempt of a step; one still ``running`` after a later one began was lost with its worker."""
    rel = attempts_rel(run_id, step_id)
    out = [doc for name in store.list(rel) if (doc := store.read_json(f"{rel}/{name}"))]
    out.sort(key=lambda d: d["attempt"])
    for doc in out[:-1]:
        if doc.get("status") == "running":
            doc["status"] = "lost"
    return out
