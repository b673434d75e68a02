"""What a step really used, read from the engine's cgroup accounting while the container runs.

Peak memory and CPU seconds come from the kernel's own counters for the container's cgroup,
found from the container's pid (``/proc/<pid>/cgroup``), so the engine's layout (cgroupfs or
systemd driver, cgroup v1 or v2) does not matter:

- cgroup v1: ``memory.max_usage_in_bytes`` (already a peak) and ``cpuacct.usage`` (ns);
- cgroup v2: ``memory.peak`` when the kernel has it (5.19+), else the highest sampled
  ``memory.current``; ``cpu.stat`` ``usage_usec``.

The engine removes the cgroup as soon as the container exits, so a thread samples every
``interval`` seconds (20 ms; 10 ms in the first second) and the figures are the last sample before the exit (CPU seconds may
miss at most one interval). A remote engine (no local cgroup to read) falls back to the
engine's stats API (``docker stats``), whose samples come about once a second; when neither
answers, the figure is None, never a guess.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from algodock.records import Usage

if TYPE_CHECKING:
    import docker
    from docker.models.containers import Container

log = logging.getLogger("algodock.runtime.usage")

CGROUP_ROOT = Path(os.environ.get("ALGODOCK_CGROUP_ROOT", "/sys/fs/cgroup"))
SAMPLE_INTERVAL = float(os.environ.get("ALGODOCK_USAGE_INTERVAL", "0.02"))
PID_LOOKUP_DELAY = 0.25
"""When a container's cgroup is not at the engine's usual places, how long the sampler waits for the
step's own wait to end before asking the engine for the pid (a short container has often exited:
then no engine call is made). The CPU total and, on cgroup v1 and v2 from Linux 5.19, the memory
peak are kept by the kernel, so starting later loses nothing there."""


@dataclass(frozen=True)
class CgroupFiles:
    """The accounting files of one container's cgroup."""

    version: int
    memory_peak: Path | None
    """v1 ``memory.max_usage_in_bytes`` or v2 ``memory.peak``; None when the kernel has none."""
    memory_current: Path | None
    cpu: Path | None
    """v1 ``cpuacct.usage`` (ns) or v2 ``cpu.stat`` (``usage_usec``)."""


def _v1_dir(controllers: str, rel: str, wanted: str) -> Path | None:
    """The folder of a v1 hierarchy mounted as ``controllers`` (``cpu,cpuacct``) or as ``wanted``."""
    rel = rel.lstrip("/")
    for name in (controllers, wanted, *controllers.split(","), "cpu,cpuacct" if wanted == "cpuacct" else wanted):
        d = CGROUP_ROOT / name / rel
        if d.is_dir():
            return d
    return None


def cgroup_files(pid: int) -> CgroupFiles | None:
    """The accounting files of the cgroup of process ``pid`` on this host; None when not visible."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return None
    return cgroup_files_of(text)


CONTAINER_CGROUPS = ("docker/{id}", "system.slice/docker-{id}.scope")
"""Where the engine puts a container's cgroup with the cgroupfs and the systemd drivers."""


def container_cgroup_files(container_id: str) -> CgroupFiles | None:
    """The accounting files of a container's cgroup at the engine's usual places, found without
    asking the engine (so the first sample comes at once); None elsewhere (then use its pid)."""
    for pattern in CONTAINER_CGROUPS:
        rel = "/" + pattern.format(id=container_id)
        if (CGROUP_ROOT / "memory" / rel.lstrip("/")).is_dir():
            return cgroup_files_of(f"1:memory:{rel}\n2:cpuacct:{rel}\n")
        if (CGROUP_ROOT / rel.lstrip("/") / "cgroup.controllers").exists():
            return cgroup_files_of(f"0::{rel}\n")
    return None


def cgroup_files_of(proc_cgroup: str) -> CgroupFiles | None:
    """The accounting files named by a ``/proc/<pid>/cgroup`` text, under :data:`CGROUP_ROOT`."""
    lines = proc_cgroup.splitlines()
    v1: dict[str, str] = {}
    unified: str | None = None
    for line in lines:
        hid, _, rest = line.partition(":")
        controllers, _, rel = rest.partition(":")
        if hid == "0" and controllers == "":
            unified = rel
        for c in controllers.split(","):
            if c:
                v1[c] = f"{controllers}\0{rel}"
    if "memory" in v1 or "cpuacct" in v1:
        mem_dir = _v1_dir(*v1["memory"].split("\0"), "memory") if "memory" in v1 else None
        cpu_dir = _v1_dir(*v1["cpuacct"].split("\0"), "cpuacct") if "cpuacct" in v1 else None
        if mem_dir or cpu_dir:
            return CgroupFiles(
                1,
                mem_dir / "memory.max_usage_in_bytes" if mem_dir else None,
                mem_dir / "memory.usage_in_bytes" if mem_dir else None,
                cpu_dir / "cpuacct.usage" if cpu_dir else None,
            )
    if unified is not None:
        d = CGROUP_ROOT / unified.lstrip("/")
        if (d / "cgroup.controllers").exists() or (d / "memory.current").exists():
            peak = d / "memory.peak"
            return CgroupFiles(
                2,
                peak if peak.exists() else None,
                d / "memory.current" if (d / "memory.current").exists() else None,
                d / "cpu.stat" if (d / "cpu.stat").exists() else None,
            )
    return None


