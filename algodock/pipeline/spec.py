"""The pipeline spec: a DAG of algorithm steps, validated whole before any container starts.

A spec is YAML (or JSON, or built in code with :class:`PipelineBuilder`)::

    pipeline_version: "0.1"
    name: device-visits-daily
    inputs: {pings: s3://raw/pings/2026-11-27/}
    steps:
      - id: visits
        manifest: ../examples/device-visits/manifest.json   # relative to the spec file
        inputs: {pings: inputs.pings}                      # inputs.<name> or <step>.<output>
        parameters: {look_back_time: 3600}
        retries: 2
      - id: stats
        manifest: ../examples/dwell-stats/manifest.json
        inputs: {visits: visits.visits}

:func:`load_pipeline` / :func:`build_pipeline` check everything that can be checked without
running anything (references, formats, cycles, parameters, resource requests) and raise one
:class:`~algodock.errors.InvalidManifest` listing every error, each line naming the file,
the step and the field. What they return, :class:`Pipeline`, is the resolved DAG.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from algodock.pipeline.capacity import Capacity
from algodock.contract.manifest import NAME_PATTERN, Manifest, Name, format_validation_error, load_manifest, read_document
from algodock.errors import InvalidInput, InvalidManifest
from algodock.contract.params import parse_value, resolve_parameters

PIPELINE_VERSION = "0.1"
"""The pipeline spec version this platform reads."""

INPUTS = "inputs"
"""Reference prefix of the pipeline's external inputs; also a reserved step id."""

BlockResolver = Callable[[str], Manifest]
"""Turns an algorithm block name into its manifest (the Prefect layer provides it)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StepSpec(_Strict):
    """One step: an algorithm (a manifest file or an algorithm block), its inputs and parameters."""

    id: Name = Field(description="Unique step id; also the Prefect task name.")
    manifest: str | None = Field(None, description="Manifest file, relative to the spec file.", examples=["../examples/device-visits/manifest.json"])
    block: str | None = Field(None, description="Name of a saved algorithm block (instead of manifest).")
    inputs: dict[Name, str] = Field(default_factory=dict, description="Input slot -> inputs.<name> or <step>.<output>.", examples=[{"pings": "inputs.pings"}])
    parameters: dict[str, Any] = Field(default_factory=dict, description="config.parameters; validated by the manifest's schema.")
    retries: int = Field(0, ge=0, description="Retries after exit_code, timeout or oom failures (infrastructure failures always retry).")
    after: list[Name] = Field(default_factory=list, description="Steps that must finish first, without data passing.")

    @model_validator(mode="after")
    def _one_algorithm(self) -> StepSpec:
        if (self.manifest is None) == (self.block is None):
            raise ValueError("give exactly one of `manifest` (a file) or `block` (an algorithm block name)")
        return self


class PipelineSpec(_Strict):
    """A pipeline as written (the ``pipeline_version: "0.1"`` document)."""

    pipeline_version: Literal["0.1"]
    name: Name
    description: str = ""
    inputs: dict[Name, str] = Field(default_factory=dict, description="External inputs: local path (relative to the spec file), file:// or s3:// URI.", examples=[{"pings": "s3://raw/pings/2026-11-27/"}])
    steps: list[StepSpec] = Field(min_length=1)


class Ref(NamedTuple):
    """Where a step input comes from: ``inputs.<name>`` or ``<step>.<output>``."""

    kind: Literal["input", "step"]
    name: str
    """The pipeline input name, or the producing step id."""
    output: str | None = None
    """The producer's output name (``kind == "step"`` only)."""

    @classmethod
    def parse(cls, text: str) -> Ref:
        """``"inputs.pings"`` or ``"visits.visits"``; raises ``ValueError`` otherwise.

        >>> Ref.parse("inputs.pings"), Ref.parse("visits.visits")
        (Ref(kind='input', name='pings', output=None), Ref(kind='step', name='visits', output='visits'))
        """
        head, sep, tail = text.partition(".")
        if not sep or not re.fullmatch(NAME_PATTERN, head) or not re.fullmatch(NAME_PATTERN, tail):
            raise ValueError(f"{text!r} is not a reference: expected inputs.<name> or <step>.<output>")
        return cls("input", tail) if head == INPUTS else cls("step", head, tail)

    def __str__(self) -> str:
        return f"{INPUTS}.{self.name}" if self.kind == "input" else f"{self.name}.{self.output}"


