"""Container log lines on their way to Prefect's task-run logs."""

from __future__ import annotations

import threading
from typing import Any


class LogBatches:
    """Container log lines to a Prefect logger in batches: one log record per up to
    ``max_lines`` lines or ``max_bytes``, or whatever came within ``max_delay`` seconds.

    Every Prefect log record is a row the API stores; sent one by one, the 20,000 lines a
    step may send kept ``algodock run`` waiting over 20 s for the log worker after the last
    container had exited. Batched, they are about a hundred rows. Use as a context manager:
    the last batch is sent on exit.
    """

    def __init__(self, emit: Any, max_lines: int = 200, max_bytes: int = 64 * 1024, max_delay: float = 1.0) -> None:
        self.emit, self.max_lines, self.max_bytes, self.max_delay = emit, max_lines, max_bytes, max_delay
        self._lines: list[str] = []
        self._size = 0
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def __call__(self, line: str) -> None:
        with self._lock:
            self._lines.append(line)
            self._size += len(line) + 1
            if len(self._lines) >= self.max_lines or self._size >= self.max_bytes:
                self._send_locked()
            elif self._timer is None:  # a quiet container's last lines still show within max_delay
                self._timer = threading.Timer(self.max_delay, self.flush)
                self._timer.daemon = True
                self._timer.start()

    def flush(self) -> None:
        with self._lock:
            self._send_locked()

    def _send_locked(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._lines:
            text, self._lines, self._size = "\n".join(self._lines), [], 0
            self.emit(text)

    def __enter__(self) -> LogBatches:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.flush()
