"""The author's commands, registered lazily by :mod:`algodock.cli`: ``init``, ``check-image``, ``usage``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from algodock.console import print_errors
from algodock.errors import AlgodockError


def _fail(exc: AlgodockError) -> None:
    print_errors(exc)
    sys.exit(1)


@click.command("init")
@click.argument("name")
@click.option("--dir", "directory", type=click.Path(path_type=Path), help="Where to create the project [default: ./NAME]. Must not exist.")
def init_cmd(name: str, directory: Path | None) -> None:
    """Create an algorithm project NAME: manifest, Dockerfile, Python skeleton, sample input.

    \b
    Example:
      algodock init my-algo
      docker build --build-arg BASE_IMAGE=python:3.11-slim -t my-algo:0.1.0 my-algo
      algodock check-image my-algo/manifest.json
    """
    from algodock.authoring.init import init_project

    try:
        dest = init_project(name, directory)
    except AlgodockError as exc:
        _fail(exc)
    click.echo(f"created {dest}/ (manifest.json, Dockerfile, algorithm.py, sample/, README.md, .wheels/)")
    click.echo("next:")
    click.echo(f"  docker build --build-arg BASE_IMAGE=python:3.11-slim -t {name}:0.1.0 {dest}")
    click.echo(f"  algodock check-image {dest}/manifest.json")


@click.command("check-image")
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--input", "-i", "inputs", multiple=True, metavar="NAME=PATH", help="Sample data for input slot NAME [default: sample/NAME beside the manifest].")
@click.option("--param", "-p", "params", multiple=True, metavar="KEY=VALUE", help="A parameter; VALUE is JSON when it parses.")
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON document on stdout.")
def check_image_cmd(manifest: Path, inputs: tuple[str, ...], params: tuple[str, ...], as_json: bool) -> None:
    """Run the manifest's image in the real sandbox and check it meets the contract.

    \b
    Rules: manifest, image, user, exit, outputs, schema, input_path, determinism, resources, lint.
    Each is pass, warn or fail, with a one-line fix. Exit 1 when any fails.
    The image runs twice (three times when the second run fails): the second time with
    algo_input.json at another path, to catch a hard-coded /work/algo_input.json.
    """
    from algodock.authoring.check_image import check_image
    from algodock.contract.params import parse_assignments, parse_inputs

    try:
        report = check_image(
            manifest,
            inputs=parse_inputs(inputs),
            params=parse_assignments(params),
            on_log=lambda line: print(f"  | {line}", file=sys.stderr, flush=True),
        )
    except AlgodockError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        colours = {"pass": "green", "warn": "yellow", "fail": "red"}
        click.echo(f"check-image {report.image} ({report.image_id or 'no image'}{f', {report.repo_digest}' if report.repo_digest else ''})")
        for c in report.checks:
            click.echo(f"  {click.style(c.status.ljust(4), fg=colours[c.status])}  {c.id:<12} {c.message}")
        click.echo(f"verdict: {report.verdict}")
    sys.exit(1 if report.verdict == "fail" else 0)


@click.command("usage")
@click.argument("target", metavar="STEP_OR_IMAGE")
@click.option("--store", metavar="URI", help="Local folder or s3://bucket/prefix [default: ./.algodock/store].")
@click.option("--last", default=20, show_default=True, help="How many of the latest runs to summarise.")
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON document on stdout.")
def usage_cmd(target: str, store: str | None, last: int, as_json: bool) -> None:
    """What a step (id), algorithm (name) or image (tag or id) used over its last runs.

    Median and max of peak memory, CPU seconds, wall seconds and output, from the lineage
    documents in the store, with a right-sizing hint against the latest request.
    """
    from algodock.authoring.history import usage_history
    from algodock.store.backends import open_store
    from algodock.runtime.usage import fmt_bytes

    try:
        summary = usage_history(open_store(store), target, last)
    except AlgodockError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    f = summary["figures"]
    shown = {
        "peak memory": (fmt_bytes(f["peak_memory_bytes"]["median"]), fmt_bytes(f["peak_memory_bytes"]["max"])),
        "cpu seconds": tuple("-" if v is None else f"{v:.2f}" for v in (f["cpu_seconds"]["median"], f["cpu_seconds"]["max"])),
        "wall seconds": tuple("-" if v is None else f"{v:.1f}" for v in (f["wall_seconds"]["median"], f["wall_seconds"]["max"])),
        "output bytes": (fmt_bytes(f["output_bytes"]["median"]), fmt_bytes(f["output_bytes"]["max"])),
        "output files": tuple("-" if v is None else f"{v:g}" for v in (f["output_files"]["median"], f["output_files"]["max"])),
    }
    click.echo(f"{target}: last {summary['runs']} run(s), request {summary['resource_request']}")
    click.echo(f"  {'':<14}{'median':>12}{'max':>12}")
    for name, (med, mx) in shown.items():
        click.echo(f"  {name:<14}{med:>12}{mx:>12}")
    if summary["hint"]:
        click.echo(f"hint: {summary['hint']}")
