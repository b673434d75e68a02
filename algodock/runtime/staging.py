"""Staging: where each input's bytes go in a step's work folder, decided as data, then done.

A step's work folder holds ``algo_input.json`` and ``input/<slot>/…``; it is mounted
read-only into the container. Files are hardlinked when source and folder share a
filesystem (no bytes copied; the read-only mount keeps the source safe) and copied
otherwise, or when the container's uid could not read the original.

A folder is listed once: :func:`hash_input` returns the hash together with the listing it
was computed over, a binding carries both, and staging stages exactly that listing (each
file checked with ``lstat`` to still be a regular file), so a file added between hashing
and staging is never staged unhashed. Without a known hash, staging hashes the files it
staged.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

from algodock.contract.manifest import INPUT_DIR, AlgoConfig, AlgoInput, InputData, Manifest
from algodock.errors import InvalidInput
from algodock.hashing import folder_digest, list_files, sha256_file, sha256_regular
from algodock.records import InputBinding, InputRecord


class StagedFile(NamedTuple):
    """One file to put into a step's input folder."""

    source: Path
    """The file as it exists on the host."""
    target: Path
    """Where it goes on the host, inside the step's ``input/<slot>/``."""
    container_path: str
    """The same file as the container sees it."""
    relative: str
    """Path relative to the slot folder (POSIX): what the folder hash is computed over."""


class StagedSlot(NamedTuple):
    """One input slot: its files and what the record says about it."""

    binding: InputBinding
    format: str
    files: list[StagedFile]


def hash_input(path: Path) -> tuple[str, tuple[str, ...] | None]:
    """The sha256 of a local input and, for a folder, the one listing it was computed over.

    Give both to the :class:`InputBinding` (``sha256=``, ``files=``): staging then stages
    that listing and nothing else.
    """
    path = Path(path)
    if path.is_dir():
        try:
            files = tuple(list_files(path))
            return folder_digest([(rel, sha256_regular(path / rel)) for rel in files]), files
        except OSError as exc:
            raise InvalidInput(f"{path}: cannot hash {exc.filename}: {exc.strerror} (did it change while being read?)") from exc
    return sha256_file(path), None


def plan_inputs(manifest: Manifest, bindings: Mapping[str, InputBinding], input_root: Path) -> list[StagedSlot]:
    """Check bindings against the manifest's slots and decide where every file goes (no writes)."""
    errors = [f"inputs.{name}: the manifest declares no input slot {name!r}" for name in bindings if not manifest.input_slot(name)]
    errors += [
        f"inputs.{slot.name}: required input is missing"
        for slot in manifest.inputs
        if slot.required and slot.name not in bindings
    ]
    plan: list[StagedSlot] = []
    for slot in manifest.inputs:
        binding = bindings.get(slot.name)
        if binding is None:
            continue
        src = Path(binding.path)
        if not src.exists():
            errors.append(f"inputs.{slot.name}: {src} does not exist")
            continue
        if not os.access(src, os.R_OK):
            errors.append(f"inputs.{slot.name}: {src} is not readable")
            continue
        if src.is_dir():
            try:
                rels = list(binding.files) if binding.files is not None else list_files(src)
            except OSError as exc:  # a subfolder that cannot be listed: never skipped silently
                errors.append(f"inputs.{slot.name}: cannot list {exc.filename}: {exc.strerror}")
                continue
        else:
            rels = [src.name]
        base = src if src.is_dir() else src.parent
        if not rels:
            errors.append(f"inputs.{slot.name}: {src} holds no files")
            continue
        if not slot.multiple and len(rels) > 1:
            errors.append(f"inputs.{slot.name}: the slot takes one file but {src} holds {len(rels)}")
            continue
        files = [
            StagedFile(base / rel, input_root / slot.name / rel, f"{INPUT_DIR}/{slot.name}/{rel}", rel if src.is_dir() else rel)
            for rel in rels
        ]
        plan.append(StagedSlot(binding, slot.format, files))
    if errors:
        raise InvalidInput("\n".join(errors), errors=errors)
    return plan


def _place(source: Path, target: Path, in_folder: bool) -> None:
    """Hardlink when possible and readable by others, else copy (readable by the container).

    A file of a folder must still be a regular file (``lstat``): a symlink swapped in since
    the listing is refused, never followed.
    """
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    st = source.lstat() if in_folder else source.stat()
    if not stat.S_ISREG(st.st_mode):
        raise InvalidInput(f"{source}: no longer a regular file (the input folder changed while it was staged)")
    mode = st.st_mode
    if mode & stat.S_IROTH:
        try:
            os.link(source, target)
            return
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EACCES):
                raise
    shutil.copyfile(source, target)
    os.chmod(target, 0o644)


def stage_inputs(plan: list[StagedSlot]) -> list[tuple[InputRecord, InputData]]:
    """Do the I/O of a plan; hash what has no known hash. Returns the record and the descriptor."""
    out = []
    for binding, fmt, files in plan:
        in_folder = Path(binding.path).is_dir()
        try:
            for f in files:
                _place(f.source, f.target, in_folder)
        except OSError as exc:
            raise InvalidInput(f"inputs.{binding.slot}: cannot stage {exc.filename}: {exc.strerror}") from exc
        digest = binding.sha256
        if digest is None:
            if Path(binding.path).is_dir():
                digest = folder_digest([(f.relative, sha256_regular(f.target)) for f in files])
            else:
                digest = sha256_file(files[0].target)
        uri = binding.uri or str(Path(binding.path).resolve())
        record = InputRecord(
            name=binding.slot,
            uri=uri,
            sha256=digest,
            format=fmt,
            produced_by=binding.produced_by,
            rows=binding.rows,
            files=[f.container_path for f in files],
        )
        data = InputData(
            name=binding.slot,
            format=fmt,
            path=f"{INPUT_DIR}/{binding.slot}",
            files=[f.container_path for f in files],
            source_uri=uri,
            sha256=digest,
        )
        out.append((record, data))
    return out


def prepare_work_dir(work_dir: Path, manifest: Manifest, bindings: Mapping[str, InputBinding], parameters: dict) -> list[InputRecord]:
    """Stage inputs into ``work_dir/input`` and write ``work_dir/algo_input.json``."""
    input_root = work_dir / "input"
    input_root.mkdir(parents=True, exist_ok=True)
    os.chmod(work_dir, 0o755)
    os.chmod(input_root, 0o755)
    staged = stage_inputs(plan_inputs(manifest, bindings, input_root))
    for slot in manifest.inputs:  # an optional slot left unbound is still an (empty) folder
        (input_root / slot.name).mkdir(exist_ok=True, mode=0o755)
    algo_input = AlgoInput(config=AlgoConfig(parameters=parameters), input_data=[d for _, d in staged])
    path = work_dir / "algo_input.json"
    path.write_text(algo_input.model_dump_json(indent=2))
    os.chmod(path, 0o644)
    return [r for r, _ in staged]
