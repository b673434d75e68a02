"""The ``algodock`` command."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import click

from algodock.errors import AlgodockError, InvalidInput, InvalidManifest, StepFailure

log = logging.getLogger("algodock")


_HANDLER = logging.StreamHandler(sys.stderr)


def _setup_logging(verbose: bool) -> None:
    """algodock's own messages at INFO, everyone else's (httpx, docker, Prefect's console) at WARNING."""
    _HANDLER.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S"))
    _HANDLER.setLevel(logging.DEBUG if verbose else logging.WARNING)
    logging.getLogger().addHandler(_HANDLER)
    ours = logging.getLogger("algodock")
    ours.setLevel(logging.DEBUG if verbose else logging.INFO)
    mine = logging.StreamHandler(sys.stderr)
    mine.setFormatter(_HANDLER.formatter)
    ours.addHandler(mine)
    ours.propagate = False
    # A temporary Prefect server can take a while on a busy machine; 20 s is Prefect's default.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def _log_to(stream: Any) -> None:
    """Point our log handlers at ``stream`` (the live view's proxy, so lines print above the table)."""
    for handler in (_HANDLER, *logging.getLogger("algodock").handlers):
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(stream)


def _terminate_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so running containers are removed on the way out."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def _print_errors(exc: AlgodockError) -> None:
    lines = getattr(exc, "errors", None) or [str(exc)]
    for line in lines:
        click.echo(f"error: {line}", err=True)


class _Commands(click.Group):
    """Command groups defined in other modules are imported only when used: `run-step` starts lean."""

    LAZY = {"lineage": ("algodock.lineage", "lineage_cli")}

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
    algodock lineage RUN_ID           show what produced what in a run

    The container contract (manifest, /work layout, algo_output.json, failure kinds) is in
    CONTRACT.md; JSON Schemas for editors are in schemas/.
    """
    _setup_logging(verbose)


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
def validate(files: tuple[Path, ...]) -> None:
    """Check manifests or pipeline specs (JSON or YAML); print each error with file and field.

    A file with a top-level `pipeline_version` is read as a pipeline, else as a manifest.
    Exit 0 when every file is valid, 1 otherwise.
    """
    from algodock.contract import load_manifest, read_document

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
            _print_errors(exc)
    sys.exit(1 if failed else 0)


def _parse_inputs(items: tuple[str, ...]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise InvalidInput(f"--input {item!r}: expected NAME=PATH")
        if name in out:
            raise InvalidInput(f"--input {name}: given twice")
        out[name] = Path(path)
    return out


@main.command("run-step")
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--input", "-i", "inputs", multiple=True, metavar="NAME=PATH", help="Data for input slot NAME: a file or a folder. Repeat per slot.")
@click.option("--param", "-p", "params", multiple=True, metavar="KEY=VALUE", help="A parameter; VALUE is JSON when it parses (n=5 is 5), else a string.")
@click.option("--output", "-o", "output", required=True, type=click.Path(file_okay=False, path_type=Path), help="Empty or new folder where the outputs land.")
@click.option("--log-file", type=click.Path(dir_okay=False, path_type=Path), help="Also keep the container's whole log here.")
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON document on stdout (logs go to stderr).")
def run_step_cmd(manifest: Path, inputs: tuple[str, ...], params: tuple[str, ...], output: Path, log_file: Path | None, as_json: bool) -> None:
    """Run one algorithm container on local data, in the sandbox of CONTRACT.md.

    \b
    Example:
      algodock run-step examples/device-visits/manifest.json \\
          --input pings=data/pings --param look_back_time=7200 --output out/visits

    Exit 0 only when the step succeeded; 1 when it failed (the failure kind and message are
    printed, or are in the JSON document).
    """
    from algodock.contract import load_manifest
    from algodock.params import parse_assignments
    from algodock.results import StepResult
    from algodock.runner import run_step

    _terminate_on_sigterm()
    image = "?"
    try:
        m = load_manifest(manifest)
        image = m.container_parameters.image
        result = run_step(
            m,
            inputs=_parse_inputs(inputs),
            parameters=parse_assignments(params),
            output_dir=output,
            # Flushed per line: a piped stderr is block-buffered, and logs must show as they come.
            on_log=lambda line: print(f"[{m.name}] {line}", file=sys.stderr, flush=True),
            log_path=log_file,
        )
    except StepFailure as exc:  # caught before the runner: manifest or command-line input
        result = StepResult(status="failed", image=image, failure=exc)
    sys.stderr.flush()
    if as_json:
        click.echo(json.dumps(result.summary(), indent=2))
    if result.ok:
        if not as_json:
            for o in result.outputs:
                rows = f", {o.rows} rows" if o.rows is not None else ""
                click.echo(f"{o.name}: {o.path} ({o.format}{rows}) sha256:{o.sha256}")
            click.echo(f"succeeded: image {result.image} = {result.image_id}", err=True)
        sys.exit(0)
    assert result.failure is not None
    if not as_json:
        _print_errors(result.failure)
    click.echo(f"failed ({result.failure.kind})", err=True)
    sys.exit(1)


def _live_view(order: list[str]):
    """A live table of step states on stderr (only when stderr is a terminal)."""
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    console = Console(stderr=True)
    if not console.is_terminal:
        return None, None
    states: dict[str, Any] = {s: None for s in order}
    colours = {"succeeded": "green", "cached": "cyan", "failed": "red", "skipped": "yellow", "running": "blue"}

    def render() -> Table:
        table = Table(title="algodock run", expand=False)
        for col in ("step", "status", "image id", "outputs / failure"):
            table.add_column(col)
        for step_id, rec in states.items():
            status = rec.status if rec else "pending"
            detail = ""
            if rec is not None and rec.failure:
                detail = f"{rec.failure.kind}: {rec.failure.message.splitlines()[0][:80]}"
            elif rec is not None:
                detail = ", ".join(f"{o.name} ({o.rows} rows)" if o.rows is not None else o.name for o in rec.outputs)
            image_id = (rec.image_id or "")[7:19] if rec else ""
            table.add_row(step_id, f"[{colours.get(status, 'white')}]{status}[/]", image_id, detail)
        return table

    live = Live(render(), console=console, refresh_per_second=4, transient=False, redirect_stderr=True)

    def listener(record: Any) -> None:
        states[record.id] = record
        live.update(render())

    return live, listener


@main.command("run")
@click.argument("pipeline", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--store", metavar="URI", help="Local folder or s3://bucket/prefix for outputs and records [default: ./.algodock/store].")
@click.option("--run-id", metavar="ID", help="Name of this run in the store [default: a timestamp].")
@click.option("--set", "sets", multiple=True, metavar="STEP.KEY=VALUE", help="Override a step's parameter; VALUE is JSON when it parses.")
@click.option("--capacity", metavar="cpu_millicore=N,memory_gb=M", help="What running steps may use together [default: the engine's CPUs and memory].")
@click.option("--no-cache", is_flag=True, help="Run every step, even when an identical earlier run could be reused.")
@click.option("--concurrency-limit", metavar="NAME", help="A Prefect global concurrency limit each step also holds a slot of (a limit shared across hosts).")
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON document (the run summary) on stdout.")
def run_cmd(pipeline: Path, store: str | None, run_id: str | None, sets: tuple[str, ...], capacity: str | None, no_cache: bool, concurrency_limit: str | None, as_json: bool) -> None:
    """Run a pipeline as a Prefect flow: each step a task, independent steps concurrently.

    Uses the Prefect server at PREFECT_API_URL when set, else a temporary local one.
    The spec is validated first: a bad spec starts no container. Exit 0 only when every
    step succeeded or was cached.

    \b
    Example:
      algodock run deployments/device-visits-daily.yaml --set visits.look_back_time=7200
    """
    from algodock.capacity import Capacity
    from algodock.pipeline import load_pipeline, parse_overrides

    _terminate_on_sigterm()
    # Without PREFECT_API_URL Prefect starts a temporary server: it must not phone home (offline it prints errors).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if sys.stderr.isatty():
        # The live table shows step states; the log lines stay in the Prefect UI and the store.
        # (Set before Prefect is imported: its logging is configured then.)
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_FLOW_RUNS_LEVEL", "WARNING")
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_TASK_RUNS_LEVEL", "WARNING")
    try:
        overrides = parse_overrides(list(sets))
        cap = Capacity.parse(capacity) if capacity else None
        if cap is None:
            from algodock.engine import docker_client

            cap = Capacity.from_engine(docker_client())
        from blocks import manifest_from_block

        spec = load_pipeline(pipeline, overrides=overrides, capacity=cap, resolve_block=manifest_from_block)
    except StepFailure as exc:
        _print_errors(exc)
        if as_json:
            click.echo(json.dumps({"run_id": run_id, "status": "failed", "flow_run_id": None, "lineage_uri": None, "failure": exc.as_dict(), "steps": []}, indent=2))
        sys.exit(1)

    from flows import pipeline as flows_pipeline
    from algodock.store import open_store, run_json_rel

    run_id = run_id or flows_pipeline.default_run_id(None)
    live, listener = _live_view(spec.topological_order())
    if listener:
        flows_pipeline.LISTENERS.append(listener)
    params = dict(spec=str(pipeline.resolve()), store=store, run_id=run_id, overrides=overrides or None, capacity=str(cap),
                  no_cache=no_cache, concurrency_limit=concurrency_limit)

    def finish(prefect_problem: str | None) -> int:
        if live:
            live.stop()
            _log_to(sys.stderr)
        summary = open_store(store).read_json(run_json_rel(run_id))
        if summary is None:
            message = prefect_problem or (state.message if state is not None else None) or "the flow run failed before it recorded anything"
            summary = {"run_id": run_id, "status": "failed", "flow_run_id": None, "lineage_uri": None, "failure": {"kind": "infrastructure", "message": message}, "steps": []}
        if as_json:
            click.echo(json.dumps(summary, indent=2))
        else:
            if not live:  # the live table already showed them
                for step in summary["steps"]:
                    click.echo(f"{step['id']:<20} {step['status']:<10} {(step.get('failure') or {}).get('kind', '')}")
            click.echo(f"run {run_id}: {summary['status']}; lineage at {summary.get('lineage_uri')}", err=True)
            ui = os.environ.get("PREFECT_UI_URL") or (os.environ.get("PREFECT_API_URL") or "").removesuffix("/api")
            if ui and summary.get("flow_run_id"):
                click.echo(f"in the Prefect UI: {ui}/runs/flow-run/{summary['flow_run_id']}", err=True)
        if prefect_problem and summary["steps"]:
            click.echo(f"warning: Prefect's record of run {run_id} is incomplete ({prefect_problem}); the lineage in the store is the record of what ran", err=True)
        return 0 if summary["status"] == "succeeded" else 1

    def prefect_lost() -> None:  # called by the watchdog: the steps have ended, Prefect cannot be told
        code = finish("the Prefect API stopped answering during the run")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # Prefect's engine threads would retry their API calls for minutes

    state = None
    problem: str | None = None
    try:
        if live:
            live.start()
            _log_to(sys.stderr)  # Live has replaced sys.stderr with a proxy that prints above the table
        state = flows_pipeline.run_with_watchdog(prefect_lost, **params)
    except Exception as exc:  # Prefect's own calls failed (the API went away at the very end, …)
        import httpx

        if not isinstance(exc, (httpx.HTTPError, OSError)) and "prefect" not in type(exc).__module__:
            raise
        problem = f"{type(exc).__name__}: {exc}"
    sys.exit(finish(problem))


if __name__ == "__main__":
    main()
