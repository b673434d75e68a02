"""Why a step ran (``algodock cache explain RUN_ID STEP``): which part of its cache key changed.

Every cache lookup keeps the step's key document beside its run
(``runs/<run>/keys/<step>.json``, see :func:`algodock.cache.key_document`). For a step
that ran, :func:`explain` finds the nearest earlier step in the store with the same pipeline
and step id (else the same algorithm) and compares the two documents part by part: image id
(with the tags), command, environment, each parameter after defaults, the GPU request, each
input (added, removed, its files renamed, its sha256 or its source URI changed) and whether
the run had ``--no-cache``. For a cached step it names the run and step it reused; for a step
with no earlier one, it says so. Runs recorded before key documents were kept are compared by
what their lineage recorded (image id, command, parameters, GPU, input hashes and URIs).

>>> differences({"image_id": "sha256:a", "parameters": {"k": 1}}, {"image_id": "sha256:a", "parameters": {"k": 2}})
[{'part': 'parameter', 'name': 'k', 'old': 1, 'new': 2}]
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from algodock.cache import keys_rel
from algodock.errors import InvalidInput
from algodock.lineage.queries import documents, read_document
from algodock.records import LineageDocument, StepRecord
from algodock.store.base import Store
from algodock.store.layout import cache_rel

_ABSENT = None
_EPOCH = datetime.min.replace(tzinfo=timezone.utc)


def _inputs_of_document(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    algo_input = doc.get("algo_input") or {}
    if "input_data" in algo_input:
        return {
            d["name"]: {"sha256": d.get("sha256"), "source_uri": d.get("source_uri"), "files": list(d.get("files") or [])}
            for d in algo_input["input_data"]
        }
    sources = dict(tuple(p) for p in algo_input.get("sources") or [])
    return {slot: {"sha256": sha, "source_uri": sources.get(slot), "files": None} for slot, sha in doc.get("inputs") or []}


def view_of_key(keys: dict[str, Any]) -> dict[str, Any]:
    """The comparable parts of a kept key document (``runs/<run>/keys/<step>.json``)."""
    doc = keys.get("document") or {}
    return {
        "cache_version": doc.get("cache_version"),
        "image_id": doc.get("image_id"),
        "image": keys.get("image"),
        "command": doc.get("command"),
        "env": doc.get("env"),
        "parameters": doc.get("parameters") or {},
        "gpu": doc.get("gpu"),
        "shm_mb": doc.get("shm_mb"),
        "input_slots": doc.get("input_slots"),
        "output_slots": doc.get("output_slots"),
        "inputs": _inputs_of_document(doc),
        "no_cache": keys.get("use_cache") is False,
    }


def view_of_record(step: StepRecord) -> dict[str, Any]:
    """What a lineage record alone says of the key (runs without a kept key document)."""
    return {
        "image_id": step.image_id,
        "image": step.image,
        "command": step.command,
        "parameters": step.parameters,
        "gpu": (step.resource_request or {}).get("gpu", 0),
        "inputs": {i.name: {"sha256": i.sha256, "source_uri": i.uri, "files": None} for i in step.inputs},
    }


def _input_changes(old: dict[str, dict[str, Any]], new: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    changes: list[dict[str, Any]] = []
    for slot in sorted(set(old) | set(new)):
        a, b = old.get(slot), new.get(slot)
        if a is None or b is None:
            changes.append({"part": "input", "slot": slot, "change": "added" if a is None else "removed", "old": a and a.get("source_uri"), "new": b and b.get("source_uri")})
            continue
        if a["files"] is not None and b["files"] is not None and a["files"] != b["files"]:
            gone, came = sorted(set(a["files"]) - set(b["files"])), sorted(set(b["files"]) - set(a["files"]))
            if gone and came and len(gone) == len(came):  # (a folder's sha256 covers its file names: it changes too)
                changes.append({"part": "input", "slot": slot, "change": "renamed", "old": gone, "new": came})
            else:
                changes.append({"part": "input", "slot": slot, "change": "files", "old": gone, "new": came})
        if a["sha256"] != b["sha256"]:
            changes.append({"part": "input", "slot": slot, "change": "sha256", "old": a["sha256"], "new": b["sha256"]})
        if a["source_uri"] != b["source_uri"]:
            changes.append({"part": "input", "slot": slot, "change": "source_uri", "old": a["source_uri"], "new": b["source_uri"]})
    return changes


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[dict[str, Any]]:
    """Each part of the key that differs between two views, ``{"part", …, "old", "new"}``."""
    out: list[dict[str, Any]] = []
    if old.get("image_id") != new.get("image_id"):
        out.append({"part": "image_id", "old": old.get("image_id"), "new": new.get("image_id"), "old_tag": old.get("image"), "new_tag": new.get("image")})
    for part in ("cache_version", "command", "gpu", "shm_mb", "input_slots", "output_slots"):
        if part in old and part in new and old[part] != new[part]:
            out.append({"part": part, "old": old[part], "new": new[part]})
    if isinstance(old.get("env"), dict) and isinstance(new.get("env"), dict):
        for name in sorted(set(old["env"]) | set(new["env"])):
            if old["env"].get(name, _ABSENT) != new["env"].get(name, _ABSENT):
                out.append({"part": "env", "name": name, "old": old["env"].get(name), "new": new["env"].get(name)})
    a, b = old.get("parameters") or {}, new.get("parameters") or {}
    for name in sorted(set(a) | set(b)):
        if a.get(name, _ABSENT) != b.get(name, _ABSENT) or (name in a) != (name in b):
            out.append({"part": "parameter", "name": name, "old": a.get(name), "new": b.get(name)})
    out.extend(_input_changes(old.get("inputs") or {}, new.get("inputs") or {}))
    if new.get("no_cache"):
        out.append({"part": "no_cache", "old": False, "new": True})
    return out


def _step_of(doc: LineageDocument, step_id: str) -> StepRecord:
    found = [s for s in doc.steps if s.id == step_id]
    if not found:
        raise InvalidInput(f"run {doc.run_id!r} has no step {step_id!r} (its steps: {', '.join(s.id for s in doc.steps)})")
    return found[0]


def _view(store: Store, run_id: str, step: StepRecord) -> tuple[dict[str, Any], str]:
    keys = store.read_json(keys_rel(run_id, step.id))
    if isinstance(keys, dict) and isinstance(keys.get("document"), dict):
        return view_of_key(keys), "key document"
    return view_of_record(step), "lineage record"


def nearest_earlier(store: Store, doc: LineageDocument, step: StepRecord) -> tuple[LineageDocument, StepRecord, str] | None:
    """The latest step that started before ``doc`` and wrote or used a cache entry: same pipeline and step id, else same algorithm."""
    start = doc.started_at or _EPOCH
    same_step: list[tuple[datetime, LineageDocument, StepRecord]] = []
    same_algorithm: list[tuple[datetime, LineageDocument, StepRecord]] = []
    for other in documents(store):
        if other.run_id == doc.run_id or (other.started_at or _EPOCH) >= start:
            continue
        for s in other.steps:
            if s.status not in ("succeeded", "cached") or not s.cache_key:
                continue
            when = other.started_at or _EPOCH
            if other.pipeline == doc.pipeline and s.id == step.id:
                same_step.append((when, other, s))
            elif step.algorithm and s.algorithm == step.algorithm:
                same_algorithm.append((when, other, s))
    for found, match in ((same_step, "step"), (same_algorithm, "algorithm")):
        if found:
            _, other, s = max(found, key=lambda t: (t[0], t[1].run_id))
            return other, s, match
    return None


def explain(store: Store, run_id: str, step_id: str) -> dict[str, Any]:
    """Why ``step_id`` of ``run_id`` ran, or what it reused (see the module docstring)."""
    doc = read_document(store, run_id)
    step = _step_of(doc, step_id)
    result: dict[str, Any] = {"run_id": run_id, "step": step_id, "status": step.status, "cache_key": step.cache_key}
    if step.status == "cached":
        entry = store.read_json(cache_rel(step.cache_key)) if step.cache_key else None
        result["verdict"] = "cached"
        result["reused"] = {"run_id": step.cached_from, "step": (entry or {}).get("step_id")}
        return result
    if step.status not in ("succeeded", "failed"):
        result["verdict"] = "did_not_run"
        return result
    earlier = nearest_earlier(store, doc, step)
    if earlier is None:
        result["verdict"] = "no_earlier_entry"
        result["message"] = f"no earlier run in {store.uri()} has step {step_id!r} of pipeline {doc.pipeline!r} or algorithm {step.algorithm!r}"
        return result
    other, other_step, match = earlier
    new, new_from = _view(store, run_id, step)
    old, old_from = _view(store, other.run_id, other_step)
    if new_from != old_from:  # compare like with like
        new, old = view_of_record(step) | {"no_cache": new.get("no_cache", False)}, view_of_record(other_step)
    changes = differences(old, new)
    result["verdict"] = "key_changed" if [c for c in changes if c["part"] != "no_cache"] else ("no_cache" if changes else "same_key")
    result["compared_with"] = {"run_id": other.run_id, "step": other_step.id, "match": match, "cache_key": other_step.cache_key, "compared": old_from if new_from == old_from else "lineage record"}
    result["differences"] = changes
    if result["verdict"] == "same_key":
        entry = store.read_json(cache_rel(step.cache_key)) if step.cache_key else None
        result["message"] = (
            "the key is the same; the earlier entry was gone (removed by gc?) or its outputs were missing or changed in the store when this step looked"
            if entry is None or entry.get("run_id") == run_id
            else f"the key is the same; the entry of run {entry.get('run_id')} was not usable when this step looked (its outputs were missing or changed, or a gc was removing them)"
        )
    return result


def render(result: dict[str, Any]) -> str:
    """The text of ``algodock cache explain``."""
    head = f"run {result['run_id']} step {result['step']} ({result['status']})"
    verdict = result["verdict"]
    if verdict == "cached":
        return f"{head}: cached, reused step {result['reused']['step']} of run {result['reused']['run_id']}"
    if verdict == "did_not_run":
        return f"{head}: no container ran for it"
    if verdict == "no_earlier_entry":
        return f"{head}: ran: {result['message']}"
    cw = result["compared_with"]
    lines = [f"{head}: ran; compared with step {cw['step']} of run {cw['run_id']} (same {cw['match']})"]
    for c in result["differences"]:
        part = c["part"]
        if part == "image_id":
            lines.append(f"  image id  {c['old']} ({c['old_tag']}) -> {c['new']} ({c['new_tag']})")
        elif part in ("parameter", "env"):
            lines.append(f"  {part} {c['name']}: {c['old']!r} -> {c['new']!r}")
        elif part == "input":
            lines.append(f"  input {c['slot']}: {c['change']}: {c['old']} -> {c['new']}")
        elif part == "no_cache":
            lines.append("  --no-cache: the run asked to run every step")
        else:
            lines.append(f"  {part}: {c['old']!r} -> {c['new']!r}")
    if verdict == "same_key":
        lines.append(f"  {result['message']}")
    return "\n".join(lines)


__all__ = ["differences", "explain", "nearest_earlier", "render", "view_of_key", "view_of_record"]
