"""``output_mb`` and ``output_files`` (docs/contract.md §1) enforced while the container runs.

Mechanism: a watcher thread walks the bind-mounted output folder with :func:`os.scandir`
(no symlink followed) and adds up every entry's size and count; when either is over the
manifest's limit it kills the container at once and the step fails with ``disk_limit``. It
starts before the container does (a loaded engine confirms a start only after a fast writer
wrote hundreds of MiB). The kill is a SIGKILL, straight from this host, of every process in
the container's cgroup (found on this host at the engine's usual places, no engine call);
when this host does not show that cgroup, of the container's init (its pid asked from the
engine once, in a thread of its own, when an output nears a limit); then the engine's own kill.
A file counts with the larger of its apparent size and its allocated blocks, so a sparse
file cannot pass for small (it would be read, hashed and uploaded at its apparent size).

Cost: a walk of ``n`` entries costs about ``n`` microseconds of CPU; the watcher rests
``RATIO`` = 40 times the CPU its last walk took (at least ``MIN_INTERVAL`` = 10 ms, at most
``MAX_INTERVAL`` = 2 s), so it never takes more than about 1/``RATIO`` (2.5 %) of one core; a
small tree (a walk of tens of microseconds) is looked at every 10 ms. CPU, not wall time: on a
loaded host a walk of a tiny folder can wait tens of ms for a core, and charged as cost that
wait made the watcher rest for a second while a writer went hundreds of MiB past the limit.
While the output grows, the watcher also wakes after half the time the fastest growth it has
seen needs to reach a limit (never sooner than ``FAST_INTERVAL`` = 2 ms, nor sooner than
``RATIO`` x its walk's CPU), so it looks more often exactly when a limit comes near.
Until then the folder is empty (a step's output folder starts so), and nothing can be written
below it before an entry appears in it: the watcher waits for that first entry without
walking, told by the kernel (inotify on the folder, no walk at all for a step that writes at
its end, as most do; it walked every 10 ms before), then walks as above. Where inotify is
not to be had it walks from the start.
Slack: the bytes an algorithm can write past ``output_mb`` before it is stopped are what it
writes between the last two looks plus the late wake-ups of a loaded host (a SIGKILL from
this host takes microseconds): for a small tree at 1-4 GB/s into the page cache, a few ms of
writing, i.e. a few MiB to tens of MiB (bench/output_limit.py measures it; the test suite
holds it under 2 x ``output_mb`` on a loaded machine); more for a tree so large that one
walk takes long (a 100,000-entry tree walks in ~0.1-0.3 s, so it is looked at every few seconds).
After the container exited, :func:`measure` walks the folder once more, so a step can never
end over its limits unnoticed, whatever it wrote in its last interval.

The watcher needs the output folder on this host (bind staging). With named-volume staging
(a remote engine) the folder lives on the engine's host and is only checked when it is
read back after the exit (see :func:`algodock.runtime.runner.run_step`).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import select
import signal
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from algodock.errors import DiskLimitFailure
from algodock.runtime.usage import CGROUP_ROOT, CONTAINER_CGROUPS

log = logging.getLogger("algodock.runtime.limits")

MIB = 1024 * 1024
MIN_INTERVAL = 0.01
MAX_INTERVAL = 2.0
RATIO = 40.0
FAST_INTERVAL = 0.002
"""The shortest rest, taken only while the output grows towards a limit."""
_IN_MOVED_TO, _IN_CREATE = 0x80, 0x100  # inotify(7): an entry moved into, or created in, the watched folder
_IN_NONBLOCK, _IN_CLOEXEC = os.O_NONBLOCK, 0o2000000


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
        self._procs: Path | None = None
        self._pid: int | None = None
        self._resolver: threading.Thread | None = None
        self._stop = threading.Event()
        self.failure: DiskLimitFailure | None = None
        """Set when the watcher stopped the container."""
        self.walks = 0
        self._pace = [0.0, 0.0]  # the fastest growth seen, bytes and entries a second
        self._wake_r = self._wake_w = -1  # a pipe from start() on: stop() wakes a watcher waiting for the first entry
        self._thread = threading.Thread(target=self._run, name="algodock-output-limit", daemon=True)

    def start(self) -> OutputWatcher:
        """Start walking; may be called before the container starts (its cgroup is looked up later)."""
        self._wake_r, self._wake_w = os.pipe()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError:  # stopped before, or never started
            pass
        self._thread.join(MAX_INTERVAL + 5)
        if self._resolver is not None:
            self._resolver.join(5)
        if not self._thread.is_alive():
            for fd in (self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError:  # closed by an earlier stop
                    pass
            self._wake_r = self._wake_w = -1

    def _until_written(self) -> bool:
        """Wait, without walking, until the first entry appears in the output folder: it starts
        empty, and nothing can be written anywhere below it before an entry is made in it. The
        kernel says when (inotify); False when stopped first. Where inotify is not to be had (not
        Linux, or this user's instances used up) the walks start at once, as they always did."""
        fd = _watch_entries(self.root)
        if fd is None:
            return True
        try:
            with os.scandir(self.root) as it:
                if any(True for _ in it):  # written before the watch was set
                    return True
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            poller.register(self._wake_r, select.POLLIN)
            poller.poll()  # no timeout: an entry, or stop()
            return not self._stop.is_set()
        except OSError:  # the folder went away: the walks say what there is
            return True
        finally:
            os.close(fd)

    def _kill_on_host(self) -> None:
        """SIGKILL the container's processes from this host: faster than the engine's kill (an API
        call, tens to hundreds of ms on a loaded engine), so less is written after the limit.
        Every process of the container's cgroup when this host sees it (the writer stops at once,
        not only once its init has died); else its init, when ``/proc`` shows that pid still in
        the container's cgroup (no pid reused since). The engine's kill follows anyway."""
        procs = self._procs or (container_procs(self._container_id) if self._container_id else None)
        pids = _cgroup_pids(procs) if procs is not None else []
        if not pids and self._pid and self._container_id and _in_cgroup_of(self._pid, self._container_id):
            pids = [self._pid]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError as exc:  # gone, or not ours to signal (not root)
                log.debug("host kill of pid %s: %s", pid, exc)

    def _nearing(self, usage: Usage) -> bool:
        """Past a quarter of a limit: time to learn what a kill would signal (an engine call when
        this host does not show the container's cgroup, which most steps never need)."""
        return usage.bytes * 4 >= self.limits.max_bytes or usage.entries * 4 >= self.limits.max_entries

    def _prepare_kill(self) -> None:
        """Find the container's cgroup on this host; failing that, ask the engine for its init pid,
        once, in a thread of its own: a busy engine answers in hundreds of ms, and the watcher must
        keep walking meanwhile."""
        self._procs = container_procs(self._container_id) if self._container_id else None
        resolve, self._host_pid = self._host_pid, None
        if self._procs is not None or resolve is None:
            return

        def ask() -> None:
            try:
                self._pid = resolve()
            except Exception as exc:  # the engine is busy or gone: the engine's kill still works
                log.debug("no host pid for the container: %s", exc)

        self._resolver = threading.Thread(target=ask, name="algodock-output-limit-pid", daemon=True)
        self._resolver.start()

    def _interval(self, cost: float, usage: Usage, before: Usage, dt: float) -> float:
        """Rest ``RATIO`` x the walk's CPU cost, but wake sooner when the growth seen would reach a limit first."""
        rest = min(MAX_INTERVAL, max(MIN_INTERVAL, RATIO * cost))
        if dt > 0:
            for i, (now, then, limit) in enumerate(((usage.bytes, before.bytes, self.limits.max_bytes), (usage.entries, before.entries, self.limits.max_entries))):
                if now > then:  # growing: half the time it needs to reach the limit at the fastest pace seen (writers come in bursts)
                    self._pace[i] = max(self._pace[i], (now - then) / dt)
                    eta = (limit - now) / self._pace[i]
                    rest = min(rest, max(RATIO * cost, FAST_INTERVAL, eta / 2))
        return rest

    def _run(self) -> None:
        if not self._until_written():
            return
        before, last = Usage(0, 0), time.monotonic()  # the folder starts empty: the first walk already sees a pace
        while not self._stop.is_set():
            t0, cpu0 = time.monotonic(), time.thread_time()
            usage = measure(self.root, self.limits)
            cost = time.thread_time() - cpu0  # CPU, not wall: time spent waiting for a core is not the walk's cost
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
            if self._procs is None and self._host_pid is not None and self._nearing(usage):
                self._prepare_kill()
            rest = self._interval(cost, usage, before, t0 - last)
            before, last = usage, t0
            self._stop.wait(rest)


@functools.cache
def _inotify_libc() -> ctypes.CDLL | None:
    """The C library, where it has inotify (Linux); None elsewhere."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.inotify_init1  # not Linux: no such symbol
    except (OSError, AttributeError):
        return None
    return libc


def _watch_entries(folder: Path) -> int | None:
    """An inotify descriptor told of every entry created in or moved into ``folder`` (not below
    it); None where the kernel offers none (not Linux, the instance limit reached)."""
    libc = _inotify_libc()
    if libc is None:
        return None
    fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
    if fd < 0:
        return None
    if libc.inotify_add_watch(fd, os.fsencode(folder), _IN_CREATE | _IN_MOVED_TO) < 0:
        os.close(fd)
        return None
    return fd


def container_procs(container_id: str) -> Path | None:
    """The ``cgroup.procs`` file of a container's cgroup on this host, at the engine's usual
    places (cgroup v2, or v1's ``pids``/``memory`` hierarchies; cgroupfs or systemd driver),
    found without asking the engine; None when this host does not see it (a remote engine)."""
    for pattern in CONTAINER_CGROUPS:
        rel = pattern.format(id=container_id)
        for hierarchy in ("", "pids", "memory"):
            procs = CGROUP_ROOT / hierarchy / rel / "cgroup.procs"
            if procs.is_file():
                return procs
    return None


def _cgroup_pids(procs: Path) -> list[int]:
    try:
        return [int(line) for line in procs.read_text().split()]
    except (OSError, ValueError):  # the cgroup is gone: the container has exited
        return []


def _in_cgroup_of(pid: int, container_id: str) -> bool:
    try:
        return container_id in Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return False


__all__ = ["OutputLimits", "OutputWatcher", "Usage", "container_procs", "measure"]
