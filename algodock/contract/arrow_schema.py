"""A parquet slot's Arrow schema (manifest 0.3, docs/contract.md "Slot schemas"): the model,
the type strings, and when one declaration can feed another.

A column type is written exactly as pyarrow prints it (``str(field.type)``), so an author can
paste what ``print(table.schema)`` shows; :func:`parse_type` turns every such string back into
the same type. Leaf types go through pyarrow's own alias table (``pa.type_for_alias``); only
what it does not know (parameters, nesting) is parsed here.

>>> str(parse_type("struct<a: list<item: int64>, b: timestamp[us, tz=UTC] not null>"))
'struct<a: list<item: int64>, b: timestamp[us, tz=UTC] not null>'
>>> feeds(parse_type("int32"), parse_type("int64")), feeds(parse_type("int64"), parse_type("int32"))
(True, False)

Safe widenings (:func:`feeds`): a consumer may declare a wider type than its producer
writes where every value converts exactly:

- signed integers ``int8 → int16 → int32 → int64``; unsigned ``uint8 → … → uint64``; an
  unsigned integer into any larger signed one (``uint32 → int64``);
- ``halffloat → float → double``;
- ``string → large_string``, ``binary → large_binary``;
- time of day to a finer unit (``time32[s] → time32[ms] → time64[us] → time64[ns]``: values
  are bounded by one day, so none overflows) and ``date32[day] → date64[ms]``.

Not widened: timestamps and durations between units (a coarser-to-finer conversion can
overflow int64 for some value, a finer-to-coarser one loses precision), nor a timezone
change, nor integers into floats (``int64`` does not fit a ``double`` exactly). Nested types
must be equal (a list's item name is not part of its type).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

if TYPE_CHECKING:
    import pyarrow as pa


class Column(BaseModel):
    """One declared column."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, StringConstraints(min_length=1, max_length=1024)] = Field(description="The column name, as in the parquet file.")
    type: Annotated[str, StringConstraints(min_length=1, max_length=4096)] = Field(
        description="The Arrow type as pyarrow prints it (str(field.type)).",
        examples=["int64", "string", "timestamp[us, tz=UTC]", "list<item: double>"],
    )
    nullable: bool = Field(True, description="false: the column must hold no null (checked on the bytes from row-group statistics).")

    @field_validator("type")
    @classmethod
    def _known_type(cls, text: str) -> str:
        parse_type(text)  # raises ValueError naming what is wrong
        return text

    @property
    def arrow_type(self) -> pa.DataType:
        return parse_type(self.type)


class SlotSchema(BaseModel):
    """The ``schema`` of a parquet slot: its columns in order, and whether others may appear."""

    model_config = ConfigDict(extra="forbid")

    columns: list[Column] = Field(min_length=1, description="The columns the slot holds, in order.")
    extra_columns: Literal["allow", "forbid"] = Field("allow", description="forbid: a column not declared here is an error.")

    @field_validator("columns")
    @classmethod
    def _unique(cls, columns: list[Column]) -> list[Column]:
        seen: dict[str, int] = {}
        for i, column in enumerate(columns):
            if column.name in seen:
                raise ValueError(f"column name {column.name!r} is used twice (columns.{seen[column.name]} and columns.{i})")
            seen[column.name] = i
        return columns

    def column(self, name: str) -> Column | None:
        return next((c for c in self.columns if c.name == name), None)

    @classmethod
    def of(cls, schema: pa.Schema, *, extra_columns: Literal["allow", "forbid"] = "allow") -> SlotSchema:
        """The declaration that ``schema`` (e.g. a parquet file's) satisfies exactly.

        A field is non-nullable only when the file says so; :func:`algodock.runtime.handoff.describe`
        also marks columns that hold no null.
        """
        return cls(columns=[Column(name=f.name, type=str(f.type), nullable=f.nullable) for f in schema], extra_columns=extra_columns)


# ---------------------------------------------------------------- type strings

_UNIT_TYPES = ("date32", "date64", "time32", "time64", "duration")
_LISTS = ("list", "large_list", "list_view", "large_list_view", "fixed_size_list")
_CANONICAL_EXTENSIONS = {"arrow.uuid": "uuid", "arrow.json": "json_", "arrow.bool8": "bool8"}


def parse_type(text: str) -> pa.DataType:
    """The pyarrow type ``text`` names, written as ``str(type)`` prints it.

    Raises ``ValueError`` saying where the text stops making sense.
    """
    parser = _TypeParser(text)
    try:
        result = parser.type()
        if parser.pos != len(text):
            raise parser.fail("unexpected text after the type")
    except (ValueError, TypeError, KeyError, IndexError, ArithmeticError) as exc:  # ours, or pyarrow refusing a parameter
        if str(exc).startswith("not an Arrow type"):
            raise
        raise ValueError(f"not an Arrow type: {text!r}: {exc}") from None
    return result


