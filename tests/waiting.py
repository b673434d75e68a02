"""Waiting on a condition in tests: poll it until it holds, fail naming what was awaited."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest


def poll(what: str, check: Callable[[], Any], deadline: float = 60.0, every: float = 0.05, seen: Callable[[], str] | None = None) -> Any:
    """Wait until ``check()`` is truthy (returning it); fail naming ``what`` (and ``seen()``) at the deadline."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(every)  # polling interval, not synchronization: the state decides
    pytest.fail(f"timed out after {deadline:g} s waiting for {what}" + (f"; seen:\n{seen()[-4000:]}" if seen else ""))