def _read_int(path: Path | None) -> int | None:
    if path is None:
        return None
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _read_cpu_seconds(files: CgroupFiles) -> float | None:
    if files.cpu is None:
        return None
    try:
        text = files.cpu.read_text()
    except OSError:
        return None
    if files.version == 1:
        try:
            return int(text.split()[0]) / 1e9
        except (ValueError, IndexError):
            return None
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "usage_usec":
            return int(value) / 1e6
    return None


class UsageSampler:
    """Samples a running container's cgroup (or the engine's stats) in a thread.

    >>> sampler = UsageSampler.start(client, container)   # doctest: +SKIP
    >>> container.wait(); usage = sampler.stop()          # doctest: +SKIP
    >>> usage.peak_memory_bytes, usage.cpu_seconds        # doctest: +SKIP
    (314572800, 2.01)
    """

    def __init__(self, interval: float = SAMPLE_INTERVAL) -> None:
        self.interval = interval
        self.peak: int | None = None
        self.cpu: float | None = None
        self.source: str | None = None
        """Where the figures come from: ``cgroup-v1``, ``cgroup-v2`` or ``stats-api``."""
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stats_stream: Any = None

    @classmethod
    def start(cls, client: docker.DockerClient, container: Container, *, interval: float = SAMPLE_INTERVAL, use_cgroup: bool = True) -> UsageSampler:
        """Start sampling ``container`` (just started) in a thread: its local cgroup, else the stats API.

        Everything, the engine call for the pid included, happens in the thread: a slow engine
        never delays the step, it only leaves the figures unknown.
        """
        sampler = cls(interval)
        sampler._thread = threading.Thread(target=sampler._run, args=(client, container.id, use_cgroup), name="algodock-usage", daemon=True)
        sampler._thread.start()
        return sampler

    def _run(self, client: docker.DockerClient, container_id: str, use_cgroup: bool) -> None:
        files = container_cgroup_files(container_id) if use_cgroup else None
        if use_cgroup and files is None:
            # Not at the usual places: the container may have exited already (a short one often
            # has); give its wait a moment to say so before asking the engine for its pid.
            if self._stop.wait(PID_LOOKUP_DELAY):
                return  # the container has exited and been waited for: nothing left to sample
            try:
                state = client.api.inspect_container(container_id).get("State") or {}
            except Exception as exc:  # an engine hiccup must not fail the step: usage is then unknown
                log.debug("usage: cannot inspect %s: %s", container_id, exc)
                state = {"Running": True}
            if not state.get("Running", True):
                return  # it exited before its first sample: its stats would only be zeros
            pid = int(state.get("Pid") or 0)
            files = cgroup_files(pid) if pid else None
        if files is not None:
            self.source = f"cgroup-v{files.version}"
            self._cgroup_loop(files)
        elif not self._stop.is_set():
            self.source = "stats-api"
            self._stats_loop(client, container_id)

    # ----------------------------------------------------------------- cgroup files

    def _sample_cgroup(self, files: CgroupFiles) -> bool:
        """Read once; False when the cgroup is gone (the container has exited)."""
        peak = _read_int(files.memory_peak)
        current = _read_int(files.memory_current)
        cpu = _read_cpu_seconds(files)
        if peak is None and current is None and cpu is None:
            return False
        for value in (peak, current):
            if value is not None and (self.peak is None or value > self.peak):
                self.peak = value
        if cpu is not None:
            self.cpu = cpu
        return True

    def _cgroup_loop(self, files: CgroupFiles) -> None:
        while not self._stop.is_set():
            if not self._sample_cgroup(files):
                return
            # Faster in the first second: a short container must not exit between two samples.
            early = time.monotonic() - self._started < 1.0
            self._stop.wait(min(self.interval, 0.01) if early else self.interval)

    # ----------------------------------------------------------------- stats API

    def _stats_loop(self, client: docker.DockerClient, container_id: str) -> None:
        try:
            self._stats_stream = client.api.stats(container_id, stream=True, decode=True)
            for stats in self._stats_stream:
                self._take_stats(stats)
                if self._stop.is_set():
                    return
        except Exception as exc:  # the stream ends with the container; an error leaves usage unknown
            log.debug("usage: stats stream of %s ended: %s", container_id, exc)

    def _take_stats(self, stats: dict[str, Any]) -> None:
        mem = stats.get("memory_stats") or {}
        for value in (mem.get("max_usage"), mem.get("usage")):
            if isinstance(value, int) and value > 0 and (self.peak is None or value > self.peak):
                self.peak = value
        total = ((stats.get("cpu_stats") or {}).get("cpu_usage") or {}).get("total_usage")
        if isinstance(total, int) and total > 0:
            self.cpu = total / 1e9

    # ----------------------------------------------------------------- end

    def stop(self) -> Usage:
        """Stop sampling (the container has exited) and return the figures."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.interval + 1 if self.source != "stats-api" else 2)
        # Copied at once: a thread still blocked on the engine must not change them later.
        peak, cpu = self.peak, self.cpu
        if self._stats_stream is not None:
            try:
                self._stats_stream.close()
            except Exception:  # already closed by the engine
                pass
        log.debug("usage from %s: peak %s bytes, %s cpu s", self.source, peak, cpu)
        return Usage(
            peak_memory_bytes=peak,
            cpu_seconds=round(cpu, 3) if cpu is not None else None,
            wall_seconds=round(time.monotonic() - self._started, 3),
        )


def output_totals(output_dir: Path) -> tuple[int, int]:
    """(bytes of regular files, files plus folders) under ``output_dir``; symlinks are not followed."""
    total = count = 0
    for root, dirs, files in os.walk(output_dir):
        count += len(dirs) + len(files)
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if not os.path.islink(os.path.join(root, name)):
                total += st.st_size
    return total, count


def sizing_hint(usage: Usage | dict[str, Any] | None, memory_gb: float) -> str | None:
    """A right-sizing hint when the peak is under half the request or over 90% of it, else None.

    >>> sizing_hint({"peak_memory_bytes": 100 * 2**20}, 4)
    'peak memory 100 MiB is 2% of the 4 GB request: resource_request.memory_gb 0.25 would do'
    >>> sizing_hint({"peak_memory_bytes": 950 * 2**20}, 1)
    'peak memory 950 MiB is 93% of the 1 GB request: raise resource_request.memory_gb to 1.5'
    """
    peak = usage.get("peak_memory_bytes") if isinstance(usage, dict) else (usage.peak_memory_bytes if usage else None)
    if not peak:
        return None
    limit = memory_gb * 1024**3
    share = peak / limit
    if 0.5 <= share <= 0.9:
        return None
    verb = "would do" if share < 0.5 else None
    suggested = suggest_memory_gb(peak)
    if verb and suggested >= memory_gb:
        return None  # already the smallest request we would suggest
    head = f"peak memory {fmt_bytes(peak)} is {share:.0%} of the {memory_gb:g} GB request"
    if verb:
        return f"{head}: resource_request.memory_gb {suggested:g} {verb}"
    return f"{head}: raise resource_request.memory_gb to {max(suggested, memory_gb * 1.5):g}"


def suggest_memory_gb(peak_bytes: int) -> float:
    """A request with 50% headroom over ``peak_bytes``, rounded up to a quarter GB.

    >>> suggest_memory_gb(300 * 2**20)
    0.5
    """
    quarters = -(-(peak_bytes * 1.5) // (1024**3 / 4))
    return max(0.25, quarters / 4)


def fmt_bytes(n: int | float | None) -> str:
    """Human bytes in binary units: ``fmt_bytes(314572800) == '300 MiB'``."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit in ("B", "KiB", "MiB") else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def usage_text(usage: dict[str, Any] | Usage | None) -> str:
    """One short line: ``mem 300 MiB, cpu 2.01 s, wall 2.3 s, out 1.2 MiB/3``."""
    if usage is None:
        return ""
    u = usage.as_dict() if isinstance(usage, Usage) else usage
    parts = [f"mem {fmt_bytes(u.get('peak_memory_bytes'))}"]
    if u.get("cpu_seconds") is not None:
        parts.append(f"cpu {u['cpu_seconds']:.2f} s")
    if u.get("wall_seconds") is not None:
        parts.append(f"wall {u['wall_seconds']:.1f} s")
    if u.get("output_bytes") is not None:
        parts.append(f"out {fmt_bytes(u['output_bytes'])}/{u.get('output_files')}")
    return ", ".join(parts)