class _TypeParser:
    """Recursive descent over ``str(pa.DataType)``; leaves go to ``pa.type_for_alias``."""

    def __init__(self, text: str) -> None:
        self.text, self.pos = text, 0

    def fail(self, why: str) -> ValueError:
        return ValueError(f"not an Arrow type: {self.text!r}: {why} at character {self.pos} (write it as str(pyarrow type) prints it, e.g. int64, timestamp[us, tz=UTC], list<item: string>)")

    def eat(self, literal: str) -> bool:
        if self.text.startswith(literal, self.pos):
            self.pos += len(literal)
            return True
        return False

    def expect(self, literal: str) -> None:
        if not self.eat(literal):
            raise self.fail(f"expected {literal!r}")

    def until(self, stop: str) -> str:
        end = self.text.find(stop, self.pos)
        if end < 0:
            raise self.fail(f"expected {stop!r}")
        value, self.pos = self.text[self.pos : end], end
        return value

    def integer(self) -> int:
        match = re.compile(r"-?\d+").match(self.text, self.pos)
        if not match:
            raise self.fail("expected a number")
        self.pos = match.end()
        return int(match.group())

    def type(self) -> pa.DataType:
        import pyarrow as pa

        match = re.compile(r"[a-z][a-z0-9_]*").match(self.text, self.pos)
        if not match:
            raise self.fail("expected a type name")
        word = match.group()
        self.pos = match.end()
        if word == "timestamp":
            self.expect("[")
            unit, has_tz, tz = self.until("]").partition(", tz=")
            self.expect("]")
            return pa.timestamp(unit, tz if has_tz else None)
        if word in _UNIT_TYPES:
            self.expect("[")
            unit = self.until("]")
            self.expect("]")
            return self.alias(f"{word}[{unit}]")
        if word == "fixed_size_binary":
            self.expect("[")
            width = self.integer()
            self.expect("]")
            return pa.binary(width)
        if re.fullmatch(r"decimal(32|64|128|256)", word):
            self.expect("(")
            precision = self.integer()
            self.expect(", ")
            scale = self.integer()
            self.expect(")")
            return getattr(pa, word)(precision, scale)
        if word in _LISTS:
            return self.list_type(word)
        if word == "struct":
            self.expect("<")
            fields = [] if self.eat(">") else self.fields(">")
            return pa.struct(fields)
        if word == "map":
            return self.map_type()
        if word == "dictionary":
            self.expect("<values=")
            values = self.type()
            self.expect(", indices=")
            indices = self.type()
            self.expect(", ordered=")
            ordered = self.integer()
            self.expect(">")
            return pa.dictionary(indices, values, ordered=bool(ordered))
        if word in ("sparse_union", "dense_union"):
            return self.union_type(word)
        if word == "run_end_encoded":
            self.expect("<run_ends: ")
            run_ends = self.type()
            self.expect(", values: ")
            values = self.type()
            self.expect(">")
            return pa.run_end_encoded(run_ends, values)
        if word == "extension":
            return self.extension_type()
        return self.alias(word)

    def alias(self, name: str) -> pa.DataType:
        import pyarrow as pa

        try:
            return pa.type_for_alias(name)
        except ValueError:
            raise self.fail(f"unknown type {name!r}") from None

    def field(self, stops: str) -> pa.Field:
        """``name: type[ not null]``; the name runs to the first ': '."""
        import pyarrow as pa

        name = self.until(": ")
        self.expect(": ")
        value = self.type()
        nullable = not self.eat(" not null")
        if self.pos < len(self.text) and self.text[self.pos] not in stops and not self.text.startswith(", ", self.pos):
            raise self.fail(f"unexpected text after field {name!r}")
        return pa.field(name, value, nullable=nullable)

    def fields(self, close: str) -> list[pa.Field]:
        fields = [self.field(close)]
        while self.eat(", "):
            fields.append(self.field(close))
        self.expect(close)
        return fields

    def list_type(self, word: str) -> pa.DataType:
        import pyarrow as pa

        self.expect("<")
        item = self.field(">")
        self.expect(">")
        if word == "fixed_size_list":
            self.expect("[")
            size = self.integer()
            self.expect("]")
            return pa.list_(item, size)
        return {"list": pa.list_, "large_list": pa.large_list, "list_view": pa.list_view, "large_list_view": pa.large_list_view}[word](item)

    def map_type(self) -> pa.DataType:
        """``map<K[ ('key')], V[ not null][ ('value')][, keys_sorted]>``."""
        import pyarrow as pa

        self.expect("<")
        key = self.type()
        key_name = self.quoted_name() or "key"
        self.expect(", ")
        item = self.type()
        item_nullable = not self.eat(" not null")
        item_name = self.quoted_name() or "value"
        keys_sorted = self.eat(", keys_sorted")
        self.expect(">")
        return pa.map_(pa.field(key_name, key, nullable=False), pa.field(item_name, item, nullable=item_nullable), keys_sorted=keys_sorted)

    def quoted_name(self) -> str | None:
        if not self.eat(" ('"):
            return None
        name = self.until("')")
        self.expect("')")
        return name

    def union_type(self, word: str) -> pa.DataType:
        """``sparse_union<a: int32=0, b: string=1>`` (each field with its type code)."""
        import pyarrow as pa

        self.expect("<")
        fields, codes = [], []
        while True:
            name = self.until(": ")
            self.expect(": ")
            value = self.type()
            nullable = not self.eat(" not null")
            self.expect("=")
            fields.append(pa.field(name, value, nullable=nullable))
            codes.append(self.integer())
            if not self.eat(", "):
                break
        self.expect(">")
        return (pa.sparse_union if word == "sparse_union" else pa.dense_union)(fields, codes)

    def extension_type(self) -> pa.DataType:
        """The canonical extension types pyarrow registers (``extension<arrow.uuid>``, ``…json``, ``…bool8``, ``…opaque[…]``)."""
        import pyarrow as pa

        self.expect("<")
        if self.eat("arrow.opaque[storage_type="):
            storage = self.type()
            self.expect(", type_name=")
            type_name = self.until(", vendor_name=")
            self.expect(", vendor_name=")
            vendor = self.until("]>")
            self.expect("]>")
            return pa.opaque(storage, type_name, vendor)
        name = self.until(">")
        factory = _CANONICAL_EXTENSIONS.get(name)
        if factory is None:
            raise self.fail(f"unknown extension type {name!r} (known: {', '.join(sorted(_CANONICAL_EXTENSIONS))}, arrow.opaque)")
        self.expect(">")
        return getattr(pa, factory)()


