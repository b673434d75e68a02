"""``algodock pin``: a pipeline spec with every step's image pinned to the digest its registry serves now.

:func:`pin_spec` reads a spec, asks each step's registry for its image tag's current digest
(through the engine, with the run's credentials; nothing is downloaded) and returns the spec
document with a step-level ``image: repo@sha256:…`` on every step, which
``--require-digest`` (or ``policy: {require_digest: true}``) accepts. A step already pinned
(its ``image:`` or its manifest's image) keeps its digest.

>>> rebase_path("../examples/a/manifest.json", Path("/w/deployments"), Path("/w/frozen"))
'../examples/a/manifest.json'
>>> rebase_path("data/pings", Path("/w/deployments"), Path("/w"))
'deployments/data/pings'
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from algodock.contract.documents import read_document
from algodock.errors import InvalidManifest, StepFailure
from algodock.pipeline.load import build_pipeline, load_manifests
from algodock.pipeline.spec import BlockResolver, parse_spec, step_error
from algodock.runtime.images import RegistryAuth, is_pinned, remote_digest, repository_of

if TYPE_CHECKING:
    import docker


class PinFailed(StepFailure):
    """Some step's image could not be pinned; ``errors`` has one line per step."""

    kind = "image_not_found"

    def __init__(self, errors: list[str], kind: str) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors
        self.kind = kind  # type: ignore[misc]


def pin_spec(
    path: str | Path,
    client: docker.DockerClient,
    *,
    credentials: Iterable[RegistryAuth] = (),
    resolve_block: BlockResolver | None = None,
    output: str | Path | None = None,
) -> dict[str, Any]:
    """The spec document at ``path`` with each step's image pinned by digest.

    ``output``: where the document will be written; relative manifest and input paths are
    rewritten to stay correct from there. Raises :class:`InvalidManifest` for a spec that does
    not validate, and a failure naming every step whose image could not be resolved
    (``image_not_found``, or ``infrastructure`` when a registry does not answer).
    """
    path = Path(path)
    source = str(path)
    base = path.parent.absolute()
    doc = read_document(path)
    spec = parse_spec(doc, source)
    manifests, errors = load_manifests(spec, base, source, resolve_block)
    if errors:
        raise InvalidManifest("\n".join(errors), errors=errors)
    credentials = tuple(credentials)
    pinned: dict[str, str] = {}
    failures: list[str] = []
    kinds: set[str] = set()
    out = copy.deepcopy(dict(doc))
    for raw, step in zip(out["steps"], spec.steps):
        image = step.image or manifests[step.id].container_parameters.image
        if is_pinned(image):
            raw["image"] = image
            continue
        try:
            if image not in pinned:
                pinned[image] = f"{repository_of(image)}@{remote_digest(client, image, credentials)}"
        except StepFailure as exc:
            failures.append(step_error(source, step.id, "image", exc.message))
            kinds.add(exc.kind)
            continue
        raw["image"] = pinned[image]
    if failures:
        raise PinFailed(failures, "infrastructure" if "infrastructure" in kinds else "image_not_found")
    if output is not None:
        _rebase(out, base, Path(output).absolute().parent)
    target_base = Path(output).absolute().parent if output is not None else base
    build_pipeline(out, base_dir=target_base, source=str(output or path), resolve_block=resolve_block, require_digest=True)  # what it wrote passes the policy
    return out


def rebase_path(value: str, old: Path, new: Path) -> str:
    """A path relative to ``old`` as a path relative to ``new`` (URIs and absolute paths unchanged)."""
    if "://" in value or os.path.isabs(value) or old == new:
        return value
    return os.path.relpath(os.path.normpath(old / value), new)


def _rebase(doc: dict[str, Any], old: Path, new: Path) -> None:
    for name, value in (doc.get("inputs") or {}).items():
        if isinstance(value, str):
            doc["inputs"][name] = rebase_path(value, old, new)
    for step in doc.get("steps") or []:
        if isinstance(step.get("manifest"), str):
            step["manifest"] = rebase_path(step["manifest"], old, new)


__all__ = ["PinFailed", "pin_spec", "rebase_path"]
