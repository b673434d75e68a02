"""Records of step runs and pipeline runs (docs/contract.md §6).

One record per concept: a :class:`StepRecord` is what ``run_step`` returns and what a
pipeline keeps per step in the run's lineage document (exported as
``schemas/lineage.schema.json``), with :class:`InputRecord` and :class:`OutputRecord` for its
data; :class:`InputBinding` and :class:`ResolvedImage` are what a run is given. The lineage document is the source
of truth about a run. It is rewritten in the store as each step ends, so a crash mid-run
leaves every finished step recorded. The run summary that ``algodock run --json`` prints is
a view of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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
    files: tuple[str, ...] | None = None
    """For a folder: the relative files ``sha256`` was computed over. Staging stages exactly
    these (the folder is not listed again), so a file added since is never staged unhashed."""


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


LINEAGE_VERSION = "0.1"
StepStatus = Literal["pending", "running", "succeeded", "failed", "cached", "skipped"]
HASH_DESCRIPTION = (
    "sha256 (hex) of the file's bytes; for a folder, the sha256 of one framed entry per regular file, "
    '"<hex sha256> <byte length of the path>:<path relative to the folder>\\n", sorted by the path\'s bytes '
    "(length-prefixed, so no file name can forge it; see algodock.hashing for a shell line that reproduces it)."
)


class Failure(BaseModel):
    """How a step failed: one of docs/contract.md §4's kinds (see :mod:`algodock.errors`)."""

    kind: str
    message: str
    exit_code: int | None = None

    @classmethod
    def of(cls, error: StepFailure) -> Failure:
        return cls(kind=error.kind, message=error.message, exit_code=error.exit_code)

    @property
    def retryable(self) -> bool:
        """Whether retrying the step may help (the kind's own answer, see :mod:`algodock.errors`)."""
        from algodock.errors import FAILURE_KINDS

        return FAILURE_KINDS[self.kind].retryable if self.kind in FAILURE_KINDS else False

    @property
    def errors(self) -> list[str]:
        """The message's lines (validation failures list one error a line)."""
        return self.message.splitlines() or [self.kind]


class InputRecord(BaseModel):
    """One input slot as staged for a step: where its data came from and its content hash."""

    name: str
    uri: str
    sha256: str = Field(description=HASH_DESCRIPTION)
    format: str | None = None
    produced_by: str | None = Field(None, description="Step id that produced it; null for an external input.")
    produced_by_task_run: str | None = Field(None, description="A table handed over by a Python task of a flow: the Prefect task run that returned it.")
    rows: int | None = None
    files: list[str] = Field(default_factory=list, exclude=True)
    """The files as the container sees them (in algo_input.json; not recorded in lineage)."""


class OutputRecord(BaseModel):
    """One declared output: found in the output folder, hashed, then (in a pipeline) stored."""

    # The key is "schema" (BaseModel has a method of that name, hence the alias).
    model_config = ConfigDict(validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)

    name: str
    uri: str = Field(description="Where it is: the store's file:// path or s3:// URI (a local path for run-step).")
    sha256: str = Field(description=HASH_DESCRIPTION)
    format: str
    rows: int | None = None
    schema_: dict[str, Any] | None = Field(
        None,
        alias="schema",
        exclude_if=lambda schema: schema is None,
        description="parquet: the Arrow schema of the bytes as a slot schema object (columns with pyarrow type strings), read from the footers.",
    )
    path: Path | None = Field(None, exclude=True)
    """The local file or folder while the step runs (not recorded)."""
    multiple: bool = Field(False, exclude=True)
    """A folder of files (``multiple: true`` slot)."""

    @model_validator(mode="before")
    @classmethod
    def _uri_from_path(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("uri") and data.get("path") is not None:
            data = {**data, "uri": str(data["path"])}
        return data

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class Usage(BaseModel):
    """What a step's container used, from the engine's cgroup accounting (see algodock.runtime.usage).

    None means not measured (never a guess).
    """

    peak_memory_bytes: int | None = Field(None, description="Highest memory charged to the container's cgroup (page cache and the /tmp tmpfs included).")
    cpu_seconds: float | None = Field(None, description="CPU time of all its processes, user and system.")
    wall_seconds: float | None = Field(None, description="From the container's start to its exit.")
    output_bytes: int | None = Field(None, description="Bytes of the regular files it wrote to /work/output (algo_output.json included).")
    output_files: int | None = Field(None, description="Files plus folders it wrote to /work/output.")

    def as_dict(self) -> dict[str, Any]:
        """The ``usage`` object of ``run-step --json`` and of the lineage document."""
        return self.model_dump(mode="json")


class StepRecord(BaseModel):
    """Everything recorded about one step (docs/contract.md §6): what ``run_step`` returns, and
    one entry of a run's lineage document. Fields marked ``exclude`` stay in memory only."""

    model_config = ConfigDict(validate_assignment=True)

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
    inputs: list[InputRecord] = Field(default_factory=list)
    outputs: list[OutputRecord] = Field(default_factory=list)
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
    message: str | None = Field(None, description="The algorithm's own message (algo_output.json).")
    log_tail: list[str] = Field(default_factory=list, exclude=True)
    container_id: str | None = Field(None, exclude=True)
    engine: dict[str, str] | None = Field(None, description='The Docker engine the step ran on: {"name", "id"} as `docker info` reports them.')
    attempt_history: list[dict[str, Any]] = Field(
        default_factory=list,
        description=(
            "Cluster mode: every attempt (number, engine, worker, status, times); an attempt lost with its worker is `lost`. "
            "A step whose outputs the store refused: the attempt that ran the container and the one that committed its kept outputs (`ran_container`, `committed_from`)."
        ),
    )
    usage: Usage | None = Field(None, description="What the container used; null when no container ran (cached, skipped, failed before start).")

    @field_validator("failure", mode="before")
    @classmethod
    def _failure_of_error(cls, value: Any) -> Any:
        return Failure.of(value) if isinstance(value, StepFailure) else value

    @property
    def ok(self) -> bool:
        return self.status == "succeeded"

    def step_summary(self) -> dict[str, Any]:
        """The ``algodock run-step --json`` document."""
        return self.model_dump(
            mode="json",
            include={"status", "failure", "image", "image_id", "repo_digest", "outputs", "started_at", "finished_at", "usage"},
        )

    def summary(self) -> dict[str, Any]:
        """The step object of ``algodock run --json``."""
        return self.model_dump(
            mode="json",
            include={"id", "status", "failure", "image", "image_id", "started_at", "finished_at", "outputs", "usage", "engine", "cached_from"},
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


RUN_FIELDS = (
    "status", "image", "image_id", "repo_digest", "command", "parameters", "resource_request", "inputs", "outputs",
    "failure", "exit_code", "started_at", "finished_at", "metrics", "message", "log_tail", "container_id", "usage",
)
"""What one container run fills in (``run_step``); a pipeline adds the rest (id, attempts, cache, task run)."""


def record_from_result(record: StepRecord, result: StepRecord) -> StepRecord:
    """``record`` (a pipeline's record of the step) with the fields ``run_step`` filled in ``result``."""
    for name in RUN_FIELDS:
        setattr(record, name, getattr(result, name))
    return record
