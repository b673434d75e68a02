"""Reading lineage back: show a run, trace an output to its sources, verify stored outputs.

The lineage document of a run (:class:`LineageDocument`, ``runs/<run_id>/lineage.json`` in
the store) is written by the flow as each step ends. This module answers questions about it:

* :func:`read_document` — the document of one run;
* :func:`trace` — walk a file back through the steps that produced it, to the pipeline's
  external inputs, naming each step's immutable image id on the way;
* :func:`verify_run` — re-hash every stored output of a run (local or S3) and name those
  whose bytes no longer match the recorded sha256.

Hashes follow :mod:`algodock.hashing`: a file's sha256 is that of its bytes; a folder's is
the sha256 of the ``sha256sum``-style listing of its files (``"<hex>  <relative path>\\n"``,
sorted by path).

The same as commands::

    algodock lineage RUN_ID [--store URI] [--json]
    algodock lineage trace PATH_OR_URI [--store URI] [--json]
    algodock lineage verify RUN_ID [--store URI] [--json]

>>> import tempfile
>>> from algodock.store.backends import open_store
>>> store = open_store(tempfile.mkdtemp())
>>> store.write_json("runs/r1/lineage.json", LineageDocument(run_id="r1", pipeline="p", spec_sha256="0", store=store.uri()).model_dump(mode="json"))
>>> read_document(store, "r1").pipeline, run_ids(store)
('p', ['r1'])
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import click
from pydantic import ValidationError

from algodock.errors import InvalidInput
from algodock.records import LineageDocument, OutputRecord, StepRecord
from algodock.store.backends import Store, lineage_rel, local_path_of, open_store
from algodock.store.content import hash_uri, store_rel

__all__ = [
    "LineageDocument",
    "OutputCheck",
    "hash_uri",
    "lineage_cli",
    "locate_output",
    "read_document",
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
        summary = store.read_json(f"runs/{run_id}/run.json")
        removed = [c for c in (summary or {}).get("collected") or [] if isinstance(c, dict) and c.get("removed")] if isinstance(summary, dict) else []
        if removed:
            raise InvalidInput(f"run {run_id!r} was removed by algodock gc {removed[-1].get('gc_id')} at {removed[-1].get('at')}; its record is {store.uri(f'runs/{run_id}/run.json')}")
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


# ---------------------------------------------------------------- rendering


def _short(digest: str | None, n: int = 12) -> str:
    if not digest:
        return ""
    return digest.removeprefix("sha256:")[:n]


def _duration(step: StepRecord) -> str:
    if step.started_at and step.finished_at:
        return f"{(step.finished_at - step.started_at).total_seconds():.1f}s"
    return ""


def schema_text(schema: dict[str, Any] | None) -> str:
    """An output's recorded Arrow schema on one line (``''`` when none was recorded): ``\n  a: int64, b: string``."""
    if not schema:
        return ""
    columns = ", ".join(f"{c['name']}: {c['type']}" + ("" if c.get("nullable", True) else " not null") for c in schema.get("columns", []))
    return f"\n  {columns}"


def render_document(doc: LineageDocument, console: Any) -> None:
    """A table of the run's steps on a rich console."""
    from rich.markup import escape
    from rich.table import Table

    from algodock.runtime.usage import usage_text

    colours = {"succeeded": "green", "cached": "cyan", "failed": "red", "skipped": "yellow", "running": "blue"}
    console.print(f"run [bold]{doc.run_id}[/] of pipeline [bold]{doc.pipeline}[/]: {doc.status}  (spec sha256 {_short(doc.spec_sha256)}, flow run {doc.flow_run_id or '-'})")
    table = Table(show_lines=True)
    for col in ("step", "status", "algorithm", "image id", "time", "used", "inputs", "outputs (sha256, rows, schema)"):
        table.add_column(col, overflow="fold")
    for s in doc.steps:
        status = f"[{colours.get(s.status, 'white')}]{s.status}[/]"
        if s.cached_from:
            status += f"\nfrom {s.cached_from}"
        if s.failure:
            status += f"\n{s.failure.kind}"
        algo = f"{s.algorithm or ''} {s.algorithm_version or ''}".strip()
        inputs = "\n".join(f"{i.name} ← {i.produced_by or 'external'}" for i in s.inputs)
        outputs = "\n".join(f"{o.name} {_short(o.sha256)}" + (f" ({o.rows} rows)" if o.rows is not None else "") + escape(schema_text(o.schema_)) for o in s.outputs)
        used = usage_text(s.usage.model_dump()).replace(", ", "\n") if s.usage else ""
        table.add_row(s.id, status, algo, _short(s.image_id), _duration(s), used, inputs, outputs)
    console.print(table)


