"""The one retry policy of every algorithm step, a Python flow's or a pipeline's: Prefect's
retries, its delays with jitter, and a condition that reads the failure's kind from the
exception (never from its text)."""

from __future__ import annotations

from typing import Any


INFRA_RETRIES = 2
"""How often an ``infrastructure`` failure is retried, whatever the step says."""
USER_RETRY_KINDS = {"exit_code", "timeout", "oom"}
"""Failure kinds retried only when the step sets ``retries``."""
RETRY_DELAYS_SECONDS = [2.0, 10.0]
"""Prefect's wait before each retry of a step (the last repeats): an engine or store that just
failed gets time to come back instead of all attempts being spent within a second."""
RETRY_JITTER_FACTOR = 0.5
"""Each delay is drawn at random around its nominal value, within this fraction (Prefect's jitter), so steps that failed together do not retry together."""


def retry_condition(max_user_retries: int) -> Any:
    """Prefect's retry condition: ``infrastructure`` always, ``exit_code``/``timeout``/``oom`` up to ``max_user_retries``, nothing else (the kind is the exception's own, never parsed from text)."""

    def should_retry(task: Any, task_run: Any, state: Any) -> bool:
        exc = state.result(raise_on_failure=False)
        kind = getattr(exc, "kind", "infrastructure")
        if kind == "infrastructure":
            return True
        return kind in USER_RETRY_KINDS and task_run.run_count <= max_user_retries

    return should_retry


def retry_options(user_retries: int) -> dict[str, Any]:
    """Prefect's retry settings of every algorithm step, a pipeline's or a Python flow's:
    ``infrastructure`` up to :data:`INFRA_RETRIES` times, the user kinds up to ``user_retries``,
    after :data:`RETRY_DELAYS_SECONDS` with :data:`RETRY_JITTER_FACTOR` (read at each call)."""
    return {
        "retries": max(user_retries, INFRA_RETRIES),
        "retry_delay_seconds": RETRY_DELAYS_SECONDS,
        "retry_jitter_factor": RETRY_JITTER_FACTOR,
        "retry_condition_fn": retry_condition(user_retries),
    }
