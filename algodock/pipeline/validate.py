"""A pipeline spec checked whole, on manifests already loaded: no file, block or engine is read here.

:func:`validate_pipeline` checks everything that can be checked without running anything
(step ids, references, formats, slot schemas, cycles, parameters, resource requests) and raises one
:class:`~algodock.errors.InvalidManifest` listing every error, each line naming the file,
the step and the field. What it returns, :class:`Pipeline`, is the resolved DAG: one
:class:`ResolvedStep` per step.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from algodock.contract.arrow_schema import compare
from algodock.contract.manifest import Manifest
from algodock.contract.params import resolve_parameters
from algodock.errors import InvalidInput, InvalidManifest
from algodock.pipeline.capacity import Capacity
from algodock.runtime.images import canonical_repository, is_pinned, normalize_registry, registry_of, repository_of
from algodock.pipeline.spec import INPUTS, PipelineSpec, Ref, StepSpec, spec_sha256, step_error


@dataclass(frozen=True)
class ResolvedStep:
    """One step, resolved: everything a run needs to know about it, in one record."""

    spec: StepSpec
    """The step as written."""
    manifest: Manifest
    parameters: dict[str, Any]
    """Spec parameters, then overrides, then the manifest's defaults."""
    bindings: dict[str, Ref]
    """Input slot -> where its data comes from."""
    dependencies: frozenset[str]
    """The steps it waits for (data and ``after``)."""

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def retries(self) -> int:
        return self.spec.retries

    @property
    def pull_policy(self) -> str | None:
        """The step's own pull policy (None: the run's)."""
        return self.spec.pull_policy


@dataclass
class Pipeline:
    """A validated pipeline: the spec with every step resolved (see :class:`ResolvedStep`)."""

    spec: PipelineSpec
    source: str
    """The spec file, or ``"<code>"``."""
    base_dir: Path
    """Relative manifest and input paths are relative to it (the spec file's folder)."""
    spec_sha256: str
    """sha256 of the spec's canonical JSON (defaults included, keys sorted; overrides not included)."""
    steps: dict[str, ResolvedStep]
    """Steps by id, in spec order."""
    inputs: dict[str, str]
    """External inputs: name -> absolute local path, file:// or s3:// URI."""
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    # Read-only views by step id, derived from ``steps`` (the one record per step).
    @cached_property
    def manifests(self) -> dict[str, Manifest]:
        return {i: s.manifest for i, s in self.steps.items()}

    @cached_property
    def parameters(self) -> dict[str, dict[str, Any]]:
        return {i: s.parameters for i, s in self.steps.items()}

    @cached_property
    def bindings(self) -> dict[str, dict[str, Ref]]:
        return {i: s.bindings for i, s in self.steps.items()}

    @cached_property
    def pull_policies(self) -> dict[str, str | None]:
        return {i: s.pull_policy for i, s in self.steps.items()}

    @cached_property
    def dependencies(self) -> dict[str, set[str]]:
        return {i: set(s.dependencies) for i, s in self.steps.items()}

    def topological_order(self) -> list[str]:
        """Every step after the steps it depends on; ties keep the spec's order."""
        order: list[str] = []
        done: set[str] = set()
        pending = list(self.steps)
        while pending:
            ready = next(s for s in pending if self.steps[s].dependencies <= done)
            order.append(ready)
            done.add(ready)
            pending.remove(ready)
        return order

    def check_capacity(self, capacity: Capacity) -> None:
        """Refuse the run (:class:`InvalidManifest`, a line per step) when a step's resource
        request could never fit ``capacity``: the check a spec loaded without one (a cluster
        run's, whose capacity is known only once its workers answer) is given later."""
        errors = [
            step_error(self.source, step_id, "resource_request", f"larger than the capacity ({', '.join(excess)}); it could never run")
            for step_id, manifest in self.manifests.items()
            if (excess := capacity.excess(manifest.container_parameters.resource_request))
        ]
        if errors:
            raise InvalidManifest("\n".join(errors), errors=errors)

    def downstream(self, step_id: str) -> set[str]:
        """Every step that depends on ``step_id``, directly or not (what a failure skips)."""
        found: set[str] = set()
        frontier = [step_id]
        while frontier:
            current = frontier.pop()
            for other, step in self.steps.items():
                if current in step.dependencies and other not in found:
                    found.add(other)
                    frontier.append(other)
        return found


