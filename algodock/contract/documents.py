"""Reading JSON and YAML that someone else wrote: duplicate keys rejected, nesting bounded.

Python's parsers recurse once per level of nesting. A document nested 100 000 levels deep
raises ``RecursionError`` from deep in the stack, and any finalizer the garbage collector
happens to run down there breaks too. So nesting is bounded *before* the parser goes deep:
JSON text is scanned once, without recursion (:func:`nesting_depth`); the YAML composer
counts its depth as it goes. :data:`MAX_NESTING` levels is far more than any manifest,
pipeline or ``algo_output.json`` needs.

>>> nesting_depth('{"a": [1, {"b": "[[[["}]}')
3
>>> too_deep("[" * 101 + "]" * 101)
True
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
from pathlib import Path
from typing import Any

from algodock.errors import InvalidManifest

MAX_NESTING = 100
"""The deepest nesting of arrays and objects accepted in any JSON or YAML document."""

TOO_DEEP = f"nested deeper than {MAX_NESTING} levels"

MAX_VALUES = 1_000_000
"""The most values a YAML document may expand to. Its aliases can repeat a node without
repeating its text, so a few hundred bytes can stand for billions of values ("billion
laughs"); JSON has no aliases, its size bounds it."""

# A JSON string, or from an unterminated one to the end: it always matches once started,
# so the scan stays linear even on hostile text (a failing match retried at every later
# quote would make it quadratic). Past an unterminated string the parser stops anyway.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\[\s\S][^"\\]*)*(?:"|\\?\Z)')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def nesting_depth(text: str) -> int:
    """How deeply arrays and objects nest in JSON ``text``, found without recursion.

    Exact for valid JSON; for invalid JSON it is exact up to the first error, which is as far
    as ``json.loads`` goes.
    """
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0)


def too_deep(text: str) -> bool:
    """Whether JSON ``text`` nests deeper than :data:`MAX_NESTING`; cheap for the usual small document."""
    return text.count("[") + text.count("{") > MAX_NESTING and nesting_depth(text) > MAX_NESTING


class _TooDeep(Exception):
    pass


def expanded_size(value: Any) -> tuple[int, int]:
    """``(values, depth)`` of ``value`` as it would be written out, every alias expanded.

    Found without recursion and without expanding: each list or mapping is measured once,
    however often it is shared (a YAML alias is the same Python object). ``ValueError`` when
    it contains itself.

    >>> a = ["x"] * 9; b = [a] * 9; c = [b] * 9
    >>> expanded_size({"c": c})
    (821, 4)
    """
    measured: dict[int, tuple[int, int]] = {}
    open_: set[int] = set()  # lists and mappings whose children are being measured
    stack: list[tuple[Any, bool]] = [(value, False)]
    while stack:
        node, children_done = stack.pop()
        if not isinstance(node, (list, dict)) or (id(node) in measured and not children_done):
            continue
        children = [c for c in (node.values() if isinstance(node, dict) else node) if isinstance(c, (list, dict))]
        if not children_done:
            if id(node) in open_:
                raise ValueError("it contains itself (a recursive alias)")
            open_.add(id(node))
            stack.append((node, True))
            stack.extend((c, False) for c in children)
            continue
        open_.discard(id(node))
        leaves = len(node) - len(children)
        size = 1 + leaves + sum(measured[id(c)][0] for c in children)
        depth = 1 + max((measured[id(c)][1] for c in children), default=0)
        measured[id(node)] = (size, depth)
    return measured.get(id(value), (1, 0))


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"key {key!r} appears twice")
        seen[key] = value
    return seen


def _yaml_loader() -> Any:
    """A safe YAML loader that rejects duplicate keys (PyYAML keeps the last one silently) and
    stops past :data:`MAX_NESTING` levels of nesting before its composer recurses any deeper."""
    import yaml

    class Loader(yaml.SafeLoader):
        _depth = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            collection = self.check_event(yaml.SequenceStartEvent, yaml.MappingStartEvent)
            self._depth += collection
            try:
                if self._depth > MAX_NESTING:
                    raise _TooDeep
                return super().compose_node(parent, index)
            finally:
                self._depth -= collection

    def mapping(loader: Any, node: Any, deep: bool = False) -> dict[Any, Any]:
        loader.flatten_mapping(node)
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in out:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice", key_node.start_mark)
            out[key] = loader.construct_object(value_node, deep=deep)
        return out

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return Loader


def read_document(path: Path) -> Any:
    """Parse a JSON or YAML file (duplicate keys rejected, nesting bounded); raise
    :class:`InvalidManifest` naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidManifest(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise InvalidManifest(f"{path}: not UTF-8 text: {exc}") from exc
    if path.suffix.lower() == ".json":
        if too_deep(text):
            raise InvalidManifest(f"{path}: {TOO_DEEP}")
        try:
            return json.loads(text, object_pairs_hook=_no_duplicates)
        except ValueError as exc:
            raise InvalidManifest(f"{path}: not valid JSON: {exc}") from exc
    import yaml

    try:
        data = yaml.load(text, Loader=_yaml_loader())  # noqa: S506 (a SafeLoader subclass)
    except _TooDeep:
        raise InvalidManifest(f"{path}: {TOO_DEEP}") from None
    except yaml.YAMLError as exc:
        raise InvalidManifest(f"{path}: not valid YAML: {exc}") from exc
    try:
        values, depth = expanded_size(data)
    except ValueError as exc:
        raise InvalidManifest(f"{path}: {exc}") from None
    if depth > MAX_NESTING:
        raise InvalidManifest(f"{path}: {TOO_DEEP} once its aliases are expanded")
    if values > MAX_VALUES:
        raise InvalidManifest(f"{path}: expands to {values:,} values through its aliases; the limit is {MAX_VALUES:,}")
    return data
