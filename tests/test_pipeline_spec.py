"""The pipeline spec: every validation error names file, step and field; good specs resolve right.

No Docker needed: the fixture manifests (tests/fixtures/pipelines/manifests/) are only read.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from algodock.pipeline.capacity import Capacity
from algodock.contract.manifest import load_manifest
from algodock.errors import InvalidInput, InvalidManifest
from algodock.pipeline import (
    Pipeline,
    PipelineBuilder,
    PipelineSpec,
    Ref,
    build_pipeline,
    load_pipeline,
    parse_overrides,
)

FIXTURES = Path(__file__).parent / "fixtures" / "pipelines"
GOOD, BAD, MANIFESTS = FIXTURES / "good", FIXTURES / "bad", FIXTURES / "manifests"
SMALL = Capacity(cpu_millicore=2000, memory_gb=4)

# (file in bad/, keyword arguments of load_pipeline, substrings that must each appear in one error line)
BAD_SPECS: list[tuple[str, dict[str, Any], list[str]]] = [
    ("not-a-mapping.yaml", {}, ["(root): expected a mapping, got list"]),
    ("unknown-key.yaml", {}, ["step a: paramters: unknown key"]),
    ("manifest-and-block.yaml", {}, ["step a: give exactly one of `manifest`"]),
    ("wrong-version.yaml", {}, ["pipeline_version: Input should be '0.1'"]),
    ("bad-step-id.yaml", {}, ["step Bad.Id: id: String should match pattern", "step ok: retries: Input should be greater than or equal to 0"]),
    ("no-steps.yaml", {}, ["steps: List should have at least 1 item"]),
    ("duplicate-ids.yaml", {}, ["step a: id: duplicate step id (steps[0] and steps[1])"]),
    ("reserved-id.yaml", {}, ["step inputs: id: 'inputs' is reserved"]),
    ("missing-manifest.yaml", {}, ["step a: manifest: ", "manifests/does-not-exist.json: cannot read"]),
    ("invalid-manifest.yaml", {}, ["step a: manifest: ", "bad-manifest.json: container_parameters.imgae: unknown key"]),
    ("block-without-resolver.yaml", {}, ["step a: block: 'source-algorithm': algorithm blocks are resolved by the Prefect flow"]),
    ("bad-ref-syntax.yaml", {}, ["step a: inputs.raw: 'raw' is not a reference: expected inputs.<name> or <step>.<output>"]),
    ("unknown-input.yaml", {}, ["step a: inputs.raw: unknown pipeline input 'inputs.nope' (pipeline inputs: raw)"]),
    ("bad-input-scheme.yaml", {}, ["inputs.raw: 'http://example.com/raw.csv': unsupported scheme"]),
    ("unknown-step.yaml", {}, ["step b: inputs.table: 'ghost.table' names an unknown step 'ghost'"]),
    ("unknown-output.yaml", {}, ["step b: inputs.table: step 'a' (manifest 'source') has no output 'nothing' (outputs: table)"]),
    ("unknown-slot.yaml", {}, ["step b: inputs.tabel: the manifest 'square' has no input slot 'tabel'", "step b: inputs.table: required input slot"]),
    ("format-mismatch.yaml", {}, ["step b: inputs.data: format mismatch: a.table is parquet, the slot expects csv"]),
    ("multiple-mismatch.yaml", {}, ["step b: inputs.table: parts.parts is a folder of files (multiple), the slot takes a single file"]),
    ("required-unbound.yaml", {}, ["step m: inputs.right: required input slot of 'merge' is not bound"]),
    ("after-unknown.yaml", {}, ["step a: after: unknown step 'ghost'"]),
    ("cycle.yaml", {}, ["steps: cycle: a -> b -> c -> a"]),
    ("self-after.yaml", {}, ["steps: cycle: a -> a"]),
    (
        "bad-parameters.yaml",
        {},
        [
            "step visits: parameters.n: 0 is less than the minimum of 1",
            "step visits: parameters: Additional properties are not allowed ('look_back' was unexpected)",
            "step sq: parameters.power: 'two' is not of type 'integer'",
        ],
    ),
    (
        "many-errors.yaml",
        {},
        [
            "step a: parameters.n: -1 is less than the minimum of 1",
            "step b: inputs.data: format mismatch",
            "step c: inputs.table: 'ghost.out' names an unknown step 'ghost'",
            "step c: after: unknown step 'nobody'",
            "step d: manifest: ",
        ],
    ),
    ("../good/big.yaml", {"capacity": SMALL}, ["step huge: resource_request: larger than the capacity (cpu_millicore 16000 > 2000, memory_gb 64 > 4)"]),
    ("../good/fanout.yaml", {"overrides": {"nope": {"x": 1}}}, ["--set nope.…: unknown step 'nope' (steps: merge, source, left, right, parts, collect)"]),
    ("../good/fanout.yaml", {"overrides": {"right": {"power": 0}}}, ["step right: parameters.power: 0 is less than the minimum of 1"]),
]


@pytest.mark.parametrize(("name", "kwargs", "expected"), BAD_SPECS, ids=[f"{n}{'+' + ','.join(k) if k else ''}" for n, k, _ in BAD_SPECS])
def test_bad_spec_names_file_step_and_field(name: str, kwargs: dict[str, Any], expected: list[str]) -> None:
    path = BAD / name
    with pytest.raises(InvalidManifest) as info:
        load_pipeline(path, **kwargs)
    errors = info.value.errors
    assert errors and str(info.value) == "\n".join(errors)
    for line in errors:
        assert line.startswith(f"{path}: "), line
    for want in expected:
        assert any(want in line for line in errors), f"{want!r} not in:\n" + "\n".join(errors)


def test_all_errors_are_collected_at_once() -> None:
    with pytest.raises(InvalidManifest) as info:
        load_pipeline(BAD / "many-errors.yaml")
    assert len(info.value.errors) == 5


def fanout() -> Pipeline:
    return load_pipeline(GOOD / "fanout.yaml")


def test_fan_out_fan_in_dependencies_and_order() -> None:
    p = fanout()
    assert p.name == "fanout" and p.source == str(GOOD / "fanout.yaml") and p.base_dir == GOOD
    assert p.dependencies == {
        "merge": {"left", "right"},
        "source": set(),
        "left": {"source"},
        "right": {"source"},
        "parts": set(),
        "collect": {"parts", "merge"},
    }
    assert p.topological_order() == ["source", "left", "right", "merge", "parts", "collect"]
    order = p.topological_order()
    for step, deps in p.dependencies.items():
        assert all(order.index(d) < order.index(step) for d in deps)
    assert p.downstream("source") == {"left", "right", "merge", "collect"}
    assert p.downstream("parts") == {"collect"}
    assert p.downstream("collect") == set()
    assert p.bindings["merge"] == {
        "left": Ref("step", "left", "squared"),
        "right": Ref("step", "right", "squared"),
        "notes": Ref("input", "notes"),
    }
    assert p.inputs == {"raw": str((FIXTURES / "data" / "raw.csv").absolute()), "notes": "s3://bucket/notes.json"}
    assert p.manifests["left"] is p.manifests["right"]  # one file, read once
    assert p.manifests["merge"] == load_manifest(MANIFESTS / "merge.json")
    assert p.steps["right"].retries == 2 and p.steps["left"].retries == 0


def test_parameters_get_defaults_and_overrides() -> None:
    assert fanout().parameters == {"merge": {}, "source": {"n": 5}, "left": {"power": 2}, "right": {"power": 3}, "parts": {}, "collect": {}}
    p = load_pipeline(GOOD / "fanout.yaml", overrides=parse_overrides(["right.power=4", "left.label=hello world", "source.n=7"]))
    assert p.parameters["right"] == {"power": 4}
    assert p.parameters["left"] == {"power": 2, "label": "hello world"}
    assert p.parameters["source"] == {"n": 7}
    assert p.overrides == {"right": {"power": 4}, "left": {"label": "hello world"}, "source": {"n": 7}}
    assert p.spec_sha256 == fanout().spec_sha256  # the spec as written; overrides live beside it


def test_parse_overrides() -> None:
    assert parse_overrides(["a.k=1", "a.j=[1, 2]", "b.s=x=y", 'b.o={"q": true}']) == {
        "a": {"k": 1, "j": [1, 2]},
        "b": {"s": "x=y", "o": {"q": True}},
    }
    for bad in ["novalue", "nodot=1", ".k=1", "a.=1"]:
        with pytest.raises(InvalidInput, match=f"--set '{bad}': expected STEP.KEY=VALUE"):
            parse_overrides(["a.k=1", bad])


def test_single_file_into_multiple_slot_is_fine() -> None:
    p = load_pipeline(GOOD / "single-into-multiple.yaml")
    assert p.dependencies["collect"] == {"source"}
    assert p.inputs["raw"] == "/data/raw.csv"


def test_block_steps_use_the_resolver() -> None:
    asked: list[str] = []

    def resolve(name: str):
        asked.append(name)
        return load_manifest(MANIFESTS / "source.json")

    p = load_pipeline(GOOD / "block.yaml", resolve_block=resolve)
    assert asked == ["source-algorithm"]
    assert p.manifests["source"].name == "source" and p.dependencies["sq"] == {"source"}
    assert p.inputs["raw"] == "file:///data/raw.csv"

    def missing(name: str):
        raise ValueError(f"Unable to find block document named {name}")

    with pytest.raises(InvalidManifest) as info:
        load_pipeline(GOOD / "block.yaml", resolve_block=missing)
    assert info.value.errors == [
        f"{GOOD / 'block.yaml'}: step source: block: 'source-algorithm': cannot load: ValueError: Unable to find block document named source-algorithm"
    ]


def test_capacity_that_fits_passes() -> None:
    load_pipeline(GOOD / "big.yaml", capacity=Capacity(16000, 64))
    load_pipeline(GOOD / "fanout.yaml", capacity=SMALL)


def test_builder_builds_the_same_pipeline_as_the_yaml() -> None:
    built = (
        PipelineBuilder("fanout", "fan-out and fan-in over tiny manifests")
        .input("raw", "../data/raw.csv")
        .input("notes", "s3://bucket/notes.json")
        .step("merge", manifest="../manifests/merge.json", inputs={"left": "left.squared", "right": "right.squared", "notes": "inputs.notes"})
        .step("source", manifest="../manifests/source.json", inputs={"raw": "inputs.raw"}, parameters={"n": 5})
        .step("left", manifest="../manifests/square.json", inputs={"table": "source.table"})
        .step("right", manifest="../manifests/square.json", inputs={"table": "source.table"}, parameters={"power": 3}, retries=2)
        .step("parts", manifest="../manifests/parts.json", inputs={"raw": "inputs.raw"})
        .step("collect", manifest="../manifests/collect.json", inputs={"tables": "parts.parts"}, after=["merge"])
        .build(base_dir=GOOD)
    )
    yaml_p = fanout()
    assert built.spec == yaml_p.spec
    assert built.spec_sha256 == yaml_p.spec_sha256
    assert built.source == "<code>"
    for attr in ("manifests", "parameters", "bindings", "dependencies", "inputs"):
        assert getattr(built, attr) == getattr(yaml_p, attr), attr
    assert built.topological_order() == yaml_p.topological_order()


def test_build_pipeline_from_dict_and_model() -> None:
    doc = yaml.safe_load((GOOD / "fanout.yaml").read_text())
    from_dict = build_pipeline(doc, base_dir=GOOD)
    from_model = build_pipeline(PipelineSpec.model_validate(doc), base_dir=GOOD)
    assert from_dict.spec_sha256 == from_model.spec_sha256 == fanout().spec_sha256
    assert from_dict.dependencies == fanout().dependencies


def _step(id: str, manifest: str, inputs: dict[str, str], *, parameters: dict[str, Any] | None = None, retries: int = 0, after: list[str] | None = None) -> dict[str, Any]:
    return {"id": id, "manifest": f"../manifests/{manifest}.json", "block": None, "inputs": inputs, "parameters": parameters or {}, "retries": retries, "after": after or []}


FANOUT_CANONICAL = {
    "pipeline_version": "0.1",
    "name": "fanout",
    "description": "fan-out and fan-in over tiny manifests",
    "inputs": {"raw": "../data/raw.csv", "notes": "s3://bucket/notes.json"},
    "steps": [
        _step("merge", "merge", {"left": "left.squared", "right": "right.squared", "notes": "inputs.notes"}),
        _step("source", "source", {"raw": "inputs.raw"}, parameters={"n": 5}),
        _step("left", "square", {"table": "source.table"}),
        _step("right", "square", {"table": "source.table"}, parameters={"power": 3}, retries=2),
        _step("parts", "parts", {"raw": "inputs.raw"}),
        _step("collect", "collect", {"tables": "parts.parts"}, after=["merge"]),
    ],
}
"""fanout.yaml as the hash sees it: the spec with every default spelled out (step order kept)."""


def test_spec_sha256_is_stable() -> None:
    p = fanout()
    # Key order, formatting, JSON vs YAML and spelled-out defaults do not change the hash ...
    assert load_pipeline(GOOD / "fanout-reordered.json").spec_sha256 == p.spec_sha256
    # ... and it does not depend on where the spec lives or on the Python session: it is the
    # sha256 of the spec's canonical JSON (every default spelled out, keys sorted, no spaces).
    assert p.spec_sha256 == hashlib.sha256(json.dumps(FANOUT_CANONICAL, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()).hexdigest()
    # Every run records it (lineage.json, run.json: spec_sha256), and runs of one spec are told
    # apart from runs of another by it, across algodock versions: a new field, a changed default
    # or another canonical form changes it for every stored run. Change it only on purpose, with
    # a note in the changelog; this value was printed by `load_pipeline(GOOD / "fanout.yaml").spec_sha256`.
    assert p.spec_sha256 == "27c8b5602a2b2eef531d979672068526eb32cedec14681ec32e845a390320a15"
    # Any change of meaning does.
    doc = yaml.safe_load((GOOD / "fanout.yaml").read_text())
    doc["steps"][1]["parameters"]["n"] = 6
    assert build_pipeline(doc, base_dir=GOOD).spec_sha256 != p.spec_sha256


def test_relative_paths_follow_the_spec_file(tmp_path: Path) -> None:
    sub = tmp_path / "specs"
    sub.mkdir()
    (tmp_path / "m.json").write_text((MANIFESTS / "big.json").read_text())
    spec = {"pipeline_version": "0.1", "name": "p", "inputs": {"x": "data/x.bin"}, "steps": [{"id": "a", "manifest": "../m.json"}]}
    (sub / "p.json").write_text(json.dumps(spec))
    p = load_pipeline(sub / "p.json")
    assert p.manifests["a"].name == "big"
    assert p.inputs["x"] == str(sub / "data" / "x.bin")


def test_ref_parse() -> None:
    assert Ref.parse("inputs.pings") == Ref("input", "pings")
    assert Ref.parse("visits.visits") == Ref("step", "visits", "visits")
    assert str(Ref.parse("inputs.pings")) == "inputs.pings" and str(Ref("step", "a", "b")) == "a.b"
    for bad in ["pings", "a.b.c", "A.b", "a.", ".b", "inputs."]:
        with pytest.raises(ValueError, match="is not a reference"):
            Ref.parse(bad)
