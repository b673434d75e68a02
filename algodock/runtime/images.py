"""Images from registries: credentials, pull policy, one pull per image per engine, repo digests.

:func:`resolve_image` turns a reference as a manifest writes it (``repo:tag``,
``repo@sha256:…`` or an image id) into a :class:`~algodock.records.ResolvedImage`: the
immutable image id the container runs by, and the repo digest of what the registry served
(also when the local copy was used). How the registry is asked is the pull policy:

* ``if_not_present`` (the default): a local image is used when the reference is present;
* ``always``: the registry is asked for the tag's current digest (a manifest HEAD through the
  engine's distribution endpoint, no download) and the image is pulled only when it differs;
* ``never``: an absent image is ``image_not_found``.

A reference pinned by digest never needs the registry when present. Credentials are
:class:`RegistryAuth` records (the Prefect layer makes them from prefect-docker's
``DockerRegistryCredentials`` blocks); without one for a registry the engine client's own
docker config (the host's ``docker login``) is used. Steps that start together on an image
that is not yet present wait for one pull per engine (:class:`_Flights`). Nothing here ever
writes a password: :class:`RegistryAuth` keeps it as a ``SecretStr`` and messages name the
credentials by where they came from.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

from pydantic import SecretStr

from algodock.errors import ImageNotFound, InfrastructureError, StepFailure
from algodock.records import ResolvedImage

if TYPE_CHECKING:
    import docker

log = logging.getLogger("algodock.runtime.images")

PullPolicy = Literal["if_not_present", "always", "never"]
PULL_POLICIES: tuple[str, ...] = get_args(PullPolicy)
DEFAULT_PULL_POLICY: PullPolicy = "if_not_present"
DOCKER_HUB = "docker.io"
_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
_DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")

Say = Callable[[str], None]


# ---------------------------------------------------------------- references


def registry_of(ref: str) -> str:
    """The registry host of an image reference (``docker.io`` when it names none).

    >>> registry_of("127.0.0.1:5000/algo/visits:1"), registry_of("python:3.11"), registry_of("myorg/x@sha256:" + "0" * 64)
    ('127.0.0.1:5000', 'docker.io', 'docker.io')
    """
    name = ref.split("@", 1)[0]
    first, sep, _ = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return normalize_registry(first)
    return DOCKER_HUB


def normalize_registry(url: str) -> str:
    """A registry as a host[:port]: scheme, path and Docker Hub's aliases removed.

    >>> normalize_registry("https://index.docker.io/v1/"), normalize_registry("http://127.0.0.1:5000")
    ('docker.io', '127.0.0.1:5000')
    """
    host = re.sub(r"^[a-z]+://", "", url.strip().lower()).split("/", 1)[0]
    return DOCKER_HUB if host in _HUB_ALIASES else host


def repository_of(ref: str) -> str:
    """The repository of a reference, without tag or digest.

    >>> repository_of("127.0.0.1:5000/a/b:1"), repository_of("a/b@sha256:" + "0" * 64), repository_of("a/b")
    ('127.0.0.1:5000/a/b', 'a/b', 'a/b')
    """
    if "@" in ref:
        return ref.split("@", 1)[0]
    last = ref.rsplit("/", 1)[-1]
    return ref.rsplit(":", 1)[0] if ":" in last else ref


def canonical_repository(ref: str) -> str:
    """The repository as the engine writes it in ``RepoDigests`` (Docker Hub's prefixes dropped).

    >>> canonical_repository("docker.io/library/python:3.11"), canonical_repository("index.docker.io/myorg/x")
    ('python', 'myorg/x')
    """
    repo = repository_of(ref)
    first, sep, rest = repo.partition("/")
    if sep and ("." in first or ":" in first) and normalize_registry(first) == DOCKER_HUB:
        repo = rest
    if repo.startswith("library/") and repo.count("/") == 1:
        repo = repo.removeprefix("library/")
    return repo


def is_pinned(ref: str) -> bool:
    """True for ``repo@sha256:<64 hex>`` (what a digest policy accepts).

    >>> is_pinned("a/b@sha256:" + "0" * 64), is_pinned("a/b:1")
    (True, False)
    """
    return bool(_DIGEST.search(ref))


def _pull_ref(ref: str) -> str:
    """What to pull: the reference, with ``:latest`` when it names neither tag nor digest."""
    return ref if ("@" in ref or ":" in ref.rsplit("/", 1)[-1]) else f"{ref}:latest"


# ---------------------------------------------------------------- credentials


@dataclass(frozen=True)
class RegistryAuth:
    """Credentials for one registry (from a ``DockerRegistryCredentials`` block).

    ``password`` is a ``SecretStr``: its repr, str and JSON are ``**********``.
    """

    registry: str
    """host[:port] (see :func:`normalize_registry`)."""
    username: str
    password: SecretStr = field(repr=False)
    source: str
    """Where they came from, for messages: ``credentials block 'name'``."""

    @classmethod
    def of(cls, registry_url: str, username: str, password: SecretStr | str, source: str) -> RegistryAuth:
        secret = password if isinstance(password, SecretStr) else SecretStr(password)
        return cls(normalize_registry(registry_url), username, secret, source)

    def auth_config(self) -> dict[str, str]:
        """The engine's ``X-Registry-Auth`` content (sent to the engine only)."""
        return {"username": self.username, "password": self.password.get_secret_value(), "serveraddress": self.registry}


class _Auth:
    """The credentials used for one registry: given ones, or the engine client's own docker config."""

    def __init__(self, client: Any, registry: str, credentials: Iterable[RegistryAuth]) -> None:
        given = next((c for c in credentials if c.registry == registry), None)
        self.registry = registry
        self.config = given.auth_config() if given is not None else None
        if given is not None:
            self.source = given.source
        elif _host_config_has(client, registry):
            self.source = "the host's docker config"
        else:
            self.source = "no credentials: none given for this registry, none in the host's docker config"


def _host_config_has(client: Any, registry: str) -> bool:
    try:
        from docker import auth as docker_auth

        configs = docker_auth.load_config(credstore_env=getattr(client.api, "credstore_env", None))  # what the client itself loaded
        return bool(configs.resolve_authconfig(registry) or (registry == DOCKER_HUB and configs.resolve_authconfig("https://index.docker.io/v1/")))
    except Exception:  # an SDK without it, or an unreadable config: say nothing about it
        return False


# ---------------------------------------------------------------- registry errors


_DENIED = ("unauthorized", "authentication required", "no basic auth credentials", "denied", "forbidden", " 401", " 403", "incorrect username or password")
_NOT_FOUND = ("manifest unknown", "not found", "does not exist", "name unknown", "no such manifest", " 404")
_NO_SUCH_HOST = ("no such host", "name or service not known", "server misbehaving")
"""The registry's name does not resolve here: the reference names no registry this engine can
know (a typo, or an offline machine pulling from a public registry), not one that is down."""


def registry_failure(ref: str, auth: _Auth, text: str, *, action: str = "pulling") -> StepFailure:
    """The failure kind of what the engine said about ``ref``'s registry (docs/contract.md §4).

    Refused credentials and a missing image are ``image_not_found`` (not retried); anything
    else (refused connection, timeout, a server error) is ``infrastructure`` naming the registry.
    """
    low = f" {text.lower()}"
    said = text.strip()
    if any(w in low for w in _DENIED):
        return ImageNotFound(
            f"image {ref!r}: the registry {auth.registry} denied access while {action} it, with {auth.source}: {said}. "
            "Give a DockerRegistryCredentials block for it (--registry-credentials NAME) or fix the one given."
        )
    if any(w in low for w in _NOT_FOUND):
        return ImageNotFound(f"image {ref!r}: the registry {auth.registry} has no such image or tag ({said}); check the name and the tag")
    if any(w in low for w in _NO_SUCH_HOST):
        return ImageNotFound(
            f"image {ref!r} is not present on the engine and its registry {auth.registry} cannot be found from it ({said}). "
            "Build it (`docker build -t …`) or check the registry name and that the engine can reach it."
        )
    return InfrastructureError(f"the registry {auth.registry} did not answer while {action} {ref!r}: {said}")


def _explain(exc: Exception) -> str:
    return str(getattr(exc, "explanation", None) or exc)


# ---------------------------------------------------------------- progress


class _Progress:
    """Pull progress in a few lines: one per layer pulled (with its size), then a total."""

    def __init__(self, ref: str, say: Say | None) -> None:
        self.ref, self.say = ref, say
        self.sizes: dict[str, int] = {}
        self.done: list[str] = []
        self.present = 0
        self.digest: str | None = None
        self.started = time.monotonic()

    def feed(self, event: Mapping[str, Any]) -> None:
        status = str(event.get("status") or "")
        layer = str(event.get("id") or "")
        detail = event.get("progressDetail") or {}
        if status == "Downloading" and detail.get("total"):
            self.sizes[layer] = int(detail["total"])
        elif status == "Pull complete":
            self.done.append(layer)
            self._say(f"layer {layer} pulled ({_size(self.sizes.get(layer, 0))})")
        elif status == "Already exists":
            self.present += 1
        elif status.startswith("Digest: "):
            self.digest = status.removeprefix("Digest: ").strip()

    def finish(self) -> None:
        total = sum(self.sizes.get(layer, 0) for layer in self.done)
        present = f", {self.present} already present" if self.present else ""
        self._say(f"pulled {self.ref}: {len(self.done)} layers, {_size(total)} in {time.monotonic() - self.started:.1f} s{present}; digest {self.digest or 'unknown'}")

    def _say(self, line: str) -> None:
        if self.say is not None:
            self.say(line)


def _size(n: int) -> str:
    from algodock.runtime.usage import fmt_bytes

    return fmt_bytes(n)


# ---------------------------------------------------------------- one pull per image per engine


WAIT_QUIETLY_SECONDS = 0.5
"""A step waiting longer than this for another's resolution of its image says so in its log."""


class _Flight:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: Any = None
        self.error: StepFailure | None = None


class _Flights:
    """Resolutions (and pulls) under way, by engine, reference, policy and credentials: a step
    asking for an image another step is resolving (pulling) on the same engine waits for that
    one's answer instead of asking the engine and the registry itself."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[tuple[str, ...], _Flight] = {}

    def run(self, key: tuple[str, ...], resolve: Callable[[], Any], ref: str, say: Say | None) -> Any:
        with self._lock:
            current = self._running.get(key)
            leader = current is None
            if current is None:
                current = self._running[key] = _Flight()
        if not leader:
            if not current.done.wait(WAIT_QUIETLY_SECONDS) and say is not None:  # a pull, not a look at a local image: say so
                say(f"waiting for the pull of {ref} another step started on this engine")
            current.done.wait()
            if current.error is not None:
                raise type(current.error)(current.error.message)
            return current.result
        try:
            current.result = resolve()
            return current.result
        except StepFailure as exc:
            current.error = exc
            raise
        except BaseException as exc:
            current.error = InfrastructureError(f"the Docker engine failed while resolving image {ref!r}: {type(exc).__name__}: {exc}")
            raise
        finally:
            current.done.set()
            with self._lock:
                self._running.pop(key, None)


FLIGHTS = _Flights()


def engine_key(client: Any) -> str:
    """What tells engines apart: the API URL, and the socket for a local one."""
    api = client.api
    adapter = (getattr(api, "adapters", {}) or {}).get("http+docker://")  # a local engine's socket adapter
    return f"{api.base_url}|{getattr(adapter, 'socket_path', '')}"


def pull_stall_seconds() -> float:
    """How long a pull may go without a word from the engine before it counts as a registry that
    does not answer (``ALGODOCK_PULL_STALL_SECONDS``, default 600; the engine reports progress
    at least every few seconds while it downloads or extracts)."""
    return float(os.environ.get("ALGODOCK_PULL_STALL_SECONDS") or 600)


def _pull_events(client: Any, target: str, config: dict[str, str] | None) -> Iterator[dict[str, Any]]:
    """The engine's pull stream (``POST /images/create``), each read bounded by :func:`pull_stall_seconds`
    (the SDK's own ``pull`` waits forever on a registry that stalls: this posts through the
    ``requests.Session`` the ``APIClient`` is, with a timeout)."""
    from docker import auth as docker_auth
    from docker.utils import parse_repository_tag
    from docker.utils.json_stream import json_stream

    from algodock.runtime.engine_api import api_url, raise_for_engine_status

    api = client.api
    repo, tag = parse_repository_tag(target)
    header = docker_auth.encode_header(config) if config is not None else docker_auth.get_config_header(api, docker_auth.resolve_repository_name(repo)[0])
    res = api.post(api_url(api, "/images/create"), params={"tag": tag or "latest", "fromImage": repo},
                   headers={"X-Registry-Auth": header} if header else {}, stream=True, timeout=pull_stall_seconds())
    raise_for_engine_status(res)
    return json_stream(res.iter_content(chunk_size=None))  # each JSON message as soon as its chunk arrives


def _pull(client: Any, ref: str, auth: _Auth, say: Say | None) -> str | None:
    """Pull ``ref`` (streaming its progress to ``say``); returns the digest the registry served."""
    from docker.errors import APIError
    from requests.exceptions import ConnectionError, RequestException, Timeout

    target = _pull_ref(ref)
    if say is not None:
        say(f"pulling {target} from {auth.registry} ({auth.source})")
    progress = _Progress(target, say)
    try:
        for event in _pull_events(client, target, auth.config):
            if event.get("error"):
                raise registry_failure(ref, auth, str(event.get("error")))
            progress.feed(event)
    except APIError as exc:
        raise registry_failure(ref, auth, _explain(exc)) from None
    except (Timeout, ConnectionError) as exc:
        if "timed out" not in str(exc).lower() and not isinstance(exc, Timeout):
            raise InfrastructureError(f"the Docker engine failed while pulling {ref!r} from {auth.registry}: {type(exc).__name__}: {exc}") from None
        raise InfrastructureError(
            f"the registry {auth.registry} did not answer while pulling {ref!r}: no progress for {pull_stall_seconds():g} s (ALGODOCK_PULL_STALL_SECONDS)"
        ) from None
    except RequestException as exc:
        raise InfrastructureError(f"the Docker engine failed while pulling {ref!r} from {auth.registry}: {type(exc).__name__}: {exc}") from None
    progress.finish()
    return progress.digest


def remote_digest(client: Any, ref: str, credentials: Iterable[RegistryAuth] = ()) -> str:
    """The digest the registry serves for ``ref`` now (the engine asks the registry for the
    manifest; nothing is downloaded). Raises ``image_not_found`` or ``infrastructure``."""
    from docker.errors import APIError
    from requests.exceptions import RequestException

    auth = _Auth(client, registry_of(ref), credentials)
    try:
        answer = client.api.inspect_distribution(_pull_ref(ref), auth_config=auth.config)
    except APIError as exc:
        raise registry_failure(ref, auth, _explain(exc), action="asking for") from None
    except RequestException as exc:
        raise InfrastructureError(f"the Docker engine failed while asking {auth.registry} for {ref!r}: {type(exc).__name__}: {exc}") from None
    return str((answer.get("Descriptor") or {}).get("digest") or "")


# ---------------------------------------------------------------- resolving


def _local(client: Any, ref: str) -> Any:
    from docker.errors import ImageNotFound as DockerImageNotFound, NotFound

    try:
        return client.images.get(ref)
    except (DockerImageNotFound, NotFound):
        return None


def _local_digest(image: Any, ref: str) -> str | None:
    """The digest part of the image's ``RepoDigests`` entry for ``ref``'s repository."""
    repo = canonical_repository(ref)
    for entry in image.attrs.get("RepoDigests") or []:
        name, _, digest = entry.partition("@")
        if canonical_repository(name) == repo:
            return digest
    return None


def _resolved(ref: str, image: Any, digest: str | None) -> ResolvedImage:
    if is_pinned(ref):
        repo_digest: str | None = ref
    elif digest:
        repo_digest = f"{repository_of(ref)}@{digest}"
    else:  # built here, or pulled under another name: the first digest the engine knows, if any
        digests = image.attrs.get("RepoDigests") or []
        repo_digest = digests[0] if digests else None
    user = (image.attrs.get("Config") or {}).get("User") or ""
    return ResolvedImage(ref=ref, id=image.id, repo_digest=repo_digest, user=user)


def resolve_image(
    client: docker.DockerClient,
    ref: str,
    *,
    pull: bool = True,
    policy: PullPolicy | str | None = None,
    credentials: Iterable[RegistryAuth] = (),
    on_log: Say | None = None,
) -> ResolvedImage:
    """Resolve ``ref`` to its immutable id and repo digest, asking its registry as ``policy`` says.

    ``pull=False`` is ``policy="never"``. ``on_log`` gets the pull's progress in a few lines.
    Raises :class:`ImageNotFound` (absent, unknown to the registry, or access denied) or
    :class:`InfrastructureError` (the engine or the registry not answering).
    """
    from docker.errors import DockerException

    policy = "never" if not pull else (policy or DEFAULT_PULL_POLICY)
    if policy not in PULL_POLICIES:
        raise ValueError(f"pull policy {policy!r}: expected one of {', '.join(PULL_POLICIES)}")
    credentials = tuple(credentials)
    key = (engine_key(client), ref, policy, _Auth(client, registry_of(ref), credentials).source)
    try:
        return FLIGHTS.run(key, lambda: _resolve(client, ref, policy, credentials, on_log), ref, on_log)
    except StepFailure:
        raise
    except DockerException as exc:
        raise InfrastructureError(f"the Docker engine failed while resolving image {ref!r}: {exc}") from exc


def _resolve(client: Any, ref: str, policy: str, credentials: tuple[RegistryAuth, ...], say: Say | None) -> ResolvedImage:
    local = _local(client, ref)
    if ref.startswith("sha256:"):
        if local is None:
            raise ImageNotFound(f"image {ref!r} is not present on the engine and cannot be pulled by id")
        return _resolved(ref, local, None)
    if local is not None and (policy != "always" or is_pinned(ref)):
        return _resolved(ref, local, _local_digest(local, ref))
    if policy == "never":
        raise ImageNotFound(f"image {ref!r} is not present on the engine and the pull policy is never; pull or build it first, or use another pull policy")
    auth = _Auth(client, registry_of(ref), credentials)
    if local is not None:  # policy always, by tag: ask the registry for the tag's digest now
        current = remote_digest(client, ref, credentials)
        if current and current == _local_digest(local, ref):
            if say is not None:
                say(f"image {ref} is up to date with {auth.registry} ({current})")
            return _resolved(ref, local, current)
        if say is not None:
            say(f"the registry {auth.registry} has {current} for {ref}; the local image is {_local_digest(local, ref) or 'not from it'}")
    # Steps resolving the image under another policy (or later) join a pull under way.
    digest = FLIGHTS.run((engine_key(client), "pull", ref, auth.source), lambda: _pull(client, ref, auth, say), ref, say)
    pulled = _local(client, f"{repository_of(ref)}@{digest}") if digest else None
    pulled = pulled or _local(client, _pull_ref(ref))
    if pulled is None:
        raise ImageNotFound(f"image {ref!r} was pulled from {auth.registry} but the engine does not have it; pull it by hand to see why")
    return _resolved(ref, pulled, digest or _local_digest(pulled, ref))


__all__ = [
    "DEFAULT_PULL_POLICY",
    "PULL_POLICIES",
    "PullPolicy",
    "RegistryAuth",
    "canonical_repository",
    "is_pinned",
    "normalize_registry",
    "registry_of",
    "remote_digest",
    "repository_of",
    "resolve_image",
]
