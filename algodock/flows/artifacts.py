"""What a pipeline run shows in the Prefect UI besides its task runs.

* Per run, two artifacts on the flow run (also under stable keys, so the Artifacts page keeps
  the history of a pipeline): ``algodock-<pipeline>-steps``, a table of the steps (status,
  image id, duration, outputs with their sha256), and ``algodock-<pipeline>-run``, markdown
  the UI renders: each step (linked to its task run) with what it reads, and each output
  with its location, size, rows and sha256. The DAG itself is Prefect's run graph: every
  step's task run names its upstream task runs in ``task_inputs``.
* Asset materializations come from the step tasks themselves: :func:`step_assets` gives a
  step's algorithm task its outputs as the assets it materializes (on this host or on a Dask
  worker), :func:`add_output_metadata` puts each output's sha256, rows, image id and real URI on
  its event; :func:`asset_key` names an output or input as an asset.

Nothing here may fail a run: every function logs and returns on error.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

from algodock.lineage.render import schema_text
from algodock.records import LineageDocument, StepRecord
from algodock.store.layout import local_path_of, output_rel

if TYPE_CHECKING:
    from algodock.pipeline import Pipeline
    from algodock.pipeline.execute import RunContext

log = logging.getLogger("algodock.flows.artifacts")

# ---------------------------------------------------------------- helpers


def artifact_key(pipeline: str, what: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) for ``what`` of ``pipeline``.

    >>> artifact_key("device_visits-Daily", "steps")
    'algodock-device-visits-daily-steps'
    """
    slug = re.sub(r"[^a-z0-9-]+", "-", pipeline.lower()).strip("-") or "pipeline"
    return f"algodock-{slug}-{what}"


def asset_key(uri: str) -> str | None:
    """The Prefect asset key of a stored output or input: its ``s3://`` or ``file://`` URI.

    None when the location cannot be an asset key (Prefect forbids spaces, ``%``, ``#``, …
    and keys longer than 512 characters).

    >>> asset_key("/store/runs/r1/steps/a/outputs/t.parquet"), asset_key("s3://b/k/")
    ('file:///store/runs/r1/steps/a/outputs/t.parquet', 's3://b/k')
    >>> asset_key("/tmp/with space.csv") is None
    True
    """
    from prefect.types.names import validate_valid_asset_key

    if uri.startswith("s3://"):
        key = uri.rstrip("/")
    else:
        local = local_path_of(uri)
        if local is None:
            return None
        key = "file://" + str(local.absolute())
    try:
        return validate_valid_asset_key(key)
    except ValueError:
        return None


def cached_state(record: StepRecord, run_id: str, data: Any = None) -> Any:
    """Prefect's ``Cached`` state (Completed, named "Cached") for a step that ran no container,
    naming the run whose outputs it reuses: another run's (a cache hit), or an earlier attempt
    of this run (a retried flow run keeps what already succeeded). ``data``: the task's result (default the record)."""
    from prefect.states import Completed

    key = (record.cache_key or "")[:12]
    if record.status == "cached":
        message = f"cache hit: outputs of step {record.id} of run {record.cached_from} reused, no container ran (cache key {key})"
    else:
        message = f"kept from the earlier attempt of run {run_id} (task run {record.task_run_id}), no container ran (cache key {key})"
    return Completed(name="Cached", data=record if data is None else data, message=message)


MATERIALIZED_BY = "algodock"


def output_asset_keys(ctx: RunContext, step_id: str, manifest: Any = None) -> dict[str, str]:
    """Output name -> its asset key: the store URI ``runs/<run>/steps/<step>/outputs/<file>``,
    one name per output of the run, whichever attempt's folder holds the bytes (the
    materialization's metadata carries that real ``uri``). ``manifest``: the step's, when the
    run does not know the step yet (a step composed in Python, at its call)."""
    keys = {}
    for o in (manifest or ctx.pipeline.manifests[step_id]).outputs:
        key = asset_key(ctx.store.uri(output_rel(ctx.run_id, step_id, o.name if o.multiple else f"{o.name}.{o.format}")))
        if key:
            keys[o.name] = key
    return keys


def spec_externals(pipeline: Any, step_id: str) -> list[str]:
    """The external inputs (URIs, paths) a step of a spec reads, as its bindings name them."""
    return [pipeline.inputs.get(ref.name, "") for ref in pipeline.bindings.get(step_id, {}).values() if ref.kind == "input"]


def asset_deps(externals: list[str]) -> list[str]:
    """The asset keys of the external inputs that can be assets, sorted, each once."""
    return sorted({k for k in (asset_key(u) for u in externals if u) if k})


def step_assets(ctx: RunContext, step_id: str, manifest: Any, externals: list[str]) -> dict[str, Any]:
    """The ``assets`` and ``asset_deps`` task options of a step: the outputs it materializes
    and the external inputs (URIs, paths) it reads; empty when it has no output that can be an asset."""
    outputs = sorted(set(output_asset_keys(ctx, step_id, manifest).values()))
    if not outputs:
        return {}
    return {"assets": outputs, "asset_deps": asset_deps(externals) or None}


def add_output_metadata(record: StepRecord, ctx: RunContext) -> None:
    """Attach the sha256, rows, image id, real URI, … of each output to its materialization event
    (called inside the step's task; a no-op outside a materializing task)."""
    try:
        from prefect.assets import add_asset_metadata
        from prefect.context import AssetContext

        planned = {a.key for a in (AssetContext.get().downstream_assets if AssetContext.get() else ())}
        keys = output_asset_keys(ctx, record.id)
        for o in record.outputs:
            key = keys.get(o.name)
            if key not in planned:
                continue
            add_asset_metadata(key, {"sha256": o.sha256, "format": o.format, "rows": o.rows, "uri": o.uri, "step": record.id,
                                     "run_id": ctx.run_id, "image": record.image, "image_id": record.image_id, "repo_digest": record.repo_digest})
    except Exception as exc:  # the asset view must not fail the step
        log.warning("could not add the asset metadata of step %s: %s", record.id, exc)


