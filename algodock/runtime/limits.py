"""``output_mb`` and ``output_files`` (docs/contract.md §1) enforced while the container runs.

Mechanism: a watcher thread walks the bind-mounted output folder with :func:`os.scandir`
(no symlink followed) and adds up every entry's size and count; when either is over the
manifest's limit it kills the container at once and the step fails with ``disk_limit``. The
kill is a SIGKILL of the container's init straight from this host when the engine is local
(its pid, looked up once in the background, checked against ``/proc/<pid>/cgroup`` just
before), then the engine's own kill.
A file counts with the larger of its apparent size and its allocated blocks, so a sparse
file cannot pass for small (it would be read, hashed and uploaded at its apparent size).

Cost and slack: a walk of ``n`` entries costs about ``n`` microseconds; the watcher rests
``RATIO`` = 40 times as long as its last walk took (at least ``MIN_INTERVAL`` = 10 ms, at
most ``MAX_INTERVAL`` = 2 s), so it never takes more than about 1/``RATIO`` (2.5 %) of one
core; a small tree (a walk of tens of microseconds) is looked at every 10 ms.
While the output grows, the watcher also wakes after half the time the growth it saw needs
to reach a limit (never sooner than ``FAST_INTERVAL`` = 5 ms, nor sooner than ``RATIO`` x
its walk), so it looks more often exactly when a limit comes near.
Slack: the bytes an algorithm can write past ``output_mb`` before it is stopped are what it
writes in the last interval plus the kill (a SIGKILL from this host takes microseconds; the
engine's kill, an API call, tens of ms on a loaded engine): for a small tree at 1-4 GB/s into
the page cache, 10-20 ms of writing, i.e. tens of MB (measured 1-36 MiB over a 100 MiB
limit by the bench, up to 235 MiB in the loaded test suite, where the kill lands later); more for a tree so large that one walk takes long (a 100,000-entry tree walks in
~0.1-0.3 s, so it is looked at every few seconds). bench/output_limit.py measures it.
After the container exited, :func:`measure` walks the folder once more, so a step can never
end over its limits unnoticed, whatever it wrote in its last interval.

The watcher needs the output folder on this host (bind staging). With named-volume staging
(a remote engine) the folder lives on the engine's host and is only checked when it is
read back after the exit (see :func:`algodock.runtime.runner.run_step`).
"""

from __future__ import annotations

import logging
import os
import signal
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from algodock.errors import DiskLimitFailure

log = logging.getLogger("algodock.runtime.limits")

MIB = 1024 * 1024
MIN_INTERVAL = 0.01
MAX_INTERVAL = 2.0
RATIO = 40.0
FAST_INTERVAL = 0.005
"""The shortest rest, taken only while the output grows towards a limit."""


@dataclass(frozen=True)
class Usage:
    """What an output folder holds."""

    bytes: int
    """Sum over files of max(apparent size, allocated blocks)."""
    entries: int
    """Files plus folders (the folder itself not counted)."""


@dataclass(frozen=True)
class OutputLimits:
    """The manifest's limits on ``/work/output``."""

    max_bytes: int
    max_entries: int

    @classmethod
    def of(cls, output_mb: int, output_files: int) -> OutputLimits:
        return cls(output_mb * MIB, output_files)

    def check(self, usage: Usage) -> None:
        """Raise :class:`DiskLimitFailure` when ``usage`` is over a limit."""
        if usage.bytes > self.max_bytes:
            raise DiskLimitFailure(
                f"the algorithm wrote more than output_mb={self.max_bytes // MIB} MiB into /work/output "
                f"({usage.bytes // MIB} MiB seen) and was stopped; raise container_parameters.output_mb or write less"
            )
        if usage.entries > self.max_entries:
            raise DiskLimitFailure(
                f"the algorithm created more than output_files={self.max_entries} files and folders in /work/output "
                f"({usage.entries} seen) and was stopped; raise container_parameters.output_files or write fewer files"
            )


