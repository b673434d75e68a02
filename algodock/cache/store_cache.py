"""Step caching: reuse the outputs of an identical earlier step instead of starting a container.

A step is *identical* to an earlier one when its cache key is equal: when everything the
container could see is the same (docs/contract.md §6). The key is the sha256 of the canonical JSON
(sorted keys, no spaces) of::

    {"cache_version": "3",
     "image_id":   "sha256:…",             # the resolved immutable id, never the tag
     "command":    [...],
     "env":        {...},                   # the manifest's container env
     "parameters": {...},                   # after defaults
     "gpu":        0,                       # the GPU request: a GPU is visible or not
     "shm_mb":     0,                       # a /dev/shm is visible or not
     "algo_input": {...},                   # the whole algo_input.json the container will read:
                                            #   every file name, source_uri and sha256 of each slot
     "inputs":     [[slot, sha256], ...],   # every input byte (the framed hash of a folder)
     "input_slots":  [[name, format, multiple], ...],
     "output_slots": [[name, format, multiple, required], ...]}

``algo_input`` is built by the same staging plan the run uses, so a file renamed inside an
input folder, or the same bytes from another ``source_uri``, is another key. Left out: the
tag (a moved tag resolves to a new image id), the resource requests other than the GPU,
timeouts and scratch size (they bound a run; a run they break fails and is never cached).

A hit is served only after the bytes of every cached output were hashed again and match the
recorded sha256: an output changed in the store is a miss (with a warning), never served.
Before that, the files it reuses are pinned against gc (:func:`algodock.store.gc.pin`): a
file a running gc is removing is a miss, never a missing byte later.

Every lookup of a run keeps the key document beside the run (``runs/<run>/keys/<step>.json``,
:func:`keys_rel`), so ``algodock cache explain`` can name the part of the key that changed.

Outputs are immutable and content-addressed in one more way: ``cache/objects/<sha256>/<file>.json``
names where bytes with that sha256 and file name were first stored. A step that produces the
same bytes again (say, a moved tag whose new image computes the same result) records that
first location instead of a new copy, so the steps downstream see the same ``source_uri``
and stay cached, as they should: nothing they could see has changed.

Entries live in the store as ``cache/<key>.json``, written atomically once the step's outputs
are committed, so every process and host that shares the store shares the cache. An entry
names the run that produced the outputs and their store-relative paths; a hit reuses those
outputs in place (nothing is copied) after checking that each is still there, committed, and
has the recorded bytes.

A retried flow run keeps its run id. :class:`StoreCache` built with that ``run_id`` reads the
run's lineage document as the earlier attempt left it, and hands back a step that already
succeeded there (same key, outputs still committed) unchanged, even with ``use=False``:
a retry re-runs only what failed or was skipped.

>>> import tempfile
>>> from algodock.store.backends import open_store
>>> cache = StoreCache(open_store(tempfile.mkdtemp()))
>>> rec = StepRecord(id="a", image_id="sha256:" + "0" * 64, command=["true"])
>>> cache.lookup(rec, {}) is None, len(rec.cache_key)
(True, 64)
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field, ValidationError

from algodock.records import InputBinding, InputRecord, LineageDocument, OutputRecord, StepRecord
from algodock.store.base import Store
from algodock.store.content import hash_uri, store_rel
from algodock.store.gc import pin
from algodock.store.layout import cache_rel, lineage_rel, object_rel
from algodock.store.transfer import retrying

if TYPE_CHECKING:
    from algodock.contract.manifest import Manifest

log = logging.getLogger("algodock.cache")

CACHE_VERSION = "3"  # 2: framed folder hashes; 3: the key covers algo_input.json (file names, source_uri) and the GPU request
"""Bumped whenever the key's definition changes, so old entries simply miss."""

REUSABLE = ("succeeded", "cached")


class CachedOutput(BaseModel):
    """One output of a cache entry, by its path relative to the store root."""

    name: str
    rel: str
    sha256: str
    format: str
    rows: int | None = None
    arrow_schema: dict[str, Any] | None = None
    """The recorded Arrow schema of the bytes (parquet), as :attr:`OutputRecord.schema_`."""


