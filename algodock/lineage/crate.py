"""A run's lineage as a Workflow Run RO-Crate, Provenance Run Crate profile
(``algodock lineage export RUN_ID --ro-crate DIR_OR_ZIP [--with-data]``).

What the crate says (https://w3id.org/ro/wfrun/provenance/0.5):

* the pipeline is the workflow (the crate's ``mainEntity``, ``ComputationalWorkflow``), each
  step one of its ``HowToStep``s, run by its algorithm (a ``SoftwareApplication`` with its
  container image: a ``ContainerImage`` with tag, image id and repo digest);
* the run is a ``CreateAction`` of the workflow; each step's container run a ``CreateAction``
  of its algorithm (``instrument``), with its ``containerImage``, start and end time,
  ``actionStatus``, inputs as ``object`` and outputs as ``result``; a ``ControlAction`` per
  step ties it to its ``HowToStep``, and an ``OrganizeAction`` of algodock orchestrates them;
* parameters after defaults are ``PropertyValue``s (``exampleOfWork`` the algorithm's
  ``FormalParameter``), in the action's ``object``;
* inputs and outputs are ``File`` entities (``Dataset`` for a folder) with ``sha256`` and
  ``contentSize``: by their store URIs, or copied into the crate with ``with_data``
  (``outputs/<step>/<name>``, ``sameAs`` the store URI).

The metadata is written as JSON-LD with no dependency; the ``rocrate`` library reads it back.

>>> crate_id("s3://b/k/x.parquet"), crate_id("/store/runs/r/x.parquet")
('s3://b/k/x.parquet', 'file:///store/runs/r/x.parquet')
"""

from __future__ import annotations

import json
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from algodock import __version__ as ALGODOCK_VERSION
from algodock.errors import InvalidInput
from algodock.lineage.queries import read_document
from algodock.records import InputRecord, LineageDocument, OutputRecord, StepRecord
from algodock.store.base import Store
from algodock.store.layout import local_path_of
from algodock.store.s3 import S3Store

WFRUN = "https://w3id.org/ro/terms/workflow-run#"
PROFILES = [
    "https://w3id.org/ro/wfrun/process/0.5",
    "https://w3id.org/ro/wfrun/workflow/0.5",
    "https://w3id.org/ro/wfrun/provenance/0.5",
    "https://w3id.org/workflowhub/workflow-ro-crate/1.0",
]
CONTEXT: list[Any] = [
    "https://w3id.org/ro/crate/1.1/context",
    {
        "ContainerImage": f"{WFRUN}ContainerImage",
        "DockerImage": f"{WFRUN}DockerImage",
        "containerImage": f"{WFRUN}containerImage",
        "registry": f"{WFRUN}registry",
        "tag": f"{WFRUN}tag",
        "sha256": f"{WFRUN}sha256",
    },
]
FORMATS = {"parquet": "application/vnd.apache.parquet", "csv": "text/csv", "json": "application/json"}
STATUS = {"succeeded": "http://schema.org/CompletedActionStatus", "cached": "http://schema.org/CompletedActionStatus", "failed": "http://schema.org/FailedActionStatus"}


def crate_id(uri: str) -> str:
    """The ``@id`` of data outside the crate: its URI (``file://`` for a local path)."""
    if uri.startswith(("s3://", "file://", "http://", "https://")):
        return uri
    return (local_path_of(uri) or Path(uri)).absolute().as_uri()


def _size(store: Store, uri: str) -> int | None:
    local = local_path_of(uri) if not uri.startswith("s3://") else None
    try:
        if local is not None:
            return sum(p.stat().st_size for p in local.rglob("*") if p.is_file()) if local.is_dir() else local.stat().st_size
        fs = store.fs if isinstance(store, S3Store) else None
        if fs is None:
            return None
        return int(fs.du(uri.removeprefix("s3://").rstrip("/")))
    except (OSError, ValueError):
        return None


def _is_folder(store: Store, uri: str) -> bool:
    local = local_path_of(uri) if not uri.startswith("s3://") else None
    if local is not None:
        return local.is_dir()
    return isinstance(store, S3Store) and bool(store.fs.isdir(uri.removeprefix("s3://").rstrip("/")))


class _Crate:
    """The graph being built: entities by ``@id``."""

    def __init__(self) -> None:
        self.graph: dict[str, dict[str, Any]] = {}

    def add(self, entity: dict[str, Any]) -> dict[str, str]:
        self.graph.setdefault(entity["@id"], entity)
        return {"@id": entity["@id"]}


