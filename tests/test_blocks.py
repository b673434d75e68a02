"""Prefect blocks against the Prefect test harness (a real API)."""

from __future__ import annotations


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


def test_algorithm_block_with_a_bad_manifest_names_the_block(prefect_harness):
    from algodock.errors import InvalidManifest
    from algodock.blocks import AlgorithmBlock, manifest_from_block

    AlgorithmBlock(manifest={"manifest_version": "0.1", "name": "x", "version": "1", "container_parameters": {"image": "a:1"}}).save("broken-test", overwrite=True)
    with pytest.raises(InvalidManifest) as exc:
        manifest_from_block("broken-test")
    assert "block broken-test: container_parameters.command: required field is missing" in str(exc.value)


def test_store_block_opens_s3_with_secret_credentials(prefect_harness, s3_endpoint):
    import boto3

    from algodock.blocks import StoreBlock

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="blocks")
    StoreBlock(uri="s3://blocks/algodock", endpoint_url=s3_endpoint, region_name="us-east-1",
               aws_access_key_id="testing", aws_secret_access_key="testing").save("lake-test", overwrite=True)
    block = StoreBlock.load("lake-test")
    assert "testing" not in repr(block.aws_secret_access_key)  # a SecretStr
    store = block.open()
    store.write_json("probe.json", {"ok": True})
    assert store.read_json("probe.json") == {"ok": True}
    assert store.uri("probe.json") == "s3://blocks/algodock/probe.json"


def test_blocks_register_with_prefect_cli(prefect_harness):
    import os
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    proc = subprocess.run([sys.executable, "-m", "prefect", "block", "register", "-m", "algodock.blocks"], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "algodock Algorithm" in proc.stdout and "algodock Store" in proc.stdout
