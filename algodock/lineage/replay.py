"""Replay recorded steps to prove their outputs reproduce (``algodock replay RUN_ID [STEP...]``).

Each step is run again in the sandbox with exactly what its lineage and its kept key
document (``runs/<run>/keys/<step>.json``) recorded: the image by its id (refused, naming it,
when the engine no longer has it and its ``repo_digest`` cannot be pulled), the command, the
environment, the parameters after defaults, the resource request, the input and output slots,
and every input's bytes taken from the store and checked against the recorded sha256 before
the container starts. Outputs go to a scratch folder, never over the recorded ones. Each
output's verdict is ``reproduced`` (same sha256) or ``differs``; a parquet output that differs
says how (:func:`compare_parquet`: row counts, schema, the columns whose values differ and
the first differing row). Each replay is recorded beside the run,
``runs/<run>/replays/<replay_id>.json``.

>>> compare_parquet.__name__
'compare_parquet'
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from algodock.cache import keys_rel
from algodock.errors import ImageNotFound, InfrastructureError, InvalidInput
from algodock.hashing import sha256_path
from algodock.lineage.queries import read_document, replays
from algodock.records import InputBinding, ResolvedImage, StepRecord
from algodock.runtime.staging import hash_input
from algodock.store.base import Store
from algodock.store.layout import local_path_of

if TYPE_CHECKING:
    import docker

    from algodock.contract.manifest import Manifest

log = logging.getLogger("algodock.lineage.replay")

REPLAYABLE = ("succeeded", "cached")


def replays_rel(run_id: str, replay_id: str) -> str:
    """``runs/<run_id>/replays/<replay_id>.json``."""
    return f"runs/{run_id}/replays/{replay_id}.json"


def list_replays(store: Store, run_id: str) -> list[dict[str, Any]]:
    """The replays recorded beside ``run_id``, oldest first."""
    return replays(store, run_id)


def select_steps(doc_steps: list[StepRecord], steps: tuple[str, ...], all_steps: bool) -> list[StepRecord]:
    """The records to replay; :class:`InvalidInput` for an unknown step or when neither steps nor ``--all`` are given."""
    if not steps and not all_steps:
        raise InvalidInput("name the steps to replay, or pass --all")
    by_id = {s.id: s for s in doc_steps}
    unknown = [s for s in steps if s not in by_id]
    if unknown:
        raise InvalidInput(f"no step {', '.join(map(repr, unknown))} in this run (its steps: {', '.join(by_id)})")
    chosen = [by_id[s] for s in steps] if steps else list(doc_steps)
    return [s for s in chosen if s.status in REPLAYABLE or steps]


def _manifest_of(step: StepRecord, keys: dict[str, Any] | None) -> Manifest:
    """The manifest the step ran with, rebuilt from its record and key document."""
    from algodock.contract.manifest import Manifest

    doc = (keys or {}).get("document") or {}
    input_slots = doc.get("input_slots") or [[i.name, i.format or "binary", False] for i in step.inputs]
    output_slots = doc.get("output_slots") or [[o.name, o.format, False, True] for o in step.outputs]
    return Manifest.model_validate(
        {
            "manifest_version": "0.2",
            "name": step.algorithm or step.id,
            "version": step.algorithm_version or "0",
            "container_parameters": {
                "image": step.image or "replay",
                "command": step.command,
                "env": doc.get("env") or {},
                "resource_request": step.resource_request or {},
                "shm_mb": doc.get("shm_mb") or 0,
            },
            "parameters": {"type": "object"},
            "inputs": [{"name": n, "format": f, "multiple": m} for n, f, m in input_slots],
            "outputs": [{"name": n, "format": f, "multiple": m, "required": r} for n, f, m, r in output_slots],
        }
    )


def _image(client: docker.DockerClient, step: StepRecord) -> ResolvedImage:
    """The recorded image id on the engine, pulled by its ``repo_digest`` when needed; refused otherwise."""
    from docker.errors import APIError, ImageNotFound as DockerImageNotFound

    assert step.image_id
    try:
        image = client.images.get(step.image_id)
    except DockerImageNotFound:
        image = None
        if step.repo_digest:
            try:
                image = client.images.pull(step.repo_digest)
            except (APIError, DockerImageNotFound) as exc:
                log.warning("step %s: pulling %s failed: %s", step.id, step.repo_digest, exc)
        if image is None or image.id != step.image_id:
            raise ImageNotFound(
                f"step {step.id}: image {step.image_id} ({step.image}) is no longer on the engine"
                + (f" and {step.repo_digest} did not pull it" if step.repo_digest else " and no repo_digest was recorded to pull it by")
                + "; it cannot be replayed"
            ) from None
    return ResolvedImage(ref=step.image or step.image_id, id=image.id, repo_digest=step.repo_digest, user=(image.attrs.get("Config") or {}).get("User") or "")


def _bind(store: Store, step: StepRecord, scratch: Path) -> dict[str, InputBinding]:
    """Every recorded input, from the store (or where it was), checked against its recorded sha256."""
    bindings = {}
    for inp in step.inputs:
        local = local_path_of(inp.uri)
        if local is None:
            path = store.fetch(inp.uri, scratch / "inputs" / inp.name, expected_sha256=inp.sha256)  # checked as it streams in
            digest, files = hash_input(path)
        else:
            if not local.exists():
                raise InvalidInput(f"step {step.id}: input {inp.name} at {inp.uri} is gone; it cannot be replayed")
            path = local
            digest, files = hash_input(local)
        if digest != inp.sha256:
            raise InvalidInput(f"step {step.id}: input {inp.name} at {inp.uri} has sha256 {digest}, recorded {inp.sha256}; it cannot be replayed")
        bindings[inp.name] = InputBinding(slot=inp.name, path=path, uri=inp.uri, sha256=digest, produced_by=inp.produced_by, rows=inp.rows, files=files)
    return bindings


def compare_parquet(recorded: Path, replayed: Path) -> dict[str, Any]:
    """How two parquet files (or folders of parts) differ: rows, schema, differing columns, first differing row."""
    import pyarrow.parquet as pq

    a, b = pq.read_table(recorded), pq.read_table(replayed)
    fa, fb = {f.name: str(f.type) for f in a.schema}, {f.name: str(f.type) for f in b.schema}
    schema = (
        [{"column": c, "change": "removed", "recorded": fa[c]} for c in fa if c not in fb]
        + [{"column": c, "change": "added", "replayed": fb[c]} for c in fb if c not in fa]
        + [{"column": c, "change": "type", "recorded": fa[c], "replayed": fb[c]} for c in fa if c in fb and fa[c] != fb[c]]
    )
    n = min(a.num_rows, b.num_rows)
    columns, first = [], None
    for c in (c for c in fa if c in fb):
        left, right = a.column(c).slice(0, n).to_pylist(), b.column(c).slice(0, n).to_pylist()
        row = next((i for i, (x, y) in enumerate(zip(left, right)) if x != y), None)
        if row is not None or a.num_rows != b.num_rows:
            if row is not None:
                columns.append(c)
                first = row if first is None else min(first, row)
    if first is None and a.num_rows != b.num_rows:
        first = n
    return {"rows": {"recorded": a.num_rows, "replayed": b.num_rows}, "schema": schema, "columns": columns, "first_differing_row": first}


def _recorded_copy(store: Store, uri: str, scratch: Path, name: str) -> Path:
    local = local_path_of(uri)
    return local if local is not None else store.fetch(uri, scratch / "recorded" / name)


def replay_step(store: Store, client: docker.DockerClient, run_id: str, step: StepRecord, scratch: Path, *, replay_id: str, on_log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run one recorded step again; its verdicts (never raises for the step's own failure)."""
    from algodock.runtime.runner import run_step

    item: dict[str, Any] = {"step": step.id, "image": step.image, "image_id": step.image_id, "outputs": [], "usage": None, "failure": None}
    folder = scratch / step.id
    folder.mkdir(parents=True, exist_ok=True)
    try:
        image = _image(client, step)
        bindings = _bind(store, step, folder)
    except (ImageNotFound, InvalidInput, InfrastructureError) as exc:
        item["status"], item["failure"] = "refused", str(exc)
        return item
    keys = store.read_json(keys_rel(run_id, step.id))
    if not keys:
        item["note"] = "no key document was kept for this step (recorded before replay existed): the environment is replayed empty"
    result = run_step(
        _manifest_of(step, keys), inputs=bindings, parameters=step.parameters, parameters_resolved=True, output_dir=folder / "outputs",
        run_id=f"replay-{replay_id}", step_id=step.id, client=client, image=image, on_log=on_log, work_dir=folder / "work",
    )
    item["usage"] = result.usage.as_dict() if result.usage else None
    if not result.ok:
        assert result.failure is not None
        item["status"], item["failure"] = "failed", f"{result.failure.kind}: {result.failure.message}"
        return item
    replayed = {o.name: o for o in result.outputs}
    for rec in step.outputs:
        out = replayed.get(rec.name)
        verdict: dict[str, Any] = {"output": rec.name, "recorded_sha256": rec.sha256, "replayed_sha256": out.sha256 if out else None}
        verdict["verdict"] = "reproduced" if out is not None and out.sha256 == rec.sha256 else "differs"
        if verdict["verdict"] == "differs" and out is not None and out.path is not None and rec.format == "parquet":
            try:
                verdict["parquet"] = compare_parquet(_recorded_copy(store, rec.uri, folder, rec.name), out.path)
            except Exception as exc:  # the verdict stands; only its detail is missing
                verdict["parquet"] = {"error": f"could not compare: {exc}"}
        item["outputs"].append(verdict)
    item["status"] = "reproduced" if all(v["verdict"] == "reproduced" for v in item["outputs"]) else "differs"
    return item


