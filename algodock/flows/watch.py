"""What a run watches while it runs: its flow run cancelled from the UI, Prefect's API gone.

Cancelling a run on this host from the UI changes only its state in Prefect: the cancellation
watcher turns that into the run's cancel event and the removal of its containers. The API
watcher probes Prefect's ``/health`` and marks the run's :class:`RunWatch` when the API stopped
answering, so that the run can end without it (see algodock.pipeline.direct).
"""

from __future__ import annotations

import contextvars
import logging
import threading
from typing import TYPE_CHECKING, Any

from algodock.runtime.leftovers import kill_run_containers

if TYPE_CHECKING:
    from algodock.records import StepRecord

CANCEL_WATCH_SECONDS = 2.0
"""How often a run asks Prefect whether its flow run is being cancelled."""


API_PROBE_SECONDS = 1.0
API_LOST_AFTER = 3
"""Consecutive failed probes of the Prefect API's /health (one a second) after which the run
goes on without Prefect: the steps' outcome is what counts, Prefect's record stays incomplete."""


class RunWatch:
    """What a caller sees of a run without asking Prefect: whether it finished, whether
    Prefect's API went away, and which path (Prefect's task, or direct) runs each step."""

    def __init__(self) -> None:
        self.finished = threading.Event()
        self.prefect_lost = threading.Event()
        self.final: dict[str, StepRecord] = {}
        self._claims: dict[str, str] = {}
        self._lock = threading.Lock()

    def claim(self, step_id: str, by: str) -> bool:
        """True when ``by`` ("prefect" or "direct") runs ``step_id``: the first claim wins."""
        with self._lock:
            return self._claims.setdefault(step_id, by) == by


_WATCHES: dict[str, RunWatch] = {}


def run_watch(run_id: str) -> RunWatch:
    """The :class:`RunWatch` of ``run_id`` in this process (created on first use)."""
    return _WATCHES.setdefault(run_id, RunWatch())


def _watch_api(watch: RunWatch, stop: threading.Event) -> None:
    """Probe the Prefect API; set ``watch.prefect_lost`` when it stops answering at all.

    Any HTTP answer counts as alive (a Cloud API may want auth for /health): only refused
    connections and timeouts count as misses.
    """
    import httpx
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return  # an in-process API cannot go away without this process
    misses = 0
    with httpx.Client(timeout=2.0) as http:  # one client: building one (its TLS context) costs more than the probe
        while not stop.wait(API_PROBE_SECONDS):
            try:
                http.get(url.rstrip("/") + "/health")
                misses = 0
            except httpx.HTTPError:
                misses += 1
            if misses >= API_LOST_AFTER:
                logging.getLogger("algodock").warning(
                    "the Prefect API at %s does not answer: the run goes on without it; Prefect's record of this run will be incomplete", url
                )
                watch.prefect_lost.set()
                return


def _watch_cancellation(flow_run_id: str, ctx: Any, stop: threading.Event, kill: Any = None) -> None:
    """Cancelling a local run from the UI changes only its state; this makes it kill containers."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        while not stop.wait(CANCEL_WATCH_SECONDS):
            try:
                state = client.read_flow_run(flow_run_id).state
            except Exception:
                continue
            if state is not None and (state.is_cancelling() or state.is_cancelled()):
                ctx.cancel.set()
                ctx.pool.wake_all()
                kill() if kill else kill_run_containers(ctx.client, ctx.run_id)  # kill: every host's (cluster mode)
                return


def watch_run(flow_run_id: str | None, ctx: Any, watch: RunWatch | None = None, kill: Any = None) -> threading.Event:
    """Start the run's watchers (none outside a flow run); set the returned event to stop them.

    ``ctx``: the run's :class:`~algodock.pipeline.execute.RunContext`; ``watch``: also probe
    the API; ``kill``: how to remove the run's containers (default: on ``ctx.client``'s engine).
    """
    stop = threading.Event()
    if not flow_run_id:
        return stop
    targets: list[tuple[Any, tuple[Any, ...]]] = [(_watch_cancellation, (flow_run_id, ctx, stop, kill))]
    if watch is not None:
        targets.append((_watch_api, (watch, stop)))
    for target, args in targets:
        # In copies of this context, so the watchers talk to the same Prefect API (settings set in code included).
        threading.Thread(target=contextvars.copy_context().run, args=(target, *args), name=f"algodock-watch-{ctx.run_id}", daemon=True).start()
    return stop


__all__ = ["API_LOST_AFTER", "API_PROBE_SECONDS", "CANCEL_WATCH_SECONDS", "RunWatch", "run_watch", "watch_run"]
