"""Reading what an algorithm returned (docs/contract.md §3) without trusting it.

The output folder is listed once, with ``lstat`` only (:func:`scan_output_folder`). Inside
it only regular files and folders count: a symlink (even one that stays inside), FIFO,
socket or device file anywhere in it, or a name holding a control character (newline
included) or bytes that are not UTF-8, makes the step ``invalid_output`` before any output
is opened, so nothing is ever followed, hashed or uploaded through a link.

``algo_output.json`` must be a regular file of at most 1 MiB, checked by size before it is
read, then opened with ``O_NOFOLLOW`` and read with a bounded read. Every path it names must
be relative, free of ``..``, and present in the listing; declared outputs it does not list
are looked for as ``<name>.<format>`` or ``<name>/``. Two outputs on one path, or one inside
another, are ``invalid_output``. Files are hashed from the listing, each opened with
``O_NOFOLLOW``.

:func:`copy_regular_tree` keeps a failed attempt's folder for a post-mortem with only its
regular files and folders.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import posixpath
import re
import shutil
import stat
from collections import Counter
from pathlib import Path
from typing import NamedTuple

from pydantic import ValidationError

from algodock.contract.documents import TOO_DEEP, too_deep
from algodock.contract.manifest import ALGO_OUTPUT_NAME, AlgoOutput, Manifest, format_validation_error, safe_relative
from algodock.errors import InfrastructureError, InvalidOutput, MissingOutput, shorten
from algodock.hashing import folder_digest, parquet_rows, sha256_regular, sort_key
from algodock.records import OutputRecord

log = logging.getLogger("algodock.runtime.outputs")

MAX_ALGO_OUTPUT_BYTES = 1024 * 1024
"""docs/contract.md §3: a larger ``algo_output.json`` is ``invalid_output`` (it describes outputs; data goes in files)."""

MAX_MESSAGE_LINES = 20
"""Validation errors quoted in a failure message; a hostile file could produce thousands."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0)
# An I/O error of the host's own disk is the platform's problem (retryable), not the algorithm's.
_HOST_ERRNOS = {errno.EIO, errno.ENOSPC, errno.ENOMEM, errno.EDQUOT, errno.ESTALE}


class OutputEntry(NamedTuple):
    """One entry of the output folder, as ``lstat`` saw it."""

    rel: str
    """Path relative to the output folder (POSIX)."""
    is_dir: bool
    """A folder (else a regular file: nothing else is admitted)."""
    size: int
    """Bytes of a regular file; 0 for a folder."""


# ---------------------------------------------------------------- names


def bad_name_reason(rel: str) -> str | None:
    """Why ``rel`` cannot be an output path (a control character, bytes not UTF-8), or None.

    >>> bad_name_reason("a/b.csv"), bad_name_reason("a\\nb")
    (None, 'has a control character in its name')
    """
    if _CONTROL.search(rel):
        return "has a control character in its name"
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:  # os.fsdecode's surrogate escapes: the name's bytes are not UTF-8
        return "has a name that is not valid UTF-8"
    return None


def _check_name(rel: str) -> None:
    reason = bad_name_reason(rel)
    if reason is not None:
        raise InvalidOutput(f"output folder: {rel!r} {reason} (docs/contract.md §3: such names are not allowed)")


def _symlink_message(path: Path, root: Path, rel: str) -> str:
    """Describe a symlink without opening what it points at (readlink and lstat only)."""
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    try:
        real = os.path.realpath(path, strict=True)
    except OSError:
        return f"output folder: {rel} is a symlink that cannot be resolved (a dangling or looping symlink); only regular files and folders count"
    real_root = os.path.realpath(root)
    if real != real_root and not real.startswith(real_root + os.sep):
        return (
            f"output folder: {rel} is a symlink leading outside the output folder (to {target!r}); nothing that "
            "leads outside the output folder is followed, and only regular files and folders count"
        )
    return f"output folder: {rel} is a symlink (to {target!r}); only regular files and folders count, even a symlink that stays inside"


