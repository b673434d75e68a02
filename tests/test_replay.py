"""`algodock replay`: recorded steps run again exactly as recorded (real Docker engine); a
deterministic step reproduces, a non-deterministic parquet step names the differing column."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from algodock.store.backends import lineage_rel, open_store
from tests.lineage_support import STABLE, build_versioned, manifest, run_local, sh, write_table

pytestmark = pytest.mark.docker

PY_IMAGE = "algodock/dwell-stats:1.0.0"
"""An example image with python3 and pyarrow (built by `make images`)."""
_SCRIPT = Path(sys.executable).parent / "algodock"
ALGODOCK = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "algodock.cli"]
NOISY = (
    "import os, random, pyarrow as pa, pyarrow.parquet as pq\n"
    "t = pq.read_table('/work/input/raw')\n"
    "n = t.num_rows\n"
    "noise = [float(i) if i < 2 else random.random() for i in range(n)]\n"
    "pq.write_table(t.append_column('noise', pa.array(noise, pa.float64())), '/work/output/table.parquet')\n"
)


@pytest.fixture
def recorded(tmp_path, docker_client, busybox_image):
    build_versioned(docker_client, STABLE, "stable")
    docker_client.images.get(PY_IMAGE)  # `make images` builds it
    folder = tmp_path / "p"
    folder.mkdir()
    write_table(folder / "raw.parquet", list(range(6)))
    parquet_in = [{"name": "raw", "format": "parquet"}]
    manifest(folder / "copy.json", name="copy", image=STABLE, command=sh("cp /work/input/raw/* /work/output/table.parquet"), inputs=parquet_in,
             outputs=[{"name": "table", "format": "parquet"}], env={"MODE": "exact"})
    manifest(folder / "noisy.json", name="noisy", image=PY_IMAGE, command=["python3", "-c", NOISY], inputs=parquet_in, outputs=[{"name": "table", "format": "parquet"}])
    spec = folder / "pipeline.json"
    spec.write_text(json.dumps({
        "pipeline_version": "0.1", "name": "replayed", "inputs": {"raw": "raw.parquet"},
        "steps": [{"id": "copy", "manifest": "copy.json", "inputs": {"raw": "inputs.raw"}},
                  {"id": "noisy", "manifest": "noisy.json", "inputs": {"raw": "copy.table"}}],
    }))
    store = open_store(str(tmp_path / "store"))
    doc = run_local(spec, store, "rec", docker_client)
    assert doc.status == "succeeded", [(s.id, s.failure) for s in doc.steps]
    return store, folder


def _replay(store, *args: str) -> tuple[int, dict, str]:
    proc = subprocess.run([*ALGODOCK, "replay", "rec", *args, "--store", store.uri(), "--json"], capture_output=True, text=True, timeout=300)
    return proc.returncode, (json.loads(proc.stdout) if proc.stdout.strip() else {}), proc.stderr


def test_a_deterministic_step_reproduces_and_a_noisy_one_names_its_column(recorded) -> None:
    store, _ = recorded
    before = {f.rel: f.size for f in store.walk("runs/rec/steps")}
    rc, record, err = _replay(store, "copy")
    assert rc == 0, err[-3000:]
    [copy] = record["steps"]
    assert copy["status"] == "reproduced" and copy["outputs"][0]["verdict"] == "reproduced"
    assert copy["outputs"][0]["replayed_sha256"] == copy["outputs"][0]["recorded_sha256"]
    rc, record, err = _replay(store, "--all")
    assert rc == 1, err[-3000:]
    verdicts = {s["step"]: s for s in record["steps"]}
    assert verdicts["copy"]["status"] == "reproduced" and verdicts["noisy"]["status"] == "differs"
    detail = verdicts["noisy"]["outputs"][0]["parquet"]
    assert detail == {"rows": {"recorded": 6, "replayed": 6}, "schema": [], "columns": ["noise"], "first_differing_row": 2}
    assert {f.rel: f.size for f in store.walk("runs/rec/steps")} == before, "a replay wrote over the recorded outputs"
    names = store.list("runs/rec/replays")
    assert len(names) == 2
    assert names == sorted(names, key=lambda n: store.read_json(f"runs/rec/replays/{n}")["at"]), "replay ids do not sort by time"
    kept = store.read_json(f"runs/rec/replays/{names[-1]}")
    assert kept["reproduced"] is False and kept["engine"]["id"] and kept["steps"][1]["usage"]["wall_seconds"] is not None
    shown = subprocess.run([*ALGODOCK, "lineage", "rec", "--store", store.uri()], capture_output=True, text=True, timeout=120)
    assert "copy reproduced, noisy differs" in shown.stdout, shown.stdout[-2000:]


def test_replay_refuses_a_missing_image_and_a_changed_input_naming_them(recorded) -> None:
    store, folder = recorded
    doc = store.read_json(lineage_rel("rec"))
    real_id = doc["steps"][0]["image_id"]
    doc["steps"][0]["image_id"] = "sha256:" + "0" * 64
    store.write_json(lineage_rel("rec"), doc)
    rc, record, err = _replay(store, "copy")
    assert rc == 1 and record["steps"][0]["status"] == "refused"
    assert "sha256:" + "0" * 64 in record["steps"][0]["failure"] and "no repo_digest" in record["steps"][0]["failure"]
    doc["steps"][0]["image_id"] = real_id
    store.write_json(lineage_rel("rec"), doc)
    write_table(folder / "raw.parquet", [9, 9])  # the external input changed after the run
    rc, record, err = _replay(store, "noisy", "copy")
    by_step = {s["step"]: s for s in record["steps"]}
    assert rc == 1 and by_step["copy"]["status"] == "refused" and "raw.parquet" in by_step["copy"]["failure"] and "recorded" in by_step["copy"]["failure"]


def test_replay_bad_input(recorded) -> None:
    store, _ = recorded
    for args, named in (((), "--all"), (("nope",), "nope")):
        rc, _, err = _replay(store, *args)
        assert rc == 2 and named in err
    proc = subprocess.run([*ALGODOCK, "replay", "missing-run", "--all", "--store", store.uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "missing-run" in proc.stderr
