"""The hand-off check: parquet bytes against a slot's declared schema, from the footers only.

A producer's declared outputs are checked once its container succeeded (a mismatch is
``invalid_output``); a consumer's staged inputs before its container is created
(``invalid_input``, and no container). Only each file's footer is read: the columns and
their types from the Arrow schema stored there, the nulls of a non-nullable column from the
row-group statistics. A column without statistics (or a nested one, which has none at its
own level) is read alone to count its nulls.

>>> import pyarrow as pa, pyarrow.parquet as pq, tempfile, pathlib      # doctest: +SKIP
>>> from algodock.contract.arrow_schema import SlotSchema              # doctest: +SKIP
>>> d = pathlib.Path(tempfile.mkdtemp()); pq.write_table(pa.table({"id": ["a"]}), d / "t.parquet")  # doctest: +SKIP
>>> want = SlotSchema.model_validate({"columns": [{"name": "id", "type": "int64"}]})                  # doctest: +SKIP
>>> [p.found for p in check_files(want, d, ["t.parquet"])]                                          # doctest: +SKIP
['type string, the schema declares int64']
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, NamedTuple

from algodock.contract.arrow_schema import SlotSchema, feeds, parse_type
from algodock.errors import InvalidInput, InvalidOutput, shorten
from algodock.hashing import list_files

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from algodock.contract.manifest import Manifest
    from algodock.records import InputBinding, OutputRecord

Opener = Callable[[str], IO[bytes]]
"""Opens one file of a slot by its relative path (local files by default; an S3 store passes its own)."""

MAX_PROBLEMS = 20
"""Problems listed per slot; the rest are counted (a folder of 1,000 bad parts stays readable)."""


class SchemaProblem(NamedTuple):
    """One way a parquet file disagrees with its slot's declaration."""

    file: str
    """The file, as the user knows it (an output's path in the output folder, an input's source)."""
    column: str
    found: str
    """What the file holds instead of what was declared."""

    def __str__(self) -> str:
        return f"{self.file}: column {self.column!r}: {self.found}"


def parquet_files(path: Path, files: Iterable[str] | None = None) -> list[str]:
    """The ``.parquet`` files of a slot, relative to ``path`` ('' for a single file)."""
    if not path.is_dir():
        return [""]
    return [rel for rel in (files if files is not None else list_files(path)) if rel.endswith(".parquet")]


def _local_opener(root: Path) -> Opener:
    return lambda rel: open(root / rel if rel else root, "rb")


def check_files(schema: SlotSchema, root: Path | str, files: Sequence[str], *, open_file: Opener | None = None, label: Callable[[str], str] | None = None) -> list[SchemaProblem]:
    """Every problem of ``files`` (relative to ``root``; '' is ``root`` itself) against ``schema``."""
    import pyarrow.parquet as pq

    open_file = open_file or _local_opener(Path(root))
    label = label or (lambda rel: f"{root}/{rel}" if rel else str(root))
    wanted = [(c, parse_type(c.type)) for c in schema.columns]
    problems: list[SchemaProblem] = []
    for rel in files:
        try:
            with open_file(rel) as fh:
                problems += _check_one(schema, wanted, pq.ParquetFile(fh), label(rel))
        except OSError:
            raise  # the file could not be opened or read: not a schema question
        except Exception as exc:  # not parquet, truncated: said as what was found
            problems.append(SchemaProblem(label(rel), "*", f"not a readable parquet file ({shorten(str(exc), 200)})"))
    return problems


def _check_one(schema: SlotSchema, wanted: list, footer: pq.ParquetFile, where: str) -> list[SchemaProblem]:
    arrow = footer.schema_arrow
    names = arrow.names
    problems: list[SchemaProblem] = []
    for column, declared in wanted:
        count = names.count(column.name)
        if count == 0:
            problems.append(SchemaProblem(where, column.name, f"missing (the file's columns: {shorten(', '.join(names), 300)})"))
            continue
        if count > 1:
            problems.append(SchemaProblem(where, column.name, f"appears {count} times in the file"))
            continue
        field = arrow.field(column.name)
        if not feeds(field.type, declared):
            problems.append(SchemaProblem(where, column.name, f"type {field.type}, the schema declares {column.type}"))
            continue
        if not column.nullable and field.nullable:
            nulls = null_count(footer, column.name)
            if nulls:
                problems.append(SchemaProblem(where, column.name, f"{nulls:,} null value(s) in a column declared not nullable"))
    if schema.extra_columns == "forbid":
        declared_names = {c.name for c in schema.columns}
        for field in arrow:
            if field.name not in declared_names:
                problems.append(SchemaProblem(where, field.name, f"extra column ({field.type}); the schema forbids columns it does not declare"))
    return problems


def null_count(footer: pq.ParquetFile, name: str) -> int:
    """Nulls of top-level column ``name``: summed from the row-group statistics; read alone when a
    row group has none (or the column is nested: its leaves' counts are not the column's)."""
    meta = footer.metadata
    leaf = next((i for i in range(meta.num_columns) if meta.schema.column(i).path == name), None)
    if leaf is not None:
        total = 0
        for g in range(meta.num_row_groups):
            stats = meta.row_group(g).column(leaf).statistics
            if stats is None or not stats.has_null_count:
                break
            total += stats.null_count
        else:
            return total
    return footer.read(columns=[name]).column(name).null_count


