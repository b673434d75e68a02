"""Pipelines on images from a real private registry, through `algodock run` and Prefect:
DockerRegistryCredentials blocks (by name, and on an AlgorithmBlock), the lineage's repo
digests, one pull for a fan-out, refused credentials not retried, and the password written
nowhere (stdout, stderr, logs, the store's files, OpenLineage events, Prefect's logs,
artifacts and flow-run parameters)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, build_image, write_manifest
from tests.registry import Registry, remove_local

pytestmark = pytest.mark.docker

FANOUT = 4


def _prefect_texts(flow_run_id: str) -> list[str]:
    """Everything Prefect keeps of a flow run: its parameters, its logs, its artifacts."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        texts = [json.dumps(client.read_flow_run(flow_run_id).parameters, default=str)]
        offset = 0
        while True:
            page = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200, offset=offset)
            texts += [log.message for log in page]
            offset += len(page)
            if len(page) < 200:
                break
        texts += [json.dumps(a.model_dump(mode="json"), default=str) for a in client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))]
    return texts


def _files_holding(folder: Path, secret: str) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def test_a_pipeline_pulls_with_credentials_blocks_and_never_writes_the_password(registry: Registry, docker_client: Any, busybox_image: str, prefect_harness: Any, tmp_path: Path) -> None:
    from prefect.settings import PREFECT_API_URL
    from prefect_docker import DockerRegistryCredentials

    from algodock.blocks import AlgorithmBlock
    from algodock.contract.manifest import load_manifest

    tag = uuid.uuid4().hex[:8]
    name = f"algo/fanout-{tag}"
    local = f"algodock-test/fanout-{tag}:1"
    image_id = build_image(docker_client, local, f"FROM {busybox_image}\nCOPY unique /unique\n", {"unique": tag.encode() * 1000})  # a layer of its own
    digest = registry.push(docker_client, image_id, name, "1")
    ref = f"{registry.host}/{name}:1"
    remove_local(docker_client, local, ref, f"{registry.host}/{name}@{digest}")
    good, bad = f"team-{tag}", f"stale-{tag}"
    wrong_password = f"wrong-{uuid.uuid4().hex}"
    DockerRegistryCredentials(username="algoteam", password=registry.password, registry_url=f"http://{registry.host}").save(good)
    DockerRegistryCredentials(username="algoteam", password=wrong_password, registry_url=registry.host).save(bad)

    write_manifest(tmp_path / "algo.json", image=ref, command=["sh", "-c", "echo ran"], name="algo",
                   container={"resource_request": {"cpu_millicore": 100, "memory_gb": 0.1}})
    AlgorithmBlock(manifest=load_manifest(tmp_path / "algo.json"), registry_credentials=DockerRegistryCredentials.load(good)).save(f"algo-{tag}")
    steps = "".join(f"  - {{id: s{i}, manifest: algo.json}}\n" for i in range(FANOUT))
    (tmp_path / "p.yaml").write_text(f'pipeline_version: "0.1"\nname: fanout\nsteps:\n{steps}  - {{id: by_block, block: algo-{tag}, pull_policy: always}}\n')
    events = tmp_path / "events.jsonl"
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "OPENLINEAGE__TRANSPORT__TYPE": "file",
           "OPENLINEAGE__TRANSPORT__LOG_FILE_PATH": str(events), "OPENLINEAGE__TRANSPORT__APPEND": "true"}

    def run(run_id: str, *flags: str) -> tuple[subprocess.CompletedProcess, dict]:
        cmd = [sys.executable, "-m", "algodock.cli", "run", str(tmp_path / "p.yaml"), "--store", str(tmp_path / "store"),
               "--run-id", run_id, "--no-cache", "--json", *flags]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
        return proc, json.loads(proc.stdout)

    try:
        ok, summary = run("pulled", "--registry-credentials", good)
        assert ok.returncode == 0, ok.stderr[-3000:]
        lineage = json.loads((tmp_path / "store/runs/pulled/lineage.json").read_text())
        assert {s["id"]: s["repo_digest"] for s in lineage["steps"]} == {s: f"{registry.host}/{name}@{digest}" for s in [*(f"s{i}" for i in range(FANOUT)), "by_block"]}
        assert len({s["image_id"] for s in lineage["steps"]}) == 1
        fetched = [d for d, _ in registry.blob_fetches(name)]
        layers = [d for d in fetched if d != image_id]  # the image config (its id) is also read by by_block's `always` check
        assert layers and len(layers) == len(set(layers)) and fetched.count(image_id) <= 2, f"{FANOUT} steps starting together pulled more than once: {fetched}"
        logs = "".join(p.read_text() for p in (tmp_path / "store/runs/pulled").rglob("container.log"))
        assert "ran" in logs

        refused, failed = run("refused", "--registry-credentials", bad, "--pull-policy", "always")
        assert refused.returncode == 1
        by = {s["id"]: s for s in json.loads((tmp_path / "store/runs/refused/lineage.json").read_text())["steps"]}
        for i in range(FANOUT):
            failure = by[f"s{i}"]["failure"]
            assert failure["kind"] == "image_not_found" and "denied" in failure["message"] and f"credentials block {bad!r}" in failure["message"], failure
            assert by[f"s{i}"]["attempts"] == 1  # not retried
        assert by["by_block"]["status"] == "succeeded", by["by_block"]  # its algorithm block's credentials come before the run's
    finally:
        remove_local(docker_client, ref)

    for secret in (registry.password, wrong_password):
        assert secret not in ok.stdout + ok.stderr + refused.stdout + refused.stderr
        assert not _files_holding(tmp_path / "store", secret)
        assert events.exists() and secret not in events.read_text()
        for flow_run_id in (summary["flow_run_id"], failed["flow_run_id"]):
            assert not [t for t in _prefect_texts(flow_run_id) if secret in t]


