"""Records of pipeline runs: one per step (CONTRACT.md §5) and the run's lineage document.

The lineage document is the source of truth about a run. It is rewritten in the store as
each step ends, so a crash mid-run leaves every finished step recorded. The run summary
that ``algodock run --json`` prints is a view of it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from algodock.results import StepResult

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
    cache_key: str | None = Field(None, description="sha256 of the step's identity: image id, command, env, parameters, input hashes, slots (see algodock.cache).")
    cached_from: str | None = Field(None, description="Run id whose outputs a cached step reuses.")
    log_uri: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    engine: dict[str, str] | None = Field(None, description='The Docker engine the step ran on: {"name", "id"} as `docker info` reports them.')
    attempt_history: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Cluster mode: every attempt (number, engine, worker, status, times); an attempt lost with its worker is `lost`.",
    )

    def summary(self) -> dict[str, Any]:
        """The step object of ``algodock run --json``."""
        return self.model_dump(
            mode="json",
            include={"id", "status", "failure", "image", "image_id", "started_at", "finished_at", "outputs", "engine"},
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
