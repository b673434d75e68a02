"""``algodock run``: a pipeline as a Prefect flow, from the command line.

The engine's command group (:mod:`algodock.cli`) loads this module only when ``run`` is
called, so the engine's own commands never import Prefect.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from algodock.console import log_to, print_errors, terminate_on_sigterm
from algodock.errors import StepFailure
from algodock.runtime.images import DEFAULT_PULL_POLICY, PULL_POLICIES


def _live_view(order: list[str]):
    """A live table of step states on stderr (only when stderr is a terminal)."""
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    from algodock.runtime.usage import usage_text

    console = Console(stderr=True)
    if not console.is_terminal:
        return None, None
    states: dict[str, Any] = {s: None for s in order}
    colours = {"succeeded": "green", "cached": "cyan", "failed": "red", "skipped": "yellow", "running": "blue"}

    def render() -> Table:
        table = Table(title="algodock run", expand=False)
        for col in ("step", "status", "image id", "used", "outputs / failure"):
            table.add_column(col)
        for step_id, rec in states.items():
            status = rec.status if rec else "pending"
            detail = ""
            if rec is not None and rec.failure:
                detail = f"{rec.failure.kind}: {rec.failure.message.splitlines()[0][:80]}"
            elif rec is not None:
                detail = ", ".join(f"{o.name} ({o.rows} rows)" if o.rows is not None else o.name for o in rec.outputs)
            image_id = (rec.image_id or "")[7:19] if rec else ""
            used = usage_text(rec.usage.model_dump()) if rec is not None and rec.usage else ""
            table.add_row(step_id, f"[{colours.get(status, 'white')}]{status}[/]", image_id, used, detail)
        return table

    live = Live(render(), console=console, refresh_per_second=4, transient=False, redirect_stderr=True)

    def listener(record: Any) -> None:
        states[record.id] = record
        live.update(render())

    return live, listener


@click.command("run")
@click.argument("pipeline", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--store", metavar="URI", help="Local folder or s3://bucket/prefix for outputs and records [default: ./.algodock/store].")
@click.option("--run-id", metavar="ID", help="Name of this run in the store [default: a timestamp].")
@click.option("--set", "sets", multiple=True, metavar="STEP.KEY=VALUE", help="Override a step's parameter; VALUE is JSON when it parses.")
@click.option("--capacity", metavar="cpu_millicore=N,memory_gb=M", help="What running steps may use together [default: the engine's CPUs and memory].")
@click.option("--no-cache", is_flag=True, help="Run every step, even when an identical earlier run could be reused.")
@click.option("--concurrency-limit", metavar="NAME", help="A Prefect global concurrency limit each step also holds a slot of (a limit shared across hosts).")
@click.option("--cluster", metavar="tcp://HOST:8786", help="Run the steps on this Dask scheduler's `algodock worker`s, placed by their resource requests.")
@click.option("--shared-store", is_flag=True, help="With --cluster: the --store path is mounted at the same place on every host.")
@click.option("--registry-credentials", "registry_credentials", multiple=True, metavar="NAME", help="A saved prefect-docker DockerRegistryCredentials block for a registry the images come from (repeatable) [default: the engine host's docker config].")
@click.option("--pull-policy", type=click.Choice(PULL_POLICIES), default=DEFAULT_PULL_POLICY, show_default=True, help="if_not_present: use a local image; always: pull when the tag's digest moved in the registry; never: fail when absent. A step's own pull_policy wins.")
@click.option("--require-digest", is_flag=True, help="Refuse, before any container, every step whose image is not pinned by digest (`algodock pin` pins them).")
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON document (the run summary) on stdout.")
def run_cmd(pipeline: Path, store: str | None, run_id: str | None, sets: tuple[str, ...], capacity: str | None, no_cache: bool, concurrency_limit: str | None, cluster: str | None, shared_store: bool,
            registry_credentials: tuple[str, ...], pull_policy: str, require_digest: bool, as_json: bool) -> None:
    """Run a pipeline as a Prefect flow: each step a task, independent steps concurrently.

    Uses the Prefect server at PREFECT_API_URL when set, else a temporary local one.
    The spec is validated first: a bad spec starts no container. Exit 0 only when every
    step succeeded or was cached.

    \b
    Example:
      algodock run deployments/device-visits-daily.yaml --set visits.look_back_time=7200
    """
    from algodock.pipeline import parse_overrides
    from algodock.pipeline.capacity import Capacity
    from algodock.pipeline.prepare import prepare_run

    terminate_on_sigterm()
    # Without PREFECT_API_URL Prefect starts a temporary server: it must not phone home (offline it prints errors).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if sys.stderr.isatty():
        # The live table shows step states; the log lines stay in the Prefect UI and the store.
        # (Set before Prefect is imported: its logging is configured then.)
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_FLOW_RUNS_LEVEL", "WARNING")
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_TASK_RUNS_LEVEL", "WARNING")
    from algodock.pipeline.composed import default_run_id
    from algodock.store.backends import open_store
    from algodock.store.layout import run_json_rel

    named_run = run_id
    run_id = run_id or default_run_id()
    try:
        overrides = parse_overrides(list(sets))
        cap = Capacity.parse(capacity) if capacity else None
        if cap is None and not cluster:  # in cluster mode the flow asks the workers
            from algodock.runtime.engine import docker_client

            cap = Capacity.from_engine(docker_client())
        from algodock.blocks import manifest_from_block, registry_auths

        registry_auths(registry_credentials)  # an unknown block name fails here, before any flow starts
        # Once, here, for the flow too: a host-local store of a cluster run, a bad spec and a
        # run another process holds (RunBusy names the holder) all fail before any flow starts.
        prepared = prepare_run(pipeline, store=open_store(store), run_id=run_id, overrides=overrides, capacity=cap,
                               resolve_block=manifest_from_block, cluster=bool(cluster), store_label=store,
                               shared_store=shared_store, hand_over=True, require_digest=require_digest)
    except StepFailure as exc:
        print_errors(exc)
        if as_json:
            click.echo(json.dumps({"run_id": named_run, "status": "failed", "flow_run_id": None, "lineage_uri": None, "failure": exc.as_dict(), "steps": []}, indent=2))
        sys.exit(1)
    spec, lease = prepared.pipeline, prepared.lease
    from algodock.flows import pipeline as flows_pipeline

    live, listener = _live_view(spec.topological_order())
    if listener:
        flows_pipeline.LISTENERS.append(listener)
    params = dict(spec=str(pipeline.resolve()), store=store, run_id=run_id, overrides=overrides or None,
                  capacity=str(cap) if cap else None, cluster=cluster, shared_store=shared_store,
                  no_cache=no_cache, concurrency_limit=concurrency_limit,
                  registry_credentials=list(registry_credentials) or None, pull_policy=pull_policy, require_digest=require_digest)
    released = False

    def finish(prefect_problem: str | None) -> int:
        nonlocal released
        if not released:  # [store] the run is given back however it ended (os._exit included)
            released = True
            lease.release()
        if live:
            live.stop()
            log_to(sys.stderr)
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
            log_to(sys.stderr)  # Live has replaced sys.stderr with a proxy that prints above the table
        state = flows_pipeline.run_with_watchdog(prefect_lost, **params)
    except Exception as exc:  # Prefect's own calls failed (the API went away at the very end, …)
        import httpx

        if not isinstance(exc, (httpx.HTTPError, OSError)) and "prefect" not in type(exc).__module__:
            raise
        problem = f"{type(exc).__name__}: {exc}"
    except BaseException:  # Ctrl-C, SIGTERM, a bug: the run is still given back
        if not released:
            released = True
            lease.release()
        raise
    sys.exit(finish(problem))


@click.command("pin")
@click.argument("pipeline", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), help="Write the pinned spec here [default: stdout]; relative paths in it are rewritten to stay right from there.")
@click.option("--registry-credentials", "registry_credentials", multiple=True, metavar="NAME", help="A saved prefect-docker DockerRegistryCredentials block (repeatable) [default: the engine host's docker config].")
def pin_cmd(pipeline: Path, output: Path | None, registry_credentials: tuple[str, ...]) -> None:
    """Pin every step's image to the digest its registry serves now.

    Asks each registry for the current digest of each step's image tag (a manifest request,
    nothing is downloaded) and writes the spec with `image: repo@sha256:...` on every step,
    which `algodock run --require-digest` accepts. YAML in, YAML out (JSON for a .json spec).

    \b
    Example:
      algodock pin deployments/device-visits-daily.yaml --output deployments/frozen.yaml
    """
    import yaml

    from algodock.blocks import manifest_from_block, registry_auths
    from algodock.pipeline.pin import pin_spec
    from algodock.runtime.engine import docker_client

    try:
        auths = registry_auths(registry_credentials)
        doc = pin_spec(pipeline, docker_client(), credentials=auths, resolve_block=manifest_from_block, output=output)
    except StepFailure as exc:
        print_errors(exc)
        sys.exit(1)
    as_json = (output or pipeline).suffix.lower() == ".json"
    text = json.dumps(doc, indent=2) + "\n" if as_json else yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text)
        click.echo(f"wrote {output}: {len(doc['steps'])} steps pinned", err=True)