def _duration(step: StepRecord) -> float | None:
    if step.started_at and step.finished_at:
        return round((step.finished_at - step.started_at).total_seconds(), 3)
    return None


def _outputs_text(step: StepRecord) -> str:
    return "; ".join(
        f"{o.name}: {o.uri} sha256={o.sha256}" + (f" rows={o.rows}" if o.rows is not None else "") for o in step.outputs
    )


def steps_table(doc: LineageDocument) -> list[dict[str, Any]]:
    """The rows of the steps table artifact."""
    from algodock.runtime.usage import usage_text

    rows = []
    for s in doc.steps:
        rows.append(
            {
                "step": s.id,
                "status": s.status + (f" (from {s.cached_from})" if s.cached_from else ""),
                "algorithm": f"{s.algorithm or ''} {s.algorithm_version or ''}".strip(),
                "image": s.image or "",
                "image_id": s.image_id or "",
                "duration_s": _duration(s),
                "failure": f"{s.failure.kind}: {s.failure.message.splitlines()[0][:200]}" if s.failure else "",
                "usage": usage_text(s.usage.model_dump()) if s.usage else "",
                "outputs": _outputs_text(s),
            }
        )
    return rows


def _size(uri: str) -> int | None:
    """Bytes of a stored output (a file, or a folder's files); None when not on this host's disk."""
    local = local_path_of(uri)
    try:
        if local is None or not local.exists():
            return None
        if local.is_file():
            return local.stat().st_size
        return sum(p.stat().st_size for p in local.rglob("*") if p.is_file() and not p.is_symlink())
    except OSError:
        return None


def _human(n: int | None) -> str:
    if n is None:
        return ""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(n)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def run_markdown(doc: LineageDocument, pipeline: Pipeline | None = None) -> str:
    """The markdown artifact the Prefect UI renders: the steps with what they read, then the outputs.

    The DAG itself is the run graph (every step's task run names its upstream task runs);
    this lists each step's inputs, linking a step to its task run page, and each output
    with its size, rows, sha256 and the image id that made it.
    """
    lines = [f"**Run** `{doc.run_id}` of `{doc.pipeline}`: **{doc.status}** · spec sha256 `{doc.spec_sha256[:12]}` · store `{doc.store}`", ""]
    lines += ["| step | status | reads | image id | duration |", "|---|---|---|---|---|"]
    for s in doc.steps:
        reads: list[str] = []
        if pipeline is not None and s.id in pipeline.bindings:
            for slot, ref in sorted(pipeline.bindings[s.id].items()):
                reads.append(f"{slot} ← input {ref.name}" if ref.kind == "input" else f"{slot} ← {ref.name}.{ref.output}")
            data = {ref.name for ref in pipeline.bindings[s.id].values() if ref.kind != "input"}
            reads += [f"after {d}" for d in sorted(pipeline.dependencies.get(s.id, set()) - data)]
        name = f"[{s.id}](/runs/task-run/{s.task_run_id})" if s.task_run_id else s.id
        status = s.status + (f" (from run `{s.cached_from}`)" if s.cached_from else "")
        if s.failure:
            status += f": {s.failure.kind}"
        duration = _duration(s)
        lines.append(f"| {name} | {_cell(status)} | {_cell(', '.join(reads))} | `{(s.image_id or '')[:19]}` | {'' if duration is None else f'{duration:g} s'} |")
    lines += ["", "| step | output | rows | size | sha256 | in the store | schema |", "|---|---|---|---|---|---|---|"]
    prefix = doc.store.rstrip("/") + "/"
    for s in doc.steps:
        for o in s.outputs:
            rows = "" if o.rows is None else str(o.rows)
            size = getattr(o, "size", None)
            where = o.uri[len(prefix):] if o.uri.startswith(prefix) else o.uri
            lines.append(f"| {s.id} | {o.name} | {rows} | {_human(size if size is not None else _size(o.uri))} | `{o.sha256[:16]}…` | `{_cell(where)}` | {_cell(schema_text(o.schema_).strip())} |")
    lines += ["", f"The full record: `algodock lineage {doc.run_id} --store {doc.store}`."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- Prefect


def publish_run_artifacts(doc: LineageDocument, pipeline: Pipeline | None = None) -> None:
    """Create the steps table and DAG markdown artifacts of the current flow run."""
    try:
        from prefect.artifacts import create_markdown_artifact, create_table_artifact

        create_table_artifact(
            table=steps_table(doc),
            key=artifact_key(doc.pipeline, "steps"),
            description=f"Steps of run {doc.run_id} ({doc.status}); the full record is {doc.store}/runs/{doc.run_id}/lineage.json",
        )
        create_markdown_artifact(
            markdown=run_markdown(doc, pipeline),
            key=artifact_key(doc.pipeline, "run"),
            description=f"Steps and outputs of run {doc.run_id} (the DAG is the run graph)",
        )
    except Exception as exc:  # the UI's view of a run must not fail the run
        log.warning("could not create the artifacts of run %s: %s", doc.run_id, exc)


__all__ = ["add_output_metadata", "artifact_key", "asset_key", "cached_state", "output_asset_keys", "publish_run_artifacts", "run_markdown", "steps_table"]
