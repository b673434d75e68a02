"""A flow run's end without waiting for Prefect's heartbeat thread.

Prefect (3.9) sends a flow run's heartbeats from a thread that sleeps in whole seconds, and the
synchronous flow engine joins that thread when the run ends: every flow run returns only at the
next whole second of its heartbeat loop, 0.5 s late on average (measured: a 2-step and a 4-step
chain both took 1.07 s, a 10-step one 3.07 s; the flows' own work ended 0.1 to 1.0 s before).
Prefect's asynchronous engine does not join it (``join_on_exit=False``); :func:`install` makes
the synchronous engine do the same. The thread still stops at that next second, and sends no
heartbeat after the run ended (it checks its stop event before each one); heartbeats during the
run are unchanged.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

log = logging.getLogger("algodock.flows.heartbeats")

_INSTALLED = "_algodock_unjoined"


def install() -> bool:
    """Make Prefect's synchronous flow engine end a run without joining its heartbeat thread
    (idempotent); False, and nothing changed, where this Prefect has no such function."""
    from prefect import flow_engine

    original = getattr(flow_engine, "_send_heartbeats", None)
    if original is None:
        log.debug("this Prefect has no flow_engine._send_heartbeats: nothing to change")
        return False
    if getattr(original, _INSTALLED, False):
        return True

    @contextlib.contextmanager
    def unjoined(engine: Any, join_on_exit: bool = True) -> Iterator[None]:
        with original(engine, join_on_exit=False):
            yield

    setattr(unjoined, _INSTALLED, True)
    unjoined.__wrapped__ = original  # type: ignore[attr-defined]
    flow_engine._send_heartbeats = unjoined
    return True
