"""The algorithm container contract (docs/contract.md §1-3) as pydantic models.

The models are the source of the JSON Schemas in ``schemas/`` (see
:func:`algodock.schemas.export_schemas`). Manifests reject unknown keys so that a typo
never passes silently; what an algorithm writes (``algo_output.json``) is read leniently
but checked for everything the platform relies on.

>>> m = Manifest.model_validate({
...     "manifest_version": "0.2", "name": "echo", "version": "1.0.0",
...     "container_parameters": {"image": "busybox:latest", "command": ["true"]},
... })
>>> m.container_parameters.resource_request.cpu_millicore
1000
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, ValidationInfo, field_validator, model_validator

from algodock.contract.arrow_schema import SlotSchema
from algodock.contract.documents import read_document
from algodock.contract.params import check_refs
from algodock.errors import InvalidManifest, shorten

TRIVIAL_SCHEMA = {"type": "object"}
"""The parameters schema of a manifest that declares none: any object, no defaults."""

CONTRACT_VERSION = "0.3"
"""The newest manifest version this platform reads."""

MAX_TIMEOUT_SECONDS = 7 * 24 * 3600
"""The longest ``timeout_seconds`` (docs/contract.md §1): a bound keeps deadlines inside what clocks can represent."""

ALGO_IO_VERSION = "0.1.0"
"""The version written into ``algo_input.json``."""

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
IMAGE_PATTERN = r"^(sha256:[0-9a-f]{64}|[A-Za-z0-9][A-Za-z0-9._/:@-]*)$"

Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
Format = Literal["parquet", "csv", "json", "binary"]

# Paths the container sees (docs/contract.md §2).
WORK_DIR = "/work"
ALGO_INPUT_PATH = "/work/algo_input.json"
INPUT_DIR = "/work/input"
OUTPUT_DIR = "/work/output"
ALGO_OUTPUT_NAME = "algo_output.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ResourceRequest(_Strict):
    """What a container may use: a hard CPU quota, a hard memory limit, GPUs."""

    cpu_millicore: int = Field(1000, gt=0, description="1000 = one core, a hard quota.")
    memory_gb: float = Field(1, gt=0, description="Hard memory limit, swap included.")
    gpu: int = Field(0, ge=0, description="Number of GPUs; 0 means none.")

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gb * 1024**3)


class ContainerParameters(_Strict):
    """How to run the image."""

    image: Annotated[str, StringConstraints(pattern=IMAGE_PATTERN, max_length=512)] = Field(
        description="A tag (repo:tag), a digest (repo@sha256:...) or a local image id (sha256:...).",
        examples=["myorg/device-visits:1.0.0"],
    )
    command: list[str] = Field(min_length=1, description="argv list run in the container.")
    resource_request: ResourceRequest = Field(default_factory=ResourceRequest)
    timeout_seconds: float = Field(
        3600, gt=0, le=MAX_TIMEOUT_SECONDS, allow_inf_nan=False, description="Wall-clock limit in seconds (at most 7 days); the container is killed after it."
    )
    env: dict[Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")], str] = Field(
        default_factory=dict,
        description="Extra environment variables.",
        # What the validators below enforce, said in the exported JSON Schema too.
        json_schema_extra={"additionalProperties": False, "not": {"required": ["ALGORITHM_INPUT_PATH"]}},
    )
    scratch_mb: int = Field(64, gt=0, description="Size of the /tmp tmpfs in MiB; counts against memory.")
    output_mb: int = Field(
        10240, gt=0, description="Most MiB the algorithm may write into /work/output; enforced while it runs (failure kind disk_limit)."
    )
    output_files: int = Field(
        100000, gt=0, description="Most files plus folders the algorithm may create in /work/output; enforced while it runs (disk_limit)."
    )
    shm_mb: int = Field(0, ge=0, description="Size of a writable /dev/shm tmpfs in MiB (counts against memory); 0: no /dev/shm.")

    @field_validator("env")
    @classmethod
    def _reserved_env(cls, env: dict[str, str]) -> dict[str, str]:
        if "ALGORITHM_INPUT_PATH" in env:
            raise ValueError("ALGORITHM_INPUT_PATH is set by the platform and cannot be overridden")
        return env


SCHEMA_VERSIONS = ("0.3",)
"""Manifest versions whose parquet slots may declare a ``schema``."""


class _Slot(_Strict):
    # The key is "schema" (BaseModel has a method of that name, hence the alias).
    model_config = ConfigDict(extra="forbid", validate_by_name=False, validate_by_alias=True, serialize_by_alias=True)

    name: Name
    format: Format
    required: bool = True
    multiple: bool = Field(False, description="True: the slot is a folder of files (e.g. parquet parts).")
    description: str = ""
    schema_: SlotSchema | None = Field(
        None,
        alias="schema",
        exclude_if=lambda schema: schema is None,  # a manifest without schemas dumps as before 0.3
        description="Manifest 0.3, parquet slots only: the Arrow columns the data holds, checked before a run and on the bytes at hand-off.",
        examples=[{"columns": [{"name": "device_id", "type": "string", "nullable": False}, {"name": "ts", "type": "timestamp[us, tz=UTC]"}], "extra_columns": "allow"}],
    )

    @field_validator("schema_")
    @classmethod
    def _parquet_only(cls, schema: SlotSchema | None, info: ValidationInfo) -> SlotSchema | None:
        fmt = info.data.get("format")
        if schema is not None and fmt is not None and fmt != "parquet":
            raise ValueError(f"a schema is only for parquet slots; this slot's format is {fmt}")
        return schema


class InputSlot(_Slot):
    """A named input the algorithm reads from ``/work/input/<name>/``."""


class OutputSlot(_Slot):
    """A named output the algorithm writes under ``/work/output``."""


class Manifest(_Strict):
    """What an algorithm author ships beside the image (docs/contract.md §1)."""

    manifest_version: Literal["0.1", "0.2", "0.3"]  # 0.2 added output limits and shm_mb, 0.3 slot schemas; older ones stay valid
    name: Name
    version: str = Field(min_length=1)
    description: str = ""
    container_parameters: ContainerParameters
    parameters: dict[str, Any] = Field(
        default_factory=lambda: {"type": "object"},
        description="JSON Schema (draft 2020-12) of config.parameters.",
        json_schema_extra={"$ref": "https://json-schema.org/draft/2020-12/schema"},
    )
    inputs: list[InputSlot] = Field(default_factory=list)
    outputs: list[OutputSlot] = Field(default_factory=list)

    @field_validator("parameters")
    @classmethod
    def _schema_is_valid(cls, schema: dict[str, Any]) -> dict[str, Any]:
        if schema == TRIVIAL_SCHEMA:  # the default: valid, and importing jsonschema costs ~0.3 s of a cold start
            return schema
        from jsonschema import Draft202012Validator
        from jsonschema.exceptions import SchemaError

        try:
            Draft202012Validator.check_schema(schema)
        except SchemaError as exc:
            where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
            raise ValueError(f"not a valid JSON Schema at {shorten(where)}: {shorten(exc.message)}") from None
        check_refs(schema)
        return schema

    @field_validator("inputs", "outputs")
    @classmethod
    def _unique_slots(cls, slots: list[InputSlot] | list[OutputSlot], info: ValidationInfo) -> list:
        seen: dict[str, int] = {}
        for i, slot in enumerate(slots):
            if slot.name in seen:
                raise ValueError(f"slot name {slot.name!r} is used twice ({info.field_name}.{seen[slot.name]} and {info.field_name}.{i})")
            seen[slot.name] = i
        return slots

    @model_validator(mode="after")
    def _schemas_need_03(self) -> Manifest:
        if self.manifest_version not in SCHEMA_VERSIONS:
            for where, slots in (("inputs", self.inputs), ("outputs", self.outputs)):
                for i, slot in enumerate(slots):
                    if slot.schema_ is not None:
                        raise ValueError(f"{where}.{i}.schema: a slot schema needs manifest_version 0.3 (this manifest says {self.manifest_version})")
        return self

    def input_slot(self, name: str) -> InputSlot | None:
        return next((s for s in self.inputs if s.name == name), None)

    def output_slot(self, name: str) -> OutputSlot | None:
        return next((s for s in self.outputs if s.name == name), None)


class InputData(BaseModel):
    """One staged input slot as the container sees it."""

    name: str
    format: Format
    path: str = Field(description="Folder of the slot in the container.")
    files: list[str] = Field(description="Every file of the slot, absolute container paths, sorted.")
    source_uri: str | None = None
    sha256: str | None = None


class AlgoConfig(BaseModel):
    parameters: dict[str, Any] = Field(default_factory=dict)


class AlgoInput(BaseModel):
    """``/work/algo_input.json`` (docs/contract.md §2)."""

    version: str = ALGO_IO_VERSION
    input_data_path: str = INPUT_DIR
    output_path: str = OUTPUT_DIR
    config: AlgoConfig = Field(default_factory=AlgoConfig)
    input_data: list[InputData] = Field(default_factory=list)


class OutputData(BaseModel):
    """One output the algorithm declares in ``algo_output.json``."""

    name: str
    format: Format
    path: str = Field(min_length=1, description="Relative to output_path; must stay inside it.")


class AlgoOutput(BaseModel):
    """``/work/output/algo_output.json`` (docs/contract.md §3), read leniently."""

    model_config = ConfigDict(extra="allow")

    version: str = ALGO_IO_VERSION
    status: Literal["success", "failure", "failed", "error"] = "success"
    output_data: list[OutputData] = Field(default_factory=list)
    metrics: dict[str, Any] = Field(default_factory=dict)
    message: str | None = None


# ---------------------------------------------------------------- loading with good errors


def format_validation_error(source: str, exc: ValidationError) -> list[str]:
    """One line per error: ``file: field.path: message`` (a key or message someone else wrote, shortened)."""
    lines = []
    for err in exc.errors():
        where = shorten(".".join(str(p) for p in err["loc"]) or "(root)", 200)
        msg = shorten(err["msg"], 500)
        if err["type"] == "extra_forbidden":
            msg = "unknown key (not part of the contract; check the spelling)"
        elif err["type"] == "missing":
            msg = "required field is missing"
        elif err["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        lines.append(f"{source}: {where}: {msg}")
    return lines


def parse_manifest(data: Any, source: str = "manifest") -> Manifest:
    """Validate already-parsed manifest data; errors name ``source`` and the field."""
    if not isinstance(data, dict):
        raise InvalidManifest(f"{source}: (root): expected a mapping, got {type(data).__name__}")
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        errors = format_validation_error(source, exc)
        raise InvalidManifest("\n".join(errors), errors=errors) from None


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest file (JSON or YAML)."""
    path = Path(path)
    return parse_manifest(read_document(path), str(path))


def safe_relative(path: str) -> bool:
    """True when ``path`` is relative and has no ``..`` component (pure check, no I/O)."""
    if not path or path.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", path):
        return False
    return ".." not in re.split(r"[/\\]", path)
