"""The ``algodock lineage`` commands beyond show, trace and verify (defined in :mod:`algodock.lineage.queries`):
``diff``, ``replay``'s record shown with a run, ``export``. The ``algodock`` command loads this module for ``lineage``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from algodock.errors import InvalidInput
from algodock.lineage.queries import _json_option, _store_option, lineage_cli
from algodock.store.backends import open_store

__all__ = ["lineage_cli"]


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
