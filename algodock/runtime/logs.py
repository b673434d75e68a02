"""Container output as it comes: to a log file bounded, to a logger bounded, a tail kept.

The container's stdout and stderr are read through the engine's attach stream in large
chunks, as fast as the engine delivers them (a flood never waits for a slow logger):

- ``log_path`` (when given) keeps the log whole up to ``log_max_bytes`` (64 MiB, docs/contract.md
  §5); past that it keeps the head and the tail, with one line between them saying how many
  bytes were dropped. The tail is a ring in a file beside the log, so memory stays small.
- ``on_line`` receives complete lines, at most ``emit_lines`` of them (20,000) and at most
  ``emit_limit`` bytes, then one line saying where the whole log is. It is called from a
  thread of its own through a queue: a slow callback (Prefect's API) delays only itself, and
  :meth:`LogPump.join` gives it ``drain_seconds`` after the stream ended, then stops it with a
  notice so a step never waits minutes for its log lines.
- the last ``tail_bytes`` are kept for the failure message, and those of stderr apart: the
  engine copies the two streams independently, so a last word on stderr can arrive before
  the last lines of stdout.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

MAX_LINE = 16 * 1024
LOG_MAX_BYTES = 64 * 1024 * 1024
"""The most a stored container log keeps (head and tail)."""
EMIT_LINES = 20_000
"""The most lines of one step that go to the line callback (Prefect's logs)."""
DRAIN_SECONDS = 5.0
"""How long the callback may still run after the stream ended before the rest is dropped."""
_MARKER_ROOM = 256
_STOP = object()


class BoundedLog:
    """A file that keeps the first and the last bytes written to it, at most ``max_bytes`` in all.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "l.log"
    >>> log = BoundedLog(p, max_bytes=300)
    >>> for i in range(100):
    ...     log.write(b"%03d\\n" % i)
    >>> log.close()
    >>> text = p.read_text()
    >>> text.startswith("000\\n") and text.endswith("099\\n") and "bytes of log dropped here" in text
    True
    """

    def __init__(self, path: Path, max_bytes: int = LOG_MAX_BYTES) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        budget = max(max_bytes - _MARKER_ROOM, 2)
        self._head_room = budget // 2
        self._tail_size = budget - self._head_room
        self._head: BinaryIO = open(path, "wb")
        self._ring: BinaryIO | None = None
        self._ring_pos = 0
        self._ring_fill = 0
        self.written = 0
        """Bytes offered (the whole log's length)."""

    def write(self, data: bytes) -> None:
        self.written += len(data)
        if self._head_room:
            part = data[: self._head_room]
            self._head.write(part)
            self._head_room -= len(part)
            data = data[len(part) :]
        if data:
            self._to_ring(data)

    def _to_ring(self, data: bytes) -> None:
        if self._ring is None:
            self._ring = open(self.path.with_name(self.path.name + ".tail"), "w+b")
        if len(data) >= self._tail_size:  # only its end can survive
            self._ring_fill += len(data) - self._tail_size
            data = data[-self._tail_size :]
        while data:
            room = self._tail_size - self._ring_pos
            part = data[:room]
            self._ring.seek(self._ring_pos)
            self._ring.write(part)
            self._ring_pos = (self._ring_pos + len(part)) % self._tail_size
            self._ring_fill += len(part)
            data = data[len(part) :]

    def close(self) -> None:
        """Write the tail after the head (with the dropped-bytes line when bytes were dropped)."""
        ring, self._ring = self._ring, None
        try:
            if ring is not None:
                kept = min(self._ring_fill, self._tail_size)
                dropped = self._ring_fill - kept
                if dropped:
                    head = self._head.tell()
                    self._head.write(
                        f"\n[algodock] {dropped} bytes of log dropped here (the stored log keeps the first {head} "
                        f"and the last {kept} of {self.written} bytes)\n".encode()
                    )
                start = self._ring_pos if self._ring_fill > self._tail_size else 0
                for lo, hi in ((start, kept), (0, start)) if start else ((0, kept),):
                    ring.seek(lo)
                    left = hi - lo
                    while left > 0:
                        block = ring.read(min(left, 1024 * 1024))
                        if not block:
                            break
                        self._head.write(block)
                        left -= len(block)
        finally:
            self._head.close()
            if ring is not None:
                ring.close()
                os.unlink(ring.name)


class LogPump:
    """Consumes an iterable of byte chunks, or ``(stdout, stderr)`` pairs with one None, in a thread."""

    def __init__(
        self,
        chunks: Iterable[bytes],
        *,
        on_line: Callable[[str], None] | None = None,
        log_path: Path | None = None,
        emit_limit: int = 2 * 1024 * 1024,
        emit_lines: int = EMIT_LINES,
        tail_bytes: int = 8 * 1024,
        log_max_bytes: int = LOG_MAX_BYTES,
        log_location: str | None = None,
    ) -> None:
        self._chunks = chunks
        self._on_line = on_line
        self._log_path = log_path
        self._log_location = log_location or (str(log_path) if log_path else None)
        self._emit_limit = emit_limit
        self._emit_lines = emit_lines
        self._log_max_bytes = log_max_bytes
        self._tail_bytes = tail_bytes
        self._tail = bytearray()
        self._err_tail = bytearray()
        self._partial = bytearray()
        self._lines: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._emitting = on_line is not None
        self._cut = threading.Event()
        self.emitted = 0
        """Bytes handed to the line callback (lines plus newlines)."""
        self.emitted_lines = 0
        self.total = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="algodock-logs", daemon=True)
        self._emitter = threading.Thread(target=self._emit_loop, name="algodock-log-lines", daemon=True)

    def start(self) -> LogPump:
        self._thread.start()
        if self._on_line is not None:
            self._emitter.start()
        return self

    def join(self, timeout: float | None = None, drain_seconds: float = DRAIN_SECONDS) -> bool:
        """Wait for the stream to end (``timeout``), then up to ``drain_seconds`` for the callback."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            return False
        if self._on_line is not None and self._emitter.is_alive():
            self._emitter.join(drain_seconds)
            if self._emitter.is_alive():
                self._cut.set()  # the callback is too slow: the rest is in the stored log only
                self._emitter.join(1)
        return True

    def _notice(self, why: str) -> str:
        where = f"; the full log is in {self._log_location}" if self._log_location else ""
        return f"[algodock] {why}{where}"

    def _emit(self, data: bytes) -> None:
        if not self._emitting:
            return
        self._partial += data
        if b"\n" not in data:
            del self._partial[:-MAX_LINE]
            return
        *lines, rest = self._partial.split(b"\n")
        self._partial = bytearray(rest[-MAX_LINE:])
        for line in lines:
            if self.emitted_lines >= self._emit_lines:
                self._stop_emitting(f"log output past {self._emit_lines} lines is not shown here")
                return
            if self.emitted >= self._emit_limit:
                self._stop_emitting(f"log output past {self._emit_limit} bytes is not shown here")
                return
            self._lines.put(line[:MAX_LINE])
            self.emitted += len(line) + 1
            self.emitted_lines += 1

    def _stop_emitting(self, why: str) -> None:
        self._emitting = False
        self._partial.clear()
        self._lines.put(self._notice(why).encode())

    def _emit_loop(self) -> None:
        assert self._on_line is not None
        while True:
            item = self._lines.get()
            if item is _STOP:
                return
            if self._cut.is_set():
                self._on_line(self._notice("the log callback fell behind; the remaining lines are not shown here"))
                return
            try:
                self._on_line(bytes(item).decode("utf-8", "replace").rstrip("\r"))  # type: ignore[arg-type]
            except Exception as exc:  # a failing logger must not stop the log file or the step
                self.error = self.error or exc

    def _run(self) -> None:
        sink: BoundedLog | None = None
        try:
            if self._log_path is not None:
                sink = BoundedLog(self._log_path, self._log_max_bytes)
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
            if self._partial and self._emitting:
                if self.emitted_lines < self._emit_lines:
                    self._lines.put(bytes(self._partial))
                    self.emitted_lines += 1
                else:
                    self._stop_emitting(f"log output past {self._emit_lines} lines is not shown here")
        except BaseException as exc:  # the stream breaks when the container is removed under us
            self.error = exc
        finally:
            self._lines.put(_STOP)
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


__all__ = ["BoundedLog", "EMIT_LINES", "LOG_MAX_BYTES", "LogPump", "MAX_LINE"]