def render_trace(result: dict[str, Any], console: Any) -> None:
    """The trace as a tree on a rich console."""
    from rich.tree import Tree

    def label(node: dict[str, Any]) -> str:
        p = node["producer"]
        member = f" [dim]({node['member']})[/]" if node.get("member") else ""
        cached = f", cached from run {p['cached_from']}" if p["cached_from"] else ""
        return (
            f"[bold]{node['uri']}[/]{member}\n"
            f"sha256 {node['sha256']}\n"
            f"← step [bold]{p['step']}[/] of run {p['run_id']} ({p['status']}{cached}): {p['algorithm'] or ''} {p['algorithm_version'] or ''}\n"
            f"  image {p['image']} = {p['image_id']}" + (f"\n  repo digest {p['repo_digest']}" if p["repo_digest"] else "")
        )

    def add(tree: Tree, node: dict[str, Any]) -> None:
        for inp in node["inputs"]:
            if inp["external"]:
                tree.add(f"[cyan]external[/] {inp['name']}: {inp['uri']}\nsha256 {inp['sha256']}")
            elif "from" in inp:
                add(tree.add(f"{inp['name']}: " + label(inp["from"])), inp["from"])
            else:
                tree.add(f"[red]{inp['name']}: {inp.get('error', 'unknown producer')}[/]")

    root = Tree(label(result["tree"]))
    add(root, result["tree"])
    console.print(root)


# ---------------------------------------------------------------- command line


class _ShowByDefault(click.Group):
    """``algodock lineage RUN_ID`` means ``algodock lineage show RUN_ID``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["show", *args]
        return super().parse_args(ctx, args)


_store_option = click.option("--store", metavar="URI", help="Local folder or s3://bucket/prefix [default: ./.algodock/store].")
_json_option = click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON document on stdout.")


def _console() -> Any:
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=200)  # piped: do not squeeze hashes into 80 columns


def _fail(exc: Exception) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(1)


@click.group("lineage", cls=_ShowByDefault, context_settings={"help_option_names": ["-h", "--help"]}, no_args_is_help=True)
def lineage_cli() -> None:
    """What produced what: show a run's lineage, trace an output, verify stored outputs.

    \b
    algodock lineage RUN_ID [--store URI] [--json]        the run's steps (same as `show`)
    algodock lineage trace PATH_OR_URI [--store URI]      an output back to external inputs and image ids
    algodock lineage verify RUN_ID [--store URI]          re-hash stored outputs; exit 1 if any changed
    algodock lineage diff RUN_A RUN_B [--store URI]       two runs side by side, step by step
    """


@lineage_cli.command("show")
@click.argument("run_id")
@_store_option
@_json_option
def show_cmd(run_id: str, store: str | None, as_json: bool) -> None:
    """Show the lineage of RUN_ID: per step the image id, inputs and their producers, output hashes."""
    the_store = open_store(store)
    try:
        doc = read_document(the_store, run_id)
    except InvalidInput as exc:
        _fail(exc)
    replays = _replays(the_store, run_id)
    if as_json:
        click.echo(json.dumps(doc.model_dump(mode="json") | ({"replays": replays} if replays else {}), indent=2))
        return
    render_document(doc, _console())
    for r in replays:
        verdicts = ", ".join(f"{s['step']} {s['status']}" for s in r.get("steps") or [])
        click.echo(f"replay {r.get('replay_id')} at {r.get('at')} on {(r.get('engine') or {}).get('name', '?')}: {verdicts}")


def _replays(store: Store, run_id: str) -> list[dict[str, Any]]:
    """The replays recorded beside the run (``runs/<run>/replays/*.json``, see algodock.lineage.replay), oldest first."""
    found = [store.read_json(f"runs/{run_id}/replays/{name}") for name in store.list(f"runs/{run_id}/replays")]
    return sorted((r for r in found if isinstance(r, dict)), key=lambda r: str(r.get("at")))


@lineage_cli.command("trace")
@click.argument("path_or_uri")
@_store_option
@_json_option
def trace_cmd(path_or_uri: str, store: str | None, as_json: bool) -> None:
    """Walk the output at PATH_OR_URI back through its producers to external inputs and image ids.

    PATH_OR_URI is a stored output (local path, file:// or s3:// URI, or a file inside a
    folder output), or any copy of one: it is then found by its sha256.
    """
    try:
        result = trace(open_store(store), path_or_uri)
    except InvalidInput as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    render_trace(result, _console())


@lineage_cli.command("verify")
@click.argument("run_id")
@_store_option
@_json_option
def verify_cmd(run_id: str, store: str | None, as_json: bool) -> None:
    """Re-hash the stored outputs of RUN_ID (local or S3); name each that changed. Exit 1 if any did."""
    try:
        checks = verify_run(open_store(store), run_id)
    except InvalidInput as exc:
        _fail(exc)
    bad = [c for c in checks if not c.ok]
    if as_json:
        click.echo(json.dumps({"run_id": run_id, "ok": not bad, "outputs": [asdict(c) for c in checks]}, indent=2))
    else:
        for c in checks:
            line = f"{c.status:<11} {c.step}.{c.output}  {c.uri}"
            if c.status == "changed":
                line += f"\n            recorded sha256 {c.expected}\n            now      sha256 {c.actual}"
            click.echo(line)
        click.echo(f"run {run_id}: {len(checks) - len(bad)} of {len(checks)} outputs match their recorded sha256", err=True)
    sys.exit(1 if bad else 0)


