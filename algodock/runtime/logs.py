"""Container output as it comes: to a log file whole, to a logger bounded, a tail kept.

The container's stdout and stderr are read through the engine's attach stream in large
chunks. The full bytes go to ``log_path`` (when given); complete lines go to ``on_line``
until ``emit_limit`` bytes were emitted (then one notice); the last ``tail_bytes`` are kept
for the failure message, and those of stderr apart: the engine copies the two streams
independently, so a last word on stderr can arrive before the last lines of stdout.
Memory stays bounded whatever the container prints.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

MAX_LINE = 16 * 1024


class LogPump:
    """Consumes an iterable of byte chunks, or ``(stdout, stderr)`` pairs with one None, in a thread."""

    def __init__(
        self,
        chunks: Iterable[bytes],
        *,
        on_line: Callable[[str], None] | None = None,
        log_path: Path | None = None,
        emit_limit: int = 2 * 1024 * 1024,
        tail_bytes: int = 8 * 1024,
    ) -> None:
        self._chunks = chunks
        self._on_line = on_line
        self._log_path = log_path
        self._emit_limit = emit_limit
        self._tail_bytes = tail_bytes
        self._tail = bytearray()
        self._err_tail = bytearray()
        self._partial = bytearray()
        self.emitted = 0
        self.total = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="algodock-logs", daemon=True)

    def start(self) -> LogPump:
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _emit(self, data: bytes) -> None:
        if self._on_line is None or self.emitted >= self._emit_limit:
            return
        self._partial += data
        *lines, rest = self._partial.split(b"\n")
        self._partial = bytearray(rest[-MAX_LINE:])
        for line in lines:
            self._on_line(line[:MAX_LINE].decode("utf-8", "replace").rstrip("\r"))
            self.emitted += len(line) + 1
            if self.emitted >= self._emit_limit:
                where = f"; the full log is in {self._log_path}" if self._log_path else ""
                self._on_line(f"[algodock] log output past {self._emit_limit} bytes is not shown here{where}")
                return

    def _run(self) -> None:
        sink: BinaryIO | None = None
        try:
            if self._log_path is not None:
                self._log_path.parent.mkdir(parents=True, exist_ok=True)
                sink = open(self._log_path, "wb")
            for chunk in self._chunks:
                if isinstance(chunk, tuple):  # demultiplexed: (stdout, None) or (None, stderr)
                    out, err = chunk
                    chunk = out or err
                    if err:
                        self._keep(self._err_tail, err)
                if not chunk:
                    continue
                self.total += len(chunk)
                if sink is not None:
                    sink.write(chunk)
                self._keep(self._tail, chunk)
                self._emit(chunk)
            if self._partial and self._on_line is not None and self.emitted < self._emit_limit:
                self._on_line(self._partial.decode("utf-8", "replace"))
        except BaseException as exc:  # the stream breaks when the container is removed under us
            self.error = exc
        finally:
            if sink is not None:
                sink.close()

    def _keep(self, buf: bytearray, data: bytes) -> None:
        buf += data
        if len(buf) > 2 * self._tail_bytes:
            del buf[: -self._tail_bytes]

    def tail(self, lines: int = 20) -> list[str]:
        """The last ``lines`` lines the container printed."""
        text = bytes(self._tail[-self._tail_bytes :]).decode("utf-8", "replace")
        return text.splitlines()[-lines:]

    def stderr_tail(self, lines: int = 5) -> list[str]:
        """The last ``lines`` lines on stderr (empty unless the stream was demultiplexed)."""
        text = bytes(self._err_tail[-self._tail_bytes :]).decode("utf-8", "replace")
        return text.splitlines()[-lines:]
