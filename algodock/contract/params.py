"""Algorithm parameters: validation against the manifest's JSON Schema, with defaults filled.

>>> schema = {"type": "object", "properties": {"n": {"type": "integer", "default": 3}}}
>>> resolve_parameters(schema, {})
{'n': 3}
>>> parse_value("5"), parse_value("abc"), parse_value('{"a": 1}')
(5, 'abc', {'a': 1})
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from algodock.contract.documents import TOO_DEEP, too_deep
from algodock.errors import InvalidInput, shorten

MAX_ERRORS = 50
"""Parameter errors listed at most; then one line says how many more there are."""


def _fill_defaults(schema: Mapping[str, Any], value: Any) -> Any:
    """Fill ``default`` of object properties, recursively, without touching given values."""
    if not isinstance(value, dict) or not isinstance(schema, Mapping):
        return value
    for key, sub in (schema.get("properties") or {}).items():
        if not isinstance(sub, Mapping):
            continue
        if key not in value and "default" in sub:
            value[key] = copy.deepcopy(sub["default"])
        if key in value:
            value[key] = _fill_defaults(sub, value[key])
    return value


def _never_fetch(uri: str) -> Any:
    from referencing.exceptions import NoSuchResource

    raise NoSuchResource(ref=uri)


def _keyword(schema: Any, name: str) -> Iterator[tuple[str, str]]:
    """Every string value of keyword ``name`` (``$ref``, ``$id``) in ``schema`` with where it is
    (``properties/a``), without recursion."""
    stack: list[tuple[Any, tuple[str, ...]]] = [(schema, ())]
    while stack:
        node, path = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get(name), str):
                yield "/".join(path) or "(root)", node[name]
            stack.extend((v, (*path, str(k))) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((v, (*path, str(i))) for i, v in enumerate(node))


def check_refs(schema: Mapping[str, Any]) -> None:
    """``ValueError`` unless every ``$ref`` of a parameters schema points inside it, at something.

    A reference to another document would make the orchestrator fetch it, from wherever it
    names, each time parameters are checked; a manifest is someone else's file.
    """
    from referencing import Registry
    from referencing.exceptions import Unresolvable
    from referencing.jsonschema import DRAFT202012

    base = "urn:algodock:parameters"
    resolver = Registry(retrieve=_never_fetch).with_resource(base, DRAFT202012.create_resource(dict(schema))).resolver(base_uri=base)
    nested_ids = any(where != "(root)" for where, _ in _keyword(schema, "$id"))
    for where, ref in _keyword(schema, "$ref"):
        if not ref.startswith("#"):
            raise ValueError(f"$ref {shorten(ref)!r} at {shorten(where)}: only references inside the schema (#/…) are allowed; algodock never fetches a schema")
        if nested_ids:
            continue  # a "#…" under a nested $id is relative to that subschema; jsonschema resolves it when parameters are checked
        try:
            resolver.lookup(ref)
        except Unresolvable:
            raise ValueError(f"$ref {shorten(ref)!r} at {shorten(where)} points at nothing in the schema") from None


def resolve_parameters(schema: Mapping[str, Any], given: Mapping[str, Any], source: str = "parameters") -> dict[str, Any]:
    """Defaults filled, then validated (draft 2020-12); raises :class:`InvalidInput` listing every error."""
    if dict(schema) == {"type": "object"} and isinstance(given, Mapping):
        return copy.deepcopy(dict(given))  # nothing to fill or check: skip importing jsonschema (cold start)
    from jsonschema import Draft202012Validator
    from referencing import Registry
    from referencing.exceptions import Unresolvable

    value = _fill_defaults(schema, copy.deepcopy(dict(given)))
    validator = Draft202012Validator(schema, registry=Registry(retrieve=_never_fetch))
    try:
        errors = sorted(validator.iter_errors(value), key=lambda e: list(e.absolute_path))
    except Unresolvable as exc:
        raise InvalidInput(f"{source}: $ref {shorten(str(getattr(exc, 'ref', exc)))} cannot be resolved (algodock never fetches a schema)") from None
    if errors:
        lines = []
        for err in errors[:MAX_ERRORS]:
            where = shorten(".".join(str(p) for p in err.absolute_path))
            lines.append(f"{source}{'.' + where if where else ''}: {shorten(err.message)}")
        if len(errors) > MAX_ERRORS:
            lines.append(f"{source}: … and {len(errors) - MAX_ERRORS} more errors")
        raise InvalidInput("\n".join(lines), errors=lines)
    return value


def parse_value(text: str) -> Any:
    """A parameter given on a command line: JSON when it parses (``5`` is 5), else the string."""
    if too_deep(text):
        raise InvalidInput(f"value {shorten(text, 40)!r} is {TOO_DEEP}")
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_assignments(items: Iterable[str], what: str = "--param") -> dict[str, Any]:
    """``["a=1", "b=x"]`` into ``{"a": 1, "b": "x"}``; ``KEY=VALUE`` is required."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise InvalidInput(f"{what} {item!r}: expected KEY=VALUE")
        out[key] = parse_value(raw)
    return out


def parse_inputs(items: Iterable[str]) -> dict[str, Path]:
    """``--input NAME=PATH`` items into ``{slot name: path}``; a malformed or repeated one is an
    :class:`InvalidInput` naming it."""
    out: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise InvalidInput(f"--input {item!r}: expected NAME=PATH (NAME: an input slot of the manifest)")
        if name in out:
            raise InvalidInput(f"--input {name}: given twice")
        out[name] = Path(path)
    return out
