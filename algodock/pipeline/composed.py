"""A run composed step by step from Python (no Prefect here).

A pipeline spec states its DAG up front; a flow written in Python makes its steps as it
calls algorithms. :class:`ComposedPipeline` is the same view of a run that
:func:`~algodock.pipeline.execute.execute_step` reads from a validated
:class:`~algodock.pipeline.Pipeline` (manifests, parameters, bindings, inputs by step id),
growing one step at a time. :class:`ComposedRun` holds everything one such run shares: the
store and its lease, the engine, the resource pool, the cache, the lineage document and the
step ids given so far (``name``, ``name-2``, … in call order, so a resumed run and the cache
line up). :func:`put_table` writes a table into the store once, content-addressed.

The Prefect layer (``algodock.flows.compose``) turns each call into a task run; everything
that touches data, containers or the store happens here or below.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from algodock.contract.manifest import Manifest
from algodock.errors import InvalidInput
from algodock.hashing import sha256_path
from algodock.lineage.cache import StoreCache
from algodock.lineage.ledger import Ledger
from algodock.lineage.openlineage import OpenLineageObserver
from algodock.pipeline.capacity import Capacity, ResourcePool
from algodock.pipeline.execute import RunContext, recover_run
from algodock.pipeline.spec import Ref
from algodock.pipeline.validate import Pipeline
from algodock.records import LineageDocument, StepRecord
from algodock.runtime.images import DEFAULT_PULL_POLICY, RegistryAuth, is_pinned
from algodock.store.base import Store
from algodock.store.lease import RunLease

if TYPE_CHECKING:
    import docker

log = logging.getLogger("algodock.pipeline.composed")

TABLES_DIR = "tables"
"""Where tables handed to algorithms are stored: ``<store>/tables/<sha256>.parquet``."""
COMBINED_DIR = "inputs"
"""Where a list given to a ``multiple`` slot is stored as one folder: ``<store>/inputs/<sha256>/``."""


@dataclass(frozen=True)
class _Spec:
    name: str


@dataclass
class ComposedPipeline:
    """A run's steps as they are made: what :func:`execute_step` reads by step id."""

    name: str
    spec: _Spec = field(init=False)
    manifests: dict[str, Manifest] = field(default_factory=dict)
    parameters: dict[str, dict[str, Any]] = field(default_factory=dict)
    bindings: dict[str, dict[str, Ref]] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)
    """External inputs: ``<step>.<slot>`` -> a local path or URI."""
    dependencies: dict[str, set[str]] = field(default_factory=dict)
    pull_policies: dict[str, str] = field(default_factory=dict)
    """A step's own pull policy (its algorithm's ``pull_policy``), read by ``RunContext.step_pull_policy``."""
    spec_sha256: str = ""

    def __post_init__(self) -> None:
        self.spec = _Spec(self.name)

    def add_step(self, step_id: str, manifest: Manifest, parameters: dict[str, Any], bindings: Mapping[str, Ref | str]) -> None:
        """Add (or, on a retry, replace) ``step_id``; ``bindings``: slot -> an upstream :class:`Ref`
        or an external location (a local path or URI)."""
        refs: dict[str, Ref] = {}
        for slot, where in bindings.items():
            if isinstance(where, Ref):
                refs[slot] = where
            else:
                name = f"{step_id}.{slot}"
                self.inputs[name] = where
                refs[slot] = Ref("input", name)
        self.manifests[step_id] = manifest
        self.parameters[step_id] = parameters
        self.bindings[step_id] = refs
        self.dependencies[step_id] = {r.name for r in refs.values() if r.kind == "step"}

    def topological_order(self) -> list[str]:
        return list(self.manifests)


