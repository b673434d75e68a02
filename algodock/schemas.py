"""The contract's JSON Schemas, exported from the pydantic models into ``schemas/``.

Editors use these files to autocomplete and check manifests; ``tests/test_schemas.py``
fails when a committed file differs from a fresh export, so the models stay the source.
The pipeline and lineage schemas join once :mod:`algodock.pipeline.spec` and
:mod:`algodock.lineage.queries` exist.

    python -m algodock.schemas           # (re)write schemas/*.schema.json
    python -m algodock.schemas --check   # exit 1 naming every stale file

>>> docs = build_schemas()
>>> docs["manifest.schema.json"]["$schema"]
'https://json-schema.org/draft/2020-12/schema'
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode

from algodock.contract.manifest import CONTRACT_VERSION, AlgoInput, AlgoOutput, Manifest
from algodock.pipeline.spec import PipelineSpec
from algodock.records import LineageDocument

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DEST = REPO / "schemas"
DRAFT = "https://json-schema.org/draft/2020-12/schema"
SUFFIX = ".schema.json"

log = logging.getLogger("algodock.schemas")


SCHEMAS: dict[str, tuple[str, type[BaseModel], JsonSchemaMode]] = {
    "manifest": ("the algorithm manifest (docs/contract.md §1)", Manifest, "validation"),
    "algo_input": ("/work/algo_input.json, what the container reads (docs/contract.md §2)", AlgoInput, "validation"),
    "algo_output": ("/work/output/algo_output.json, what the container returns (docs/contract.md §3)", AlgoOutput, "validation"),
    "pipeline": ("a pipeline spec", PipelineSpec, "validation"),
    # Written by algodock, read by people and tools: the schema of what is written.
    "lineage": ("the lineage record of a run (docs/contract.md §6)", LineageDocument, "serialization"),
}
"""File stem -> (what it describes, the model, which side of it: what is read or what is written)."""


def schema_of(stem: str, what: str, model: type[BaseModel], mode: JsonSchemaMode = "validation") -> dict[str, Any]:
    """The JSON Schema of ``model`` with ``$schema``, ``$id`` and a title carrying the contract version."""
    schema = model.model_json_schema(mode=mode)
    return {
        "$schema": DRAFT,
        "$id": f"urn:algodock:schema:{CONTRACT_VERSION}:{stem}",
        **schema,
        "title": f"algodock {stem} (contract {CONTRACT_VERSION})",
        "description": f"{what.capitalize()}. {schema.get('description', '')}".strip(),
    }


def build_schemas() -> dict[str, dict[str, Any]]:
    """File name -> schema document, for every model available."""
    out = {}
    for stem, (what, model, mode) in SCHEMAS.items():
        out[f"{stem}{SUFFIX}"] = schema_of(stem, what, model, mode)
    return out


def render(doc: dict[str, Any]) -> str:
    """Deterministic text: sorted keys, indent 2, UTF-8 as is, a trailing newline."""
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def export_schemas(dest: Path = DEFAULT_DEST) -> list[Path]:
    """Write every schema into ``dest``; return the paths written (sorted)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for name, doc in sorted(build_schemas().items()):
        path = dest / name
        path.write_text(render(doc), encoding="utf-8")
        written.append(path)
    return written


def stale_schemas(dest: Path = DEFAULT_DEST) -> list[str]:
    """Why each file in ``dest`` is out of date with the models (empty when all are current)."""
    dest = Path(dest)
    fresh = {name: render(doc) for name, doc in build_schemas().items()}
    problems = []
    for name, text in sorted(fresh.items()):
        path = dest / name
        if not path.exists():
            problems.append(f"{path}: missing")
        elif path.read_text(encoding="utf-8") != text:
            problems.append(f"{path}: differs from the models")
    for path in sorted(dest.glob(f"*{SUFFIX}")):
        if path.name not in fresh:
            problems.append(f"{path}: no model exports it any more")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m algodock.schemas", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="Write nothing; exit 1 naming every stale file.")
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST, help=f"Folder of the schema files (default: {DEFAULT_DEST}).")
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(levelname)s %(message)s")
    if args.check:
        problems = stale_schemas(args.dest)
        for line in problems:
            print(f"stale: {line}", file=sys.stderr)
        if problems:
            print("run `python -m algodock.schemas` to regenerate them", file=sys.stderr)
            return 1
        print(f"schemas in {args.dest} are up to date")
        return 0
    for path in export_schemas(args.dest):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
