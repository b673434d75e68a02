"""Images from a real private registry (tests/registry.py: Debian's docker-registry on 127.0.0.1
with htpasswd auth): credentials, pull policies, moved tags, pinned digests, a registry that
goes down, one pull for steps that start together, and no password written anywhere."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from algodock.errors import ImageNotFound, InfrastructureError, InvalidManifest, StepFailure
from algodock.runtime.images import RegistryAuth, resolve_image
from tests.conftest import build_image
from tests.registry import Registry, remove_local

pytestmark = pytest.mark.docker


class Pushed(NamedTuple):
    ref: str
    """``<registry>/<name>:<tag>``."""
    digest: str
    """What the registry serves for the tag."""
    repo: str


@pytest.fixture
def push(registry: Registry, docker_client: Any, busybox_image: str) -> Iterator[Any]:
    """``push(name, tag)``: a new image (busybox plus a unique ENV) pushed as ``name:tag``; no local copy is left."""
    made: list[str] = []

    def _push(name: str | None = None, tag: str = "1") -> Pushed:
        name = name or f"algo/{uuid.uuid4().hex[:10]}"
        local = f"algodock-test/pushed-{uuid.uuid4().hex[:10]}:1"
        image_id = build_image(docker_client, local, f"FROM {busybox_image}\nENV UNIQUE={uuid.uuid4().hex}\n")
        digest = registry.push(docker_client, image_id, name, tag)
        repo = f"{registry.host}/{name}"
        made.append(f"{repo}:{tag}")
        remove_local(docker_client, local, f"{repo}:{tag}", f"{repo}@{digest}")
        return Pushed(f"{repo}:{tag}", digest, repo)

    yield _push
    remove_local(docker_client, *made)


def creds(registry: Registry, password: str | None = None, name: str = "team") -> RegistryAuth:
    return RegistryAuth.of(f"http://{registry.host}", "algoteam", password or registry.password, f"credentials block {name!r}")


def test_credentials_pull_by_tag_and_record_the_registry_digest(registry: Registry, docker_client: Any, push: Any) -> None:
    image = push()
    lines: list[str] = []
    resolved = resolve_image(docker_client, image.ref, credentials=[creds(registry)], on_log=lines.append)
    assert resolved.repo_digest == f"{image.repo}@{image.digest}"
    assert docker_client.images.get(image.ref).id == resolved.id
    assert lines[0].startswith(f"pulling {image.ref} from {registry.host} (credentials block 'team')")
    assert lines[-1].startswith(f"pulled {image.ref}:") and image.digest in lines[-1]
    assert len(lines) <= 6, lines  # a few lines: one per layer pulled, then a total
    assert not any(registry.password in line for line in lines)
    # the local copy, without asking the registry: the same digest is recorded
    again = resolve_image(docker_client, image.ref)
    assert (again.id, again.repo_digest) == (resolved.id, resolved.repo_digest)


def test_refused_or_missing_credentials_are_image_not_found_naming_them(registry: Registry, docker_client: Any, push: Any) -> None:
    image = push()
    with pytest.raises(ImageNotFound) as refused:
        resolve_image(docker_client, image.ref, credentials=[creds(registry, password="wrong-" + uuid.uuid4().hex, name="stale")])
    assert "denied" in refused.value.message and "credentials block 'stale'" in refused.value.message and image.ref in refused.value.message
    assert not refused.value.retryable
    with pytest.raises(ImageNotFound) as none:
        resolve_image(docker_client, image.ref)
    assert "denied" in none.value.message and "no credentials" in none.value.message
    with pytest.raises(ImageNotFound) as other_registry:  # credentials for another registry are not used
        resolve_image(docker_client, image.ref, credentials=[RegistryAuth.of("registry.example.com", "u", registry.password, "credentials block 'other'")])
    assert "no credentials" in other_registry.value.message
    for exc in (refused.value, none.value, other_registry.value):
        assert registry.password not in str(exc)


def test_an_unknown_tag_is_image_not_found_naming_the_reference(registry: Registry, docker_client: Any, push: Any) -> None:
    image = push()
    missing = f"{image.repo}:no-such-tag"
    with pytest.raises(ImageNotFound) as exc:
        resolve_image(docker_client, missing, credentials=[creds(registry)])
    assert missing in exc.value.message and "no such image" in exc.value.message


def test_a_moved_tag_under_each_policy(registry: Registry, docker_client: Any, push: Any) -> None:
    first = push()
    auth = [creds(registry)]
    old = resolve_image(docker_client, first.ref, credentials=auth)
    name = first.repo.split("/", 1)[1]
    moved = push(name, "1")  # the team pushes a new image under the same tag
    assert moved.digest != first.digest
    docker_client.api.tag(old.id, first.repo, "1")  # pushing from this engine moved the local tag too; elsewhere it stays

    kept = resolve_image(docker_client, first.ref, policy="if_not_present", credentials=auth)
    assert (kept.id, kept.repo_digest) == (old.id, f"{first.repo}@{first.digest}")  # the old local copy, and it says so
    never = resolve_image(docker_client, first.ref, policy="never")
    assert never.id == old.id
    before = len(registry.blob_fetches(name))
    lines: list[str] = []
    fresh = resolve_image(docker_client, first.ref, policy="always", credentials=auth, on_log=lines.append)
    assert fresh.repo_digest == f"{first.repo}@{moved.digest}" and fresh.id != old.id
    assert len(registry.blob_fetches(name)) > before and any(line.startswith("pulled ") for line in lines)
    fetched = len(registry.blob_fetches(name))
    lines.clear()
    same = resolve_image(docker_client, first.ref, policy="always", credentials=auth, on_log=lines.append)
    assert (same.id, same.repo_digest) == (fresh.id, fresh.repo_digest)
    # asked, not pulled: the engine's distribution inspect reads the manifest and at most the image config (the image id), no layer
    assert {d for d, _ in registry.blob_fetches(name)[fetched:]} <= {same.id} and not any(line.startswith("pulling") for line in lines)
    remove_local(docker_client, first.ref, f"{first.repo}@{first.digest}", f"{first.repo}@{moved.digest}")
    with pytest.raises(ImageNotFound) as absent:
        resolve_image(docker_client, first.ref, policy="never")
    assert "never" in absent.value.message and first.ref in absent.value.message


def test_pull_by_digest_then_the_registry_is_not_needed(registry: Registry, docker_client: Any, push: Any) -> None:
    image = push()
    pinned = f"{image.repo}@{image.digest}"
    resolved = resolve_image(docker_client, pinned, credentials=[creds(registry)])
    assert resolved.repo_digest == pinned
    registry.stop()
    try:
        for policy in ("if_not_present", "always", "never"):
            assert resolve_image(docker_client, pinned, policy=policy).id == resolved.id
    finally:
        registry.start()
    remove_local(docker_client, pinned)


def test_a_registry_that_is_down_is_infrastructure_naming_it(registry: Registry, docker_client: Any, push: Any) -> None:
    image = push()
    present = push()
    resolve_image(docker_client, present.ref, credentials=[creds(registry)])
    registry.stop()
    try:
        for ref, policy in ((image.ref, "if_not_present"), (present.ref, "always")):
            with pytest.raises(InfrastructureError) as exc:
                resolve_image(docker_client, ref, policy=policy, credentials=[creds(registry)])
            assert registry.host in exc.value.message and exc.value.retryable
            assert registry.password not in exc.value.message
    finally:
        registry.start()
    assert resolve_image(docker_client, image.ref, credentials=[creds(registry)]).repo_digest == f"{image.repo}@{image.digest}"  # back: pulls


def test_steps_starting_together_wait_for_one_pull(registry: Registry, docker_client: Any, push: Any) -> None:
    image = push()
    name = image.repo.split("/", 1)[1]
    results: list[Any] = []
    logs: list[list[str]] = [[] for _ in range(6)]
    start = threading.Barrier(6)

    def step(i: int) -> None:
        start.wait()
        results.append(resolve_image(docker_client, image.ref, credentials=[creds(registry)], on_log=logs[i].append))

    threads = [threading.Thread(target=step, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 6 and len({(r.id, r.repo_digest) for r in results}) == 1
    fetched = [digest for digest, _ in registry.blob_fetches(name)]
    assert fetched and len(fetched) == len(set(fetched)), f"a blob was downloaded more than once: {fetched}"
    assert sum(1 for lines in logs if any(line.startswith("pulling ") for line in lines)) == 1


def test_pin_spec_pins_every_step_and_the_digest_policy_accepts_it(registry: Registry, docker_client: Any, push: Any, tmp_path: Path) -> None:
    import yaml

    from algodock.pipeline import load_pipeline
    from algodock.pipeline.pin import pin_spec
    from tests.conftest import write_manifest

    image = push()
    (tmp_path / "algo").mkdir()
    write_manifest(tmp_path / "algo" / "manifest.json", image=image.ref, command=["sh", "-c", "true"], name="algo")
    spec = tmp_path / "p.yaml"
    spec.write_text('pipeline_version: "0.1"\nname: pinned\nsteps:\n  - {id: a, manifest: algo/manifest.json}\n  - {id: b, manifest: algo/manifest.json, after: [a]}\n')
    with pytest.raises(InvalidManifest) as refused:
        load_pipeline(spec, require_digest=True)
    assert len(refused.value.errors) == 2 and all(image.ref in e for e in refused.value.errors)
    out = tmp_path / "frozen" / "p.yaml"
    out.parent.mkdir()
    doc = pin_spec(spec, docker_client, credentials=[creds(registry)], output=out)
    assert [s["image"] for s in doc["steps"]] == [f"{image.repo}@{image.digest}"] * 2
    assert doc["steps"][0]["manifest"] == "../algo/manifest.json"
    assert docker_client.images.list(name=image.repo) == []  # asked, nothing pulled
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    pipeline = load_pipeline(out, require_digest=True)
    assert {s.manifest.container_parameters.image for s in pipeline.steps.values()} == {f"{image.repo}@{image.digest}"}
    registry.stop()
    try:
        with pytest.raises(StepFailure) as down:
            pin_spec(spec, docker_client, credentials=[creds(registry)])
    finally:
        registry.start()
    assert down.value.kind == "infrastructure" and registry.host in str(down.value) and "step a" in str(down.value)


def test_a_registry_that_accepts_and_never_answers_is_infrastructure_after_the_stall_bound(docker_client: Any, monkeypatch: Any) -> None:
    import socket

    monkeypatch.setenv("ALGODOCK_PULL_STALL_SECONDS", "2")  # the engine itself would wait 25 s for the registry's first answer
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # connections complete in the backlog; nothing ever answers
        host = f"127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(InfrastructureError) as exc:
            resolve_image(docker_client, f"{host}/algo/silent:1")
    assert f"registry {host} did not answer" in exc.value.message and "no progress for 2 s" in exc.value.message
