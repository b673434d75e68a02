"""``algodock usage``: what an algorithm used over its last runs, from the store's lineage."""

from __future__ import annotations

import statistics
from datetime import datetime, timezone
from typing import Any

from algodock.errors import InvalidInput
from algodock.runtime.usage import sizing_hint

FIGURES = ("peak_memory_bytes", "cpu_seconds", "wall_seconds", "output_bytes", "output_files")


def _matches(step: Any, target: str) -> bool:
    if target in (step.id, step.algorithm, step.image):
        return True
    image_id = step.image_id or ""
    return bool(image_id) and target.removeprefix("sha256:") and image_id.removeprefix("sha256:").startswith(target.removeprefix("sha256:")) and len(target.removeprefix("sha256:")) >= 12


def usage_history(store: Any, target: str, last: int = 20) -> dict[str, Any]:
    """Median and max of each usage figure over the last ``last`` runs of a step id, algorithm or image.

    Runs that used no container (cached, skipped) are left out.
    """
    from algodock.lineage.queries import documents

    runs = []
    for doc in documents(store):
        for step in doc.steps:
            if step.usage is None or not _matches(step, target):
                continue
            runs.append((step.started_at or datetime.min.replace(tzinfo=timezone.utc), doc.run_id, step))
    if not runs:
        raise InvalidInput(f"no run in {store.uri('runs')} has usage for {target!r} (give a step id, algorithm name, image or image id)")
    runs.sort(key=lambda r: r[0])
    runs = runs[-last:]
    figures: dict[str, Any] = {}
    for name in FIGURES:
        values = [getattr(s.usage, name) for _, _, s in runs if getattr(s.usage, name) is not None]
        figures[name] = {"median": statistics.median(values) if values else None, "max": max(values) if values else None, "n": len(values)}
    latest = runs[-1][2]
    memory_gb = (latest.resource_request or {}).get("memory_gb")
    hint = sizing_hint({"peak_memory_bytes": figures["peak_memory_bytes"]["max"]}, memory_gb) if memory_gb else None
    return {
        "target": target,
        "runs": len(runs),
        "run_ids": [r for _, r, _ in runs],
        "resource_request": latest.resource_request,
        "figures": figures,
        "hint": hint,
    }
