"""Algorithm tasks in a user's own flow on images from a real private registry (tests/registry.py),
against the session's Prefect server: credentials blocks given to ``algodock_run`` and carried
by an ``AlgorithmBlock``, a step's own pull policy, refused credentials not retried, the digest
policy refused at submit, and the password written nowhere (the store's files, OpenLineage
events, Prefect's logs, artifacts and flow-run parameters, the error raised)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import build_image, write_manifest
from tests.registry import Registry, remove_local
from tests.test_registry_flow import _files_holding, _prefect_texts

pytestmark = [pytest.mark.docker, pytest.mark.prefect]


def _push_unique(registry: Registry, docker_client: Any, busybox_image: str, kind: str) -> tuple[str, str, str]:
    """An image of its own pushed to the registry and absent locally: ``(name, tag ref, digest)``."""
    tag = uuid.uuid4().hex[:8]
    name = f"algo/{kind}-{tag}"
    local = f"algodock-test/{kind}-{tag}:1"
    digest = registry.push(docker_client, build_image(docker_client, local, f"FROM {busybox_image}\nENV UNIQUE={tag}\n"), name, "1")
    ref = f"{registry.host}/{name}:1"
    remove_local(docker_client, local, ref, f"{registry.host}/{name}@{digest}")
    return name, ref, digest


def _manifest(path: Path, image: str) -> Path:
    return write_manifest(path, image=image, command=["sh", "-c", "echo ran"], name="algo",
                          container={"resource_request": {"cpu_millicore": 100, "memory_gb": 0.1}})


def _steps(store: Path, run_id: str) -> dict[str, dict]:
    return {s["id"]: s for s in json.loads((store / "runs" / run_id / "lineage.json").read_text())["steps"]}


def test_a_user_flow_pulls_with_credentials_blocks_and_never_writes_the_password(registry: Registry, docker_client: Any, busybox_image: str, prefect_harness: Any, tmp_path: Path, monkeypatch: Any) -> None:
    from prefect import flow
    from prefect.runtime import flow_run
    from prefect_docker import DockerRegistryCredentials

    from algodock.blocks import AlgorithmBlock
    from algodock.contract.manifest import load_manifest
    from algodock.flows import AlgorithmFailed, StepResult, algodock_run, algorithm

    name, ref, digest = _push_unique(registry, docker_client, busybox_image, "compose")
    pinned = f"{registry.host}/{name}@{digest}"
    tag = name.rsplit("-", 1)[1]
    good, bad = f"team-{tag}", f"stale-{tag}"
    wrong_password = f"wrong-{uuid.uuid4().hex}"
    DockerRegistryCredentials(username="algoteam", password=registry.password, registry_url=f"http://{registry.host}").save(good)
    DockerRegistryCredentials(username="algoteam", password=wrong_password, registry_url=registry.host).save(bad)
    manifest = _manifest(tmp_path / "algo.json", ref)
    AlgorithmBlock(manifest=load_manifest(manifest), registry_credentials=DockerRegistryCredentials.load(good)).save(f"algo-{tag}")
    events = tmp_path / "events.jsonl"
    monkeypatch.setenv("OPENLINEAGE__TRANSPORT__TYPE", "file")
    monkeypatch.setenv("OPENLINEAGE__TRANSPORT__LOG_FILE_PATH", str(events))
    monkeypatch.setenv("OPENLINEAGE__TRANSPORT__APPEND", "true")
    store = tmp_path / "store"
    algo = algorithm(manifest)

    @flow
    def pulled(credentials: str) -> tuple[StepResult, str]:
        with algodock_run(store=str(store), run_id="pulled", cache=False, registry_credentials=[credentials]):
            return algo.submit(inputs={}).result(), str(flow_run.id)

    @flow
    def refused(credentials: str) -> tuple[dict[str, Any], AlgorithmFailed, str]:
        with algodock_run(store=str(store), run_id="refused", cache=False, registry_credentials=credentials):
            local = algo.submit(inputs={}, step_id="local")  # the run's policy: the local copy, no registry
            always = algo.with_options(pull_policy="always").submit(inputs={}, step_id="always")  # asks the registry: refused
            by_block = algorithm(f"algo-{tag}", pull_policy="always").submit(inputs={}, step_id="by_block")  # its block's credentials first
            with pytest.raises(AlgorithmFailed) as failed:
                always.result()
            return {"local": local.result(), "by_block": by_block.result()}, failed.value, str(flow_run.id)

    try:
        result, first_run = pulled(good)
        assert result.status == "succeeded" and result.repo_digest == pinned
        assert _steps(store, "pulled")["algo"]["repo_digest"] == pinned
        assert [d for d, _ in registry.blob_fetches(name)], "the image did not come from the registry"

        ok, failure, second_run = refused(bad)
        assert {k: (r.status, r.repo_digest) for k, r in ok.items()} == {"local": ("succeeded", pinned), "by_block": ("succeeded", pinned)}
        assert failure.kind == "image_not_found" and failure.step_id == "always", failure
        assert "denied" in failure.message and f"credentials block {bad!r}" in failure.message, failure.message
        steps = _steps(store, "refused")
        assert steps["always"]["failure"]["kind"] == "image_not_found" and steps["always"]["attempts"] == 1  # not retried
        assert steps["always"]["started_at"] is None  # no container
    finally:
        remove_local(docker_client, ref, pinned)

    for secret in (registry.password, wrong_password):
        assert secret not in str(failure)
        assert not _files_holding(store, secret)
        assert events.exists() and secret not in events.read_text()
        for flow_run_id in (first_run, second_run):
            assert not [t for t in _prefect_texts(flow_run_id) if secret in t]


def test_require_digest_refuses_a_tag_at_submit_and_runs_a_pinned_image(registry: Registry, docker_client: Any, busybox_image: str, prefect_harness: Any, tmp_path: Path) -> None:
    from prefect import flow
    from prefect_docker import DockerRegistryCredentials

    from algodock.errors import InvalidInput
    from algodock.flows import StepResult, algodock_run, algorithm

    name, ref, digest = _push_unique(registry, docker_client, busybox_image, "digest")
    pinned = f"{registry.host}/{name}@{digest}"
    creds = f"digest-{name.rsplit('-', 1)[1]}"
    DockerRegistryCredentials(username="algoteam", password=registry.password, registry_url=registry.host).save(creds)
    by_tag = algorithm(_manifest(tmp_path / "tag.json", ref), name="by-tag")
    by_digest = algorithm(_manifest(tmp_path / "digest.json", pinned), name="by-digest")
    store = tmp_path / "store"

    @flow
    def policed() -> tuple[str, StepResult]:
        with algodock_run(store=str(store), run_id="policed", cache=False, registry_credentials=[creds], require_digest=True):
            with pytest.raises(ValueError) as refused:
                by_tag.submit(inputs={})
            return str(refused.value), by_digest.submit(inputs={}).result()

    try:
        message, result = policed()
    finally:
        remove_local(docker_client, pinned)
    assert "step by-tag" in message and repr(ref) in message and "not pinned by digest" in message, message
    assert result.repo_digest == pinned
    assert list(_steps(store, "policed")) == ["by-digest"]  # the refused call made no step

    @flow
    def unknown_block() -> None:
        with algodock_run(store=str(tmp_path / "never"), registry_credentials=[f"no-such-{uuid.uuid4().hex[:8]}"]):
            by_digest.submit(inputs={})

    with pytest.raises(InvalidInput, match="no-such-"):
        unknown_block()
    assert not (tmp_path / "never").exists()  # refused at entry: nothing opened
    with pytest.raises(ValueError, match="pull_policy 'sometimes'"):
        algorithm(tmp_path / "tag.json", pull_policy="sometimes")
