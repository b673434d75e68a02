"""The image policy of a pipeline spec, checked at validation (pure: no engine, no registry)."""

from __future__ import annotations

from pathlib import Path

import pytest

from algodock.errors import InvalidManifest
from algodock.pipeline import load_pipeline
from algodock.pipeline.spec import spec_sha256, parse_spec
from algodock.runtime.images import canonical_repository, is_pinned, registry_of
from tests.conftest import write_manifest

DIGEST = "sha256:" + "ab" * 32
REG = "registry.example.com:5000"


def _spec(tmp_path: Path, body: str, *, image: str = f"{REG}/team/algo:1") -> Path:
    write_manifest(tmp_path / "algo.json", image=image, command=["true"], name="algo")
    write_manifest(tmp_path / "hub.json", image="team/other:2", command=["true"], name="other")
    path = tmp_path / "p.yaml"
    path.write_text('pipeline_version: "0.1"\nname: p\n' + body)
    return path


def test_require_digest_refuses_each_unpinned_step_once_naming_it_and_its_image(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "steps:\n  - {id: a, manifest: algo.json}\n  - {id: b, manifest: hub.json}\n"
                            f"  - {{id: c, manifest: algo.json, image: '{REG}/team/algo@{DIGEST}'}}\n")
    load_pipeline(spec)  # no policy: fine
    with pytest.raises(InvalidManifest) as exc:
        load_pipeline(spec, require_digest=True)
    errors = exc.value.errors
    assert len(errors) == 2, errors
    assert "step a: image" in errors[0] and f"{REG}/team/algo:1" in errors[0] and "not pinned by digest" in errors[0]
    assert "step b: image" in errors[1] and "team/other:2" in errors[1]
    assert str(spec) in errors[0]


def test_the_spec_policy_refuses_unpinned_images_and_other_registries(tmp_path: Path) -> None:
    spec = _spec(tmp_path, f"policy: {{require_digest: true, allowed_registries: ['{REG}']}}\n"
                            "steps:\n  - {id: a, manifest: algo.json}\n"
                            f"  - {{id: b, manifest: algo.json, image: '{REG}/team/algo@{DIGEST}'}}\n"
                            "  - {id: c, manifest: hub.json}\n")
    with pytest.raises(InvalidManifest) as exc:
        load_pipeline(spec)
    errors = exc.value.errors
    assert [e.split(": ")[1] for e in errors] == ["step a", "step c"], errors
    assert "not pinned" in errors[1] and "docker.io is not in policy.allowed_registries" in errors[1]


def test_a_pinned_step_runs_its_digest_and_may_only_pin_its_own_repository(tmp_path: Path) -> None:
    pinned = f"{REG}/team/algo@{DIGEST}"
    spec = _spec(tmp_path, f"steps:\n  - {{id: a, manifest: algo.json, image: '{pinned}', pull_policy: always}}\n")
    pipeline = load_pipeline(spec, require_digest=True)
    assert pipeline.steps["a"].manifest.container_parameters.image == pinned
    assert pipeline.pull_policies == {"a": "always"}
    for image, why in ((f"{REG}/team/evil@{DIGEST}", "not the manifest's repository"), (f"{REG}/team/algo:2", "not pinned by digest"),
                       (f"other.example.com/team/algo@{DIGEST}", "not the manifest's repository")):
        bad = _spec(tmp_path, f"steps:\n  - {{id: a, manifest: algo.json, image: '{image}'}}\n")
        with pytest.raises(InvalidManifest) as exc:
            load_pipeline(bad)
        assert "step a: image" in str(exc.value) and why in str(exc.value)


def test_a_bad_pull_policy_names_the_step(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "steps:\n  - {id: a, manifest: algo.json, pull_policy: sometimes}\n")
    with pytest.raises(InvalidManifest) as exc:
        load_pipeline(spec)
    assert "step a: pull_policy" in str(exc.value)


def test_the_new_fields_leave_the_hash_of_a_spec_that_does_not_use_them() -> None:
    doc = {"pipeline_version": "0.1", "name": "p", "steps": [{"id": "a", "manifest": "m.json"}]}
    plain = spec_sha256(parse_spec(doc, "x"))
    assert plain == "0243201d7679b890c0b9d1e92fe6173286f77fc10ef1bd19832052f2caa095c6"  # as before pull_policy, image and policy existed
    assert spec_sha256(parse_spec({**doc, "steps": [{"id": "a", "manifest": "m.json", "pull_policy": "always"}]}, "x")) != plain


def test_references() -> None:
    assert registry_of("localhost:5000/a:1") == "localhost:5000" and registry_of("localhost/a") == "localhost"
    assert canonical_repository("docker.io/library/busybox:1") == canonical_repository("busybox") == "busybox"
    assert not is_pinned("a@sha256:abc") and is_pinned(f"a/b@{DIGEST}")


def test_cluster_workers_get_the_runs_pull_policy_and_credentials(tmp_path: Path) -> None:
    """A spec step sent to a Dask worker carries, in its call's ticket, the run's pull policy and
    credentials and its own pull policy (the worker resolves its image as the run's host would)."""
    import cloudpickle  # what Dask sends a task's arguments with

    from algodock.flows.compose import algorithm
    from algodock.flows.runs import open_spec_run
    from algodock.pipeline.capacity import Capacity
    from algodock.runtime.images import RegistryAuth
    from algodock.store.backends import open_store

    pipeline = load_pipeline(_spec(tmp_path, "steps:\n  - {id: a, manifest: algo.json, pull_policy: never}\n"))
    auth = RegistryAuth.of(REG, "ci", "s3cret-pw", "credentials block 'team'")
    run = open_spec_run(pipeline, open_store(str(tmp_path / "store")), "r1", None, Capacity(cpu_millicore=1000, memory_gb=1), use_cache=True,
                        flow_run_id=None, pull_policy="always", registry_credentials=(auth,), step_credentials={}, concurrency_limit=None,
                        runner=None, watch=None)
    try:
        call = algorithm(pipeline.steps["a"].manifest, name="a")._call(run, {}, None, "a")
    finally:
        run.close()
    ticket = cloudpickle.loads(cloudpickle.dumps(call["ticket"]))
    assert (ticket.run_pull_policy, ticket.pull_policy) == ("always", "never")
    [carried] = ticket.registry_credentials
    assert carried.password.get_secret_value() == "s3cret-pw" and "s3cret-pw" not in repr(carried)
