"""What a pipeline run shows in the Prefect UI besides its task runs.

* Per run, two artifacts on the flow run (also under stable keys, so the Artifacts page keeps
  the history of a pipeline): ``algodock-<pipeline>-steps``, a table of the steps (status,
  image id, duration, outputs with their sha256), and ``algodock-<pipeline>-dag``, markdown
  with the DAG as a mermaid graph and the outputs as links.
* Per succeeded step, Prefect asset events for its outputs: ``prefect.asset.materialization.succeeded``
  for each output (asset key: the output's URI, ``file:///…`` or ``s3://…``) with the step's
  inputs as upstream assets (related resources with role ``asset``, each also announced by a
  ``prefect.asset.referenced`` event), ``materialized_by: algodock``, and the sha256, format,
  row count and image id as the event payload. This is what ``@materialize`` emits, without
  having to know the outputs when the task is defined. Cached steps materialize nothing (as
  Prefect's own cached tasks), so the Assets page shows when bytes were really produced.

Nothing here may fail a run: every function logs and returns on error.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

from algodock.records import LineageDocument, StepRecord
from algodock.store.backends import local_path_of

if TYPE_CHECKING:
    from algodock.pipeline import Pipeline

log = logging.getLogger("algodock.flows.artifacts")

MATERIALIZED_BY = "algodock"
_STATUS_STYLE = {
    "succeeded": "fill:#d1fadf,stroke:#12b76a",
    "cached": "fill:#d1e9ff,stroke:#2e90fa",
    "failed": "fill:#fee4e2,stroke:#f04438",
    "skipped": "fill:#fef0c7,stroke:#f79009",
    "running": "fill:#f2f4f7,stroke:#667085",
    "pending": "fill:#f2f4f7,stroke:#98a2b3",
}


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


def _node_id(prefix: str, name: str) -> str:
    return f"{prefix}_{re.sub(r'[^A-Za-z0-9_]', '_', name)}"


def _label(text: str) -> str:
    return text.replace('"', "#quot;")


def dag_markdown(doc: LineageDocument, pipeline: Pipeline | None = None) -> str:
    """The markdown artifact: the DAG as mermaid (status colours, data edges labelled with the input slot) and output links."""
    steps = {s.id: s for s in doc.steps}
    lines = ["```mermaid", "graph LR"]
    edges: list[str] = []
    externals: dict[str, str] = {}
    for s in doc.steps:
        status = s.status + (f" from {s.cached_from}" if s.cached_from else "")
        image = f"<br/>{(s.image_id or '')[:19]}" if s.image_id else ""
        lines.append(f'  {_node_id("s", s.id)}["{_label(s.id)}<br/><i>{_label(status)}</i>{image}"]:::{s.status}')
        data_deps: set[str] = set()
        if pipeline is not None and s.id in pipeline.bindings:
            for slot, ref in sorted(pipeline.bindings[s.id].items()):
                if ref.kind == "input":
                    externals[ref.name] = pipeline.inputs.get(ref.name, "")
                    edges.append(f"  {_node_id('in', ref.name)} -->|{_label(slot)}| {_node_id('s', s.id)}")
                else:
                    data_deps.add(ref.name)
                    edges.append(f"  {_node_id('s', ref.name)} -->|{_label(slot)}| {_node_id('s', s.id)}")
            for dep in sorted(pipeline.dependencies.get(s.id, set()) - data_deps):
                edges.append(f"  {_node_id('s', dep)} -.->|after| {_node_id('s', s.id)}")
        else:
            for inp in s.inputs:
                if inp.produced_by is None:
                    externals[inp.name] = inp.uri
                    edges.append(f"  {_node_id('in', inp.name)} -->|{_label(inp.name)}| {_node_id('s', s.id)}")
                elif inp.produced_by in steps:
                    edges.append(f"  {_node_id('s', inp.produced_by)} -->|{_label(inp.name)}| {_node_id('s', s.id)}")
    for name, uri in sorted(externals.items()):
        lines.append(f'  {_node_id("in", name)}[("{_label(name)}<br/>{_label(uri)}")]')
    lines += edges
    lines += [f"  classDef {status} {style}" for status, style in _STATUS_STYLE.items()]
    lines.append("```")

    lines += ["", f"**Run** `{doc.run_id}` of `{doc.pipeline}`: **{doc.status}** · spec sha256 `{doc.spec_sha256[:12]}` · store `{doc.store}`", ""]
    lines += ["| step | output | location | sha256 | rows |", "|---|---|---|---|---|"]
    for s in doc.steps:
        for o in s.outputs:
            key = asset_key(o.uri)
            link = f"[{o.uri}]({key})" if key and key.startswith("file://") else f"`{o.uri}`"
            rows = "" if o.rows is None else str(o.rows)
            lines.append(f"| {s.id} | {o.name} | {link} | `{o.sha256[:16]}…` | {rows} |")
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
            markdown=dag_markdown(doc, pipeline),
            key=artifact_key(doc.pipeline, "dag"),
            description=f"DAG and outputs of run {doc.run_id}",
        )
    except Exception as exc:  # the UI's view of a run must not fail the run
        log.warning("could not create the artifacts of run %s: %s", doc.run_id, exc)


def emit_step_assets(record: StepRecord, run_id: str | None = None) -> None:
    """Asset materialization events for a succeeded step's outputs, with its inputs as upstream assets."""
    if record.status != "succeeded" or record.cached_from or not record.outputs:
        return
    try:
        from prefect.assets import Asset, AssetProperties
        from prefect.context import AssetContext
        from prefect.states import Completed

        upstream = {Asset(key=k) for k in (asset_key(i.uri) for i in record.inputs) if k}
        downstream: set[Asset] = set()
        metadata: dict[str, dict[str, Any]] = {}
        for o in record.outputs:
            key = asset_key(o.uri)
            if key is None:
                log.info("step %s: output %s cannot be a Prefect asset key; no materialization event", record.id, o.uri)
                continue
            downstream.add(Asset(key=key, properties=AssetProperties(name=f"{record.id}.{o.name}", description=f"Output {o.name!r} of step {record.id} ({o.format})")))
            metadata[key] = {
                "sha256": o.sha256,
                "format": o.format,
                "rows": o.rows,
                "step": record.id,
                "run_id": run_id,
                "image": record.image,
                "image_id": record.image_id,
                "repo_digest": record.repo_digest,
            }
        if not downstream:
            return
        AssetContext(
            downstream_assets=downstream,
            upstream_assets=upstream,
            materialized_by=MATERIALIZED_BY,
            materialization_metadata=metadata,
        ).emit_events(Completed())
    except Exception as exc:
        log.warning("could not emit the asset events of step %s: %s", record.id, exc)


__all__ = ["artifact_key", "asset_key", "dag_markdown", "emit_step_assets", "publish_run_artifacts", "steps_table"]