def validate_pipeline(
    spec: PipelineSpec,
    manifests: Mapping[str, Manifest],
    *,
    base_dir: Path,
    source: str = "<code>",
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    capacity: Capacity | None = None,
    errors: Iterable[str] = (),
    require_digest: bool = False,
) -> Pipeline:
    """Check ``spec`` against its steps' ``manifests`` (by step id) and resolve it.

    ``errors`` are lines already found while loading (a manifest that did not load has no
    entry in ``manifests``); they are reported with the rest. ``overrides`` replace or add
    parameters; ``capacity`` rejects steps that could never fit; ``require_digest`` (or the
    spec's ``policy``) refuses every step whose image is not pinned by digest. A step's
    ``image:`` pins its manifest's image: the resolved step's manifest runs that reference.
    Raises :class:`InvalidManifest` with every error found.
    """
    checker = _Checker(spec, manifests, base_dir, source, dict(overrides or {}), capacity, list(errors))
    checker.require_digest = require_digest
    return checker.run()


class _Checker:
    """Collects every error of one spec; :meth:`run` raises them together."""

    def __init__(
        self,
        spec: PipelineSpec,
        manifests: Mapping[str, Manifest],
        base: Path,
        source: str,
        overrides: dict[str, Mapping[str, Any]],
        capacity: Capacity | None,
        errors: list[str],
    ) -> None:
        self.spec, self.manifests, self.base, self.source = spec, manifests, base, source
        self.overrides, self.capacity, self.errors = overrides, capacity, errors
        self.require_digest = False

    def error(self, step: str | None, where: str, message: str) -> None:
        self.errors.append(step_error(self.source, step, where, message))

    def run(self) -> Pipeline:
        spec = self.spec
        ids = self._check_ids()
        inputs = self._external_inputs()
        for step in self.overrides:
            if step not in ids:
                self.error(None, f"--set {step}.…", f"unknown step {step!r} (steps: {', '.join(ids)})")
        parameters = self._parameters()
        bindings: dict[str, dict[str, Ref]] = {}
        deps: dict[str, set[str]] = {s.id: set() for s in spec.steps}
        for step in spec.steps:
            bindings[step.id] = self._bindings(step, ids)
            deps[step.id] |= {r.name for r in bindings[step.id].values() if r.kind == "step" and r.name in ids}
            for other in step.after:
                if other in ids:
                    deps[step.id].add(other)
                else:
                    self.error(step.id, "after", f"unknown step {other!r} (steps: {', '.join(ids)})")
        for cycle in _cycles(deps):
            self.error(None, "steps", f"cycle: {' -> '.join(cycle)} (each step needs the one before it)")
        self._check_capacity()
        self._pin_images()
        self._check_image_policy()
        if self.errors:
            raise InvalidManifest("\n".join(self.errors), errors=self.errors)
        steps = {
            s.id: ResolvedStep(spec=s, manifest=self.manifests[s.id], parameters=parameters[s.id], bindings=bindings[s.id], dependencies=frozenset(deps[s.id]))
            for s in spec.steps
        }
        return Pipeline(
            spec=spec,
            source=self.source,
            base_dir=self.base,
            spec_sha256=spec_sha256(spec),
            steps=steps,
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

    def _parameters(self) -> dict[str, dict[str, Any]]:
        resolved: dict[str, dict[str, Any]] = {}
        for step in self.spec.steps:
            manifest = self.manifests.get(step.id)
            if manifest is None:
                continue
            given = {**step.parameters, **self.overrides.get(step.id, {})}
            try:
                resolved[step.id] = resolve_parameters(manifest.parameters, given, source=f"{self.source}: step {step.id}: parameters")
            except InvalidInput as exc:
                self.errors.extend(exc.errors)
        return resolved

    def _bindings(self, step: StepSpec, ids: list[str]) -> dict[str, Ref]:
        bindings: dict[str, Ref] = {}
        manifest = self.manifests.get(step.id)
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
            elif (producer := self.manifests.get(ref.name)) is not None:
                out = producer.output_slot(ref.output or "")
                if out is None:
                    outs = ", ".join(o.name for o in producer.outputs) or "none"
                    self.error(step.id, where, f"step {ref.name!r} (manifest {producer.name!r}) has no output {ref.output!r} (outputs: {outs})")
                    continue
                if slot is not None and out.format != slot.format:
                    self.error(step.id, where, f"format mismatch: {ref} is {out.format}, the slot expects {slot.format}")
                if slot is not None and out.multiple and not slot.multiple:
                    self.error(step.id, where, f"{ref} is a folder of files (multiple), the slot takes a single file (multiple: false)")
                if slot is not None and out.schema_ is not None and slot.schema_ is not None:
                    for mismatch in compare(out.schema_, slot.schema_):
                        self.error(
                            step.id,
                            f"{where}.schema",
                            f"column {mismatch.column!r}: step {ref.name!r} output {ref.output!r} does not feed step {step.id!r} input {slot_name!r}: {mismatch.problem}",
                        )
            bindings[slot_name] = ref
        if manifest is not None:
            for slot in manifest.inputs:
                if slot.required and slot.name not in step.inputs:
                    self.error(step.id, f"inputs.{slot.name}", f"required input slot of {manifest.name!r} is not bound")
        return bindings

    def _pin_images(self) -> None:
        """A step's ``image:`` replaces its manifest's image: its own repository, pinned by digest."""
        pinned: dict[str, Manifest] = dict(self.manifests)
        for step in self.spec.steps:
            manifest = self.manifests.get(step.id)
            if step.image is None or manifest is None:
                continue
            written = manifest.container_parameters.image
            if not is_pinned(step.image):
                self.error(step.id, "image", f"{step.image!r} is not pinned by digest: a step's image must be repo@sha256:<64 hex> (`algodock pin` writes it)")
            elif canonical_repository(step.image) != canonical_repository(written) or registry_of(step.image) != registry_of(written):
                self.error(step.id, "image", f"{step.image!r} is not the manifest's repository {repository_of(written)!r}: a step may only pin its manifest's own image")
            else:
                cp = manifest.container_parameters.model_copy(update={"image": step.image})
                pinned[step.id] = manifest.model_copy(update={"container_parameters": cp})
        self.manifests = pinned

    def _check_image_policy(self) -> None:
        """One error per step whose image the digest policy refuses (nothing runs then)."""
        policy = self.spec.policy
        require = self.require_digest or bool(policy and policy.require_digest)
        allowed = None if policy is None or policy.allowed_registries is None else [normalize_registry(r) for r in policy.allowed_registries]
        if not require and allowed is None:
            return
        for step in self.spec.steps:
            manifest = self.manifests.get(step.id)
            if manifest is None:
                continue
            image = manifest.container_parameters.image
            problems = []
            if require and not is_pinned(image):
                problems.append("not pinned by digest (repo@sha256:…; `algodock pin` pins every step)")
            if allowed is not None and registry_of(image) not in allowed:
                problems.append(f"its registry {registry_of(image)} is not in policy.allowed_registries ({', '.join(allowed) or 'none'})")
            if problems:
                self.error(step.id, "image", f"{image!r} is refused by the image policy: {'; '.join(problems)}")

    def _check_capacity(self) -> None:
        if self.capacity is None:
            return
        for step_id, manifest in self.manifests.items():
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


__all__ = ["Pipeline", "ResolvedStep", "validate_pipeline"]
