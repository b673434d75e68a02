"""The pipeline spec as written: a DAG of algorithm steps (models only, no I/O).

A spec is YAML (or JSON, or built in code with :class:`~algodock.pipeline.PipelineBuilder`)::

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

:mod:`algodock.pipeline.load` reads the files (spec, manifests, algorithm blocks);
:mod:`algodock.pipeline.validate` checks the whole on what was read, without I/O.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from algodock.contract.manifest import NAME_PATTERN, Manifest, Name, format_validation_error
from algodock.contract.params import parse_value
from algodock.errors import InvalidInput, InvalidManifest
from algodock.runtime.images import PullPolicy

PIPELINE_VERSION = "0.1"
"""The pipeline spec version this platform reads."""

INPUTS = "inputs"
"""Reference prefix of the pipeline's external inputs; also a reserved step id."""

BlockResolver = Callable[[str], Manifest]
"""Turns an algorithm block name into its manifest (the Prefect layer provides it)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


ONLY_NAMES = {"additionalProperties": False}
"""Said in the exported JSON Schema of a ``dict[Name, …]``: its keys are names (pydantic checks
them against ``Name``'s pattern; the schema's ``patternProperties`` alone would let any other key through)."""

ONE_ALGORITHM = {
    "oneOf": [
        {"required": ["manifest"], "properties": {"manifest": {"type": "string"}}},
        {"required": ["block"], "properties": {"block": {"type": "string"}}},
    ]
}
"""``StepSpec._one_algorithm`` said in the exported JSON Schema: exactly one of manifest or block (null counts as not given)."""


class StepSpec(_Strict):
    """One step: an algorithm (a manifest file or an algorithm block), its inputs and parameters."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=ONE_ALGORITHM)

    id: Name = Field(description="Unique step id; also the Prefect task name.")
    manifest: str | None = Field(None, description="Manifest file, relative to the spec file.", examples=["../examples/device-visits/manifest.json"])
    block: str | None = Field(None, description="Name of a saved algorithm block (instead of manifest).")
    inputs: dict[Name, str] = Field(
        default_factory=dict, description="Input slot -> inputs.<name> or <step>.<output>.", examples=[{"pings": "inputs.pings"}], json_schema_extra=ONLY_NAMES
    )
    parameters: dict[str, Any] = Field(default_factory=dict, description="config.parameters; validated by the manifest's schema.")
    retries: int = Field(0, ge=0, description="Retries after exit_code, timeout or oom failures (infrastructure failures always retry).")
    after: list[Name] = Field(default_factory=list, description="Steps that must finish first, without data passing.")
    pull_policy: PullPolicy | None = Field(
        None,
        description="When to ask the registry for the image: if_not_present (the default), always (pull when the tag's digest moved), never. Overrides the run's --pull-policy.",
    )
    image: str | None = Field(
        None,
        description="The manifest's image pinned by digest (repo@sha256:…, the manifest's own repository only); `algodock pin` writes it.",
        examples=["myorg/device-visits@sha256:" + "0" * 64],
    )

    @model_validator(mode="after")
    def _one_algorithm(self) -> StepSpec:
        if (self.manifest is None) == (self.block is None):
            raise ValueError("give exactly one of `manifest` (a file) or `block` (an algorithm block name)")
        return self


class PolicySpec(_Strict):
    """What images a pipeline may run, checked at validation before any container."""

    require_digest: bool = Field(False, description="Every step's image must be pinned by digest (repo@sha256:…).")
    allowed_registries: list[str] | None = Field(None, description="Registries (host[:port], docker.io for Docker Hub) the images may come from; any when omitted.", examples=[["registry.example.com"]])


class PipelineSpec(_Strict):
    """A pipeline as written (the ``pipeline_version: "0.1"`` document)."""

    pipeline_version: Literal["0.1"]
    name: Name
    description: str = ""
    inputs: dict[Name, str] = Field(
        default_factory=dict,
        description="External inputs: local path (relative to the spec file), file:// or s3:// URI.",
        examples=[{"pings": "s3://raw/pings/2026-11-27/"}],
        json_schema_extra=ONLY_NAMES,
    )
    steps: list[StepSpec] = Field(min_length=1)
    policy: PolicySpec | None = Field(None, description="The image policy (digest pinning, allowed registries).")


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


def step_error(source: str, step: str | None, where: str, message: str) -> str:
    """One error line: ``<file>: step <id>: <field>: <message>`` (every spec error reads so)."""
    return f"{source}: {f'step {step}: ' if step else ''}{where}: {message}"


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
    doc = spec.model_dump(mode="json")
    # Fields added since 0.1 count only when set, so a spec that does not use them keeps its hash.
    if doc.get("policy") is None:
        doc.pop("policy", None)
    for step in doc["steps"]:
        for key in ("pull_policy", "image"):
            if step.get(key) is None:
                step.pop(key, None)
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def parse_spec(data: Any, source: str) -> PipelineSpec:
    """Schema-check a spec document (a mapping); raises :class:`InvalidManifest` naming steps by id."""
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


__all__ = ["INPUTS", "PIPELINE_VERSION", "BlockResolver", "PipelineSpec", "PolicySpec", "Ref", "StepSpec", "parse_overrides", "parse_spec", "spec_sha256", "step_error"]
