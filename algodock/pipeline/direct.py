"""The rest of a run without an orchestrator (no Prefect here).

A pipeline's steps run as Prefect tasks (``algodock.flows``). When Prefect's API stops
answering mid-run, those tasks cannot start, or cannot report, and Prefect's engine would
retry its calls for minutes: :func:`finish_directly` then ends the run here. A step whose task
already recorded its outcome keeps it; a step a task is still running is awaited (its record
arrives in ``final``); every other step runs through :func:`execute_step` as soon as the
steps it depends on ended, or is ``skipped`` when one of them did not succeed.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import logging
from collections.abc import Callable, Mapping

from algodock.lineage.ledger import Ledger
from algodock.pipeline.execute import RunContext, execute_step
from algodock.records import Failure, StepRecord

POLL_SECONDS = 0.5
"""How often the records of steps still run by their tasks are looked for."""
_OK = ("succeeded", "cached")


def finish_directly(
    ctx: RunContext,
    ledger: Ledger,
    final: Mapping[str, StepRecord],
    claim: Callable[[str], bool],
    workers: int,
) -> dict[str, StepRecord]:
    """End every step of ``ctx``'s run; returns each step's record.

    ``final``: the records the steps' tasks wrote so far (filled on, by other threads);
    ``claim(step_id)``: True when this function may run the step (its task never started it).
    """
    pipeline = ctx.pipeline
    order = pipeline.topological_order()
    records: dict[str, StepRecord] = {}
    taken: set[str] = set()
    running: dict[concurrent.futures.Future[StepRecord], str] = {}

    def end(step_id: str, record: StepRecord) -> None:
        records[step_id] = record
        ledger.update(record)

    def body(step_id: str, upstream: dict[str, StepRecord]) -> StepRecord:
        return execute_step(ctx, step_id, upstream, on_log=logging.getLogger(f"algodock.step.{step_id}").info)

    with concurrent.futures.ThreadPoolExecutor(max(1, workers), thread_name_prefix="algodock-direct") as pool:
        while True:
            for step_id in order:
                if step_id not in records and step_id in final:
                    records[step_id] = final[step_id]
            for step_id in order:
                if step_id in records or step_id in taken:
                    continue
                deps = pipeline.dependencies[step_id]
                if any(d not in records for d in deps):
                    continue
                if ctx.cancel.is_set() or any(records[d].status not in _OK for d in deps):
                    end(step_id, StepRecord(id=step_id, status="skipped"))
                    continue
                taken.add(step_id)
                if claim(step_id):  # else its task runs it: the record comes through `final`
                    ledger.update(StepRecord(id=step_id, status="running"))
                    upstream = {d: records[d] for d in deps}
                    running[pool.submit(contextvars.copy_context().run, body, step_id, upstream)] = step_id
            if all(s in records for s in order):
                return records
            done, _ = concurrent.futures.wait(list(running), timeout=POLL_SECONDS, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                step_id = running.pop(future)
                try:
                    end(step_id, future.result())
                except Exception as exc:  # execute_step never raises; a bug must still end the step
                    end(step_id, StepRecord(id=step_id, status="failed", failure=Failure(kind="infrastructure", message=f"{type(exc).__name__}: {exc}")))


__all__ = ["finish_directly"]
