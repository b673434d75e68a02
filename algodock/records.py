"""Records of step runs and pipeline runs (CONTRACT.md §5).

The runner returns a :class:`StepResult` (plain dataclasses: what one container run
produced); a pipeline keeps one :class:`StepRecord` per step in the run's lineage document
(pydantic: exported as ``schemas/lineage.schema.json``). The lineage document is the source
of truth about a run. It is rewritten in the store as each step ends, so a crash mid-run
leaves every finished step recorded. The run summary that ``algodock run --json`` prints is
a view of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from algodock.errors import StepFailure


@dataclass(frozen=True)
class InputBinding:
    """Data to stage into one input slot."""

    slot: str
    """The manifest's input slot name."""
    path: Path
    """A local file or folder holding the data (for S3 data: where it was downloaded)."""
    uri: str | None = None
    """Where the data lives for the record (local path, file:// or s3:// URI); ``path`` if None."""
    sha256: str | None = None
    """Known content hash (see :mod:`algodock.hashing`); computed while staging when None."""
    produced_by: str | None = None
    """Step id that produced the data, None for an external input."""
    rows: int | None = None
    """Known parquet row count, if any."""


@dataclass(frozen=True)
class InputRecord:
    name: str
    uri: str
    sha256: str
    format: str
    produced_by: str | None = None
    rows: int | None = None
    files: tuple[str, ...] = ()


@dataclass(frozen=True)
class OutputRecord:
    """One declared output found in the output folder, hashed."""

    name: str
    path: Path
    """Absolute local path of the file or folder."""
    format: str
    sha256: str
    rows: int | None
    multiple: bool
    uri: str | None = None
    """Where it was stored (filled by the pipeline's store); ``path`` when None."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "uri": self.uri or str(self.path),
            "sha256": self.sha256,
            "format": self.format,
            "rows": self.rows,
        }


@dataclass(frozen=True)
class ResolvedImage:
    """An image resolved to its immutable identity before the run."""

    ref: str
    """As written in the manifest."""
    id: str
    """``sha256:…`` image id; the container runs by this."""
    repo_digest: str | None
    """``repo@sha256:…`` when the image came from a registry."""
    user: str
    """The image's ``USER`` (empty when unset)."""


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t else None


@dataclass
class StepResult:
    """Everything lineage needs about one step run (CONTRACT.md §5)."""

    status: Literal["succeeded", "failed"]
    image: str
    image_id: str | None = None
    repo_digest: str | None = None
    command: list[str] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    resource_request: dict[str, Any] = field(default_factory=dict)
    inputs: list[InputRecord] = field(default_factory=list)
    outputs: list[OutputRecord] = field(default_factory=list)
    failure: StepFailure | None = None
    exit_code: int | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    message: str | None = None
    log_tail: list[str] = field(default_factory=list)
    container_id: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "succeeded"

    def summary(self) -> dict[str, Any]:
        """The ``algodock run-step --json`` document."""
        return {
            "status": self.status,
            "failure": self.failure.as_dict() if self.failure else None,
            "image": self.image,
            "image_id": self.image_id,
            "repo_digest": self.repo_digest,
            "outputs": [o.as_dict() for o in self.outputs],
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
        }


LINEAGE_VERSION = "0.1"
StepStatus = Literal["pending", "running", "succeeded", "failed", "cached", "skipped"]
HASH_DESCRIPTION = (
    "sha256 (hex) of the file's bytes; for a folder, the sha256 of the sha256sum-style listing of its regular files, "
    'one line "<hex sha256>  <path relative to the folder>\\n" per file, sorted by path (see algodock.hashing).'
)


class Failure(BaseModel):
    kind: str
    message: str
    exit_code: int | None = None


class InputLineage(BaseModel):
    name: str
    uri: str
    sha256: str = Field(description=HASH_DESCRIPTION)
    produced_by: str | None = Field(None, description="Step id that produced it; null for an external input.")
    rows: int | None = None


class OutputLineage(BaseModel):
    name: str
    uri: str
    sha256: str = Field(description=HASH_DESCRIPTION)
    format: str
    rows: int | None = None


class StepRecord(BaseModel):
    """Everything recorded about one step of a run."""

    id: str
    status: StepStatus = "pending"
    algorithm: str | None = None
    algorithm_version: str | None = None
    image: str | None = Field(None, description="As written in the manifest.")
    image_id: str | None = Field(None, description="Immutable image id the container ran by.")
    repo_digest: str | None = None
    command: list[str] = Field(default_factory=list)
    parameters: dict[str, Any] = Field(default_factory=dict, description="After defaults.")
    resource_request: dict[str, Any] = Field(default_factory=dict)
    inputs: list[InputLineage] = Field(default_factory=list)
    outputs: list[OutputLineage] = Field(default_factory=list)
    failure: Failure | None = None
    exit_code: int | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    attempts: int = 0
    task_run_id: str | None = None
    cache_key: str | None = Field(None, description="sha256 of the step's identity: image id, command, env, parameters, input hashes, slots (see algodock.lineage.cache).")
    cached_from: str | None = Field(None, description="Run id whose outputs a cached step reuses.")
    log_uri: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The step object of ``algodock run --json``."""
        return self.model_dump(
            mode="json",
            include={"id", "status", "failure", "image", "image_id", "started_at", "finished_at", "outputs"},
        )


class LineageDocument(BaseModel):
    """What produced what in one run."""

    lineage_version: str = LINEAGE_VERSION
    run_id: str
    pipeline: str
    spec_sha256: str
    flow_run_id: str | None = None
    status: Literal["running", "succeeded", "failed", "cancelled"] = "running"
    started_at: datetime | None = None
    finished_at: datetime | None = None
    store: str
    steps: list[StepRecord] = Field(default_factory=list)

    def step(self, step_id: str) -> StepRecord:
        return next(s for s in self.steps if s.id == step_id)


def record_from_result(record: StepRecord, result: StepResult) -> StepRecord:
    """Fill a step record from the runner's result (outputs as they were stored)."""
    record.image = result.image
    record.image_id = result.image_id
    record.repo_digest = result.repo_digest
    record.command = result.command
    record.parameters = result.parameters
    record.resource_request = result.resource_request
    record.inputs = [
        InputLineage(name=i.name, uri=i.uri, sha256=i.sha256, produced_by=i.produced_by, rows=i.rows) for i in result.inputs
    ]
    record.outputs = [OutputLineage(**o.as_dict()) for o in result.outputs]
    record.failure = Failure(**result.failure.as_dict()) if result.failure else None
    record.exit_code = result.exit_code
    record.started_at = result.started_at
    record.finished_at = result.finished_at
    record.metrics = result.metrics
    record.status = "succeeded" if result.ok else "failed"
    return record
