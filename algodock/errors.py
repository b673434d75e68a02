"""The failure kinds of docs/contract.md §4, one exception class each.

Every failure a step can have is a :class:`StepFailure`; its ``kind`` is the string the
platform reports. Only :class:`InfrastructureError` is retryable by default.
"""

from __future__ import annotations

from typing import ClassVar


class AlgodockError(Exception):
    """Base of every error algodock raises on purpose."""


def shorten(text: str, limit: int = 300) -> str:
    """``text`` cut to ``limit`` characters, saying how long it was: an error message quoting a
    value someone else wrote stays readable however big the value is.

    >>> shorten("x" * 1000, 5)
    'xxxxx… (1,000 characters)'
    """
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} characters)"


class StepFailure(AlgodockError):
    """A step failed; ``kind`` is one of docs/contract.md §4."""

    kind: ClassVar[str] = "infrastructure"
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code

    def as_dict(self) -> dict[str, object]:
        """The ``failure`` object of the run summaries."""
        return {"kind": self.kind, "message": self.message, "exit_code": self.exit_code}


class _ErrorList(StepFailure):
    """A failure found by validation: every error, one line each, naming file and field."""

    def __init__(self, message: str, *, errors: list[str] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or [message]


class InvalidManifest(_ErrorList):
    """The manifest or pipeline does not validate."""

    kind = "invalid_manifest"


class InvalidInput(_ErrorList):
    """Parameters fail the schema, or a required input is missing or unreadable."""

    kind = "invalid_input"


class ImageNotFound(StepFailure):
    """The image cannot be found locally or pulled."""

    kind = "image_not_found"


class ExitCodeFailure(StepFailure):
    """The container exited non-zero; the message carries the log tail."""

    kind = "exit_code"


class TimeoutFailure(StepFailure):
    """The container ran past ``timeout_seconds`` and was killed."""

    kind = "timeout"


class OomFailure(StepFailure):
    """The container was killed for exceeding its memory limit."""

    kind = "oom"


class InvalidOutput(StepFailure):
    """``algo_output.json`` is malformed or points outside the output folder."""

    kind = "invalid_output"


class DiskLimitFailure(StepFailure):
    """The algorithm wrote more than ``output_mb`` or ``output_files`` into ``/work/output`` and was stopped."""

    kind = "disk_limit"


class MissingOutput(StepFailure):
    """A required declared output was not produced."""

    kind = "missing_output"


class InfrastructureError(StepFailure):
    """The engine, the store or the network failed; worth retrying."""

    kind = "infrastructure"
    retryable = True


FAILURE_KINDS: dict[str, type[StepFailure]] = {
    cls.kind: cls
    for cls in (
        InvalidManifest,
        InvalidInput,
        ImageNotFound,
        ExitCodeFailure,
        TimeoutFailure,
        OomFailure,
        InvalidOutput,
        DiskLimitFailure,
        MissingOutput,
        InfrastructureError,
    )
}
