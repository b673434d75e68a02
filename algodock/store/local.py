"""A store in a folder on this host: JSON records replaced by rename, outputs committed by
renaming a hidden temporary into place (atomic on one filesystem), files hardlinked rather
than copied where the filesystem allows, compare-and-swap under a lock file.

>>> import tempfile
>>> store = LocalStore(tempfile.mkdtemp())
>>> store.create_json("runs/r1/lease.json", {"owner": "me"}) == store.read_json_versioned("runs/r1/lease.json")[1]
True
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from algodock.store.base import Store, StoredFile, encode_json
from algodock.store.layout import _LOCK, DEFAULT_STORE, _hidden, _tmp_beside
from algodock.store.transfer import _link_or_copy_file, _remove, _replace

__all__ = ["LocalStore"]


class LocalStore(Store):
    """A folder on this host (default ``./.algodock/store``)."""

    is_local = True

    def __init__(self, root: str | Path = DEFAULT_STORE) -> None:
        self.root = Path(root).expanduser().absolute()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def local_path(self, *parts: str) -> Path:
        rel = self._rel(*parts)
        return self.root / rel if rel else self.root

    def uri(self, *parts: str) -> str:
        return str(self.local_path(*parts))

    def write_json(self, rel: str, obj: Any, *, durable: bool = True) -> None:
        dest = self.local_path(rel)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_beside(dest)
        try:
            with open(tmp, "wb") as fh:
                fh.write(encode_json(obj))
                if durable:
                    fh.flush()
                    os.fsync(fh.fileno())
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def read_json(self, rel: str) -> Any | None:
        try:
            return json.loads(self.local_path(rel).read_text())
        except FileNotFoundError:
            return None

    def exists(self, rel: str) -> bool:
        return os.path.lexists(self.local_path(rel))

    def output_exists(self, rel: str) -> bool:
        return self.exists(rel)  # the rename is the commit

    def list(self, rel_prefix: str) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self.local_path(rel_prefix)) if not _hidden(n))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def create_json(self, rel: str, obj: Any) -> str:
        dest = self.local_path(rel)
        dest.parent.mkdir(parents=True, exist_ok=True)
        data = encode_json(obj)
        tmp = _tmp_beside(dest)
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.link(tmp, dest)  # fails with EEXIST when a record is there: atomic, unlike exists()+write
        finally:
            tmp.unlink(missing_ok=True)
        return hashlib.sha256(data).hexdigest()

    def read_json_versioned(self, rel: str) -> tuple[Any | None, str | None]:
        try:
            data = self.local_path(rel).read_bytes()
        except FileNotFoundError:
            return None, None
        return json.loads(data), hashlib.sha256(data).hexdigest()

    def replace_json(self, rel: str, obj: Any, version: str) -> str:
        dest = self.local_path(rel)
        dest.parent.mkdir(parents=True, exist_ok=True)
        data = encode_json(obj)
        # Compare-and-swap under an exclusive lock of a file beside the record (released by the
        # kernel if this process dies); create_json needs no lock, it only writes where nothing is.
        with open(dest.with_name(f"{_LOCK}{dest.name}"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                current = dest.read_bytes()
            except FileNotFoundError:
                raise FileExistsError(f"{dest}: the record is gone; someone else changed it") from None
            if hashlib.sha256(current).hexdigest() != version:
                raise FileExistsError(f"{dest}: someone else changed the record")
            tmp = _tmp_beside(dest)
            try:
                tmp.write_bytes(data)
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
        return hashlib.sha256(data).hexdigest()

    def walk(self, rel_prefix: str = "") -> list[StoredFile]:
        top = self.local_path(rel_prefix) if rel_prefix else self.root
        found: list[StoredFile] = []
        for dirpath, _, filenames in os.walk(top):  # symlinks are listed, never followed
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                try:
                    size = os.lstat(os.path.join(dirpath, name)).st_size
                except FileNotFoundError:
                    continue
                found.append(StoredFile(name if rel_dir == "." else f"{rel_dir}/{name}", size))
        return found

    def remove(self, rels: list[str]) -> None:
        parents: set[Path] = set()
        for rel in rels:
            path = self.local_path(rel)
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except IsADirectoryError:
                shutil.rmtree(path, ignore_errors=True)
            parents.add(path.parent)
        for folder in sorted(parents, key=lambda p: len(p.parts), reverse=True):  # deepest first
            while folder != self.root and self.root in folder.parents:
                try:
                    folder.rmdir()
                except OSError:  # not empty (or gone): stop climbing
                    break
                folder = folder.parent

    def put_output(self, local_path: Path, rel: str, *, move: bool = False) -> str:
        src = Path(local_path)
        dest = self.local_path(rel)
        if not os.path.lexists(src):
            raise FileNotFoundError(f"{src}: nothing to store")
        if src.absolute() == dest or (dest.exists() and os.path.samefile(src, dest)):
            return str(dest)
        if os.path.lexists(dest):  # stored outputs are immutable: a lineage document may point here
            raise FileExistsError(f"{dest}: an output is already stored there; outputs are never replaced")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_beside(dest)
        try:
            if move:
                try:
                    os.rename(src, tmp)
                except OSError as exc:
                    if exc.errno != errno.EXDEV:
                        raise
                    move = False
            if not move:
                if src.is_dir():
                    shutil.copytree(src, tmp, symlinks=True, copy_function=_link_or_copy_file)
                else:
                    _link_or_copy_file(str(src), str(tmp))
            _replace(tmp, dest)
        finally:
            _remove(tmp)
        return str(dest)
