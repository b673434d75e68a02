"""The step cache, a concept of its own: reuse the outputs of an identical earlier step.

:class:`StepCache` is what the engine's executor asks (``RunContext.cache``);
:class:`~algodock.cache.store_cache.StoreCache` is the cache of one store, shared by every
process and host that shares the store (see :mod:`algodock.cache.store_cache` for the key,
the entries and the content objects). ``algodock cache explain`` (:mod:`algodock.lineage.explain`)
compares the key documents it keeps; ``algodock gc`` (:mod:`algodock.store.gc`) keeps what its
entries point to, and the pins it writes make a reuse during gc a miss.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from algodock.cache.store_cache import CACHE_VERSION, CacheEntry, CachedOutput, StoreCache, cache_key, key_document, key_of, keys_rel

if TYPE_CHECKING:
    from algodock.contract.manifest import Manifest
    from algodock.records import InputBinding, StepRecord


@runtime_checkable
class StepCache(Protocol):
    """What the executor asks of a cache (see :class:`~algodock.cache.store_cache.StoreCache`)."""

    def lookup(self, record: StepRecord, bindings: Mapping[str, InputBinding], *, use: bool = True, manifest: Manifest | None = None) -> StepRecord | None:
        """The record to use instead of running the step, or None (run it); always sets ``record.cache_key``."""

    def remember(self, run_id: str, record: StepRecord) -> None:
        """Record a succeeded step's committed outputs under its cache key."""

    def same_bytes(self, sha256: str, filename: str) -> str | None:
        """The URI of an output already stored with these bytes and this file name (verified), or None."""

    def remember_bytes(self, sha256: str, filename: str, uri: str) -> None:
        """Name ``uri`` as the first stored copy of these bytes."""


__all__ = ["CACHE_VERSION", "CacheEntry", "CachedOutput", "StepCache", "StoreCache", "cache_key", "key_document", "key_of", "keys_rel"]