@dataclass
class Pipeline:
    """A validated pipeline: the spec with every step's manifest, parameters and dependencies resolved."""

    spec: PipelineSpec
    source: str
    """The spec file, or ``"<code>"``."""
    base_dir: Path
    """Relative manifest and input paths are relative to it (the spec file's folder)."""
    spec_sha256: str
    """sha256 of the spec's canonical JSON (defaults included, keys sorted; overrides not included)."""
    manifests: dict[str, Manifest]
    parameters: dict[str, dict[str, Any]]
    """Per step: spec parameters, then overrides, then the manifest's defaults."""
    bindings: dict[str, dict[str, Ref]]
    """Per step: input slot -> where its data comes from."""
    dependencies: dict[str, set[str]]
    """Per step: the steps it waits for (data and ``after``)."""
    inputs: dict[str, str]
    """External inputs: name -> absolute local path, file:// or s3:// URI."""
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def steps(self) -> dict[str, StepSpec]:
        """Steps by id, in spec order."""
        return {s.id: s for s in self.spec.steps}

    def topological_order(self) -> list[str]:
        """Every step after the steps it depends on; ties keep the spec's order."""
        order: list[str] = []
        done: set[str] = set()
        pending = [s.id for s in self.spec.steps]
        while pending:
            ready = next(s for s in pending if self.dependencies[s] <= done)
            order.append(ready)
            done.add(ready)
            pending.remove(ready)
        return order

    def downstream(self, step_id: str) -> set[str]:
        """Every step that depends on ``step_id``, directly or not (what a failure skips)."""
        found: set[str] = set()
        frontier = [step_id]
        while frontier:
            current = frontier.pop()
            for other, deps in self.dependencies.items():
                if current in deps and other not in found:
                    found.add(other)
                    frontier.append(other)
        return found


# ---------------------------------------------------------------- building and validating


