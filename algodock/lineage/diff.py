"""Two runs side by side, step by step (``algodock lineage diff RUN_A RUN_B``).

For every step id of either run: image ids, parameters, input and output hashes, status and
usage of each side, and which of them are the same. A step in one run only is listed as
such (``"in": "a"`` or ``"b"``).

>>> from algodock.records import StepRecord
>>> side(StepRecord(id="s", status="cached", image_id="sha256:1"))["status"]
'cached'
"""

from __future__ import annotations

from typing import Any

from algodock.lineage.queries import read_document
from algodock.records import StepRecord
from algodock.store.base import Store

COMPARED = ("image_id", "parameters", "inputs", "outputs", "status")
"""The parts whose sameness is reported (usage differs from run to run and is only shown)."""


def side(step: StepRecord) -> dict[str, Any]:
    """One run's view of one step."""
    return {
        "status": step.status,
        "image": step.image,
        "image_id": step.image_id,
        "parameters": step.parameters,
        "inputs": {i.name: i.sha256 for i in step.inputs},
        "outputs": {o.name: o.sha256 for o in step.outputs},
        "cached_from": step.cached_from,
        "failure": step.failure.kind if step.failure else None,
        "usage": step.usage.as_dict() if step.usage else None,
    }


def diff_runs(store: Store, run_a: str, run_b: str) -> dict[str, Any]:
    """``{"run_a", "run_b", "steps": [{"step", "in", "a", "b", "same": {part: bool}}], "identical_outputs"}``."""
    a, b = read_document(store, run_a), read_document(store, run_b)
    steps_a, steps_b = {s.id: s for s in a.steps}, {s.id: s for s in b.steps}
    order = [s.id for s in a.steps] + [s.id for s in b.steps if s.id not in steps_a]
    rows = []
    for step_id in order:
        sa, sb = steps_a.get(step_id), steps_b.get(step_id)
        row: dict[str, Any] = {"step": step_id, "in": "both" if sa and sb else ("a" if sa else "b"), "a": side(sa) if sa else None, "b": side(sb) if sb else None}
        if sa and sb:
            row["same"] = {part: row["a"][part] == row["b"][part] for part in COMPARED}
        rows.append(row)
    identical = all(r["in"] == "both" and r["same"]["outputs"] for r in rows)
    return {"run_a": run_a, "run_b": run_b, "pipeline_a": a.pipeline, "pipeline_b": b.pipeline, "steps": rows, "identical_outputs": identical}


def _short(value: str | None) -> str:
    return (value or "").removeprefix("sha256:")[:12]


def _usage(u: dict[str, Any] | None) -> str:
    if not u:
        return "-"
    wall = f"{u['wall_seconds']:.1f} s" if u.get("wall_seconds") is not None else "-"
    mem = f"{u['peak_memory_bytes'] / 2**20:.0f} MiB" if u.get("peak_memory_bytes") is not None else "-"
    return f"wall {wall}, peak memory {mem}"


def render(result: dict[str, Any]) -> str:
    """The text of ``algodock lineage diff``: one block per step, ``=`` for a part that is the same."""
    lines = [f"{result['run_a']} ({result['pipeline_a']})  vs  {result['run_b']} ({result['pipeline_b']})"]
    for row in result["steps"]:
        if row["in"] != "both":
            only = row["a"] or row["b"]
            lines.append(f"{row['step']}: only in {result['run_a'] if row['in'] == 'a' else result['run_b']} ({only['status']})")
            continue
        a, b, same = row["a"], row["b"], row["same"]
        lines.append(f"{row['step']}: {a['status']} | {b['status']}")
        lines.append(f"  image id    {'=' if same['image_id'] else '≠'} {_short(a['image_id'])} | {_short(b['image_id'])}")
        if not same["parameters"]:
            keys = sorted(set(a["parameters"]) | set(b["parameters"]))
            changed = [f"{k}: {a['parameters'].get(k)!r} | {b['parameters'].get(k)!r}" for k in keys if a["parameters"].get(k) != b["parameters"].get(k)]
            lines.append(f"  parameters  ≠ {'; '.join(changed)}")
        for part in ("inputs", "outputs"):
            names = sorted(set(a[part]) | set(b[part]))
            cells = [f"{n} {_short(a[part].get(n))} | {_short(b[part].get(n))}" for n in names]
            lines.append(f"  {part:<11} {'=' if same[part] else '≠'} {'; '.join(cells)}")
        if a["usage"] or b["usage"]:
            lines.append(f"  usage       {_usage(a['usage'])} | {_usage(b['usage'])}")
    return "\n".join(lines)


__all__ = ["COMPARED", "diff_runs", "render", "side"]
