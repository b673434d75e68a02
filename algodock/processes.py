"""Which process owns a container or a run lease: a pid and its start time, so that a pid
reused by another process after the owner died is not mistaken for the owner."""

from __future__ import annotations


def process_start(pid: int) -> str:
    """Start time of a process in clock ticks since boot ('' when unknown): tells pid reuse apart."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""