def parse_overrides(items: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``--set STEP.KEY=VALUE`` items into ``{step: {key: value}}`` (values parsed as JSON when they parse).

    >>> parse_overrides(["visits.look_back_time=60", "stats.label=x"])
    {'visits': {'look_back_time': 60}, 'stats': {'label': 'x'}}
    """
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        target, sep, raw = item.partition("=")
        step, dot, key = target.partition(".")
        if not sep or not dot or not step or not key:
            raise InvalidInput(f"--set {item!r}: expected STEP.KEY=VALUE, e.g. visits.look_back_time=60")
        out.setdefault(step, {})[key] = parse_value(raw)
    return out


def spec_sha256(spec: PipelineSpec) -> str:
    """sha256 of the spec's canonical JSON: stable across key order, formatting and omitted defaults."""
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def load_pipeline(
    path: str | Path,
    *,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    capacity: Capacity | None = None,
    resolve_block: BlockResolver | None = None,
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
    )


def build_pipeline(
    spec: PipelineSpec | Mapping[str, Any],
    *,
    base_dir: str | Path | None = None,
    source: str = "<code>",
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    capacity: Capacity | None = None,
    resolve_block: BlockResolver | None = None,
) -> Pipeline:
    """Validate a spec (a :class:`PipelineSpec` or its dict) and resolve it into a :class:`Pipeline`.

    ``base_dir`` (default: the working directory) anchors relative manifest and input paths;
    ``overrides`` (``{step: {key: value}}``, see :func:`parse_overrides`) replace or add
    parameters; ``capacity`` rejects steps that could never fit; ``resolve_block`` turns
    ``block:`` names into manifests. Raises :class:`InvalidManifest` with every error found.

    >>> try:
    ...     build_pipeline({"pipeline_version": "0.1", "name": "p", "steps": [{"id": "a", "block": "x", "after": ["b"]}]})
    ... except InvalidManifest as exc:
    ...     for line in exc.errors: print(line)
    <code>: step a: block: 'x': algorithm blocks are resolved by the Prefect flow; outside it use `manifest:`
    <code>: step a: after: unknown step 'b' (steps: a)
    """
    base = Path(base_dir).absolute() if base_dir is not None else Path.cwd()
    if not isinstance(spec, PipelineSpec):
        spec = _parse_spec(spec, source)
    return _Builder(spec, base, source, dict(overrides or {}), capacity, resolve_block).build()


def _parse_spec(data: Any, source: str) -> PipelineSpec:
    if not isinstance(data, Mapping):
        raise InvalidManifest(f"{source}: (root): expected a mapping, got {type(data).__name__}")
    try:
        return PipelineSpec.model_validate(data)
    except ValidationError as exc:
        errors = format_validation_error(source, exc)
        # "steps.1.inputs.x" -> "step stats: inputs.x": name the step as the other errors do.
        steps = data.get("steps")
        if isinstance(steps, list):
            for i, raw in enumerate(steps):
                step_id = raw.get("id") if isinstance(raw, Mapping) else None
                label = f"step {step_id}" if isinstance(step_id, str) and step_id else f"steps[{i}]"
                for prefix, repl in ((f"{source}: steps.{i}.", f"{source}: {label}: "), (f"{source}: steps.{i}: ", f"{source}: {label}: ")):
                    errors = [repl + e[len(prefix) :] if e.startswith(prefix) else e for e in errors]
        raise InvalidManifest("\n".join(errors), errors=errors) from None


class _Builder:
    """Collects every error of one spec; :meth:`build` raises them together."""

    def __init__(
        self,
        spec: PipelineSpec,
        base: Path,
        source: str,
        overrides: dict[str, Mapping[str, Any]],
        capacity: Capacity | None,
        resolve_block: BlockResolver | None,
    ) -> None:
        self.spec, self.base, self.source = spec, base, source
        self.overrides, self.capacity, self.resolve_block = overrides, capacity, resolve_block
        self.errors: list[str] = []

    def error(self, step: str | None, where: str, message: str) -> None:
        self.errors.append(f"{self.source}: {f'step {step}: ' if step else ''}{where}: {message}")

    def build(self) -> Pipeline:
        spec = self.spec
        ids = self._check_ids()
        inputs = self._external_inputs()
        manifests = self._manifests()
        for step in self.overrides:
            if step not in ids:
                self.error(None, f"--set {step}.…", f"unknown step {step!r} (steps: {', '.join(ids)})")
        parameters = self._parameters(manifests)
        bindings: dict[str, dict[str, Ref]] = {}
        deps: dict[str, set[str]] = {s.id: set() for s in spec.steps}
        for step in spec.steps:
            bindings[step.id] = self._bindings(step, ids, manifests)
            deps[step.id] |= {r.name for r in bindings[step.id].values() if r.kind == "step" and r.name in ids}
            for other in step.after:
                if other in ids:
                    deps[step.id].add(other)
                else:
                    self.error(step.id, "after", f"unknown step {other!r} (steps: {', '.join(ids)})")
        for cycle in _cycles(deps):
            self.error(None, "steps", f"cycle: {' -> '.join(cycle)} (each step needs the one before it)")
        self._check_capacity(manifests)
        if self.errors:
            raise InvalidManifest("\n".join(self.errors), errors=self.errors)
        return Pipeline(
            spec=spec,
            source=self.source,
            base_dir=self.base,
            spec_sha256=spec_sha256(spec),
            manifests=manifests,
            parameters=parameters,
            bindings=bindings,
            dependencies=deps,
            inputs=inputs,
            overrides={k: dict(v) for k, v in self.overrides.items()},
        )

    def _check_ids(self) -> list[str]:
        ids: list[str] = []
        for i, step in enumerate(self.spec.steps):
            if step.id == INPUTS:
                self.error(step.id, "id", f"{INPUTS!r} is reserved for pipeline inputs; choose another id")
            elif step.id in ids:
                self.error(step.id, "id", f"duplicate step id (steps[{ids.index(step.id)}] and steps[{i}])")
            ids.append(step.id)
        return list(dict.fromkeys(ids))

    def _external_inputs(self) -> dict[str, str]:
        resolved: dict[str, str] = {}
        for name, uri in self.spec.inputs.items():
            if uri.startswith(("s3://", "file://")):
                resolved[name] = uri
            elif "://" in uri:
                self.error(None, f"inputs.{name}", f"{uri!r}: unsupported scheme (use a local path, file:// or s3://)")
            elif not uri:
                self.error(None, f"inputs.{name}", "empty location")
            else:
                resolved[name] = os.path.normpath(self.base / uri)
        return resolved

    def _manifests(self) -> dict[str, Manifest]:
        manifests: dict[str, Manifest] = {}
        loaded: dict[str, Manifest] = {}
        for step in self.spec.steps:
            try:
                if step.manifest is not None:
                    path = Path(os.path.normpath(self.base / step.manifest))
                    key = str(path.resolve())
                    if key not in loaded:
                        loaded[key] = load_manifest(path)
                    manifests[step.id] = loaded[key]
                elif self.resolve_block is None:
                    self.error(step.id, "block", f"{step.block!r}: algorithm blocks are resolved by the Prefect flow; outside it use `manifest:`")
                else:
                    assert step.block is not None
                    manifests[step.id] = self.resolve_block(step.block)
            except InvalidManifest as exc:
                what = "manifest" if step.manifest is not None else "block"
                for line in exc.errors:
                    self.error(step.id, what, line)
            except Exception as exc:  # a block resolver's own failure (e.g. no such block)
                self.error(step.id, "block", f"{step.block!r}: cannot load: {type(exc).__name__}: {exc}")
        return manifests

    def _parameters(self, manifests: dict[str, Manifest]) -> dict[str, dict[str, Any]]:
        resolved: dict[str, dict[str, Any]] = {}
        for step in self.spec.steps:
            manifest = manifests.get(step.id)
            if manifest is None:
                continue
            given = {**step.parameters, **self.overrides.get(step.id, {})}
            try:
                resolved[step.id] = resolve_parameters(manifest.parameters, given, source=f"{self.source}: step {step.id}: parameters")
            except InvalidInput as exc:
                self.errors.extend(exc.errors)
        return resolved

    def _bindings(self, step: StepSpec, ids: list[str], manifests: dict[str, Manifest]) -> dict[str, Ref]:
        bindings: dict[str, Ref] = {}
        manifest = manifests.get(step.id)
        for slot_name, text in step.inputs.items():
            where = f"inputs.{slot_name}"
            try:
                ref = Ref.parse(text)
            except ValueError as exc:
                self.error(step.id, where, str(exc))
                continue
            slot = manifest.input_slot(slot_name) if manifest else None
            if manifest is not None and slot is None:
                slots = ", ".join(s.name for s in manifest.inputs) or "none"
                self.error(step.id, where, f"the manifest {manifest.name!r} has no input slot {slot_name!r} (slots: {slots})")
            if ref.kind == "input":
                if ref.name not in self.spec.inputs:
                    declared = ", ".join(self.spec.inputs) or "none"
                    self.error(step.id, where, f"unknown pipeline input {str(ref)!r} (pipeline inputs: {declared})")
                    continue
            elif ref.name not in ids:
                self.error(step.id, where, f"{str(ref)!r} names an unknown step {ref.name!r} (steps: {', '.join(ids)})")
                continue
            elif (producer := manifests.get(ref.name)) is not None:
                out = producer.output_slot(ref.output or "")
                if out is None:
                    outs = ", ".join(o.name for o in producer.outputs) or "none"
                    self.error(step.id, where, f"step {ref.name!r} (manifest {producer.name!r}) has no output {ref.output!r} (outputs: {outs})")
                    continue
                if slot is not None and out.format != slot.format:
                    self.error(step.id, where, f"format mismatch: {ref} is {out.format}, the slot expects {slot.format}")
                if slot is not None and out.multiple and not slot.multiple:
                    self.error(step.id, where, f"{ref} is a folder of files (multiple), the slot takes a single file (multiple: false)")
            bindings[slot_name] = ref
        if manifest is not None:
            for slot in manifest.inputs:
                if slot.required and slot.name not in step.inputs:
                    self.error(step.id, f"inputs.{slot.name}", f"required input slot of {manifest.name!r} is not bound")
        return bindings

    def _check_capacity(self, manifests: dict[str, Manifest]) -> None:
        if self.capacity is None:
            return
        for step_id, manifest in manifests.items():
            excess = self.capacity.excess(manifest.container_parameters.resource_request)
            if excess:
                self.error(step_id, "resource_request", f"larger than the capacity ({', '.join(excess)}); it could never run")


def _cycles(deps: Mapping[str, set[str]]) -> list[list[str]]:
    """Each cycle once, in data-flow order, e.g. ``[a, b, a]``: b needs a, a needs b."""
    consumers: dict[str, list[str]] = {s: [] for s in deps}
    for step, needs in deps.items():
        for need in sorted(needs, key=list(deps).index):
            consumers[need].append(step)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []
    cycles: list[list[str]] = []
    seen: set[frozenset[str]] = set()

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in consumers[node]:
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt]
                if frozenset(cycle) not in seen:
                    seen.add(frozenset(cycle))
                    cycles.append(cycle)
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in deps:
        if node not in state:
            visit(node)
    return cycles


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
    ) -> PipelineBuilder:
        """Add a step (see :class:`StepSpec`)."""
        self._doc["steps"].append(
            {
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
        return _parse_spec(self._doc, "<code>")

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


__all__ = [
    "BlockResolver",
    "Pipeline",
    "PipelineBuilder",
    "PipelineSpec",
    "Ref",
    "StepSpec",
    "build_pipeline",
    "load_pipeline",
    "parse_overrides",
    "spec_sha256",
]
