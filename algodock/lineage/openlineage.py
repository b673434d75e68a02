"""OpenLineage run events for pipeline steps, through openlineage-python.

Each step attempt is one OpenLineage run of the job ``<pipeline>.<step>`` in the namespace
``$OPENLINEAGE_NAMESPACE`` (default ``algodock``): a ``START`` event when the step starts,
then ``COMPLETE`` or ``FAIL`` when it ends. A cached step (no container started) also gets
``START`` and then ``COMPLETE``, whose outputs are the reused outputs of the earlier run and
whose ``algodock_step`` facet says ``status: cached`` and ``cached_from``.

What the events carry:

* inputs and outputs as datasets named by the OpenLineage naming spec: a local file or
  folder is namespace ``file``, name its absolute path; ``s3://bucket/key`` is namespace
  ``s3://bucket``, name ``key``. Parquet datasets get a ``schema`` facet: an output's is the
  Arrow schema recorded in the lineage, an input's is read from the footer (the first part of
  a folder); every dataset recorded with a hash gets a ``version``
  facet holding its sha256; outputs with a row count get ``outputStatistics``.
* run facets: ``parent`` (the pipeline run: job ``<pipeline>``, run id the Prefect flow-run id
  when there is one, else a UUID derived from the algodock run id), ``errorMessage`` on
  ``FAIL``, and two custom facets the spec has no equivalent for: ``algodock_image``
  (``image`` as written, the immutable ``image_id`` and ``repo_digest``) and ``algodock_step``
  (run id, step id, attempt, status, cache key, ``cached_from``, exit code, failure kind).
  Their JSON Schemas are :data:`FACET_SCHEMAS`.

Configuration is openlineage-python's own: ``OPENLINEAGE_URL`` (HTTP), ``OPENLINEAGE__TRANSPORT__*``
variables (e.g. ``OPENLINEAGE__TRANSPORT__TYPE=file``, ``..._LOG_FILE_PATH=/tmp/ol.jsonl``,
``..._APPEND=true``), ``OPENLINEAGE_CONFIG`` or an ``openlineage.yml``. When none is set (or
``OPENLINEAGE_DISABLED=true``) nothing is emitted and no client is even created. A broken
transport never fails a step: the error is logged.

>>> configured({})
False
>>> configured({"OPENLINEAGE__TRANSPORT__TYPE": "console"})
True
>>> dataset_name("s3://raw/pings/2026/"), dataset_name("/data/x.parquet")
(('s3://raw', 'pings/2026'), ('file', '/data/x.parquet'))
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import attr

from algodock.records import StepRecord
from algodock.store.layout import local_path_of

if TYPE_CHECKING:
    from openlineage.client import OpenLineageClient
    from openlineage.client.generated.base import InputDataset, OutputDataset, RunFacet

log = logging.getLogger("algodock.lineage.openlineage")

DEFAULT_NAMESPACE = "algodock"
NAMESPACE_ENV = "OPENLINEAGE_NAMESPACE"
FACET_VERSION = "1-0-0"
IMAGE_FACET_ID = f"urn:algodock:openlineage:facets:{FACET_VERSION}:AlgodockImageRunFacet.json"
STEP_FACET_ID = f"urn:algodock:openlineage:facets:{FACET_VERSION}:AlgodockStepRunFacet.json"

_BASE_RUN_FACET = "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunFacet"
FACET_SCHEMAS: dict[str, dict[str, Any]] = {
    IMAGE_FACET_ID: {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": IMAGE_FACET_ID,
        "$defs": {
            "AlgodockImageRunFacet": {
                "description": "The container image a step ran by: as written, and its immutable identity.",
                "allOf": [
                    {"$ref": _BASE_RUN_FACET},
                    {
                        "type": "object",
                        "properties": {
                            "image": {"type": "string", "description": "As written in the manifest (a tag, digest or id)."},
                            "image_id": {"type": "string", "pattern": "^sha256:[0-9a-f]{64}$", "description": "The engine's immutable image id the container ran by."},
                            "repo_digest": {"type": "string", "description": "repo@sha256:… when the image came from a registry."},
                        },
                    },
                ],
                "type": "object",
            }
        },
        "type": "object",
        "properties": {"algodock_image": {"$ref": "#/$defs/AlgodockImageRunFacet"}},
    },
    STEP_FACET_ID: {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": STEP_FACET_ID,
        "$defs": {
            "AlgodockStepRunFacet": {
                "description": "Where a step run sits in an algodock pipeline run, and how it ended.",
                "allOf": [
                    {"$ref": _BASE_RUN_FACET},
                    {
                        "type": "object",
                        "properties": {
                            "run_id": {"type": "string"},
                            "step_id": {"type": "string"},
                            "attempt": {"type": "integer", "minimum": 1},
                            "status": {"enum": ["running", "succeeded", "failed", "cached", "skipped"]},
                            "cache_key": {"type": "string"},
                            "cached_from": {"type": "string", "description": "Run whose outputs a cached step reuses."},
                            "exit_code": {"type": "integer"},
                            "failure_kind": {"type": "string"},
                        },
                        "required": ["run_id", "step_id", "status"],
                    },
                ],
                "type": "object",
            }
        },
        "type": "object",
        "properties": {"algodock_step": {"$ref": "#/$defs/AlgodockStepRunFacet"}},
    },
}
"""JSON Schemas of the custom run facets, by ``$id`` (their ``_schemaURL`` is ``<$id>#/$defs/<name>``)."""


# ---------------------------------------------------------------- configuration and client


def configured(env: Mapping[str, str] | None = None) -> bool:
    """True when openlineage-python would find a transport configuration (and is not disabled)."""
    env = os.environ if env is None else env
    if env.get("OPENLINEAGE_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OPENLINEAGE_URL") or any(k.startswith("OPENLINEAGE__TRANSPORT") for k in env):
        return True
    config = env.get("OPENLINEAGE_CONFIG")
    if config and os.path.isfile(config):
        return True
    return env is os.environ and (os.path.isfile("openlineage.yml") or os.path.isfile(os.path.expanduser("~/.openlineage/openlineage.yml")))


_clients: dict[tuple[Any, ...], OpenLineageClient] = {}
_lock = threading.Lock()
_emit_lock = threading.Lock()


def get_client() -> OpenLineageClient | None:
    """The process's client for the current configuration, or None when unconfigured (never created then)."""
    if not configured():
        return None
    key = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("OPENLINEAGE"))) + (os.getcwd(),)
    with _lock:
        client = _clients.get(key)
        if client is None:
            from openlineage.client import OpenLineageClient

            try:
                client = OpenLineageClient()
            except Exception as exc:  # a bad configuration must not fail pipeline steps
                log.warning("OpenLineage is configured but its client cannot be created: %s", exc)
                return None
            _clients[key] = client
        return client


