"""The ``algodock`` command."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# pydantic scans every installed package's entry points for plugins the first time it builds a
# validator: tens of milliseconds of every command's start with Prefect's dependencies installed.
# algodock uses no pydantic plugin; a value set by the user is kept.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")

import click  # noqa: E402

from algodock.console import print_errors, setup_logging, terminate_on_sigterm  # noqa: E402
from algodock.errors import InvalidInput, InvalidManifest, StepFailure  # noqa: E402



class _Commands(click.Group):
    """Command groups defined in other modules are imported only when used: `run-step` starts lean."""

    # name -> (module, attribute). `run` lives in the Prefect layer (algodock.flows): loading
    # it by name here keeps this module, and every engine command, free of Prefect imports.
    LAZY = {
        "lineage": ("algodock.lineage.commands", "lineage_cli"),
        "run": ("algodock.flows.cli", "run_cmd"),
        "pin": ("algodock.flows.cli", "pin_cmd"),
        "worker": ("algodock.worker", "worker_cli"),
        "init": ("algodock.authoring.cli", "init_cmd"),
        "check-image": ("algodock.authoring.cli", "check_image_cmd"),
        "usage": ("algodock.authoring.cli", "usage_cmd"),
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.LAZY})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.LAZY and name not in self.commands:
            import importlib

            module, attr = self.LAZY[name]
            self.add_command(getattr(importlib.import_module(module), attr), name)
        return super().get_command(ctx, name)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging on stderr.")
def main(verbose: bool) -> None:
    """algodock: run containerized algorithms in a strict sandbox, alone or as Prefect pipelines.

    \b
    algodock validate FILE            check a manifest or pipeline spec
    algodock run-step MANIFEST ...    run one algorithm container on local data
    algodock run PIPELINE ...         run a pipeline as a Prefect flow
    algodock pin PIPELINE             pin every step's image to its registry's current digest
    algodock lineage RUN_ID           show what produced what in a run
    algodock worker --scheduler ADDR  run steps of `run --cluster` on this host's Docker engine
    algodock init NAME                scaffold an algorithm project
    algodock check-image MANIFEST     check an image meets the contract, in the sandbox
    algodock usage STEP_OR_IMAGE      what a step used over its last runs
    algodock schema FILE_OR_DIR       the slot schema of parquet data, to paste into a manifest
    algodock gc --keep-last N         remove old runs and what nothing kept refers to
    algodock cache explain RUN STEP   why a step ran: which part of its cache key changed
    algodock replay RUN [STEP...]     run recorded steps again; did their outputs reproduce?

    The container contract (manifest, /work layout, algo_output.json, failure kinds) is in
    docs/contract.md; JSON Schemas for editors are in schemas/.
    """
    setup_logging(verbose)


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
def validate(files: tuple[Path, ...]) -> None:
    """Check manifests or pipeline specs (JSON or YAML); print each error with file and field.

    A file with a top-level `pipeline_version` is read as a pipeline, else as a manifest.
    Exit 0 when every file is valid, 1 otherwise.
    """
    from algodock.contract.documents import read_document
    from algodock.contract.manifest import load_manifest

    failed = False
    for path in files:
        try:
            doc = read_document(path)
            if isinstance(doc, dict) and "pipeline_version" in doc:
                from algodock.pipeline import load_pipeline

                pipeline = load_pipeline(path)
                click.echo(f"{path}: valid pipeline {pipeline.spec.name!r} ({len(pipeline.spec.steps)} steps)")
            else:
                m = load_manifest(path)
                click.echo(f"{path}: valid manifest {m.name} {m.version} (image {m.container_parameters.image})")
        except (InvalidManifest, InvalidInput) as exc:
            failed = True
            print_errors(exc)
    sys.exit(1 if failed else 0)


@main.command("run-step")
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--input", "-i", "inputs", multiple=True, metavar="NAME=PATH", help="Data for input slot NAME: a file or a folder. Repeat per slot.")
@click.option("--param", "-p", "params", multiple=True, metavar="KEY=VALUE", help="A parameter; VALUE is JSON when it parses (n=5 is 5), else a string.")
@click.option("--output", "-o", "output", required=True, type=click.Path(file_okay=False, path_type=Path), help="Empty or new folder where the outputs land.")
@click.option("--log-file", type=click.Path(dir_okay=False, path_type=Path), help="Also keep the container's whole log here.")
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON document on stdout (logs go to stderr).")
def run_step_cmd(manifest: Path, inputs: tuple[str, ...], params: tuple[str, ...], output: Path, log_file: Path | None, as_json: bool) -> None:
    """Run one algorithm container on local data, in the sandbox of docs/contract.md.

    \b
    Example:
      algodock run-step examples/device-visits/manifest.json \\
          --input pings=data/pings --param look_back_time=7200 --output out/visits

    Exit 0 only when the step succeeded; 1 when it failed (the failure kind and message are
    printed, or are in the JSON document).
    """
    from algodock.contract.manifest import load_manifest
    from algodock.contract.params import parse_assignments, parse_inputs
    from algodock.records import StepRecord
    from algodock.runtime.runner import run_step

    terminate_on_sigterm()
    image = "?"
    try:
        m = load_manifest(manifest)
        image = m.container_parameters.image
        result = run_step(
            m,
            inputs=parse_inputs(inputs),
            parameters=parse_assignments(params),
            output_dir=output,
            # Flushed per line: a piped stderr is block-buffered, and logs must show as they come.
            on_log=lambda line: print(f"[{m.name}] {line}", file=sys.stderr, flush=True),
            log_path=log_file,
        )
    except StepFailure as exc:  # caught before the runner: manifest or command-line input
        result = StepRecord(id=manifest.stem, status="failed", image=image, failure=exc)
    sys.stderr.flush()
    if as_json:
        click.echo(json.dumps(result.step_summary(), indent=2))
    elif result.usage is not None:
        from algodock.runtime.usage import sizing_hint, usage_text

        hint = sizing_hint(result.usage, m.container_parameters.resource_request.memory_gb)
        click.echo(f"used: {usage_text(result.usage.as_dict())}" + (f" ({hint})" if hint else ""), err=True)
    if result.ok:
        if not as_json:
            for o in result.outputs:
                rows = f", {o.rows} rows" if o.rows is not None else ""
                click.echo(f"{o.name}: {o.path} ({o.format}{rows}) sha256:{o.sha256}")
            click.echo(f"succeeded: image {result.image} = {result.image_id}", err=True)
        sys.exit(0)
    assert result.failure is not None
    if not as_json:
        print_errors(result.failure)
    click.echo(f"failed ({result.failure.kind})", err=True)
    sys.exit(1)


@main.command("schema")
@click.argument("path", type=click.Path(exists=True, path_type=Path), metavar="FILE_OR_DIR")
@click.option("--forbid-extra", is_flag=True, help='Write "extra_columns": "forbid" (default: "allow").')
def schema_cmd(path: Path, forbid_extra: bool) -> None:
    """Print, as JSON on stdout, the slot `schema` object of real parquet data, ready to paste into
    a manifest 0.3 slot: a parquet file, or a folder whose .parquet parts must all agree.

    Only the footers are read. Exit 1 when there is no parquet file, one cannot be read, or the
    parts of a folder disagree (the two are named).
    """
    from algodock.contract.arrow_schema import SlotSchema
    from algodock.runtime.handoff import arrow_schema_of

    try:
        schema = arrow_schema_of(path)
    except (ValueError, OSError) as exc:
        click.echo(f"{path}: {exc}" if str(path) not in str(exc) else str(exc), err=True)
        sys.exit(1)
    declared = SlotSchema.of(schema, extra_columns="forbid" if forbid_extra else "allow")
    click.echo(json.dumps(declared.model_dump(mode="json"), indent=2))


@main.command("gc")
@click.option("--store", metavar="URI", help="Local folder or s3://bucket/prefix [default: ./.algodock/store].")
@click.option("--keep-last", type=click.IntRange(min=0), metavar="N", help="Keep the newest N runs of each pipeline.")
@click.option("--older-than", metavar="DURATION", help="Remove runs that started longer ago than this (30d, 12h, 90m, 2w); with --keep-last, a run either keeps is kept.")
@click.option("--keep", "keep", multiple=True, metavar="RUN_ID", help="Keep this run whatever the rules say (repeatable).")
@click.option("--dry-run", is_flag=True, help="Say what would go (the same figures the real gc frees); touch nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON document on stdout.")
def gc_cmd(store: str | None, keep_last: int | None, older_than: str | None, keep: tuple[str, ...], dry_run: bool, as_json: bool) -> None:
    """Remove runs outside the retention and whatever nothing kept refers to.

    \b
    Goes: runs outside --keep-last/--older-than (their attempts, logs, cache entries), the
    files of kept runs their lineage does not name (failed attempts), dead .work/ folders,
    cache entries and content objects whose runs are gone.
    Stays: runs a live process writes, everything a kept run's lineage names, the outputs of
    kept cache entries. Safe beside running pipelines; a gc killed midway is finished by the next.
    Without --keep-last or --older-than no run is removed, only garbage.
    Exit 0 on success, 2 on bad input, 1 when another gc holds the store.
    """
    from algodock.store.backends import open_store
    from algodock.store.gc import Retention, collect, parse_duration
    from algodock.store.lease import RunBusy

    try:
        retention = Retention(keep_last=keep_last, older_than=parse_duration(older_than) if older_than else None, keep=frozenset(keep))
        report = collect(open_store(store), retention, dry_run=dry_run)
    except RunBusy as exc:
        click.echo(f"error: another gc runs on this store: {exc}", err=True)
        sys.exit(1)
    except InvalidInput as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    if as_json:
        click.echo(json.dumps(report.as_json(), indent=2))
        return
    verb = "would remove" if dry_run else "removed"
    click.echo(f"{verb} {len(report.runs_removed)} run(s), {report.files} file(s), {report.bytes} bytes; kept {len(report.runs_kept)} run(s)")
    for run_id in report.runs_removed:
        click.echo(f"  {verb} {run_id}")
    if report.runs_busy:
        click.echo(f"  left alone (a live process writes them): {', '.join(report.runs_busy)}")


@main.group("cache", context_settings={"help_option_names": ["-h", "--help"]}, no_args_is_help=True)
def cache_cli() -> None:
    """The step cache: why a step ran."""


@cache_cli.command("explain")
@click.argument("run_id")
@click.argument("step")
@click.option("--store", metavar="URI", help="Local folder or s3://bucket/prefix [default: ./.algodock/store].")
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON document on stdout.")
def cache_explain_cmd(run_id: str, step: str, store: str | None, as_json: bool) -> None:
    """Why STEP of RUN_ID ran: which part of its cache key differs from the nearest earlier entry.

    Compared with the latest earlier run of the same pipeline and step (else of the same
    algorithm): image id, command, environment, parameters, GPU request, each input (added,
    removed, renamed, sha256 or source URI changed), --no-cache. For a cached step: the run it
    reused. Exit 0; 2 for an unknown run or step.
    """
    from algodock.lineage.explain import explain, render
    from algodock.store.backends import open_store

    try:
        result = explain(open_store(store), run_id, step)
    except InvalidInput as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    click.echo(json.dumps(result, indent=2) if as_json else render(result))


@main.command("replay")
@click.argument("run_id")
@click.argument("steps", nargs=-1)
@click.option("--all", "all_steps", is_flag=True, help="Replay every step of the run that succeeded or was cached.")
@click.option("--store", metavar="URI", help="Local folder or s3://bucket/prefix [default: ./.algodock/store].")
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON document (the replay record) on stdout.")
def replay_cmd(run_id: str, steps: tuple[str, ...], all_steps: bool, store: str | None, as_json: bool) -> None:
    """Run recorded STEPs of RUN_ID again, exactly as recorded, and say whether each output reproduced.

    The image by its recorded id, command, environment, parameters and resources; inputs from
    the store, checked against their recorded sha256 before the container starts. Outputs go
    to a scratch folder, never over the recorded ones. The replay is recorded in
    runs/RUN_ID/replays/ and shown by `algodock lineage RUN_ID`.
    Exit 0 only when every replayed output reproduced; 1 otherwise; 2 for bad input.
    """
    from algodock.lineage.replay import render, replay
    from algodock.runtime.engine import docker_client
    from algodock.store.backends import open_store

    terminate_on_sigterm()
    try:
        record = replay(open_store(store), docker_client(), run_id, steps, all_steps=all_steps, on_log=lambda line: print(f"[replay] {line}", file=sys.stderr, flush=True))
    except InvalidInput as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    click.echo(json.dumps(record, indent=2) if as_json else render(record))
    sys.exit(0 if record["reproduced"] else 1)


if __name__ == "__main__":
    main()