def measure(root: Path, stop_at: OutputLimits | None = None) -> Usage:
    """Walk ``root`` without following symlinks; stop early once ``stop_at`` is exceeded.

    Entries that vanish or cannot be read during the walk are skipped (the algorithm is
    still writing); the final walk after the exit sees a settled folder.
    """
    total = entries = 0
    stack = [str(root)]
    while stack:
        try:
            it = os.scandir(stack.pop())
        except OSError:
            continue
        with it:
            for entry in it:
                entries += 1
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
                total += max(st.st_size, st.st_blocks * 512) if not stat.S_ISDIR(st.st_mode) else st.st_blocks * 512
                if stop_at is not None and (total > stop_at.max_bytes or entries > stop_at.max_entries):
                    return Usage(total, entries)
    return Usage(total, entries)


class OutputWatcher:
    """A thread that stops the container (``kill``) when ``root`` goes over ``limits``."""

    def __init__(
        self,
        root: Path,
        limits: OutputLimits,
        kill: Callable[[], None],
        host_pid: Callable[[], int | None] | None = None,
        container_id: str = "",
    ) -> None:
        self.root = root
        self.limits = limits
        self._kill = kill
        self._host_pid = host_pid
        self._container_id = container_id
        self._pid: int | None = None
        self._stop = threading.Event()
        self.failure: DiskLimitFailure | None = None
        """Set when the watcher stopped the container."""
        self.walks = 0
        self._thread = threading.Thread(target=self._run, name="algodock-output-limit", daemon=True)

    def start(self) -> OutputWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(MAX_INTERVAL + 5)

    def _kill_on_host(self) -> None:
        """SIGKILL the container's init from this host: faster than the engine's kill (an API call),
        so less is written after the limit. Only when /proc shows that pid still in the container's
        cgroup (a local engine; no pid reused since); the engine's kill follows anyway."""
        pid, cid = self._pid, self._container_id
        if not pid or not cid:
            return
        try:
            if cid in Path(f"/proc/{pid}/cgroup").read_text():
                os.kill(pid, signal.SIGKILL)
        except OSError as exc:  # gone, or not ours to signal (not root)
            log.debug("host kill of pid %s: %s", pid, exc)

    def _nearing(self, usage: Usage) -> bool:
        """Past a quarter of a limit: time to learn the pid a kill would signal (an engine call
        that most steps, whose outputs stay small, never need)."""
        return usage.bytes * 4 >= self.limits.max_bytes or usage.entries * 4 >= self.limits.max_entries

    def _interval(self, took: float, usage: Usage, before: Usage | None, dt: float) -> float:
        """Rest ``RATIO`` x the walk, but wake sooner when the growth seen would reach a limit first."""
        rest = min(MAX_INTERVAL, max(MIN_INTERVAL, RATIO * took))
        if before is not None and dt > 0:
            for now, then, limit in ((usage.bytes, before.bytes, self.limits.max_bytes), (usage.entries, before.entries, self.limits.max_entries)):
                if now > then:  # growing: half the time it needs to reach the limit at this pace
                    eta = (limit - now) / ((now - then) / dt)
                    rest = min(rest, max(RATIO * took, FAST_INTERVAL, eta / 2))
        return rest

    def _run(self) -> None:
        before: Usage | None = None
        last = time.monotonic()
        while not self._stop.is_set():
            t0 = time.monotonic()
            usage = measure(self.root, self.limits)
            self.walks += 1
            try:
                self.limits.check(usage)
            except DiskLimitFailure as failure:
                self.failure = failure
                self._kill_on_host()
                try:
                    self._kill()
                except Exception as exc:  # already exited, or the engine is gone: the final walk still fails the step
                    log.debug("kill on disk_limit: %s", exc)
                return
            took = time.monotonic() - t0
            if self._host_pid is not None and self._nearing(usage):  # once, off the step's critical path
                resolve, self._host_pid = self._host_pid, None
                try:
                    self._pid = resolve()
                except Exception as exc:  # the engine is busy or gone: the engine's kill still works
                    log.debug("no host pid for the container: %s", exc)
            rest = self._interval(took, usage, before, t0 - last)
            before, last = usage, t0
            self._stop.wait(rest)


__all__ = ["OutputLimits", "OutputWatcher", "Usage", "measure"]