# ---------------------------------------------------------------- facets


def _run_facet_class() -> type:
    from openlineage.client.generated.base import RunFacet

    return RunFacet


def _define_facets() -> tuple[type, type]:
    RunFacet = _run_facet_class()

    @attr.define
    class AlgodockImageRunFacet(RunFacet):  # type: ignore[misc, valid-type]
        """The image a step ran by (the spec has no facet for container images)."""

        image: str | None = attr.field(default=None)
        image_id: str | None = attr.field(default=None)
        repo_digest: str | None = attr.field(default=None)

        @staticmethod
        def _get_schema() -> str:
            return f"{IMAGE_FACET_ID}#/$defs/AlgodockImageRunFacet"

    @attr.define
    class AlgodockStepRunFacet(RunFacet):  # type: ignore[misc, valid-type]
        """The algodock step behind an OpenLineage run."""

        run_id: str = attr.field(default="")
        step_id: str = attr.field(default="")
        status: str = attr.field(default="running")
        attempt: int | None = attr.field(default=None)
        cache_key: str | None = attr.field(default=None)
        cached_from: str | None = attr.field(default=None)
        exit_code: int | None = attr.field(default=None)
        failure_kind: str | None = attr.field(default=None)

        @staticmethod
        def _get_schema() -> str:
            return f"{STEP_FACET_ID}#/$defs/AlgodockStepRunFacet"

    return AlgodockImageRunFacet, AlgodockStepRunFacet


_facet_classes: tuple[type, type] | None = None