def _image_entity(crate: _Crate, step: StepRecord) -> dict[str, str]:
    ref = step.image or ""
    name, _, tag = ref.rpartition(":") if ":" in ref.rsplit("/", 1)[-1] else (ref, "", "")
    registry = name.split("/", 1)[0] if "/" in name and ("." in name.split("/", 1)[0] or ":" in name.split("/", 1)[0]) else "docker.io"
    return crate.add({
        "@id": f"#image-{(step.image_id or ref).removeprefix('sha256:')}",
        "@type": "ContainerImage",
        "additionalType": {"@id": f"{WFRUN}DockerImage"},
        "name": name or ref,
        "tag": tag or None,
        "registry": registry,
        "sha256": (step.image_id or "").removeprefix("sha256:") or None,
        "identifier": step.image_id,
        "url": step.repo_digest,
    })


def _data(crate: _Crate, store: Store, record: InputRecord | OutputRecord, fmt: str | None, local_id: str | None = None, *, folder: bool) -> dict[str, str]:
    entity: dict[str, Any] = {
        "@id": local_id or crate_id(record.uri),
        "@type": "Dataset" if folder else "File",
        "name": record.name,
        "sha256": record.sha256,
        "contentSize": _size(store, record.uri),
        "encodingFormat": FORMATS.get(fmt or "", "application/octet-stream"),
    }
    if local_id is not None:
        entity["sameAs"] = {"@id": crate_id(record.uri)}
    if record.rows is not None:
        entity["description"] = f"{record.rows} rows"
    return crate.add(entity)


def _copy_in(store: Store, uri: str, dest: Path) -> None:
    """An output's bytes into the crate (downloaded from S3, checked against the producer's sha256 by the caller's record)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    local = local_path_of(uri) if not uri.startswith("s3://") else None
    if local is None:
        fetched = store.fetch(uri, dest.parent / ".download")
        shutil.move(str(fetched), str(dest))
        shutil.rmtree(dest.parent / ".download", ignore_errors=True)
    elif local.is_dir():
        shutil.copytree(local, dest)
    else:
        shutil.copy2(local, dest)


def _step_entities(crate: _Crate, store: Store, doc: LineageDocument, step: StepRecord, root: Path, with_data: bool) -> tuple[dict[str, str], dict[str, str] | None]:
    """The step's HowToStep and (when it ran or was cached) its ControlAction."""
    tool = crate.add({
        "@id": f"#algorithm-{step.algorithm or step.id}-{step.algorithm_version or '0'}",
        "@type": "SoftwareApplication",
        "name": step.algorithm or step.id,
        "softwareVersion": step.algorithm_version,
    })
    crate.graph[tool["@id"]].setdefault("input", [])
    how = crate.add({"@id": f"#step-{step.id}", "@type": "HowToStep", "name": step.id, "workExample": tool, "position": str(doc.steps.index(step))})
    if step.status not in STATUS:
        return how, None
    values = []
    for name, value in sorted(step.parameters.items()):
        formal = crate.add({"@id": f"{tool['@id']}-param-{name}", "@type": "FormalParameter", "name": name, "additionalType": "Text" if isinstance(value, str) else "PropertyValue"})
        if formal not in crate.graph[tool["@id"]]["input"]:
            crate.graph[tool["@id"]]["input"].append(formal)
        values.append(crate.add({
            "@id": f"#run-{doc.run_id}-{step.id}-param-{name}", "@type": "PropertyValue", "name": name,
            "value": value if isinstance(value, (str, int, float, bool)) else json.dumps(value, sort_keys=True), "exampleOfWork": formal,
        }))
    inputs = [_data(crate, store, i, i.format, folder=_is_folder(store, i.uri)) for i in step.inputs]
    outputs = []
    for o in step.outputs:
        folder = _is_folder(store, o.uri)
        local_id = None
        if with_data:
            name = o.uri.rstrip("/").rsplit("/", 1)[-1]
            local_id = f"outputs/{step.id}/{name}" + ("/" if folder else "")
            _copy_in(store, o.uri, root / local_id.rstrip("/"))
        outputs.append(_data(crate, store, o, o.format, local_id, folder=folder))
    action = crate.add({
        "@id": f"#run-{doc.run_id}-{step.id}",
        "@type": "CreateAction",
        "name": f"step {step.id} of run {doc.run_id}" + (f" (cached from run {step.cached_from})" if step.cached_from else ""),
        "instrument": tool,
        "containerImage": _image_entity(crate, step),
        "object": inputs + values,
        "result": outputs,
        "startTime": step.started_at.isoformat() if step.started_at else None,
        "endTime": step.finished_at.isoformat() if step.finished_at else None,
        "actionStatus": STATUS[step.status],
        "error": step.failure.message if step.failure else None,
    })
    control = crate.add({"@id": f"#control-{doc.run_id}-{step.id}", "@type": "ControlAction", "instrument": how, "object": action, "name": f"orchestrate {step.id}"})
    return how, control


