"""Prefect blocks against the Prefect test harness (a real API)."""

from __future__ import annotations

import os


import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.prefect


def test_algorithm_block_round_trip_and_pipeline_reference(tmp_path, prefect_harness):
    from algodock.pipeline import build_pipeline
    from algodock.blocks import AlgorithmBlock, manifest_from_block

    AlgorithmBlock.from_manifest_file(REPO / "examples/device-visits/manifest.json").save("device-visits-test", overwrite=True)
    m = manifest_from_block("device-visits-test")
    assert m.name == "device-visits" and m.container_parameters.image == "algodock/device-visits:1.0.0"
    p = build_pipeline(
        {"pipeline_version": "0.1", "name": "b", "inputs": {"pings": str(tmp_path)},
         "steps": [{"id": "visits", "block": "device-visits-test", "inputs": {"pings": "inputs.pings"}, "parameters": {"look_back_time": 60}}]},
        resolve_block=manifest_from_block,
    )
    assert p.parameters["visits"]["look_back_time"] == 60 and p.parameters["visits"]["radius_m"] == 100


def test_algorithm_block_with_a_bad_manifest_fails_before_save(prefect_harness):
    from pydantic import ValidationError

    from algodock.blocks import AlgorithmBlock

    with pytest.raises(ValidationError) as exc:
        AlgorithmBlock(manifest={"manifest_version": "0.1", "name": "x", "version": "1", "container_parameters": {"image": "a:1"}})
    assert "container_parameters.command: required field is missing" in str(exc.value)
    with pytest.raises(ValidationError):
        AlgorithmBlock(manifest="not a manifest")


def test_a_saved_bad_manifest_names_the_block(prefect_harness):
    """A document saved by hand (or by an older algodock) that is not a manifest fails at load, naming the block."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import BlockDocumentCreate

    from algodock.errors import InvalidManifest
    from algodock.blocks import AlgorithmBlock, manifest_from_block

    AlgorithmBlock.register_type_and_schema()
    with get_client(sync_client=True) as client:
        block_type = client.read_block_type_by_slug("algodock-algorithm")
        schema = client.get_most_recent_block_schema_for_block_type(block_type.id)
        client.create_block_document(BlockDocumentCreate(
            name="broken-test", block_type_id=block_type.id, block_schema_id=schema.id,
            data={"manifest": {"manifest_version": "0.1", "name": "x", "version": "1", "container_parameters": {"image": "a:1"}}},
        ))
    with pytest.raises(InvalidManifest) as exc:
        manifest_from_block("broken-test")
    assert "block broken-test" in str(exc.value) and "command" in str(exc.value)


def test_store_block_takes_s3_credentials_from_an_aws_credentials_block(prefect_harness, s3_endpoint):
    import boto3
    from prefect_aws import AwsCredentials

    from algodock.blocks import StoreBlock, resolve_store

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="blocks")
    AwsCredentials(aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1",
                   aws_client_parameters={"endpoint_url": s3_endpoint}).save("lake-creds-test", overwrite=True)
    StoreBlock(uri="s3://blocks/algodock", credentials=AwsCredentials.load("lake-creds-test")).save("lake-test", overwrite=True)
    block = StoreBlock.load("lake-test")
    assert "testing" not in repr(block.credentials.aws_secret_access_key)  # a SecretStr
    assert block.s3_options()["client_kwargs"]["endpoint_url"] == s3_endpoint
    for store in (block.open(), resolve_store("algodock-store/lake-test"), resolve_store(block)):
        store.write_json("probe.json", {"ok": True})
        assert store.read_json("probe.json") == {"ok": True}
        assert store.uri("probe.json") == "s3://blocks/algodock/probe.json"


def test_engine_block_by_name_reaches_the_engine(prefect_harness):
    from prefect_docker import DockerHost

    from algodock.runtime.engine import docker_client as connect
    from algodock.errors import InfrastructureError, InvalidInput
    from algodock.blocks import resolve_engine

    docker_client = connect()
    base_url = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    DockerHost(base_url=base_url).save("engine-test", overwrite=True)
    client = resolve_engine("docker-host/engine-test")
    assert client.ping() and client.info()["ID"] == docker_client.info()["ID"]
    DockerHost(base_url="tcp://127.0.0.1:1").save("nowhere-test", overwrite=True)
    with pytest.raises(InfrastructureError, match="tcp://127.0.0.1:1"):
        resolve_engine("docker-host/nowhere-test")
    with pytest.raises(InvalidInput, match="no-such-engine"):
        resolve_engine("docker-host/no-such-engine")


def test_blocks_register_with_prefect_cli(prefect_harness):
    import os
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    proc = subprocess.run([sys.executable, "-m", "prefect", "block", "register", "-m", "algodock.blocks"], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "algodock Algorithm" in proc.stdout and "algodock Store" in proc.stdout
