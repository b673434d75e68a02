"""Reading lineage back: show a run, trace an output to its sources, verify stored outputs.

The lineage document of a run (:class:`LineageDocument`, ``runs/<run_id>/lineage.json`` in
the store) is written by the flow as each step ends. This module answers questions about it:

* :func:`read_document` — the document of one run;
* :func:`trace` — walk a file back through the steps that produced it, to the pipeline's
  external inputs, naming each step's immutable image id on the way;
* :func:`replays` — the replays recorded beside a run;
* :func:`verify_run` — re-hash every stored output of a run (local or S3) and name those
  whose bytes no longer match the recorded sha256.

Hashes follow :mod:`algodock.hashing`: a file's sha256 is that of its bytes; a folder's is
the sha256 of the ``sha256sum``-style listing of its files (``"<hex>  <relative path>\\n"``,
sorted by path).

Neither click nor rich is imported here: the ``algodock lineage`` commands are in
:mod:`algodock.lineage.commands`, the drawing in :mod:`algodock.lineage.render`.

>>> import tempfile
>>> from algodock.store.backends import open_store
>>> store = open_store(tempfile.mkdtemp())
>>> store.write_json("runs/r1/lineage.json", LineageDocument(run_id="r1", pipeline="p", spec_sha256="0", store=store.uri()).model_dump(mode="json"))
>>> read_document(store, "r1").pipeline, run_ids(store)
('p', ['r1'])
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from algodock.errors import InvalidInput
from algodock.records import LineageDocument, OutputRecord, StepRecord
from algodock.store.base import Store
from algodock.store.content import hash_uri, store_rel
from algodock.store.layout import lineage_rel, local_path_of, run_json_rel

__all__ = [
    "LineageDocument",
    "OutputCheck",
    "hash_uri",
    "locate_output",
    "read_document",
    "replays",
    "run_ids",
    "trace",
    "verify_run",
]

_RUN_REL = re.compile(r"^runs/(?P<run>[^/]+)/steps/(?P<step>[^/]+)/(?:attempts/[^/]+/)?outputs/(?P<file>[^/]+)(?:/(?P<member>.+))?$")


# ---------------------------------------------------------------- documents


def read_document(store: Store, run_id: str) -> LineageDocument:
    """The lineage document of ``run_id``; :class:`InvalidInput` naming the known runs when absent."""
    raw = store.read_json(lineage_rel(run_id))
    if raw is None:
        summary = store.read_json(run_json_rel(run_id))
        removed = [c for c in (summary or {}).get("collected") or [] if isinstance(c, dict) and c.get("removed")] if isinstance(summary, dict) else []
        if removed:
            raise InvalidInput(f"run {run_id!r} was removed by algodock gc {removed[-1].get('gc_id')} at {removed[-1].get('at')}; its record is {store.uri(run_json_rel(run_id))}")
        known = run_ids(store)
        hint = f"runs in this store: {', '.join(known[-10:])}" if known else "this store has no runs yet"
        raise InvalidInput(f"run {run_id!r} has no lineage document at {store.uri(lineage_rel(run_id))} ({hint})")
    try:
        doc = LineageDocument.model_validate(raw)
    except ValidationError as exc:
        raise InvalidInput(f"{store.uri(lineage_rel(run_id))} is not a lineage document: {exc}") from exc
    return _dead_writer(store, doc)


def _dead_writer(store: Store, doc: LineageDocument) -> LineageDocument:
    """A document left ``running`` by a process that died reads as failed, saying so (never ``running``)."""
    if doc.status != "running":
        return doc
    from algodock.store.lease import describe, run_abandoned
    from algodock.records import Failure

    lease = run_abandoned(store, doc.run_id)
    if lease is None:
        return doc
    message = f"the algodock process that wrote this run died ({describe(lease)}); run it again with --run-id {doc.run_id} to resume"
    doc.status = "failed"
    for step in doc.steps:
        if step.status in ("running", "pending"):
            step.status = "failed"
            step.failure = Failure(kind="infrastructure", message=message)
    return doc


def run_ids(store: Store) -> list[str]:
    """Ids of the runs that have a lineage document, sorted."""
    return [r for r in store.list("runs") if store.exists(lineage_rel(r))]


def documents(store: Store) -> Iterator[LineageDocument]:
    """Every readable lineage document of the store (unreadable ones are skipped)."""
    for run_id in store.list("runs"):
        raw = store.read_json(lineage_rel(run_id))
        if raw is None:
            continue
        try:
            yield LineageDocument.model_validate(raw)
        except ValidationError:
            continue


def replays(store: Store, run_id: str) -> list[dict[str, Any]]:
    """The replays recorded beside the run (``runs/<run>/replays/*.json``, see algodock.lineage.replay), oldest first."""
    found = [store.read_json(f"runs/{run_id}/replays/{name}") for name in store.list(f"runs/{run_id}/replays")]
    return sorted((r for r in found if isinstance(r, dict)), key=lambda r: str(r.get("at")))


# ---------------------------------------------------------------- verify


@dataclass(frozen=True)
class OutputCheck:
    """The verdict on one stored output of a run."""

    step: str
    output: str
    uri: str
    expected: str
    actual: str | None
    status: str
    """``ok``, ``changed`` (bytes differ), ``missing`` (nothing there) or ``uncommitted`` (S3 marker gone)."""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def verify_run(store: Store, run_id: str) -> list[OutputCheck]:
    """Re-hash every output recorded in the run's lineage (cached steps' reused outputs too)."""

    doc = read_document(store, run_id)
    checks: list[OutputCheck] = []
    seen: dict[str, str | None] = {}
    for step in doc.steps:
        for out in step.outputs:
            rel = store_rel(store, out.uri)
            if rel is not None and rel.startswith("runs/") and store.exists(rel) and not store.output_exists(rel):
                checks.append(OutputCheck(step.id, out.name, out.uri, out.sha256, None, "uncommitted"))
                continue
            if out.uri not in seen:
                try:
                    seen[out.uri] = hash_uri(out.uri, store)
                except FileNotFoundError:
                    seen[out.uri] = None
            actual = seen[out.uri]
            status = "missing" if actual is None else ("ok" if actual == out.sha256 else "changed")
            checks.append(OutputCheck(step.id, out.name, out.uri, out.sha256, actual, status))
    return checks


# ---------------------------------------------------------------- trace


@dataclass
class Located:
    """Where an output sits in a run's lineage."""

    doc: LineageDocument
    step: StepRecord
    output: OutputRecord
    member: str | None = None
    """The file inside a folder output that was asked about, if any."""


def _norm(uri: str) -> str:
    """A comparable form: ``s3://bucket/key`` without a trailing slash, or a real absolute local path."""
    if uri.startswith("s3://"):
        return "s3://" + uri.removeprefix("s3://").strip("/")
    local = local_path_of(uri)
    assert local is not None
    return os.path.realpath(local.expanduser())


def _match(target: str, out_uri: str) -> tuple[bool, str | None]:
    """Does ``target`` (normalized) name ``out_uri`` or a file inside it?"""
    candidate = _norm(out_uri)
    if target == candidate:
        return True, None
    if target.startswith(candidate + "/"):
        return True, target[len(candidate) + 1 :]
    return False, None


def _producer_rank(loc: Located) -> tuple[int, str]:
    # The step that actually ran beats the steps that reused its outputs; newer runs beat older.
    return (0 if loc.step.status == "succeeded" else 1, "~" if loc.doc.started_at is None else loc.doc.started_at.isoformat())


def locate_output(store: Store, path_or_uri: str) -> Located:
    """Find the step whose output ``path_or_uri`` is (or lies inside).

    By location first: a path in the store's ``runs/<run>/steps/<step>/outputs/`` names its
    run; anything else is looked up in every run's lineage. Failing that, a readable file or
    folder is hashed and matched by sha256 (a copy of an output is traced too).
    """
    target = _norm(path_or_uri)
    root = _norm(store.uri())
    rel = target[len(root) + 1 :] if target.startswith(root + "/") else ""
    m = _RUN_REL.match(rel)
    docs: list[LineageDocument]
    if m and store.exists(lineage_rel(m["run"])):
        docs = [read_document(store, m["run"])]
    else:
        docs = list(documents(store))
    found = _by_location(docs, target)
    if not found and m:  # the run named by the path did not record it; look everywhere
        docs = list(documents(store))
        found = _by_location(docs, target)
    if not found:
        try:
            digest = hash_uri(path_or_uri, store)
        except FileNotFoundError:
            raise InvalidInput(f"{path_or_uri}: no such file, and no run in {store.uri()} recorded an output there") from None
        found = [Located(d, s, o) for d in docs for s in d.steps for o in s.outputs if o.sha256 == digest]
        if not found:
            raise InvalidInput(f"{path_or_uri}: no run in {store.uri()} recorded an output at this location or with its sha256 {digest}")
    return min(found, key=_producer_rank)


def _by_location(docs: list[LineageDocument], target: str) -> list[Located]:
    found = []
    for doc in docs:
        for step in doc.steps:
            for out in step.outputs:
                hit, member = _match(target, out.uri)
                if hit:
                    found.append(Located(doc, step, out, member))
    return found


def _producer(step: StepRecord, doc: LineageDocument) -> dict[str, Any]:
    return {
        "run_id": doc.run_id,
        "step": step.id,
        "status": step.status,
        "cached_from": step.cached_from,
        "algorithm": step.algorithm,
        "algorithm_version": step.algorithm_version,
        "image": step.image,
        "image_id": step.image_id,
        "repo_digest": step.repo_digest,
        "command": step.command,
        "parameters": step.parameters,
        "started_at": step.started_at.isoformat() if step.started_at else None,
        "finished_at": step.finished_at.isoformat() if step.finished_at else None,
    }


def _node(doc: LineageDocument, step: StepRecord, out: OutputRecord, member: str | None, depth: int) -> dict[str, Any]:
    node: dict[str, Any] = {
        "uri": out.uri,
        "member": member,
        "output": out.name,
        "sha256": out.sha256,
        "format": out.format,
        "rows": out.rows,
        "schema": out.schema_,
        "producer": _producer(step, doc),
        "inputs": [],
    }
    if depth > 256:  # a DAG cannot be this deep; a corrupt document might loop
        node["error"] = "lineage too deep (a cycle in the document?)"
        return node
    for inp in step.inputs:
        item: dict[str, Any] = {"name": inp.name, "uri": inp.uri, "sha256": inp.sha256, "rows": inp.rows, "external": inp.produced_by is None}
        if inp.produced_by is not None:
            try:
                upstream = doc.step(inp.produced_by)
            except StopIteration:
                item["error"] = f"step {inp.produced_by!r} is not in run {doc.run_id}'s lineage"
            else:
                target = _norm(inp.uri)
                src = next((o for o in upstream.outputs if _match(target, o.uri)[0]), None) or next(
                    (o for o in upstream.outputs if o.sha256 == inp.sha256), None
                )
                if src is None:
                    item["error"] = f"step {upstream.id} recorded no output {inp.uri}"
                else:
                    item["from"] = _node(doc, upstream, src, None, depth + 1)
        node["inputs"].append(item)
    return node


def _flatten(node: dict[str, Any], externals: dict[str, dict[str, Any]], images: dict[str, dict[str, Any]]) -> None:
    p = node["producer"]
    images.setdefault(p["step"], {"step": p["step"], "image": p["image"], "image_id": p["image_id"], "repo_digest": p["repo_digest"]})
    for inp in node["inputs"]:
        if inp["external"]:
            externals.setdefault(inp["uri"], {"name": inp["name"], "uri": inp["uri"], "sha256": inp["sha256"]})
        elif "from" in inp:
            _flatten(inp["from"], externals, images)


def trace(store: Store, path_or_uri: str) -> dict[str, Any]:
    """The lineage tree of one output: its producer, that step's inputs, their producers, … down to external inputs.

    Returns ``{"query", "run_id", "tree", "external_inputs", "images"}``; ``tree`` nests
    ``{"uri", "output", "sha256", "producer": {..., "image_id", ...}, "inputs": [{"name",
    "uri", "sha256", "external", "from": <tree>}]}``.
    """
    loc = locate_output(store, path_or_uri)
    tree = _node(loc.doc, loc.step, loc.output, loc.member, 0)
    externals: dict[str, dict[str, Any]] = {}
    images: dict[str, dict[str, Any]] = {}
    _flatten(tree, externals, images)
    return {
        "query": path_or_uri,
        "run_id": loc.doc.run_id,
        "tree": tree,
        "external_inputs": list(externals.values()),
        "images": list(images.values()),
    }