def replay(store: Store, client: docker.DockerClient, run_id: str, steps: tuple[str, ...] = (), *, all_steps: bool = False, on_log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Replay ``steps`` (or every step that ran, with ``all_steps``) of ``run_id``; record and return the replay."""
    doc = read_document(store, run_id)
    chosen = select_steps(doc.steps, steps, all_steps)
    replay_id = f"{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S%fZ')}-{uuid.uuid4().hex[:6]}"  # sorts by time to the microsecond
    record: dict[str, Any] = {"replay_id": replay_id, "run_id": run_id, "at": datetime.now(timezone.utc).isoformat(), "engine": None, "steps": []}
    try:
        info = client.info()
        record["engine"] = {"name": str(info.get("Name", "")), "id": str(info.get("ID", ""))}
    except Exception as exc:  # the verdicts matter more than naming the engine
        log.warning("could not ask the engine who it is: %s", exc)
    scratch = Path(tempfile.mkdtemp(prefix="algodock-replay-"))
    try:
        for step in chosen:
            if step.status not in REPLAYABLE:
                record["steps"].append({"step": step.id, "status": "not_replayable", "failure": f"the step {step.status}; only a step that succeeded (or was cached) has outputs to reproduce", "outputs": []})
                continue
            record["steps"].append(replay_step(store, client, run_id, step, scratch, replay_id=replay_id, on_log=on_log))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    record["finished_at"] = datetime.now(timezone.utc).isoformat()
    record["reproduced"] = bool(record["steps"]) and all(s["status"] == "reproduced" for s in record["steps"])
    store.write_json(replays_rel(run_id, replay_id), record)
    return record


def render(record: dict[str, Any]) -> str:
    """The text of ``algodock replay``."""
    lines = [f"replay {record['replay_id']} of run {record['run_id']} on engine {(record.get('engine') or {}).get('name', '?')}"]
    for s in record["steps"]:
        lines.append(f"  {s['step']}: {s['status']}" + (f" ({s['failure']})" if s.get("failure") else ""))
        for v in s["outputs"]:
            lines.append(f"    {v['output']}: {v['verdict']}  recorded {v['recorded_sha256'][:12]}  replayed {(v['replayed_sha256'] or '-')[:12]}")
            pq_diff = v.get("parquet")
            if pq_diff and "rows" in pq_diff:
                lines.append(
                    f"      rows {pq_diff['rows']['recorded']} -> {pq_diff['rows']['replayed']}; columns that differ: {', '.join(pq_diff['columns']) or 'none'}; "
                    f"first differing row: {pq_diff['first_differing_row']}" + (f"; schema: {pq_diff['schema']}" if pq_diff["schema"] else "")
                )
    lines.append("every replayed output reproduced" if record["reproduced"] else "NOT every replayed output reproduced")
    return "\n".join(lines)


__all__ = ["compare_parquet", "list_replays", "render", "replay", "replay_step", "replays_rel", "select_steps"]