class CacheEntry(BaseModel):
    """``cache/<key>.json``: where the outputs of a finished step with this key are."""

    cache_version: str = CACHE_VERSION
    key: str
    run_id: str = Field(description="The run whose step produced (ran for) these outputs.")
    step_id: str
    image: str | None = None
    image_id: str
    repo_digest: str | None = None
    outputs: list[CachedOutput]
    log_rel: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    exit_code: int | None = None
    created_at: datetime


def algo_input_view(manifest: Manifest, bindings: Mapping[str, InputBinding], parameters: Mapping[str, Any]) -> dict[str, Any]:
    """The ``algo_input.json`` the container of this step will read, as data (no I/O but listing).

    Built with the staging plan the run itself uses, so the key sees what the container sees.
    """
    from algodock.contract.manifest import INPUT_DIR, AlgoConfig, AlgoInput, InputData
    from algodock.runtime.staging import plan_inputs

    data = []
    for binding, fmt, files in plan_inputs(manifest, bindings, Path(INPUT_DIR)):
        data.append(
            InputData(
                name=binding.slot,
                format=fmt,  # type: ignore[arg-type]
                path=f"{INPUT_DIR}/{binding.slot}",
                files=[f.container_path for f in files],
                source_uri=binding.uri or str(Path(binding.path).resolve()),
                sha256=binding.sha256,
            )
        )
    return AlgoInput(config=AlgoConfig(parameters=dict(parameters)), input_data=data).model_dump(mode="json")


def cache_key(record: StepRecord, bindings: Mapping[str, InputBinding], manifest: Manifest | None = None) -> str:
    """The step's cache key (see the module docstring); ``record.image_id`` must be resolved."""
    return key_of(key_document(record, bindings, manifest))


def key_of(doc: Mapping[str, Any]) -> str:
    """The sha256 of a key document's canonical JSON (sorted keys, no spaces)."""
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def keys_rel(run_id: str, step_id: str) -> str:
    """``runs/<run_id>/keys/<step_id>.json``: the key document of the step's last lookup (what ``cache explain`` compares)."""
    return f"runs/{run_id}/keys/{step_id}.json"


def key_document(record: StepRecord, bindings: Mapping[str, InputBinding], manifest: Manifest | None = None) -> dict[str, Any]:
    """Everything the cache key covers, as data (see the module docstring)."""
    if not record.image_id:
        raise ValueError(f"step {record.id}: the image must be resolved to its id before the cache key is computed")
    missing = sorted(slot for slot, b in bindings.items() if not b.sha256)
    if missing:
        raise ValueError(f"step {record.id}: inputs {', '.join(missing)} have no sha256 yet")
    doc: dict[str, Any] = {
        "cache_version": CACHE_VERSION,
        "image_id": record.image_id,
        "command": list(record.command),
        "parameters": record.parameters,
        "inputs": sorted([slot, b.sha256] for slot, b in bindings.items()),
        "gpu": (record.resource_request or {}).get("gpu", 0),
        # Without a manifest (pure-logic callers) the descriptor is approximated by the sources.
        "algo_input": {"sources": sorted([slot, b.uri or str(Path(b.path).resolve())] for slot, b in bindings.items())},
    }
    if manifest is not None:
        cp = manifest.container_parameters
        doc["env"] = dict(cp.env)
        doc["gpu"] = cp.resource_request.gpu
        doc["shm_mb"] = getattr(cp, "shm_mb", 0)
        doc["algo_input"] = algo_input_view(manifest, bindings, record.parameters)
        doc["input_slots"] = sorted([s.name, s.format, s.multiple] for s in manifest.inputs)
        doc["output_slots"] = sorted([s.name, s.format, s.multiple, s.required] for s in manifest.outputs)
    return doc


def _now() -> datetime:
    return datetime.now(timezone.utc)