def build_metadata(store: Store, doc: LineageDocument, root: Path, *, with_data: bool = False) -> dict[str, Any]:
    """The ``ro-crate-metadata.json`` document of ``doc`` (copying outputs under ``root`` with ``with_data``)."""
    crate = _Crate()
    crate.add({"@id": "ro-crate-metadata.json", "@type": "CreativeWork", "conformsTo": {"@id": "https://w3id.org/ro/crate/1.1"}, "about": {"@id": "./"}})
    workflow_id = f"#pipeline-{doc.pipeline}"
    steps, controls = [], []
    for step in doc.steps:
        how, control = _step_entities(crate, store, doc, step, root, with_data)
        steps.append(how)
        if control is not None:
            controls.append(control)
    workflow = crate.add({
        "@id": workflow_id, "@type": ["File", "SoftwareSourceCode", "ComputationalWorkflow", "HowTo"], "name": doc.pipeline,
        "identifier": f"sha256:{doc.spec_sha256}", "step": steps, "programmingLanguage": {"@id": "#algodock"},
        "hasPart": sorted({e["@id"] for e in crate.graph.values() if e.get("@type") == "SoftwareApplication"}),
    })
    crate.graph[workflow_id]["hasPart"] = [{"@id": i} for i in crate.graph[workflow_id]["hasPart"]]
    engine = crate.add({"@id": "#algodock", "@type": ["ComputerLanguage", "SoftwareApplication"], "name": "algodock", "version": ALGODOCK_VERSION, "softwareVersion": ALGODOCK_VERSION, "url": {"@id": "https://github.com/algodock"}})
    external = [o for s in doc.steps for o in s.inputs if o.produced_by is None]
    run = crate.add({
        "@id": f"#run-{doc.run_id}", "@type": "CreateAction", "name": f"run {doc.run_id} of pipeline {doc.pipeline}", "instrument": workflow,
        "object": [{"@id": crate_id(i.uri)} for i in external],
        "result": [{"@id": r["@id"]} for c in controls for r in crate.graph[crate.graph[c["@id"]]["object"]["@id"]]["result"]],
        "startTime": doc.started_at.isoformat() if doc.started_at else None, "endTime": doc.finished_at.isoformat() if doc.finished_at else None,
        "actionStatus": STATUS.get(doc.status, "http://schema.org/ActiveActionStatus"),
    })
    crate.add({"@id": f"#organize-{doc.run_id}", "@type": "OrganizeAction", "name": f"algodock orchestration of run {doc.run_id}", "instrument": engine, "object": controls, "result": run})
    data = [{"@id": e["@id"]} for e in crate.graph.values() if e.get("@type") in ("File", "Dataset") and e["@id"] != workflow_id]
    crate.add({
        "@id": "./", "@type": "Dataset", "name": f"algodock run {doc.run_id} of {doc.pipeline}",
        "datePublished": (doc.finished_at or doc.started_at).isoformat() if (doc.finished_at or doc.started_at) else None,
        "conformsTo": [{"@id": p} for p in PROFILES], "mainEntity": workflow, "hasPart": [workflow, *data], "mentions": [run],
        "license": {"@id": "https://spdx.org/licenses/CC0-1.0"},
    })
    crate.add({"@id": "https://spdx.org/licenses/CC0-1.0", "@type": "CreativeWork", "name": "CC0-1.0"})
    for p in PROFILES:
        crate.add({"@id": p, "@type": "CreativeWork", "name": p.rsplit("/", 2)[-2], "version": p.rsplit("/", 1)[-1]})
    graph = [{k: v for k, v in e.items() if v is not None} for e in crate.graph.values()]
    return {"@context": CONTEXT, "@graph": graph}


def export_crate(store: Store, run_id: str, target: Path, *, with_data: bool = False) -> Path:
    """Write the crate of ``run_id`` to the folder ``target``, or a zip when it ends in ``.zip``; refuse a target that exists."""
    if target.exists():
        raise InvalidInput(f"{target} exists; the crate is written only where nothing is (remove it, or choose another path)")
    doc = read_document(store, run_id)
    work = Path(tempfile.mkdtemp(prefix="algodock-crate-", dir=target.absolute().parent))
    try:
        metadata = build_metadata(store, doc, work, with_data=with_data)
        (work / "ro-crate-metadata.json").write_text(json.dumps(metadata, indent=2))
        if target.suffix == ".zip":
            tmp_zip = work.with_suffix(".zip")
            with zipfile.ZipFile(tmp_zip, "w", zipfile.ZIP_DEFLATED) as zf:
                for path in sorted(work.rglob("*")):
                    if path.is_file():
                        zf.write(path, path.relative_to(work).as_posix())
            tmp_zip.rename(target)
        else:
            work.rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        work.with_suffix(".zip").unlink(missing_ok=True)
    return target


__all__ = ["PROFILES", "build_metadata", "crate_id", "export_crate"]
