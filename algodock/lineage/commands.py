"""The ``algodock lineage`` commands beyond show, trace and verify (defined in :mod:`algodock.lineage.queries`):
``diff``, ``replay``'s record shown with a run, ``export``. The ``algodock`` command loads this module for ``lineage``.
"""

from __future__ import annotations

import json
import sys

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
