"""Loading a pipeline: the spec file, each step's manifest (a file or an algorithm block), then
:func:`~algodock.pipeline.validate.validate_pipeline` on what was read.

This is the I/O half; the checks themselves are pure (``validate``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from algodock.contract.documents import read_document
from algodock.contract.manifest import Manifest, load_manifest
from algodock.errors import InvalidManifest
from algodock.pipeline.capacity import Capacity
from algodock.pipeline.spec import PIPELINE_VERSION, BlockResolver, PipelineSpec, parse_spec, step_error
from algodock.pipeline.validate import Pipeline, validate_pipeline


def load_pipeline(
    path: str | Path,
    *,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    capacity: Capacity | None = None,
    resolve_block: BlockResolver | None = None,
    require_digest: bool = False,
) -> Pipeline:
    """Read a pipeline spec file (YAML or JSON) and validate it; see :func:`build_pipeline`."""
    path = Path(path)
    return build_pipeline(
        read_document(path),
        base_dir=path.parent,
        source=str(path),
        overrides=overrides,
        capacity=capacity,
        resolve_block=resolve_block,
        require_digest=require_digest,
    )


def build_pipeline(
    spec: PipelineSpec | Mapping[str, Any],
    *,
    base_dir: str | Path | None = None,
    source: str = "<code>",
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    capacity: Capacity | None = None,
    resolve_block: BlockResolver | None = None,
    require_digest: bool = False,
) -> Pipeline:
    """Load the manifests of a spec (a :class:`PipelineSpec` or its dict), then validate and resolve it.

    ``base_dir`` (default: the working directory) anchors relative manifest and input paths;
    ``overrides`` (``{step: {key: value}}``, see :func:`~algodock.pipeline.spec.parse_overrides`)
    replace or add parameters; ``capacity`` rejects steps that could never fit;
    ``resolve_block`` turns ``block:`` names into manifests; ``require_digest`` refuses every
    step whose image is not pinned by digest (as the spec's ``policy`` can). Raises :class:`InvalidManifest`
    with every error found.

    >>> try:
    ...     build_pipeline({"pipeline_version": "0.1", "name": "p", "steps": [{"id": "a", "block": "x", "after": ["b"]}]})
    ... except InvalidManifest as exc:
    ...     for line in exc.errors: print(line)
    <code>: step a: block: 'x': algorithm blocks are resolved by the Prefect flow; outside it use `manifest:`
    <code>: step a: after: unknown step 'b' (steps: a)
    """
    base = Path(base_dir).absolute() if base_dir is not None else Path.cwd()
    if not isinstance(spec, PipelineSpec):
        spec = parse_spec(spec, source)
    manifests, errors = load_manifests(spec, base, source, resolve_block)
    return validate_pipeline(spec, manifests, base_dir=base, source=source, overrides=overrides, capacity=capacity, errors=errors, require_digest=require_digest)


def load_manifests(spec: PipelineSpec, base: Path, source: str, resolve_block: BlockResolver | None = None) -> tuple[dict[str, Manifest], list[str]]:
    """Each step's manifest by step id (a file shared by several steps is read once), and the
    error lines of those that could not be loaded."""
    manifests: dict[str, Manifest] = {}
    errors: list[str] = []
    loaded: dict[str, Manifest] = {}
    for step in spec.steps:
        try:
            if step.manifest is not None:
                path = Path(os.path.normpath(base / step.manifest))
                key = str(path.resolve())
                if key not in loaded:
                    loaded[key] = load_manifest(path)
                manifests[step.id] = loaded[key]
            elif resolve_block is None:
                errors.append(step_error(source, step.id, "block", f"{step.block!r}: algorithm blocks are resolved by the Prefect flow; outside it use `manifest:`"))
            else:
                assert step.block is not None
                manifests[step.id] = resolve_block(step.block)
        except InvalidManifest as exc:
            what = "manifest" if step.manifest is not None else "block"
            errors.extend(step_error(source, step.id, what, line) for line in exc.errors)
        except Exception as exc:  # a block resolver's own failure (e.g. no such block)
            errors.append(step_error(source, step.id, "block", f"{step.block!r}: cannot load: {type(exc).__name__}: {exc}"))
    return manifests, errors


# ---------------------------------------------------------------- building in code


class PipelineBuilder:
    """The same spec, built in Python.

    >>> spec = (PipelineBuilder("daily").input("pings", "s3://raw/pings/")
    ...         .step("visits", manifest="visits.json", inputs={"pings": "inputs.pings"})
    ...         .step("stats", manifest="stats.json", inputs={"visits": "visits.visits"})
    ...         .spec())
    >>> [s.id for s in spec.steps]
    ['visits', 'stats']
    """

    def __init__(self, name: str, description: str = "") -> None:
        self._doc: dict[str, Any] = {"pipeline_version": PIPELINE_VERSION, "name": name, "description": description, "inputs": {}, "steps": []}

    def input(self, name: str, uri: str) -> PipelineBuilder:
        """Declare an external input (local path, file:// or s3:// URI)."""
        self._doc["inputs"][name] = uri
        return self

    def step(
        self,
        id: str,
        *,
        manifest: str | Path | None = None,
        block: str | None = None,
        inputs: Mapping[str, str] | None = None,
        parameters: Mapping[str, Any] | None = None,
        retries: int = 0,
        after: Iterable[str] = (),
        pull_policy: str | None = None,
        image: str | None = None,
    ) -> PipelineBuilder:
        """Add a step (see :class:`StepSpec`)."""
        extra = {k: v for k, v in {"pull_policy": pull_policy, "image": image}.items() if v is not None}
        self._doc["steps"].append(
            {
                **extra,
                "id": id,
                "manifest": str(manifest) if manifest is not None else None,
                "block": block,
                "inputs": dict(inputs or {}),
                "parameters": dict(parameters or {}),
                "retries": retries,
                "after": list(after),
            }
        )
        return self

    def spec(self) -> PipelineSpec:
        """The :class:`PipelineSpec` (schema-checked only)."""
        return parse_spec(self._doc, "<code>")

    def build(
        self,
        *,
        base_dir: str | Path | None = None,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
        capacity: Capacity | None = None,
        resolve_block: BlockResolver | None = None,
    ) -> Pipeline:
        """Validate and resolve, as :func:`build_pipeline`."""
        return build_pipeline(self._doc, base_dir=base_dir, overrides=overrides, capacity=capacity, resolve_block=resolve_block)


__all__ = ["PipelineBuilder", "build_pipeline", "load_manifests", "load_pipeline"]