def _kind_name(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device file"
    return "a special file"


def _os_error(what: str, exc: OSError) -> InvalidOutput | InfrastructureError:
    """An ``OSError`` on the algorithm's files: its fault (unreadable, gone), unless the host's disk failed."""
    if exc.errno in _HOST_ERRNOS:
        return InfrastructureError(f"{what}: {exc.strerror or exc}")
    return InvalidOutput(f"{what}: {exc.strerror or exc} (the algorithm left it unreadable?)")


# ---------------------------------------------------------------- algo_output.json


def _read_bounded(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    got = 0
    while got < limit:
        chunk = os.read(fd, min(limit - got, 256 * 1024))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{text[:40]} overflows a double")
    return value


def parse_algo_output(raw: bytes) -> AlgoOutput:
    """Parse the bytes of ``algo_output.json``; any bytes at all either parse or raise :class:`InvalidOutput`.

    >>> parse_algo_output(b'{"status": "success"}').status
    'success'
    """
    if len(raw) > MAX_ALGO_OUTPUT_BYTES:
        raise InvalidOutput(f"{ALGO_OUTPUT_NAME} is over {MAX_ALGO_OUTPUT_BYTES} bytes, the limit (docs/contract.md §3)")
    try:
        text = raw.decode(json.detect_encoding(raw), "surrogatepass")  # as json.loads decodes bytes
        if too_deep(text):  # before the parser recurses (docs/contract.md §3 leaves nesting open)
            raise InvalidOutput(f"{ALGO_OUTPUT_NAME} is {TOO_DEEP}")
        data = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
        # A lone surrogate ("\\ud800") parses but can never be written out as UTF-8 later.
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except (ValueError, UnicodeError) as exc:
        raise InvalidOutput(f"{ALGO_OUTPUT_NAME} is not valid JSON: {shorten(str(exc), 200)}") from None
    if not isinstance(data, dict):
        raise InvalidOutput(f"{ALGO_OUTPUT_NAME}: expected a JSON object, got {type(data).__name__}")
    try:
        return AlgoOutput.model_validate(data)
    except ValidationError as exc:
        lines = format_validation_error(ALGO_OUTPUT_NAME, exc)
        if len(lines) > MAX_MESSAGE_LINES:
            lines = [*lines[:MAX_MESSAGE_LINES], f"… and {len(lines) - MAX_MESSAGE_LINES} more errors"]
        raise InvalidOutput("\n".join(shorten(line, 500) for line in lines)) from None
    except (RecursionError, ValueError, TypeError) as exc:  # a validator choking on hostile shapes
        raise InvalidOutput(f"{ALGO_OUTPUT_NAME} cannot be read: {type(exc).__name__}: {shorten(str(exc), 200)}") from None


def read_algo_output(output_dir: Path) -> AlgoOutput | None:
    """Parse ``algo_output.json`` if present; :class:`InvalidOutput` when it is not trustworthy.

    Checked by ``lstat`` (a regular file of at most 1 MiB) before it is opened, opened with
    ``O_NOFOLLOW | O_NONBLOCK`` (a symlink or FIFO swapped in cannot be followed or block),
    and read with a bounded read.
    """
    path = Path(output_dir) / ALGO_OUTPUT_NAME
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _os_error(ALGO_OUTPUT_NAME, exc) from None
    if not stat.S_ISREG(st.st_mode):
        raise InvalidOutput(f"{ALGO_OUTPUT_NAME} must be a regular file (found a symlink or special file)")
    if st.st_size > MAX_ALGO_OUTPUT_BYTES:
        raise InvalidOutput(f"{ALGO_OUTPUT_NAME} is {st.st_size} bytes; the limit is {MAX_ALGO_OUTPUT_BYTES} (docs/contract.md §3)")
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InvalidOutput(f"{ALGO_OUTPUT_NAME} must be a regular file (found a symlink or special file)") from None
        raise _os_error(f"{ALGO_OUTPUT_NAME} cannot be opened", exc) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InvalidOutput(f"{ALGO_OUTPUT_NAME} must be a regular file (found a symlink or special file)")
        raw = _read_bounded(fd, MAX_ALGO_OUTPUT_BYTES + 1)
    except OSError as exc:
        raise _os_error(f"{ALGO_OUTPUT_NAME} cannot be read", exc) from None
    finally:
        os.close(fd)
    return parse_algo_output(raw)


# ---------------------------------------------------------------- the output folder


def scan_output_folder(root: Path) -> dict[str, OutputEntry]:
    """List the whole output folder once, with ``lstat`` only; :class:`InvalidOutput` on anything but
    regular files and folders, or on a name with a control character or bytes that are not UTF-8."""
    root = Path(root)
    entries: dict[str, OutputEntry] = {}
    stack = [("", os.fspath(root))]
    while stack:
        rel_dir, path = stack.pop()
        try:
            with os.scandir(path) as it:
                items = list(it)
        except OSError as exc:
            raise _os_error(f"output folder: {rel_dir or '.'} cannot be listed", exc) from None
        for item in items:
            rel = f"{rel_dir}/{item.name}" if rel_dir else item.name
            _check_name(rel)
            try:
                st = item.stat(follow_symlinks=False)
            except OSError as exc:
                raise _os_error(f"output folder: {rel} cannot be examined", exc) from None
            if stat.S_ISDIR(st.st_mode):
                entries[rel] = OutputEntry(rel, True, 0)
                stack.append((rel, item.path))
            elif stat.S_ISREG(st.st_mode):
                entries[rel] = OutputEntry(rel, False, st.st_size)
            elif stat.S_ISLNK(st.st_mode):
                raise InvalidOutput(_symlink_message(Path(item.path), root, rel))
            else:
                raise InvalidOutput(f"output folder: {rel} is {_kind_name(st.st_mode)}, not a regular file; only regular files and folders count")
    return entries


def _normalize(rel: str, name: str) -> str:
    if not safe_relative(rel):
        raise InvalidOutput(f"output {name!r}: path {rel!r} must be relative to the output folder, without '..'")
    reason = bad_name_reason(rel)
    if reason is not None:
        raise InvalidOutput(f"output {name!r}: path {rel!r} {reason}")
    norm = posixpath.normpath(rel)
    if norm in (".", ""):
        raise InvalidOutput(f"output {name!r}: path {rel!r} names the output folder itself; name a file or a folder inside it")
    return norm


def _fallback(entries: dict[str, OutputEntry], name: str, fmt: str) -> str | None:
    """``<name>.<format>`` or ``<name>/`` when ``algo_output.json`` does not list the output."""
    for candidate in (f"{name}.{fmt}", name):
        if candidate in entries:
            return candidate
    return None


def _check_overlaps(found: list[tuple[str, str]]) -> None:
    """Two outputs on one path, or one inside the other, are ``invalid_output``."""
    for i, (name_a, a) in enumerate(found):
        for name_b, b in found[i + 1 :]:
            if a == b:
                raise InvalidOutput(f"outputs {name_a!r} and {name_b!r} both name {a!r}; each output needs its own path")
            inner, outer = (a, b) if len(a) > len(b) else (b, a)
            if inner.startswith(outer + "/"):
                raise InvalidOutput(
                    f"outputs {name_a!r} ({a!r}) and {name_b!r} ({b!r}) overlap: {inner!r} is inside {outer!r}; outputs may not nest"
                )


def _hash_file(root: Path, rel: str) -> str:
    try:
        return sha256_regular(root / rel)
    except OSError as exc:  # NotRegularFile included: swapped after the listing
        raise _os_error(f"output folder: {rel} cannot be read", exc) from None


def collect_outputs(manifest: Manifest, output_dir: Path, algo_output: AlgoOutput | None) -> list[OutputRecord]:
    """Find, check and hash every declared output; raise on a missing required one."""
    output_dir = Path(output_dir)
    listed_entries = algo_output.output_data if algo_output else []
    declared = {slot.name for slot in manifest.outputs}
    twice = [n for n, c in Counter(o.name for o in listed_entries).items() if c > 1 and n in declared]
    if twice:
        raise InvalidOutput(f"{ALGO_OUTPUT_NAME} lists output {twice[0]!r} more than once")
    entries = scan_output_folder(output_dir)
    listed = {o.name: o for o in listed_entries}

    found: list[tuple[str, str, str]] = []  # (slot name, format, normalized path)
    for slot in manifest.outputs:
        entry = listed.get(slot.name)
        if entry is not None:
            if entry.format != slot.format:
                raise InvalidOutput(
                    f"output {slot.name!r}: {ALGO_OUTPUT_NAME} says format {entry.format!r}, the manifest declares {slot.format!r}"
                )
            rel = _normalize(entry.path, slot.name)
            if rel not in entries:
                raise MissingOutput(f"output {slot.name!r}: {ALGO_OUTPUT_NAME} names {entry.path!r}, which does not exist")
        else:
            fallback = _fallback(entries, slot.name, slot.format)
            if fallback is None:
                if slot.required:
                    raise MissingOutput(
                        f"required output {slot.name!r} was not produced: not in {ALGO_OUTPUT_NAME} and neither "
                        f"{slot.name}.{slot.format} nor {slot.name}/ exists in the output folder"
                    )
                continue
            rel = fallback
        found.append((slot.name, slot.format, rel))
    _check_overlaps([(name, rel) for name, _, rel in found])

    records: list[OutputRecord] = []
    for name, fmt, rel in found:
        path = output_dir / rel
        if entries[rel].is_dir:
            prefix = rel + "/"
            files = sorted((e.rel[len(prefix) :] for e in entries.values() if not e.is_dir and e.rel.startswith(prefix)), key=sort_key)
            digest = folder_digest([(sub, _hash_file(output_dir, prefix + sub)) for sub in files])
            rows = parquet_rows(path, files) if fmt == "parquet" else None
        else:
            digest = _hash_file(output_dir, rel)
            rows = parquet_rows(path) if fmt == "parquet" else None
        if fmt == "parquet" and rows is None:
            raise InvalidOutput(f"output {name!r}: {rel} is declared parquet but is not a readable parquet file")
        records.append(OutputRecord(name=name, path=path, format=fmt, sha256=digest, rows=rows, multiple=entries[rel].is_dir))
    return records


# ---------------------------------------------------------------- failed attempts


def copy_regular_tree(src: Path, dest: Path) -> list[str]:
    """Copy ``src`` to a new folder ``dest`` keeping only regular files and folders; returns what was dropped.

    For keeping a failed attempt's outputs for a post-mortem: symlinks, FIFOs, sockets, device
    files and names with control characters (or bytes that are not UTF-8) are left out and
    logged, never followed or opened. Files are hardlinked when the filesystem allows (no bytes
    copied), else copied from a descriptor opened with ``O_NOFOLLOW``.

    >>> import tempfile; t = Path(tempfile.mkdtemp())
    >>> (t / "a").mkdir(); _ = (t / "a" / "x.txt").write_text("x"); (t / "a" / "l").symlink_to("/etc/passwd")
    >>> copy_regular_tree(t / "a", t / "b"), sorted(p.name for p in (t / "b").iterdir())
    (['l'], ['x.txt'])
    """
    src, dest = Path(src), Path(dest)
    dropped: list[str] = []
    os.mkdir(dest, 0o755)
    stack = [("", os.fspath(src), os.fspath(dest))]
    while stack:
        rel_dir, s_dir, d_dir = stack.pop()
        try:
            with os.scandir(s_dir) as it:
                items = list(it)
        except OSError as exc:
            log.warning("failed attempt: cannot list %s: %s", rel_dir or ".", exc)
            continue
        for item in items:
            rel = f"{rel_dir}/{item.name}" if rel_dir else item.name
            target = os.path.join(d_dir, item.name)
            try:
                st = item.stat(follow_symlinks=False)
                if bad_name_reason(rel) is not None:
                    dropped.append(rel)
                elif stat.S_ISDIR(st.st_mode):
                    os.mkdir(target, 0o755)
                    stack.append((rel, item.path, target))
                elif stat.S_ISREG(st.st_mode):
                    _link_or_copy_regular(item.path, target)
                else:
                    dropped.append(rel)
            except OSError as exc:
                log.warning("failed attempt: cannot keep %r: %s", rel, exc)
                dropped.append(rel)
    if dropped:
        log.warning("kept a failed attempt's outputs without %d entries that are not regular files or folders: %s", len(dropped), ", ".join(repr(d) for d in dropped[:20]))
    return dropped


def _link_or_copy_regular(src: str, dest: str) -> None:
    try:
        os.link(src, dest, follow_symlinks=False)
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EACCES, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    fd = os.open(src, _OPEN_FLAGS)
    with os.fdopen(fd, "rb") as fin:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", src)
        with open(dest, "xb") as fout:
            shutil.copyfileobj(fin, fout, 1024 * 1024)
    os.chmod(dest, 0o644)


__all__ = [
    "MAX_ALGO_OUTPUT_BYTES",
    "OutputEntry",
    "bad_name_reason",
    "collect_outputs",
    "copy_regular_tree",
    "parse_algo_output",
    "read_algo_output",
    "scan_output_folder",
]