def facet_classes() -> tuple[type, type]:
    """``(AlgodockImageRunFacet, AlgodockStepRunFacet)``: attrs subclasses of openlineage's ``RunFacet``."""
    global _facet_classes
    if _facet_classes is None:
        _facet_classes = _define_facets()
    return _facet_classes


def dataset_name(uri: str) -> tuple[str, str]:
    """``(namespace, name)`` of a local path, ``file://`` or ``s3://`` URI, per OpenLineage's naming spec."""
    if uri.startswith("s3://"):
        from openlineage.client.naming.dataset import S3

        bucket, _, key = uri.removeprefix("s3://").strip("/").partition("/")
        naming = S3(bucket_name=bucket, object_key=key or "/")
        return naming.get_namespace(), naming.get_name()
    from openlineage.client.naming.dataset import LocalFileSystem

    local = local_path_of(uri)
    assert local is not None
    path = os.path.normpath(os.path.abspath(local))
    return LocalFileSystem(path=path).get_namespace(), LocalFileSystem(path=path).get_name()


def _parquet_schema(uri: str, store: Any = None) -> Any | None:
    """The pyarrow schema from the footer of a parquet file or the first part of a folder; None if unreadable."""
    import pyarrow.parquet as pq

    try:
        local = local_path_of(uri)
        if local is not None:
            path = Path(local)
            if path.is_dir():
                parts = sorted(p for p in path.rglob("*.parquet") if p.is_file())
                if not parts:
                    return None
                path = parts[0]
            return pq.read_schema(path)
        from algodock.store.s3 import S3Store
        from algodock.store.transfer import s3_filesystem

        fs = store.fs if isinstance(store, S3Store) else s3_filesystem()
        key = uri.removeprefix("s3://").rstrip("/")
        if fs.isdir(key):
            parts = sorted(k for k in fs.find(key) if k.endswith(".parquet"))
            if not parts:
                return None
            key = parts[0]
        with fs.open(key, "rb") as fh:
            return pq.read_schema(fh)
    except Exception as exc:  # a schema is a nicety: never fail an event for it
        log.debug("no parquet schema for %s: %s", uri, exc)
        return None


def _schema_fields(schema: Any) -> list[Any]:
    import pyarrow as pa
    from openlineage.client.generated.schema_dataset import SchemaDatasetFacetFields

    def field(f: pa.Field, position: int) -> SchemaDatasetFacetFields:
        nested = [field(f.type.field(i), i + 1) for i in range(f.type.num_fields)] if pa.types.is_struct(f.type) else []
        return SchemaDatasetFacetFields(name=f.name, type=str(f.type), ordinal_position=position, fields=nested)

    return [field(f, i + 1) for i, f in enumerate(schema)]


def _recorded_schema(recorded: dict[str, Any] | None) -> Any | None:
    """The Arrow schema the lineage recorded for an output (read from its footers when it was made)."""
    if not recorded:
        return None
    import pyarrow as pa

    from algodock.contract.arrow_schema import parse_type

    try:
        return pa.schema([pa.field(c["name"], parse_type(c["type"]), c.get("nullable", True)) for c in recorded["columns"]])
    except (KeyError, TypeError, ValueError) as exc:  # a hand-edited document: read the footer instead
        log.debug("unusable recorded schema %s: %s", recorded, exc)
        return None


def _dataset_facets(uri: str, fmt: str | None, sha256: str | None, store: Any, recorded: dict[str, Any] | None = None) -> dict[str, Any]:
    from openlineage.client.generated.dataset_version_dataset import DatasetVersionDatasetFacet
    from openlineage.client.generated.schema_dataset import SchemaDatasetFacet

    facets: dict[str, Any] = {}
    if fmt == "parquet":
        schema = _recorded_schema(recorded) or _parquet_schema(uri, store)
        if schema is not None:
            facets["schema"] = SchemaDatasetFacet(fields=_schema_fields(schema), producer=PRODUCER)
    if sha256:
        facets["version"] = DatasetVersionDatasetFacet(datasetVersion=f"sha256:{sha256}", producer=PRODUCER)
    return facets


def _size(uri: str) -> int | None:
    local = local_path_of(uri)
    if local is None or not local.exists():
        return None
    if local.is_dir():
        return sum(p.stat().st_size for p in local.rglob("*") if p.is_file() and not p.is_symlink())
    return local.stat().st_size