def test_a_registry_that_is_down_is_infrastructure_retried_then_reported(registry: Registry, docker_client: Any, busybox_image: str, prefect_harness: Any, tmp_path: Path, monkeypatch: Any) -> None:
    from prefect_docker import DockerRegistryCredentials

    from algodock.flows import pipeline as flows_pipeline
    from algodock.runtime.images import RegistryAuth, resolve_image

    from algodock.flows import retries

    monkeypatch.setattr(retries, "RETRY_DELAYS_SECONDS", [0.1])
    monkeypatch.setattr(retries, "RETRY_JITTER_FACTOR", 0.0)
    tag = uuid.uuid4().hex[:8]
    name = f"algo/down-{tag}"
    local = f"algodock-test/down-{tag}:1"
    digest = registry.push(docker_client, build_image(docker_client, local, f"FROM {busybox_image}\nENV UNIQUE={tag}\n"), name, "1")
    ref = f"{registry.host}/{name}:1"
    remove_local(docker_client, local)
    DockerRegistryCredentials(username="algoteam", password=registry.password, registry_url=registry.host).save(f"down-{tag}")
    resolve_image(docker_client, ref, credentials=[RegistryAuth.of(registry.host, "algoteam", registry.password, "x")])  # present locally
    write_manifest(tmp_path / "algo.json", image=ref, command=["sh", "-c", "echo ran"], name="algo",
                   container={"resource_request": {"cpu_millicore": 100, "memory_gb": 0.1}})
    (tmp_path / "p.yaml").write_text('pipeline_version: "0.1"\nname: down\nsteps:\n  - {id: a, manifest: algo.json}\n')
    registry.stop()
    try:
        state = flows_pipeline.run_pipeline(spec=str(tmp_path / "p.yaml"), store=str(tmp_path / "store"), run_id="down1", no_cache=True,
                                            registry_credentials=[f"down-{tag}"], pull_policy="always", return_state=True)
    finally:
        registry.start()
        remove_local(docker_client, ref, f"{registry.host}/{name}@{digest}")
    assert state.is_failed()
    [step] = json.loads((tmp_path / "store/runs/down1/lineage.json").read_text())["steps"]
    assert step["failure"]["kind"] == "infrastructure" and f"registry {registry.host}" in step["failure"]["message"], step["failure"]
    assert step["attempts"] == retries.INFRA_RETRIES + 1 and step["started_at"] is None  # no container started


def test_algodock_pin_then_run_with_require_digest(registry: Registry, docker_client: Any, busybox_image: str, prefect_harness: Any, tmp_path: Path) -> None:
    import yaml
    from prefect.settings import PREFECT_API_URL
    from prefect_docker import DockerRegistryCredentials

    tag = uuid.uuid4().hex[:8]
    name = f"algo/pinned-{tag}"
    local = f"algodock-test/pinned-{tag}:1"
    digest = registry.push(docker_client, build_image(docker_client, local, f"FROM {busybox_image}\nENV UNIQUE={tag}\n"), name, "1")
    ref = f"{registry.host}/{name}:1"
    remove_local(docker_client, local, ref, f"{registry.host}/{name}@{digest}")
    DockerRegistryCredentials(username="algoteam", password=registry.password, registry_url=registry.host).save(f"pin-{tag}")
    (tmp_path / "algo").mkdir()
    write_manifest(tmp_path / "algo" / "manifest.json", image=ref, command=["sh", "-c", "echo ran"], name="algo",
                   container={"resource_request": {"cpu_millicore": 100, "memory_gb": 0.1}})
    spec = tmp_path / "p.yaml"
    spec.write_text('pipeline_version: "0.1"\nname: pinned\nsteps:\n  - {id: a, manifest: algo/manifest.json}\n  - {id: b, manifest: algo/manifest.json}\n')
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "algodock.cli", *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)

    refused = cli("run", str(spec), "--require-digest", "--registry-credentials", f"pin-{tag}", "--store", str(tmp_path / "store"), "--json")
    assert refused.returncode == 1 and json.loads(refused.stdout)["status"] == "failed"
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and all(ref in e and "not pinned by digest" in e for e in errors), refused.stderr
    assert not (tmp_path / "store").exists()  # nothing ran

    frozen = tmp_path / "frozen" / "p.yaml"
    frozen.parent.mkdir()
    pinned = cli("pin", str(spec), "--output", str(frozen), "--registry-credentials", f"pin-{tag}")
    assert pinned.returncode == 0, pinned.stderr
    doc = yaml.safe_load(frozen.read_text())
    assert [s["image"] for s in doc["steps"]] == [f"{registry.host}/{name}@{digest}"] * 2
    assert registry.password not in frozen.read_text() + pinned.stdout + pinned.stderr

    try:
        ran = cli("run", str(frozen), "--require-digest", "--registry-credentials", f"pin-{tag}", "--store", str(tmp_path / "store"), "--run-id", "frozen", "--json")
        assert ran.returncode == 0, ran.stderr[-3000:]
        steps = json.loads((tmp_path / "store/runs/frozen/lineage.json").read_text())["steps"]
        assert {s["image"] for s in steps} == {s["repo_digest"] for s in steps} == {f"{registry.host}/{name}@{digest}"}
    finally:
        remove_local(docker_client, f"{registry.host}/{name}@{digest}")
