"""``algodock init``: scaffold an algorithm project that builds offline and passes check-image.

The project holds a manifest, a Dockerfile in the examples' style (``ARG BASE_IMAGE``,
dependencies installed on the host into ``.wheels/`` and copied in, a numeric non-root
``USER``), a Python skeleton, a small sample input and a README for the author.

>>> init_project("my-algo", Path("/tmp/my-algo"))          # doctest: +SKIP
PosixPath('/tmp/my-algo')
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import typing
from importlib import resources
from pathlib import Path

from algodock.contract.manifest import NAME_PATTERN, Manifest, parse_manifest
from algodock.errors import InvalidInput

log = logging.getLogger("algodock.authoring")

REPO = Path(__file__).resolve().parents[2]
WHEEL_PLATFORM = os.environ.get("WHEEL_PLATFORM", "manylinux_2_28_x86_64")
WHEEL_PYTHON = os.environ.get("WHEEL_PYTHON", "3.11")
SAMPLE_SLOT = "table"
SAMPLE_DIR = "sample"
"""Beside the manifest: ``sample/<slot>/`` holds the inputs ``algodock check-image`` runs on."""


def manifest_version() -> str:
    """The newest ``manifest_version`` this platform reads."""
    allowed = typing.get_args(Manifest.model_fields["manifest_version"].annotation)
    return max(allowed, key=lambda v: tuple(int(p) for p in v.split(".")))


def pyarrow_version() -> str:
    import pyarrow

    return pyarrow.__version__


def _template(name: str) -> str:
    return resources.files("algodock.authoring").joinpath("templates", name).read_text()


def _render(name: str, values: dict[str, str]) -> str:
    text = _template(name)
    for key, value in values.items():
        text = text.replace(f"__{key}__", value)
    return text


def manifest_document(name: str, image: str) -> dict:
    """The generated manifest (validated by :func:`init_project`)."""
    return {
        "manifest_version": manifest_version(),
        "name": name,
        "version": "0.1.0",
        "description": f"{name}: sums a numeric column per group (edit me).",
        "container_parameters": {
            "image": image,
            "command": ["python3", "/app/algorithm.py"],
            "resource_request": {"cpu_millicore": 1000, "memory_gb": 0.25, "gpu": 0},
            "timeout_seconds": 300,
            "env": {},
            "scratch_mb": 64,
        },
        "parameters": {
            "type": "object",
            "properties": {
                "group_by": {"type": "string", "default": "key", "description": "Column to group rows by."},
                "column": {"type": "string", "default": "value", "description": "Numeric column to count and sum per group."},
            },
            "required": [],
            "additionalProperties": False,
        },
        # The schemas are what `algodock schema sample/table` and `algodock schema` of the output print:
        # checked before a run against the steps around it, and on the bytes at hand-off (docs/contract.md).
        "inputs": [{"name": SAMPLE_SLOT, "format": "parquet", "required": True, "multiple": True, "description": "Rows with a group column and a numeric column.",
                    "schema": {"columns": [{"name": "key", "type": "string"}, {"name": "value", "type": "double"}], "extra_columns": "allow"}}],
        "outputs": [{"name": "summary", "format": "parquet", "required": True, "description": "One row per group: group, rows, total.",
                     "schema": {"columns": [{"name": "group", "type": "string"}, {"name": "rows", "type": "int64", "nullable": False},
                                            {"name": "total", "type": "double"}], "extra_columns": "forbid"}}],
    }


def write_sample(folder: Path) -> None:
    """A small deterministic parquet input: 120 rows, 3 groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    keys = ["north", "south", "west"]
    table = pa.table({"key": [keys[i % 3] for i in range(120)], "value": [float((i * 7) % 23) for i in range(120)]})
    pq.write_table(table, folder / "part-000.parquet")


def _wheels_marker() -> str:
    # The same marker scripts/build-wheels.sh writes, so either can reuse the other's folder.
    return f"pyarrow=={pyarrow_version()} {WHEEL_PLATFORM} cp{WHEEL_PYTHON}"


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def vendor_wheels(target: Path, requirements: Path) -> str:
    """Fill ``target`` (``.wheels/``) with the dependencies for the image's Python; say how.

    Reuses an example's up-to-date ``.wheels`` (hardlinked) when the checkout has one, else
    installs on the host with pip exactly as ``scripts/build-wheels.sh`` does.
    """
    want = _wheels_marker()
    for marker in sorted(REPO.glob("examples/*/.wheels/.algodock-reqs")):
        if marker.read_text().strip() == want:
            shutil.copytree(marker.parent, target, copy_function=_link_or_copy)
            return f"copied from {marker.parent}"
    cmd = [
        sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-warn-script-location",
        "--target", str(target), "--platform", WHEEL_PLATFORM, "--only-binary=:all:",
        "--python-version", WHEEL_PYTHON, "--implementation", "cp", "-r", str(requirements),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise InvalidInput(
            f"could not install the dependencies into {target}: {proc.stderr.strip()[-800:]}\n"
            f"run it yourself when pip can reach an index: {' '.join(cmd)}"
        )
    shutil.rmtree(target / "bin", ignore_errors=True)
    (target / ".algodock-reqs").write_text(want + "\n")
    return "installed with pip on the host"


def init_project(name: str, directory: Path | None = None, *, vendor: bool = True) -> Path:
    """Create the project ``name`` in ``directory`` (default ``./NAME``); refuse an existing path."""
    if not re.match(NAME_PATTERN, name):
        raise InvalidInput(f"name {name!r}: use lower-case letters, digits, '-' and '_' (at most 63, starting with a letter or digit)")
    dest = Path(directory) if directory else Path(name)
    if dest.exists() or dest.is_symlink():
        raise InvalidInput(f"{dest} already exists; init never overwrites: give a new --dir or remove it first")
    image = f"{name}:0.1.0"
    values = {"NAME": name, "IMAGE": image, "PYARROW": pyarrow_version()}
    manifest = manifest_document(name, image)
    parse_manifest(manifest, "generated manifest")  # the template must stay valid against the contract
    tmp = dest.with_name(f".{dest.name}.init-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        for template, target in (
            ("Dockerfile.tmpl", "Dockerfile"),
            ("dockerignore.tmpl", ".dockerignore"),
            ("gitignore.tmpl", ".gitignore"),
            ("requirements.txt.tmpl", "requirements.txt"),
            ("algorithm.py.tmpl", "algorithm.py"),
            ("README.md.tmpl", "README.md"),
        ):
            (tmp / target).write_text(_render(template, values))
        write_sample(tmp / SAMPLE_DIR / SAMPLE_SLOT)
        if vendor:
            how = vendor_wheels(tmp / ".wheels", tmp / "requirements.txt")
            log.info("dependencies in %s/.wheels: %s", dest, how)
        else:
            (tmp / ".wheels").mkdir()
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