def check_inputs(manifest: Manifest, bindings: dict[str, InputBinding]) -> None:
    """Raise :class:`InvalidInput` when a staged parquet input disagrees with its slot's schema
    (before any container exists). Every line names the input, the file and the column."""
    problems: list[str] = []
    for slot in manifest.inputs:
        binding = bindings.get(slot.name)
        if binding is None or slot.format != "parquet" or slot.schema_ is None:
            continue
        path = Path(binding.path)
        source = binding.uri or str(path)
        found = check_files(slot.schema_, path, parquet_files(path, binding.files), label=lambda rel, s=source: f"{s.rstrip('/')}/{rel}" if rel else s)
        problems += [f"input {slot.name!r}: {p}" for p in found]
    _raise_listing(problems, lambda lines: InvalidInput(_summary("input", lines), errors=lines))


def check_outputs(manifest: Manifest, outputs: Iterable[OutputRecord], *, locate: Callable[[OutputRecord], tuple[Opener, list[str]]] | None = None, where: str = "") -> None:
    """Raise :class:`InvalidOutput` when a declared parquet output disagrees with its slot's
    schema; each line names the output, the file (relative to the output folder) and the column.

    ``locate`` gives each output's opener and parquet files (default: its local ``path``); ``where``
    is added to the message (e.g. "served from the cache of run …").
    """
    problems: list[str] = []
    for output in outputs:
        slot = manifest.output_slot(output.name)
        if slot is None or slot.schema_ is None or output.format != "parquet":
            continue
        if locate is not None:
            opener, files = locate(output)
            found = check_files(slot.schema_, output.uri, files, open_file=opener, label=lambda rel, u=output.uri: f"{u.rstrip('/')}/{rel}" if rel else u)
        else:
            path = Path(output.path or output.uri)
            name = path.name
            found = check_files(slot.schema_, path, parquet_files(path), label=lambda rel, n=name: f"{n}/{rel}" if rel else n)
        problems += [f"output {output.name!r}: {p}" for p in found]
    _raise_listing(problems, lambda lines: InvalidOutput(_summary("output", lines) + (f" ({where})" if where else "")))


MISMATCH_HEAD = "data does not match its declared schema"
"""In the first line of every hand-off failure (``check-image`` charges those to its ``schema`` rule)."""


def _summary(side: str, lines: list[str]) -> str:
    head = f"the {side} {MISMATCH_HEAD} (docs/contract.md, slot schemas):"
    return "\n".join([head, *lines])


def _raise_listing(lines: list[str], make: Callable[[list[str]], Exception]) -> None:
    if lines:
        if len(lines) > MAX_PROBLEMS:
            lines = [*lines[:MAX_PROBLEMS], f"… and {len(lines) - MAX_PROBLEMS:,} more"]
        raise make(lines)


def arrow_schema_of(path: Path, files: Iterable[str] | None = None, *, open_file: Opener | None = None) -> pa.Schema:
    """The Arrow schema of a parquet file, or of a folder's parts (from their footers).

    Raises ``ValueError`` naming two parts whose schemas differ, or when there is no parquet file.
    """
    import pyarrow.parquet as pq

    open_file = open_file or _local_opener(path)
    rels = list(files) if files is not None else parquet_files(path)
    if not rels:
        raise ValueError(f"{path}: no .parquet file")
    first: pa.Schema | None = None
    for rel in rels:
        with open_file(rel) as fh:
            schema = pq.ParquetFile(fh).schema_arrow.remove_metadata()  # the footer only
        if first is None:
            first, first_rel = schema, rel
        elif not schema.equals(first):
            raise ValueError(f"{path}: the parts disagree: {first_rel} has ({_fields(first)}), {rel} has ({_fields(schema)})")
    assert first is not None
    return first


def _fields(schema: pa.Schema) -> str:
    return shorten(", ".join(f"{f.name}: {f.type}" for f in schema), 300)


def describe(path: Path, files: Iterable[str] | None = None) -> SlotSchema:
    """The ``schema`` object a slot holding ``path`` would declare (``algodock schema``, lineage)."""
    return SlotSchema.of(arrow_schema_of(path, files))


def record_schema(output: OutputRecord) -> OutputRecord:
    """``output`` with the Arrow schema of its bytes (parquet only; None when its parts disagree)."""
    if output.format != "parquet" or output.path is None:
        return output
    try:
        schema = describe(Path(output.path))
    except ValueError:  # parts that disagree: no one schema to record
        return output
    return output.model_copy(update={"schema_": schema.model_dump(mode="json")})


__all__ = ["MISMATCH_HEAD", "SchemaProblem", "arrow_schema_of", "check_files", "check_inputs", "check_outputs", "describe", "null_count", "parquet_files", "record_schema"]
