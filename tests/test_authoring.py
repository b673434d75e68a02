"""The author's kit: init -> build -> check-image passes; hostile images fail exactly their rule."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from algodock.authoring import check_image, init_project
from algodock.authoring.check_image import MOVED_DESCRIPTOR, Report
from algodock.errors import InvalidInput
from tests.conftest import BUSYBOX_IMAGE, REPO, build_image, write_manifest

pytestmark = pytest.mark.docker

RULES = ["manifest", "image", "user", "exit", "outputs", "schema", "input_path", "determinism", "resources", "lint"]

# One script, one mode per broken rule (argv[1]); every mode but its own keeps the other rules.
HOSTILE = b"""
import json, os, sys
mode = sys.argv[1]
path = "/work/algo_input.json" if mode == "hardcoded" else os.environ["ALGORITHM_INPUT_PATH"]
with open(path) as fh:
    d = json.load(fh)
if mode == "oom":
    hog = b"x" * (400 << 20)
if mode == "missing":
    sys.exit(0)
data = os.urandom(16).hex() if mode == "random" else json.dumps(d["config"]["parameters"], sort_keys=True)
with open(os.path.join(d["output_path"], "result.json"), "w") as fh:
    fh.write(data)
"""


def _base(client: Any) -> str:
    path = REPO / ".build" / "base-image"
    name = path.read_text().strip() if path.exists() else "python:3.11-slim"
    client.images.get(name)
    return name


@pytest.fixture(scope="module")
def hostile_images(docker_client: Any) -> dict[str, str]:
    """Built once: the script as uid 1000, and the same with no USER (root)."""
    base = _base(docker_client)
    files = {"algo.py": HOSTILE}
    return {
        "user": build_image(docker_client, "algodock-test/hostile:1", f"FROM {base}\nCOPY algo.py /app/algo.py\nUSER 1000:1000\n", files),
        "root": build_image(docker_client, "algodock-test/hostile-root:1", f"FROM {base}\nCOPY algo.py /app/algo.py\n", files),
    }


def _manifest(tmp_path: Path, mode: str, *, image: str = "algodock-test/hostile:1", memory_gb: float = 0.25) -> Path:
    return write_manifest(
        tmp_path / "manifest.json",
        image=image,
        command=["python3", "/app/algo.py", mode],
        name="hostile",
        container={"resource_request": {"cpu_millicore": 1000, "memory_gb": memory_gb}, "timeout_seconds": 60},
        parameters={"type": "object", "properties": {"n": {"type": "integer", "default": 3}}},
        outputs=[{"name": "result", "format": "json", "required": True}],
    )


def _statuses(report: Report) -> dict[str, str]:
    return {c.id: c.status for c in report.checks}


def _only(report: Report, rule: str, status: str) -> None:
    statuses = _statuses(report)
    assert statuses[rule] == status, report.as_dict()
    others = {k: v for k, v in statuses.items() if k != rule and v == "fail"}
    assert not others, f"only {rule} may fail: {report.as_dict()}"


def test_init_build_check_image_passes(docker_client: Any, tmp_path: Path) -> None:
    dest = init_project("algodock-test-init", tmp_path / "proj")
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["container_parameters"]["image"] == "algodock-test-init:0.1.0"
    assert (dest / "sample" / "table" / "part-000.parquet").is_file() and any((dest / ".wheels").iterdir())
    assert "USER 1000:1000" in (dest / "Dockerfile").read_text()
    image, _ = docker_client.images.build(
        path=str(dest), tag="algodock-test-init:0.1.0", buildargs={"BASE_IMAGE": _base(docker_client)}, rm=True, forcerm=True, network_mode="none"
    )
    report = check_image(dest / "manifest.json", client=docker_client)
    assert report.verdict == "pass", report.as_dict()
    assert [c.id for c in report.checks] == RULES
    assert set(_statuses(report).values()) == {"pass"}, report.as_dict()
    assert report.image_id == image.id
    assert report.usage and report.usage["peak_memory_bytes"] > 0 and report.usage["output_files"] == 2

    with pytest.raises(InvalidInput, match="already exists"):
        init_project("algodock-test-init", dest)


def test_hard_coded_descriptor_path_fails_input_path(docker_client: Any, hostile_images: dict, tmp_path: Path) -> None:
    report = check_image(_manifest(tmp_path, "hardcoded"), client=docker_client)
    _only(report, "input_path", "fail")
    assert MOVED_DESCRIPTOR in next(c.message for c in report.checks if c.id == "input_path")
    assert _statuses(report)["determinism"] == "pass"  # judged with a third, normal run
    assert report.verdict == "fail"


def test_non_determinism_is_a_warning_naming_the_output(docker_client: Any, hostile_images: dict, tmp_path: Path) -> None:
    report = check_image(_manifest(tmp_path, "random"), client=docker_client)
    _only(report, "determinism", "warn")
    assert "result" in next(c.message for c in report.checks if c.id == "determinism")
    assert {k for k, v in _statuses(report).items() if v != "pass"} == {"determinism"}
    assert report.verdict == "pass"


def test_missing_output_fails_outputs(docker_client: Any, hostile_images: dict, tmp_path: Path) -> None:
    report = check_image(_manifest(tmp_path, "missing"), client=docker_client)
    _only(report, "outputs", "fail")
    assert _statuses(report)["exit"] == "pass" and _statuses(report)["input_path"] == "pass"


def test_root_user_is_a_warning(docker_client: Any, hostile_images: dict, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        __import__("algodock.cli", fromlist=["main"]).main,
        ["check-image", str(_manifest(tmp_path, "ok", image="algodock-test/hostile-root:1")), "--json", "--param", "n=5"],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert set(doc) == {"image", "image_id", "repo_digest", "verdict", "checks", "usage"} and doc["verdict"] == "pass"
    statuses = {c["id"]: c["status"] for c in doc["checks"]}
    assert statuses.pop("user") == "warn" and set(statuses.values()) == {"pass"}, doc
    assert set(doc["usage"]) == {"peak_memory_bytes", "cpu_seconds", "wall_seconds", "output_bytes", "output_files"}


def test_memory_far_under_the_request_is_a_warning_with_the_suggested_request(docker_client: Any, hostile_images: dict, tmp_path: Path) -> None:
    report = check_image(_manifest(tmp_path, "ok", memory_gb=8), client=docker_client)
    _only(report, "resources", "warn")
    assert report.verdict == "pass"  # the sample is small, real inputs are not: never a failure
    message = next(c.message for c in report.checks if c.id == "resources")
    assert "suggested request: memory_gb 0.25" in message and "real inputs are larger" in message


def test_outputs_that_break_their_schema_fail_the_schema_rule(docker_client: Any, busybox_image: str, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "sample" / "table").mkdir(parents=True)
    pq.write_table(pa.table({"group": ["a"], "rows": pa.array([1], pa.int64())}), tmp_path / "sample" / "table" / "part-000.parquet")
    doc = {
        "manifest_version": "0.3", "name": "copier", "version": "1.0.0",
        "container_parameters": {"image": BUSYBOX_IMAGE, "command": ["/bin/sh", "-c", "cp /work/input/table/* /work/output/summary.parquet"], "timeout_seconds": 60,
                                 "resource_request": {"memory_gb": 0.25}},
        "inputs": [{"name": "table", "format": "parquet", "multiple": True}],
        "outputs": [{"name": "summary", "format": "parquet", "schema": {"columns": [{"name": "group", "type": "string"}, {"name": "rows", "type": "int32"}]}}],
    }
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    report = check_image(tmp_path / "manifest.json", client=docker_client)
    _only(report, "schema", "fail")
    message = next(c.message for c in report.checks if c.id == "schema")
    assert "output 'summary': summary.parquet: column 'rows': type int64, the schema declares int32" in message
    assert _statuses(report)["outputs"] == "pass" and _statuses(report)["exit"] == "pass"

    doc["outputs"][0]["schema"]["columns"][1]["type"] = "int64"
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    assert _statuses(check_image(tmp_path / "manifest.json", client=docker_client))["schema"] == "pass"


def test_memory_over_its_limit_fails_resources_with_the_peak(docker_client: Any, hostile_images: dict, tmp_path: Path) -> None:
    report = check_image(_manifest(tmp_path, "oom"), client=docker_client)
    _only(report, "resources", "fail")
    message = next(c.message for c in report.checks if c.id == "resources")
    assert "peak" in message and "256 MiB" in message, message


def test_missing_image_fails_image(docker_client: Any, tmp_path: Path) -> None:
    report = check_image(_manifest(tmp_path, "ok", image="sha256:" + "0" * 64), client=docker_client)
    assert _statuses(report) == {"manifest": "pass", "image": "fail"}


def test_invalid_manifest_fails_manifest(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"manifest_version": "0.1", "name": "x"}))
    report = check_image(path)
    assert _statuses(report) == {"manifest": "fail"} and "container_parameters" in report.checks[0].message


def test_lint_warns_on_entrypoint_latest_and_cache_dirs_in_the_image(docker_client: Any, hostile_images: dict, tmp_path: Path) -> None:
    build_image(
        docker_client,
        "algodock-test/hostile-lint:latest",
        'FROM algodock-test/hostile:1\nENV XDG_CACHE_HOME=/home/app/.cache\nENTRYPOINT ["/usr/bin/env"]\n',
    )
    report = check_image(_manifest(tmp_path, "ok", image="algodock-test/hostile-lint"), client=docker_client)
    _only(report, "lint", "warn")
    message = next(c.message for c in report.checks if c.id == "lint")
    assert "ENTRYPOINT" in message and "latest" in message and "XDG_CACHE_HOME" in message, message
    assert {k for k, v in _statuses(report).items() if v != "pass"} == {"lint"}


def test_no_sample_for_a_required_input_fails_before_any_run(docker_client: Any, hostile_images: dict, tmp_path: Path) -> None:
    path = _manifest(tmp_path, "ok")
    doc = json.loads(path.read_text())
    doc["inputs"] = [{"name": "table", "format": "parquet"}]
    path.write_text(json.dumps(doc))
    report = check_image(path, client=docker_client)
    assert _statuses(report)["inputs"] == "fail" and "sample/table" in report.checks[-1].message
    assert "exit" not in _statuses(report)


def test_check_image_reports_the_repo_digest_of_an_image_from_a_registry(docker_client: Any, hostile_images: dict, registry: Any, tmp_path: Path) -> None:
    import uuid

    from tests.registry import remove_local

    name = f"algo/hostile-{uuid.uuid4().hex[:8]}"
    digest = registry.push(docker_client, hostile_images["user"], name, "1")
    ref = f"{registry.host}/{name}:1"
    try:
        report = check_image(_manifest(tmp_path, "ok", image=ref), client=docker_client)
        assert report.repo_digest == f"{registry.host}/{name}@{digest}" and report.as_dict()["repo_digest"] == report.repo_digest
        assert report.verdict == "pass", report.as_dict()
        built_here = check_image(_manifest(tmp_path, "ok"), client=docker_client)
        assert built_here.repo_digest is None or built_here.repo_digest.startswith(registry.host)  # pushed once: the engine knows where it went
    finally:
        remove_local(docker_client, ref)