def default_run_id() -> str:
    """A new run id: a UTC timestamp and 8 random hex digits."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{os.urandom(4).hex()}"


class ComposedRun:
    """One run composed in Python: open it, add steps, finish it (see the module's docstring).

    ``open()`` takes the run's lease (``RunBusy`` names its holder), cleans what a dead
    earlier writer left, and writes the lineage document; ``finish()`` marks steps that never
    ran as ``skipped``, writes the final document and gives the lease back.
    """

    def __init__(
        self,
        store: Store,
        run_id: str,
        client: docker.DockerClient,
        capacity: Capacity,
        *,
        name: str = "composed",
        use_cache: bool = True,
        flow_run_id: str | None = None,
        pull_policy: str = DEFAULT_PULL_POLICY,
        registry_credentials: tuple[RegistryAuth, ...] = (),
        require_digest: bool = False,
        pipeline: Pipeline | None = None,
        step_credentials: dict[str, tuple[RegistryAuth, ...]] | None = None,
        on_change: Any = None,
        guest: bool = False,
        pool: ResourcePool | None = None,
        cancel: threading.Event | None = None,
        scratch_root: Path | None = None,
    ) -> None:
        self.store = store
        self.scratch_root = scratch_root
        """Where the run's scratch folder is made (default: the system's temporary folder); an
        ``algodock worker``'s own folder for a guest there, swept if the worker dies."""
        self.run_id = run_id
        self.capacity = capacity
        self.require_digest = require_digest
        self.guest = guest
        """A step of the run in another process than the run's own (a Dask worker's): no lease,
        no clean-up, no lineage written here; the run's process records what its steps return."""
        self.spec: Pipeline | None = pipeline
        """A pipeline spec's run: its steps are known up front (their ids, bindings and
        parameters are the spec's); None for a run composed call by call."""
        self.pipeline: Any = pipeline if pipeline is not None else ComposedPipeline(name)
        self.ctx = RunContext(
            pipeline=self.pipeline,  # the same view, growing when composed
            store=store,
            run_id=run_id,
            client=client,
            pool=pool or ResourcePool(capacity),
            scratch=Path(tempfile.gettempdir()),  # the run's own folder is made by open(), after the clean-up
            use_cache=use_cache,
            flow_run_id=flow_run_id,
            observers=[OpenLineageObserver()],
            pull_policy=pull_policy,
            registry_credentials=registry_credentials,
            step_credentials=dict(step_credentials or {}),
            create_ahead=not guest,  # a guest sees one step at a time; its dependents may run on another host
            **({"cancel": cancel} if cancel is not None else {}),
        )
        self.ledger = Ledger(
            LineageDocument(
                run_id=run_id,
                pipeline=pipeline.spec.name if pipeline is not None else name,
                spec_sha256=pipeline.spec_sha256 if pipeline is not None else "",
                flow_run_id=flow_run_id,
                started_at=datetime.now(timezone.utc),
                store=store.uri(),
                steps=[StepRecord(id=s) for s in pipeline.topological_order()] if pipeline is not None else [],
            ),
            store,
            on_change=on_change,
            writes=not guest,
        )
        self._lease = RunLease(store, run_id)
        self._ids: dict[str, int] = {}
        self._lock = threading.Lock()
        self.finished = False
        self._opened = False

    def open(self) -> ComposedRun:
        if self.guest:
            self.ctx.scratch = Path(tempfile.mkdtemp(prefix=f"algodock-{self.run_id}-", dir=self.scratch_root))
            self.ctx.cache = StoreCache(self.store, run_id=self.run_id)
            return self
        self._lease = self._lease.acquire()  # this process's hold, counted (`algodock run` may hold it already)
        self._opened = True
        try:
            recover_run(self.store, self.run_id, self.ctx.client)  # removes a dead writer's scratch folders too: make ours after
            self.ctx.scratch = Path(tempfile.mkdtemp(prefix=f"algodock-{self.run_id}-"))
            self.ctx.cache = StoreCache(self.store, run_id=self.run_id)  # reads an earlier attempt's lineage before it is rewritten
            self.ledger.start()
        except BaseException:
            self._lease.release()
            raise
        return self

    def step_id(self, name: str, given: str | None = None) -> str:
        """``given`` when set (it must be new in this run, or a step of the run's spec), else
        ``name``, ``name-2``, ``name-3``… in call order."""
        with self._lock:
            if given is not None and self.spec is not None and given in self.spec.steps:
                return given
            if given is not None:
                if given in self.ledger._index:
                    raise InvalidInput(f"step_id {given!r}: a step of run {self.run_id} already has this id")
                self.ledger.update(StepRecord(id=given))
                return given
            while True:
                n = self._ids.get(name, 0) + 1
                self._ids[name] = n
                candidate = name if n == 1 else f"{name}-{n}"
                if candidate not in self.ledger._index:
                    self.ledger.update(StepRecord(id=candidate))
                    return candidate

    def peek_step_id(self, name: str, given: str | None = None) -> str:
        """The id :meth:`step_id` would give now (to name a step in an error before it exists)."""
        with self._lock:
            if given is not None:
                return given
            n = self._ids.get(name, 0) + 1
            return name if n == 1 else f"{name}-{n}"

    def add_step(self, step_id: str, manifest: Manifest, parameters: dict[str, Any], bindings: Mapping[str, Ref | str]) -> None:
        """A composed step's manifest, parameters and bindings, as its task runs (a spec's steps are known already)."""
        if self.spec is None:
            self.pipeline.add_step(step_id, manifest, parameters, bindings)

    def upstream_of(self, step_id: str) -> dict[str, StepRecord]:
        """The records of the steps a step of the run's spec depends on, as they ended."""
        assert self.spec is not None
        found = {d: self.ledger.record(d) for d in sorted(self.spec.steps[step_id].dependencies)}
        return {d: r for d, r in found.items() if r is not None}

    def check_fits(self, manifest: Manifest, where: str) -> None:
        """Refuse at once a step whose resource request can never fit this run's capacity."""
        request = manifest.container_parameters.resource_request
        if not self.capacity.fits(request):
            raise InvalidInput(f"{where}: resource_request can never fit the run's capacity {self.capacity}: {', '.join(self.capacity.excess(request))}")

    def check_image(self, manifest: Manifest, where: str) -> None:
        """Refuse at once a step whose image the run's digest policy (``require_digest``) refuses."""
        image = manifest.container_parameters.image
        if self.require_digest and not is_pinned(image):
            raise InvalidInput(f"{where}: image {image!r} is refused by the image policy: not pinned by digest (give the manifest's image as repo@sha256:<64 hex>)")

    def image_options(self, step_id: str, pull_policy: str | None, credentials: tuple[RegistryAuth, ...]) -> None:
        """How step ``step_id`` gets its image: its own pull policy (None: the run's) and the
        credentials of its algorithm block (used before the run's own)."""
        if pull_policy is not None:
            self.pipeline.pull_policies[step_id] = pull_policy
        if credentials:
            self.ctx.step_credentials[step_id] = credentials

    def status(self) -> str:
        if self.ctx.cancel.is_set():
            return "cancelled"
        ended = [s.status for s in self.ledger.doc.steps]
        return "succeeded" if all(s in ("succeeded", "cached") for s in ended) else "failed"

    def finish(self) -> str:
        """Steps that never ran are ``skipped``; write the final document, give the lease back."""
        if self.finished:
            return self.ledger.doc.status
        self.finished = True
        try:
            for record in list(self.ledger.doc.steps):
                if record.status in ("pending", "running"):
                    self.ledger.update(StepRecord(id=record.id, status="skipped"))
            status = self.status()
            self.ledger.finish(status)
            return status
        finally:
            self.ctx.close()  # containers created ahead and not used
            if self._opened:
                shutil.rmtree(self.ctx.scratch, ignore_errors=True)
            self._lease.release()


