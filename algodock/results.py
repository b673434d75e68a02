"""What a step run produced, as plain records (the runner's return value)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from algodock.errors import StepFailure
from algodock.usage import Usage


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
    usage: Usage | None = None
    """What the container used (see :mod:`algodock.usage`); None when no container ran."""

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
            "usage": self.usage.as_dict() if self.usage else None,
        }