# ---------------------------------------------------------------- events


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _is_uuid(value: str | None) -> bool:
    try:
        uuid.UUID(str(value))
        return True
    except ValueError:
        return False


class StepEvents:
    """The OpenLineage run of one step attempt: START on creation, COMPLETE/FAIL on :meth:`finished`."""

    def __init__(self, client: OpenLineageClient, ctx: RunContext, record: StepRecord, upstream: Mapping[str, StepRecord]) -> None:
        from openlineage.client.uuid import generate_new_uuid

        self.client = client
        self.ctx = ctx
        self.step_id = record.id
        self.run_uuid = str(generate_new_uuid())
        self.namespace = os.environ.get(NAMESPACE_ENV) or DEFAULT_NAMESPACE
        self.pipeline_name = ctx.pipeline.spec.name
        self._planned_inputs = self._inputs_from_spec(upstream)
        self._emit("START", record, inputs=self._planned_inputs, outputs=[])

    # -- datasets

    def _input_format(self, slot: str) -> str | None:
        manifest = self.ctx.pipeline.manifests.get(self.step_id)
        s = manifest.input_slot(slot) if manifest is not None else None
        return s.format if s is not None else None

    def _inputs_from_spec(self, upstream: Mapping[str, StepRecord]) -> list[tuple[str, str | None, str | None]]:
        """``(uri, format, sha256)`` of each input as the spec binds it (nothing is read or hashed)."""
        found = []
        for slot, ref in getattr(self.ctx.pipeline, "bindings", {}).get(self.step_id, {}).items():
            if ref.kind == "input":
                uri = self.ctx.pipeline.inputs.get(ref.name)
                sha = None
            else:
                producer = upstream.get(ref.name)
                out = next((o for o in producer.outputs if o.name == ref.output), None) if producer else None
                uri, sha = (out.uri, out.sha256) if out else (None, None)
            if uri:
                found.append((uri, self._input_format(slot), sha))
        return found

    def _input_datasets(self, items: list[tuple[str, str | None, str | None]]) -> list[InputDataset]:
        from openlineage.client.generated.base import InputDataset

        out = []
        for uri, fmt, sha in items:
            ns, name = dataset_name(uri)
            out.append(InputDataset(namespace=ns, name=name, facets=_dataset_facets(uri, fmt, sha, self.ctx.store)))
        return out

    def _output_datasets(self, record: StepRecord) -> list[OutputDataset]:
        from openlineage.client.generated.base import OutputDataset
        from openlineage.client.generated.output_statistics_output_dataset import OutputStatisticsOutputDatasetFacet

        out = []
        for o in record.outputs:
            ns, name = dataset_name(o.uri)
            output_facets: dict[str, Any] = {}
            if o.rows is not None:
                output_facets["outputStatistics"] = OutputStatisticsOutputDatasetFacet(rowCount=o.rows, size=_size(o.uri), producer=PRODUCER)
            out.append(OutputDataset(namespace=ns, name=name, facets=_dataset_facets(o.uri, o.format, o.sha256, self.ctx.store, o.schema_), outputFacets=output_facets))
        return out

    # -- run facets

    def _run_facets(self, record: StepRecord, event_type: str) -> dict[str, RunFacet]:
        from openlineage.client.generated.parent_run import Job as ParentJob
        from openlineage.client.generated.parent_run import ParentRunFacet
        from openlineage.client.generated.parent_run import Run as ParentRun

        image_facet, step_facet = facet_classes()
        flow_run_id = getattr(self.ctx, "flow_run_id", None)
        parent_id = str(flow_run_id) if _is_uuid(flow_run_id) else str(uuid.uuid5(uuid.NAMESPACE_URL, f"algodock:run:{self.ctx.run_id}"))
        facets: dict[str, Any] = {
            "parent": ParentRunFacet(run=ParentRun(runId=parent_id), job=ParentJob(namespace=self.namespace, name=self.pipeline_name), producer=PRODUCER),
            "algodock_image": image_facet(image=record.image, image_id=record.image_id, repo_digest=record.repo_digest, producer=PRODUCER),
            "algodock_step": step_facet(
                run_id=self.ctx.run_id,
                step_id=record.id,
                status=record.status,
                attempt=record.attempts or None,
                cache_key=record.cache_key,
                cached_from=record.cached_from,
                exit_code=record.exit_code,
                failure_kind=record.failure.kind if record.failure else None,
                producer=PRODUCER,
            ),
        }
        if event_type == "FAIL":
            from openlineage.client.generated.error_message_run import ErrorMessageRunFacet

            failure = record.failure
            message = f"{failure.kind}: {failure.message}" if failure else f"step {record.id} did not finish"
            facets["errorMessage"] = ErrorMessageRunFacet(message=message, programmingLanguage="unknown", producer=PRODUCER)
        return facets

    # -- emitting

    def _emit(self, event_type: str, record: StepRecord, *, inputs: list[tuple[str, str | None, str | None]], outputs: list[OutputDataset]) -> None:
        from openlineage.client.event_v2 import Job, Run, RunEvent, RunState

        try:
            event = RunEvent(
                eventType=RunState(event_type),
                eventTime=_now(),
                run=Run(runId=self.run_uuid, facets=self._run_facets(record, event_type)),
                job=Job(namespace=self.namespace, name=f"{self.pipeline_name}.{self.step_id}"),
                inputs=self._input_datasets(inputs),
                outputs=outputs,
                producer=PRODUCER,
            )
            with _emit_lock:  # the file transport appends; keep concurrent steps' lines whole
                self.client.emit(event)
        except Exception as exc:  # lineage export must never fail the step
            log.warning("could not emit the OpenLineage %s event of step %s: %s", event_type, self.step_id, exc)

    def finished(self, record: StepRecord) -> None:
        """COMPLETE for a succeeded or cached step, FAIL otherwise."""
        ok = record.status in ("succeeded", "cached")
        inputs = [(i.uri, self._input_format(i.name), i.sha256) for i in record.inputs] or self._planned_inputs
        self._emit("COMPLETE" if ok else "FAIL", record, inputs=inputs, outputs=self._output_datasets(record) if ok else [])