def _write_parquet(table: Any, path: Path) -> None:
    import pyarrow.parquet as pq

    pq.write_table(table, path)


def put_table(store: Store, table: Any, scratch: Path) -> tuple[str, str, int]:
    """Store a ``pyarrow.Table`` as parquet under ``tables/<sha256>.parquet`` (written once: the
    same table is the same bytes, so the cache hits); returns ``(uri, sha256, rows)``."""
    scratch.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".parquet", dir=scratch)
    os.close(fd)
    path = Path(tmp)
    try:
        _write_parquet(table, path)
        digest = sha256_path(path)
        rel = f"{TABLES_DIR}/{digest}.parquet"
        uri = _put_once(store, path, rel)
        return uri, digest, table.num_rows
    finally:
        path.unlink(missing_ok=True)


def put_combined(store: Store, parts: list[Path], scratch: Path) -> tuple[str, str]:
    """Store several files or folders as one folder (``part-<i>-<name>`` each), content-addressed
    under ``inputs/<sha256>/``: what a ``multiple`` slot given a list sees. Returns ``(uri, sha256)``."""
    scratch.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="combined-", dir=scratch))
    try:
        for i, part in enumerate(parts):
            target = folder / f"part-{i:04d}-{part.name}"
            if part.is_dir():
                shutil.copytree(part, target, copy_function=_link_or_copy)
            else:
                _link_or_copy(str(part), str(target))
        digest = sha256_path(folder)
        rel = f"{COMBINED_DIR}/{digest}"
        uri = _put_once(store, folder, rel)
        return uri, digest
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _put_once(store: Store, local: Path, rel: str) -> str:
    """``local`` stored at ``rel`` unless the same content-addressed entry is there already."""
    if store.output_exists(rel):
        return store.uri(rel)
    try:
        return store.put_output(local, rel, move=True)
    except Exception:
        if store.output_exists(rel):  # another step stored the same bytes first
            return store.uri(rel)
        raise


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


__all__ = ["ComposedPipeline", "ComposedRun", "default_run_id", "put_combined", "put_table"]