class StoreCache:
    """The cache of one store; ``run_id`` (optional) is the current run, for retried flow runs."""

    def __init__(self, store: Store, run_id: str | None = None) -> None:
        self.store = store
        self.run_id = run_id
        self._earlier: dict[str, StepRecord] = self._earlier_attempt(run_id) if run_id else {}

    def __repr__(self) -> str:
        return f"StoreCache({self.store!r}, run_id={self.run_id!r})"

    def earlier(self, step_id: str) -> StepRecord | None:
        """What an earlier attempt of this run left for ``step_id`` (reusable when its key matches)."""
        return self._earlier.get(step_id)

    def remember_earlier(self, record: StepRecord) -> None:
        """``record`` is what an earlier attempt of the run left: in another process than the run's
        (a Dask worker's), the run's own view, read before the run rewrote its document."""
        self._earlier[record.id] = record

    def _earlier_attempt(self, run_id: str) -> dict[str, StepRecord]:
        """Finished steps of an earlier attempt of this run (read now, before the run rewrites its document)."""
        raw = self.store.read_json(lineage_rel(run_id))
        if raw is None:
            return {}
        try:
            doc = LineageDocument.model_validate(raw)
        except ValidationError as exc:
            log.warning("run %s: ignoring an unreadable earlier lineage document: %s", run_id, exc)
            return {}
        return {s.id: s for s in doc.steps if s.status in REUSABLE and s.cache_key}

    def lookup(
        self,
        record: StepRecord,
        bindings: Mapping[str, InputBinding],
        *,
        use: bool = True,
        manifest: Manifest | None = None,
    ) -> StepRecord | None:
        """The record to use instead of running the step, or None (run it).

        Always sets ``record.cache_key``. With ``use=False`` only an earlier attempt of the
        same run is reused (a retry), never another run's outputs.
        """
        document = key_document(record, bindings, manifest)
        record.cache_key = key_of(document)
        self._keep_key(record, document, use)
        earlier = self._earlier.get(record.id)
        if (
            earlier is not None
            and earlier.cache_key == record.cache_key
            and self._committed(o.uri for o in earlier.outputs)
            and self._intact(record.id, [(o.uri, o.sha256) for o in earlier.outputs])
        ):
            log.info("step %s: kept from the earlier attempt of run %s", record.id, self.run_id)
            return earlier.model_copy(deep=True)
        if not use:
            return None
        entry = self._entry(record.cache_key)
        if entry is None:
            return None
        uris = [self.store.uri(o.rel) for o in entry.outputs]
        if not pin(self.store, self.run_id, [o.rel for o in entry.outputs] + ([entry.log_rel] if entry.log_rel else [])):
            return None  # a gc is removing them: run the step
        if not all(self.store.output_exists(o.rel) for o in entry.outputs):
            log.info("step %s: cache entry %s names outputs of run %s that are gone; running it", record.id, record.cache_key[:12], entry.run_id)
            return None
        if not self._intact(record.id, [(uri, o.sha256) for o, uri in zip(entry.outputs, uris)]):
            return None
        now = _now()
        hit = record.model_copy(deep=True)
        hit.status = "cached"
        hit.cached_from = entry.run_id
        hit.inputs = [
            InputRecord(name=slot, uri=b.uri or str(b.path), sha256=b.sha256 or "", produced_by=b.produced_by, rows=b.rows)
            for slot, b in sorted(bindings.items())
        ]
        hit.outputs = [
            OutputRecord(name=o.name, uri=uri, sha256=o.sha256, format=o.format, rows=o.rows, schema_=o.arrow_schema) for o, uri in zip(entry.outputs, uris)
        ]
        hit.metrics = dict(entry.metrics)
        hit.log_uri = self.store.uri(entry.log_rel) if entry.log_rel else None
        hit.exit_code = None  # no container ran for this record
        hit.failure = None
        hit.started_at = hit.finished_at = now
        log.info("step %s: cached, reusing the outputs of run %s", record.id, entry.run_id)
        return hit

    def _keep_key(self, record: StepRecord, document: dict[str, Any], use: bool) -> None:
        """Keep the key document beside the run, for ``algodock cache explain`` (never fails the step)."""
        if not self.run_id:
            return
        rel = keys_rel(self.run_id, record.id)
        body = {"key": record.cache_key, "use_cache": use, "image": record.image, "document": document}
        try:  # one bounded try: a store that stalls must not hold the step (the document is a courtesy)
            retrying(lambda: self.store.write_json(rel, body, durable=False), f"keeping the cache key document {rel}", attempts=1)
        except Exception as exc:
            log.warning("step %s: could not keep its cache key document: %s", record.id, exc)

    def remember(self, run_id: str, record: StepRecord) -> None:
        """Record a succeeded step's committed outputs under its cache key (atomically)."""
        if record.status != "succeeded" or not record.cache_key or not record.image_id:
            return
        outputs = []
        for o in record.outputs:
            rel = store_rel(self.store, o.uri)
            if rel is None:
                log.warning("step %s: output %s is outside the store; not caching the step", record.id, o.uri)
                return
            outputs.append(CachedOutput(name=o.name, rel=rel, sha256=o.sha256, format=o.format, rows=o.rows, arrow_schema=o.schema_))
        entry = CacheEntry(
            key=record.cache_key,
            run_id=run_id,
            step_id=record.id,
            image=record.image,
            image_id=record.image_id,
            repo_digest=record.repo_digest,
            outputs=outputs,
            log_rel=store_rel(self.store, record.log_uri) if record.log_uri else None,
            metrics=record.metrics,
            exit_code=record.exit_code,
            created_at=_now(),
        )
        self.store.write_json(cache_rel(record.cache_key), entry.model_dump(mode="json"))

    def _intact(self, step_id: str, outputs: list[tuple[str, str]]) -> bool:
        """True when every ``(uri, sha256)`` still holds exactly the recorded bytes (re-hashed now)."""
        for uri, expected in outputs:
            try:
                actual = hash_uri(uri, self.store)
            except FileNotFoundError:
                log.warning("step %s: cached output %s is gone; running the step", step_id, uri)
                return False
            if actual != expected:
                log.warning(
                    "step %s: cached output %s changed in the store (sha256 %s, recorded %s); not serving it, running the step",
                    step_id, uri, actual, expected,
                )
                return False
        return True

    def same_bytes(self, sha256: str, filename: str) -> str | None:
        """The URI of an output already stored with these bytes and this file name (verified), or None."""
        raw = self.store.read_json(object_rel(sha256, filename))
        if not isinstance(raw, dict) or not isinstance(raw.get("rel"), str):
            return None
        rel = raw["rel"]
        try:
            if not pin(self.store, self.run_id, [rel]) or not self.store.output_exists(rel):
                return None
        except Exception:
            return None
        uri = self.store.uri(rel)
        return uri if self._intact(f"(object {sha256[:12]})", [(uri, sha256)]) else None

    def remember_bytes(self, sha256: str, filename: str, uri: str) -> None:
        """Name ``uri`` as the first stored copy of these bytes (the first writer wins; never replaced)."""
        rel = store_rel(self.store, uri)
        if rel is None:
            return
        try:
            self.store.create_json(object_rel(sha256, filename), {"sha256": sha256, "rel": rel, "created_at": _now().isoformat()})
        except FileExistsError:
            pass

    def _entry(self, key: str) -> CacheEntry | None:
        raw = self.store.read_json(cache_rel(key))
        if raw is None:
            return None
        try:
            entry = CacheEntry.model_validate(raw)
        except ValidationError as exc:
            log.warning("ignoring unreadable cache entry %s: %s", cache_rel(key), exc)
            return None
        return entry if entry.cache_version == CACHE_VERSION and entry.key == key else None

    def _committed(self, uris: Any) -> bool:
        for uri in uris:
            rel = store_rel(self.store, uri)
            if rel is None or not self.store.output_exists(rel):
                return False
        return True


__all__ = ["CACHE_VERSION", "CacheEntry", "CachedOutput", "StoreCache", "cache_key", "key_document", "key_of", "keys_rel", "store_rel"]
