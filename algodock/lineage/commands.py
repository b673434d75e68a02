"""The ``algodock lineage`` commands: show, trace, verify, diff, export. The ``algodock`` command loads
this module for ``lineage``; the questions are answered by :mod:`algodock.lineage.queries`, drawn by
:mod:`algodock.lineage.render`::

    algodock lineage RUN_ID [--store URI] [--json]
    algodock lineage trace PATH_OR_URI [--store URI] [--json]
    algodock lineage verify RUN_ID [--store URI] [--json]
    algodock lineage diff RUN_A RUN_B [--store URI] [--json]
    algodock lineage export RUN_ID --ro-crate DIR_OR_ZIP [--with-data] [--store URI]
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from algodock.errors import InvalidInput
from algodock.lineage.queries import read_document, replays, trace, verify_run
from algodock.lineage.render import render_document, render_trace
from algodock.store.backends import open_store

__all__ = ["lineage_cli"]


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
    recorded = replays(the_store, run_id)
    if as_json:
        click.echo(json.dumps(doc.model_dump(mode="json") | ({"replays": recorded} if recorded else {}), indent=2))
        return
    render_document(doc, _console())
    for r in recorded:
        verdicts = ", ".join(f"{s['step']} {s['status']}" for s in r.get("steps") or [])
        click.echo(f"replay {r.get('replay_id')} at {r.get('at')} on {(r.get('engine') or {}).get('name', '?')}: {verdicts}")


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


@lineage_cli.command("diff")
@click.argument("run_a")
@click.argument("run_b")
@_store_option
@_json_option
def diff_cmd(run_a: str, run_b: str, store: str | None, as_json: bool) -> None:
    """RUN_A and RUN_B side by side, step by step: image ids, parameters, input and output hashes, status, usage.

    A step in one run only is listed as such. Exit 0 (2 for an unknown run).
    """
    from algodock.lineage.diff import diff_runs, render

    try:
        result = diff_runs(open_store(store), run_a, run_b)
    except InvalidInput as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    click.echo(json.dumps(result, indent=2) if as_json else render(result))


@lineage_cli.command("export")
@click.argument("run_id")
@click.option("--ro-crate", "target", required=True, metavar="DIR_OR_ZIP", type=click.Path(path_type=Path), help="Where the crate goes: a new folder, or a .zip; must not exist.")
@click.option("--with-data", is_flag=True, help="Copy the outputs into the crate (else they are referenced by their store URIs).")
@_store_option
def export_cmd(run_id: str, target: Path, with_data: bool, store: str | None) -> None:
    """Export RUN_ID's provenance as a Workflow Run RO-Crate (Provenance Run Crate profile).

    The pipeline is the workflow, each step a CreateAction of its algorithm with its
    container image (tag, image id, repo digest), parameters as property values, inputs and
    outputs as File entities with sha256 and size. Exit 0; 2 for an unknown run or a target that exists.
    """
    from algodock.lineage.crate import export_crate

    try:
        export_crate(open_store(store), run_id, target, with_data=with_data)
    except InvalidInput as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    click.echo(str(target))
