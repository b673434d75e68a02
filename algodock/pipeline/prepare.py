"""What prepares a pipeline run, done once, before any container (no Prefect here).

:func:`prepare_run` refuses a host-local store for a cluster run, loads and validates the spec
against the capacity, and takes the run's lease in the store. ``algodock run`` prepares the run
this way before it starts a flow (a bad spec or a busy run fails without Prefect); the flow it
starts finds that preparation (:func:`take_prepared`) instead of doing it again. A flow started
any other way (a deployment, a call from Python) prepares its run itself, the same way.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from algodock.errors import InvalidInput
from algodock.pipeline.capacity import Capacity
from algodock.pipeline.load import build_pipeline, load_pipeline
from algodock.pipeline.spec import BlockResolver
from algodock.pipeline.validate import Pipeline
from algodock.store.base import Store
from algodock.store.lease import RunLease


@dataclass
class PreparedRun:
    """A run ready to start: its validated pipeline, store, id, capacity and lease."""

    pipeline: Pipeline
    store: Store
    run_id: str
    capacity: Capacity | None
    """None for a cluster run without ``--capacity``: the flow asks the workers."""
    lease: RunLease
    spec: str
    """The spec as the flow is given it (a file path), to recognise the same run."""


def check_shared_store(store: str | None, shared: bool) -> None:
    """Cluster mode needs a store every host reaches: S3, or a path declared shared.

    Raises :class:`InvalidInput` (before any container starts) for a host-local store.
    """
    if store and store.startswith("s3://"):
        return
    if shared and store:
        return
    where = store or "the default ./.algodock/store"
    raise InvalidInput(
        f"store: {where} is local to this host, but --cluster runs steps on other hosts. "
        "Use an S3 store (--store s3://bucket/prefix) or a path every host mounts at the same place, "
        "declared with --shared-store (flow parameter shared_store=True)."
    )


def load_spec(
    spec: str | Path | Mapping[str, Any],
    overrides: Mapping[str, Mapping[str, Any]] | None,
    capacity: Capacity | None,
    resolve_block: BlockResolver | None,
    require_digest: bool = False,
) -> Pipeline:
    """A spec file (or the spec as a dict) loaded and validated against ``capacity`` (and, with
    ``require_digest``, refused where a step's image is not pinned by digest)."""
    if isinstance(spec, Mapping):
        return build_pipeline(spec, overrides=overrides, capacity=capacity, resolve_block=resolve_block, require_digest=require_digest)
    return load_pipeline(Path(spec), overrides=overrides, capacity=capacity, resolve_block=resolve_block, require_digest=require_digest)


_PREPARED: dict[tuple[str, str], PreparedRun] = {}
_LOCK = threading.Lock()


def prepare_run(
    spec: str | Path | Mapping[str, Any],
    *,
    store: Store,
    run_id: str,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    capacity: Capacity | None = None,
    resolve_block: BlockResolver | None = None,
    cluster: bool = False,
    store_label: str | None = None,
    shared_store: bool = False,
    hand_over: bool = False,
    require_digest: bool = False,
) -> PreparedRun:
    """Check, load and take the run (see the module's docstring); raises a
    :class:`~algodock.errors.StepFailure` naming what is wrong (``RunBusy`` names the lease's holder).

    ``store_label``: the store as the user gave it (a cluster run refuses a host-local one).
    ``hand_over``: keep the result for the flow this process starts next (:func:`take_prepared`).
    """
    if cluster:
        check_shared_store(store_label, shared_store)
    pipeline = load_spec(spec, overrides, capacity, resolve_block, require_digest)
    lease = RunLease(store, run_id).acquire()  # one writer per run
    prepared = PreparedRun(pipeline, store, run_id, capacity, lease, _spec_key(spec))
    if hand_over:
        with _LOCK:
            _PREPARED[(store.uri(), run_id)] = prepared
    return prepared


def _spec_key(spec: Any) -> str:
    return "" if isinstance(spec, Mapping) else str(Path(spec).resolve())


def take_prepared(store: Store, run_id: str, spec: Any) -> PreparedRun | None:
    """The run this process prepared for ``spec`` in ``store`` as ``run_id`` (taken once), or None."""
    with _LOCK:
        prepared = _PREPARED.pop((store.uri(), run_id), None)
    if prepared is None or not prepared.spec or prepared.spec != _spec_key(spec):
        return None
    return prepared


__all__ = ["PreparedRun", "check_shared_store", "load_spec", "prepare_run", "take_prepared"]