# ---------------------------------------------------------------- compatibility

_SIGNED = ["int8", "int16", "int32", "int64"]
_UNSIGNED = ["uint8", "uint16", "uint32", "uint64"]
_FLOATS = ["halffloat", "float", "double"]
_TIMES = ["time32[s]", "time32[ms]", "time64[us]", "time64[ns]"]
_LARGER = {"string": "large_string", "binary": "large_binary", "date32[day]": "date64[ms]"}


def feeds(producer: pa.DataType, consumer: pa.DataType) -> bool:
    """True when data of type ``producer`` can be read as ``consumer``: equal, or a safe
    widening (see the module docstring)."""
    if producer.equals(consumer):
        return True
    have, want = str(producer), str(consumer)
    for ladder in (_SIGNED, _UNSIGNED, _FLOATS, _TIMES):
        if have in ladder and want in ladder:
            return ladder.index(have) < ladder.index(want)
    if have in _UNSIGNED and want in _SIGNED:
        return _UNSIGNED.index(have) < _SIGNED.index(want)
    return _LARGER.get(have) == want


class Mismatch(NamedTuple):
    """One way a producer's declaration cannot feed a consumer's."""

    column: str
    problem: str
    """What is wrong, naming both types where there are types."""


def compare(producer: SlotSchema, consumer: SlotSchema) -> list[Mismatch]:
    """Every way ``producer``'s declared columns fail ``consumer``'s declaration (declarations only)."""
    found: list[Mismatch] = []
    for want in consumer.columns:
        have = producer.column(want.name)
        if have is None:
            if producer.extra_columns == "forbid":
                found.append(Mismatch(want.name, f"missing: the producer declares no column {want.name!r} and forbids others (consumer wants {want.type})"))
            else:
                found.append(Mismatch(want.name, f"missing: the producer does not declare column {want.name!r} (consumer wants {want.type})"))
            continue
        if not feeds(have.arrow_type, want.arrow_type):
            found.append(Mismatch(want.name, f"type: the producer declares {have.type}, the consumer {want.type} (not the same type nor a safe widening)"))
        if have.nullable and not want.nullable:
            found.append(Mismatch(want.name, f"nullable: the producer's {have.type} may hold nulls (nullable), the consumer declares it not nullable"))
    if consumer.extra_columns == "forbid":
        for extra in producer.columns:
            if consumer.column(extra.name) is None:
                found.append(Mismatch(extra.name, f"extra: the producer declares column {extra.name!r} ({extra.type}), the consumer forbids columns it does not declare"))
    return found


__all__ = ["Column", "Mismatch", "SlotSchema", "compare", "feeds", "parse_type"]
