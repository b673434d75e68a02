"""Where things are in a store: the relative paths (``rel``) of runs, steps, attempts and
records, the names of a store's temporaries, and what a URI points at.

Layout under the store's root (see the ``*_rel`` helpers)::

    runs/<run_id>/run.json
    runs/<run_id>/lineage.json
    runs/<run_id>/lease.json                      who writes the run now (see algodock.store.lease)
    runs/<run_id>/steps/<step_id>/attempts/<attempt_id>/outputs/<name>.<ext> | <name>/
    runs/<run_id>/steps/<step_id>/attempts/<attempt_id>/container.log
    cache/<key>.json
    cache/objects/<sha256>/<filename>.json        where bytes with this hash are already stored

Pure names, no I/O.

>>> output_rel("r1", "clean", "out.parquet", "1-abc"), lineage_rel("r1")
('runs/r1/steps/clean/attempts/1-abc/outputs/out.parquet', 'runs/r1/lineage.json')
"""

from __future__ import annotations

import uuid
from pathlib import Path
from urllib.parse import unquote, urlparse

from algodock.errors import InvalidInput

__all__ = [
    "DEFAULT_STORE",
    "MARKER_SUFFIX",
    "WORK_DIR",
    "attempt_rel",
    "cache_rel",
    "lease_rel",
    "lineage_rel",
    "local_path_of",
    "log_rel",
    "new_attempt_id",
    "object_rel",
    "output_rel",
    "run_json_rel",
    "run_rel",
    "step_rel",
]

DEFAULT_STORE = Path(".algodock/store")
"""The store used when none is given, relative to the working directory."""

MARKER_SUFFIX = "._COMMITTED.json"
"""An S3 output ``rel`` is complete once ``rel + MARKER_SUFFIX`` exists."""

_TMP = ".tmp-"
_OLD = ".old-"
_LOCK = ".lock-"



# ---------------------------------------------------------------- layout


def run_rel(run_id: str) -> str:
    """``runs/<run_id>``."""
    return f"runs/{run_id}"


def run_json_rel(run_id: str) -> str:
    """``runs/<run_id>/run.json``: the run's summary."""
    return f"runs/{run_id}/run.json"


def lineage_rel(run_id: str) -> str:
    """``runs/<run_id>/lineage.json``."""
    return f"runs/{run_id}/lineage.json"


def step_rel(run_id: str, step_id: str) -> str:
    """``runs/<run_id>/steps/<step_id>``."""
    return f"runs/{run_id}/steps/{step_id}"


def attempt_rel(run_id: str, step_id: str, attempt_id: str) -> str:
    """``runs/<run_id>/steps/<step_id>/attempts/<attempt_id>``: everything one attempt wrote."""
    return f"runs/{run_id}/steps/{step_id}/attempts/{attempt_id}"


def new_attempt_id(attempt: int) -> str:
    """A fresh attempt id, ``<attempt>-<random>``: unique even when a run id is reused.

    >>> new_attempt_id(2).startswith("2-"), len(new_attempt_id(1))
    (True, 14)
    """
    return f"{attempt}-{uuid.uuid4().hex[:12]}"


def output_rel(run_id: str, step_id: str, filename: str, attempt_id: str | None = None) -> str:
    """Where an output goes: ``…/attempts/<attempt_id>/outputs/<filename>`` (``<name>.<ext>`` or a
    folder ``<name>``); without ``attempt_id`` the pre-0.2 ``runs/<run_id>/steps/<step_id>/outputs/<filename>``."""
    if attempt_id:
        return f"{attempt_rel(run_id, step_id, attempt_id)}/outputs/{filename}"
    return f"runs/{run_id}/steps/{step_id}/outputs/{filename}"


def log_rel(run_id: str, step_id: str, attempt_id: str | None = None) -> str:
    """The attempt's full container log, ``…/attempts/<attempt_id>/container.log``."""
    if attempt_id:
        return f"{attempt_rel(run_id, step_id, attempt_id)}/container.log"
    return f"runs/{run_id}/steps/{step_id}/container.log"


def lease_rel(run_id: str) -> str:
    """``runs/<run_id>/lease.json``: who holds the run (one writer per run)."""
    return f"runs/{run_id}/lease.json"


def object_rel(sha256: str, filename: str) -> str:
    """``cache/objects/<sha256>/<filename>.json``: where bytes with this hash and name are stored."""
    return f"cache/objects/{sha256}/{filename}.json"


WORK_DIR = ".work"
"""Under a local store's root: the work folders of running steps (same filesystem, so inputs hardlink)."""


def cache_rel(key: str) -> str:
    """``cache/<key>.json``."""
    return f"cache/{key}.json"



# ---------------------------------------------------------------- URIs


def local_path_of(uri: str) -> Path | None:
    """The local path of a plain path or ``file://`` URI; None for ``s3://``.

    >>> local_path_of("file:///data/x.parquet"), local_path_of("s3://b/k")
    (PosixPath('/data/x.parquet'), None)
    """
    if uri.startswith("s3://"):
        return None
    if uri.startswith("file:"):
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise InvalidInput(f"{uri}: file:// URIs on another host are not supported")
        return Path(unquote(parsed.path))
    if "://" in uri:
        raise InvalidInput(f"{uri}: unsupported URI scheme (use a local path, file:// or s3://)")
    return Path(uri)


def _s3_path(uri: str) -> str:
    """``s3://bucket/key/`` to ``bucket/key``."""
    path = uri.removeprefix("s3://").strip("/")
    if not path:
        raise InvalidInput(f"{uri}: an s3:// URI needs a bucket")
    return path



# ---------------------------------------------------------------- temporaries


def _tmp_beside(dest: Path) -> Path:
    return dest.with_name(f"{_TMP}{dest.name}-{uuid.uuid4().hex}")


def _hidden(name: str) -> bool:
    return name.startswith((_TMP, _OLD, _LOCK)) or name.endswith(MARKER_SUFFIX)
