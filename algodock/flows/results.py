"""What an algorithm call gives back: its :class:`StepResult`, or :class:`AlgorithmFailed`
naming the contract's failure kind; :class:`InvalidCall` for a call refused before any
container; :func:`output` to pick one named output of an upstream step."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


from algodock.errors import InvalidInput
from algodock.records import OutputRecord, StepRecord, Usage
from algodock.store.layout import local_path_of


class AlgorithmFailed(Exception):
    """An algorithm step failed: ``kind`` is one of the contract's failure kinds.

    Raised from a failed algorithm task's ``.result()`` (and inside the task, so that
    Prefect records the failure and retries ``infrastructure``).
    """

    def __init__(self, kind: str, step_id: str, message: str, log_tail: list[str] | None = None, record: StepRecord | None = None) -> None:
        self.kind = kind
        self.step_id = step_id
        self.message = message
        self.log_tail = list(log_tail or [])
        self.record = record
        """The step's record in the lineage, when it got that far."""
        tail = ("\n" + "\n".join(self.log_tail[-20:])) if self.log_tail else ""
        super().__init__(f"step {step_id} failed ({kind}): {message}{tail}")

    def __reduce__(self) -> tuple[Any, ...]:  # pickled back from a Dask worker
        return (type(self), (self.kind, self.step_id, self.message, self.log_tail, self.record))


class InvalidCall(InvalidInput, ValueError):
    """What an algorithm call was given cannot run (``invalid_input``), found when the call is made:
    the message names the algorithm, the step and the field. A ``ValueError`` too, as Python's
    own argument errors are."""


@dataclass
class StepResult:
    """What an algorithm task returns: the step as the lineage records it.

    ``outputs``: output name -> its record (``uri``, ``sha256``, ``format``, ``rows``);
    :meth:`read` gives one as a ``pyarrow.Table``.
    """

    step_id: str
    status: str
    """``succeeded``, or ``cached`` when no container ran (its outputs come from an earlier run)."""
    image_id: str | None
    repo_digest: str | None
    outputs: dict[str, OutputRecord]
    usage: Usage | None
    run_id: str
    cached_from: str | None = None
    record: StepRecord | None = field(default=None, repr=False, compare=False)

    @classmethod
    def of(cls, record: StepRecord, run_id: str, status: str | None = None) -> StepResult:
        return cls(
            step_id=record.id,
            status=status or record.status,
            image_id=record.image_id,
            repo_digest=record.repo_digest,
            outputs={o.name: o for o in record.outputs},
            usage=record.usage,
            run_id=run_id,
            cached_from=record.cached_from,
            record=record,
        )

    def read(self, name: str) -> Any:
        """Output ``name`` as a ``pyarrow.Table`` (a parquet file, or a folder of parquet files; any store)."""
        import pyarrow.dataset as ds
        import pyarrow.parquet as pq

        if name not in self.outputs:
            raise KeyError(f"step {self.step_id} has no output {name!r} (outputs: {', '.join(self.outputs) or 'none'})")
        uri = self.outputs[name].uri
        local = local_path_of(uri)
        if local is not None:
            return pq.read_table(local) if local.is_file() else ds.dataset(local, format="parquet").to_table()
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
        if fs.isdir(path):
            return ds.dataset(path, format="parquet", filesystem=fs).to_table()
        with fs.open(path, "rb") as fh:
            return pq.read_table(fh)


@dataclass(frozen=True)
class OutputRef:
    """One named output of an upstream algorithm step (see :func:`output`)."""

    source: Any
    """A :class:`StepResult`, or the future of an algorithm task (resolved by Prefect)."""
    name: str


def output(result: Any, name: str) -> OutputRef:
    """Output ``name`` of an upstream algorithm step (its future or its :class:`StepResult`),
    to give to a slot of another name: ``inputs={"visits": output(v, "visits")}``."""
    return OutputRef(result, name)
