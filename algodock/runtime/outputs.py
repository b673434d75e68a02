"""Reading what an algorithm returned (CONTRACT.md §3) without trusting it.

``algo_output.json`` must be a regular file of bounded size; every path in it must be
relative, free of ``..`` and, once symlinks are resolved, inside the output folder. A
folder output may hold no symlink or special file that leads out. Declared outputs that
``algo_output.json`` does not list are looked for as ``<name>.<format>`` or ``<name>/``.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from pydantic import ValidationError

from algodock.contract.manifest import ALGO_OUTPUT_NAME, AlgoOutput, Manifest, format_validation_error, safe_relative
from algodock.errors import InvalidOutput, MissingOutput
from algodock.hashing import parquet_rows, sha256_path
from algodock.records import OutputRecord

MAX_ALGO_OUTPUT_BYTES = 8 * 1024 * 1024


def _inside(root: Path, path: Path) -> bool:
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    return real == real_root or real.startswith(real_root + os.sep)


def read_algo_output(output_dir: Path) -> AlgoOutput | None:
    """Parse ``algo_output.json`` if present; :class:`InvalidOutput` when it is not trustworthy."""
    path = output_dir / ALGO_OUTPUT_NAME
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        raise InvalidOutput(f"{ALGO_OUTPUT_NAME} must be a regular file (found a symlink or special file)")
    if st.st_size > MAX_ALGO_OUTPUT_BYTES:
        raise InvalidOutput(f"{ALGO_OUTPUT_NAME} is {st.st_size} bytes; the limit is {MAX_ALGO_OUTPUT_BYTES}")
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested past any sense
        raise InvalidOutput(f"{ALGO_OUTPUT_NAME} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidOutput(f"{ALGO_OUTPUT_NAME}: expected a JSON object, got {type(data).__name__}")
    try:
        return AlgoOutput.model_validate(data)
    except ValidationError as exc:
        raise InvalidOutput("\n".join(format_validation_error(ALGO_OUTPUT_NAME, exc))) from None


def _check_tree(root: Path, target: Path, name: str) -> None:
    """A folder output may hold only regular files, folders and symlinks that stay inside."""
    for dirpath, dirnames, filenames in os.walk(target, followlinks=False):
        for entry in dirnames + filenames:
            p = Path(dirpath) / entry
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                if not _inside(root, p):
                    raise InvalidOutput(f"output {name!r}: {p.relative_to(root)} is a symlink leading outside the output folder")
            elif not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                raise InvalidOutput(f"output {name!r}: {p.relative_to(root)} is not a regular file")


def _checked_path(root: Path, rel: str, name: str) -> Path:
    if not safe_relative(rel):
        raise InvalidOutput(f"output {name!r}: path {rel!r} must be relative to the output folder, without '..'")
    path = root / rel
    if not _inside(root, path):
        raise InvalidOutput(f"output {name!r}: path {rel!r} leads outside the output folder (through a symlink)")
    try:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            st = path.stat()
    except OSError as exc:
        if isinstance(exc, (FileNotFoundError, NotADirectoryError)) and not path.is_symlink():
            raise MissingOutput(f"output {name!r}: {ALGO_OUTPUT_NAME} names {rel!r}, which does not exist") from None
        # A dangling or looping symlink is the algorithm's fault, not the platform's (not retryable).
        raise InvalidOutput(f"output {name!r}: {rel!r} cannot be read: {exc.strerror} (a dangling or looping symlink?)") from None
    if stat.S_ISDIR(st.st_mode):
        _check_tree(root, path, name)
    elif not stat.S_ISREG(st.st_mode):
        raise InvalidOutput(f"output {name!r}: {rel!r} is not a regular file or folder")
    return path


def _fallback(root: Path, name: str, fmt: str) -> str | None:
    """``<name>.<format>`` or ``<name>/`` when ``algo_output.json`` does not list the output."""
    for candidate in (f"{name}.{fmt}", name):
        p = root / candidate
        if p.exists() or p.is_symlink():
            return candidate
    return None


def collect_outputs(manifest: Manifest, output_dir: Path, algo_output: AlgoOutput | None) -> list[OutputRecord]:
    """Find, check and hash every declared output; raise on a missing required one."""
    listed = {o.name: o for o in (algo_output.output_data if algo_output else [])}
    records: list[OutputRecord] = []
    for slot in manifest.outputs:
        entry = listed.get(slot.name)
        if entry is not None:
            if entry.format != slot.format:
                raise InvalidOutput(
                    f"output {slot.name!r}: {ALGO_OUTPUT_NAME} says format {entry.format!r}, the manifest declares {slot.format!r}"
                )
            rel: str | None = entry.path
        else:
            rel = _fallback(output_dir, slot.name, slot.format)
        if rel is None:
            if slot.required:
                raise MissingOutput(
                    f"required output {slot.name!r} was not produced: not in {ALGO_OUTPUT_NAME} and neither "
                    f"{slot.name}.{slot.format} nor {slot.name}/ exists in the output folder"
                )
            continue
        path = _checked_path(output_dir, rel, slot.name)
        rows = None
        if slot.format == "parquet":
            rows = parquet_rows(path)
            if rows is None:
                raise InvalidOutput(f"output {slot.name!r}: {rel} is declared parquet but is not a readable parquet file")
        records.append(
            OutputRecord(
                name=slot.name,
                path=path,
                format=slot.format,
                sha256=sha256_path(path),
                rows=rows,
                multiple=path.is_dir(),
            )
        )
    return records
