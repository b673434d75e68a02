"""Rendering a run's lineage for people: a rich table of its steps, a rich tree of a trace,
an output's recorded Arrow schema on one line (the markdown artifact uses it too).

The data comes from :mod:`algodock.lineage.queries`; the commands that print it are in
:mod:`algodock.lineage.commands`. rich is imported only when something is drawn.

>>> schema_text({"columns": [{"name": "a", "type": "int64", "nullable": False}, {"name": "b", "type": "string"}]})
'\\n  a: int64 not null, b: string'
"""

from __future__ import annotations

from typing import Any

from algodock.records import LineageDocument, StepRecord

__all__ = ["render_document", "render_trace", "schema_text"]


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