class _NoEvents:
    """Stands in for :class:`StepEvents` when OpenLineage is not configured."""

    def finished(self, record: StepRecord) -> None:
        pass


def _producer() -> str:
    try:
        from importlib.metadata import version

        return f"urn:algodock:{version('algodock')}"
    except Exception:
        return "urn:algodock"


PRODUCER = _producer()
"""The ``producer`` URI of every event (``urn:algodock:<version>``)."""


class RunContext(Protocol):
    """What the events need of a run (algodock.pipeline.execute.RunContext satisfies it)."""

    run_id: str
    flow_run_id: str | None
    pipeline: Any
    store: Any


class OpenLineageObserver:
    """A step observer (algodock.pipeline.execute.StepObserver) that sends START when a step
    starts and COMPLETE or FAIL when it ends. Sends nothing when OpenLineage is not configured.
    """

    def __init__(self) -> None:
        self._events: dict[tuple[str, int], StepEvents | _NoEvents] = {}
        self._lock = threading.Lock()

    def step_started(self, ctx: RunContext, record: StepRecord, upstream: Mapping[str, StepRecord]) -> None:
        events = step_started(ctx, record, upstream)
        with self._lock:
            self._events[(record.id, record.attempts)] = events

    def step_finished(self, ctx: RunContext, record: StepRecord) -> None:
        with self._lock:
            events = self._events.pop((record.id, record.attempts), None)
        if events is not None:
            events.finished(record)


def step_started(ctx: RunContext, record: StepRecord, upstream: Mapping[str, StepRecord] | None = None) -> StepEvents | _NoEvents:
    """Emit START for ``record``'s step now; call ``.finished(record)`` on the result at the end.

    A no-op object when OpenLineage is not configured; never raises.
    """
    client = get_client()
    if client is None:
        return _NoEvents()
    try:
        return StepEvents(client, ctx, record, upstream or {})
    except Exception as exc:
        log.warning("OpenLineage events for step %s are off: %s", record.id, exc)
        return _NoEvents()


__all__ = ["FACET_SCHEMAS", "PRODUCER", "OpenLineageObserver", "StepEvents", "configured", "dataset_name", "facet_classes", "get_client", "step_started"]
