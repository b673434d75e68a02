"""Prefect blocks of algodock: saved algorithms and stores; the engine is prefect-docker's ``DockerHost``.

Register them with ``prefect block register -m algodock.blocks`` (``-m algodock.blocks`` once the
folders are namespaced); then create and save them in the UI or in code::

    AlgorithmBlock.from_manifest_file("examples/device-visits/manifest.json").save("device-visits")
    AwsCredentials(aws_access_key_id="…", aws_secret_access_key="…",
                   aws_client_parameters={"endpoint_url": "http://127.0.0.1:9000"}).save("lake-creds")
    StoreBlock(uri="s3://lake/algodock", credentials=AwsCredentials.load("lake-creds")).save("lake")
    DockerHost(base_url="tcp://gpu-box:2376", client_kwargs={"tls": True}).save("gpu-box")
    DockerRegistryCredentials(username="ci", password="…", registry_url="registry.example.com").save("team-registry")

A pipeline step can then say ``block: device-visits`` instead of ``manifest: …``, and a flow
run (a deployment's parameters) ``store="algodock-store/lake"``, ``engine="docker-host/gpu-box"``,
``registry_credentials=["team-registry"]`` (prefect-docker's block; :func:`registry_auths` turns
it into the engine's :class:`~algodock.runtime.images.RegistryAuth`).
S3 credentials are prefect-aws's ``AwsCredentials`` (what Prefect users already keep); s3fs
moves the bytes with them.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prefect.blocks.core import Block
from prefect_aws import AwsCredentials
from prefect_docker import DockerHost, DockerRegistryCredentials
from pydantic import Field, field_validator

from algodock.contract.manifest import Manifest, load_manifest, parse_manifest
from algodock.errors import InfrastructureError, InvalidInput, InvalidManifest
from algodock.runtime.images import RegistryAuth

__all__ = [
    "AlgorithmBlock", "AwsCredentials", "DockerHost", "DockerRegistryCredentials", "StoreBlock",
    "algorithm_block_auths", "load_algorithm_block", "load_block", "manifest_from_block", "registry_auths", "resolve_engine", "resolve_store", "step_registry_auths",
]


class AlgorithmBlock(Block):
    """A saved algorithm manifest that pipeline specs can name with ``block: NAME``.

    The manifest is validated as docs/contract.md §1 says when the block is built: a bad one
    never reaches the Prefect API (``save`` is never called with it).
    """

    _block_type_name = "algodock Algorithm"
    _block_type_slug = "algodock-algorithm"
    _logo_url = None  # type: ignore[assignment]
    _description = "An algorithm manifest (image, command, resources, parameter schema, inputs, outputs)."

    manifest: Manifest = Field(
        description="The manifest document of docs/contract.md §1.",
        examples=[{"manifest_version": "0.1", "name": "device-visits", "version": "1.0.0", "container_parameters": {"image": "myorg/device-visits:1.0.0", "command": ["python3", "/app/device_visits.py"]}}],
    )

    registry_credentials: DockerRegistryCredentials | None = Field(
        default=None,
        description="prefect-docker credentials for the registry the manifest's image comes from (used by every run of a step naming this block).",
    )

    @field_validator("manifest", mode="before")
    @classmethod
    def _validate_manifest(cls, value: Any) -> Any:
        # The contract's own validation (with its field-naming messages), not just pydantic's.
        if isinstance(value, Manifest):
            return value
        if not isinstance(value, dict):
            raise ValueError("the manifest must be a JSON object (docs/contract.md §1)")
        try:
            return parse_manifest(value, "AlgorithmBlock.manifest")
        except InvalidManifest as exc:
            raise ValueError(str(exc)) from None

    @classmethod
    def from_manifest_file(cls, path: str | Path) -> AlgorithmBlock:
        """A block holding the (validated) manifest at ``path``."""
        return cls(manifest=load_manifest(path))

    def to_manifest(self, source: str = "block") -> Manifest:
        return self.manifest


class StoreBlock(Block):
    """Where runs keep their outputs and records: a local folder or an S3 prefix."""

    _block_type_name = "algodock Store"
    _block_type_slug = "algodock-store"
    _logo_url = None  # type: ignore[assignment]
    _description = "A local folder or s3://bucket/prefix; S3 credentials and endpoint from a prefect-aws AwsCredentials block."

    uri: str = Field(
        default=".algodock/store",
        description="A local folder, file:// URI, or s3://bucket/prefix.",
        examples=[".algodock/store", "s3://lake/algodock"],
    )
    credentials: AwsCredentials | None = Field(
        default=None,
        description="prefect-aws credentials (keys, region, endpoint in aws_client_parameters); default: the standard AWS environment.",
    )

    def s3_options(self) -> dict[str, Any]:
        """The s3fs keyword arguments of :attr:`credentials` (empty without them)."""
        c = self.credentials
        if c is None:
            return {}
        kwargs: dict[str, Any] = {}
        if c.aws_access_key_id:
            kwargs["key"] = c.aws_access_key_id
        if c.aws_secret_access_key:
            kwargs["secret"] = c.aws_secret_access_key.get_secret_value()
        if c.aws_session_token:
            kwargs["token"] = c.aws_session_token
        if c.profile_name:
            kwargs["profile"] = c.profile_name
        params = c.aws_client_parameters
        client_kwargs = {
            k: v
            for k, v in {"region_name": c.region_name, "endpoint_url": params.endpoint_url, "verify": params.verify}.items()
            if v is not None
        }
        if client_kwargs:
            kwargs["client_kwargs"] = client_kwargs
        return kwargs

    def open(self) -> Any:
        """The :class:`algodock.store.base.Store` this block describes."""
        from algodock.store.backends import open_store
        from algodock.store.s3 import S3Store
        from algodock.store.transfer import s3_filesystem

        if not self.uri.startswith("s3://"):
            return open_store(self.uri)
        return S3Store(self.uri, fs=s3_filesystem(**self.s3_options()))


def load_block(ref: str, expected: type[Block]) -> Block:
    """Load ``ref`` (``"<block-type-slug>/<name>"``, or only ``<name>`` of ``expected``'s type)."""
    from prefect.exceptions import ObjectNotFound

    slug_ref = ref if "/" in ref else f"{expected.get_block_type_slug()}/{ref}"
    try:
        block = Block.load(slug_ref)
    except (ValueError, ObjectNotFound) as exc:
        raise InvalidInput(f"block {ref!r}: {exc}. Save it first (`prefect block ls` lists the saved blocks)") from None
    if not isinstance(block, expected):
        raise InvalidInput(f"block {ref!r} is a {type(block).__name__}, not a {expected.__name__}")
    return block


def resolve_store(store: str | StoreBlock | None) -> Any:
    """The store of a flow's ``store`` parameter: a path/URI, ``"algodock-store/NAME"``, or a :class:`StoreBlock`."""
    from algodock.store.backends import open_store

    if isinstance(store, StoreBlock):
        return store.open()
    if isinstance(store, str) and _is_block_ref(store, StoreBlock):
        return load_block(store, StoreBlock).open()  # type: ignore[attr-defined]
    return open_store(store)


def resolve_engine(engine: str | DockerHost | None) -> Any:
    """The Docker client of a flow's ``engine`` parameter: ``"docker-host/NAME"``, a :class:`DockerHost`, or None (``DOCKER_HOST`` / the local socket)."""
    from algodock.runtime.engine import docker_client

    if engine is None:
        return docker_client()
    from docker.errors import DockerException

    from algodock.runtime.engine import ENGINE_HINT

    host = engine if isinstance(engine, DockerHost) else load_block(engine, DockerHost)
    try:
        client = host.get_client()  # type: ignore[attr-defined]
    except DockerException as exc:  # DockerHost asks the engine its API version when it connects
        where = getattr(host, "base_url", None) or "DOCKER_HOST / the local socket"
        raise InfrastructureError(f"No Docker engine answers at {where} (DockerHost block {engine if isinstance(engine, str) else ''}): {exc}. {ENGINE_HINT}") from exc
    return docker_client(client=client)


def _is_block_ref(value: str, block_type: type[Block]) -> bool:
    return value.startswith(block_type.get_block_type_slug() + "/")


RegistryCredentialsRef = str | DockerRegistryCredentials
"""A ``DockerRegistryCredentials`` block, or its saved name (``NAME`` or ``docker-registry-credentials/NAME``)."""


def registry_auths(items: Iterable[RegistryCredentialsRef] | RegistryCredentialsRef | None) -> tuple[RegistryAuth, ...]:
    """The engine's credentials records of ``items`` (a flow's ``registry_credentials``).

    The password stays a ``SecretStr`` and is only ever sent to the Docker engine; messages name
    the block (``credentials block 'NAME'``). A given name that is not saved is ``invalid_input``.
    """
    if items is None or isinstance(items, (str, DockerRegistryCredentials)):
        items = [] if items is None else [items]
    return tuple(_auth_of(item) for item in items)


def step_registry_auths(pipeline: Any) -> dict[str, tuple[RegistryAuth, ...]]:
    """Per step, the credentials of the algorithm block it names (``AlgorithmBlock.registry_credentials``),
    used for its image before the run's own."""
    found: dict[str, tuple[RegistryAuth, ...]] = {}
    for step in pipeline.spec.steps:
        if step.block is not None:
            auths = algorithm_block_auths(AlgorithmBlock.load(step.block), step.block)  # type: ignore[arg-type]
            if auths:
                found[step.id] = auths
    return found


def algorithm_block_auths(block: AlgorithmBlock, name: str) -> tuple[RegistryAuth, ...]:
    """The credentials an algorithm block carries for its image (empty when it has none)."""
    if block.registry_credentials is None:
        return ()
    return (_auth_of(block.registry_credentials, f"the credentials of algorithm block {name!r}"),)


def _auth_of(item: RegistryCredentialsRef, source: str | None = None) -> RegistryAuth:
    if isinstance(item, DockerRegistryCredentials):
        block = item
        name = getattr(item, "_block_document_name", None)
        source = source or (f"credentials block {name!r}" if name else "the DockerRegistryCredentials block given")
    else:
        block = load_block(item, DockerRegistryCredentials)  # type: ignore[assignment]
        source = source or f"credentials block {item.split('/')[-1]!r}"
    return RegistryAuth.of(block.registry_url, block.username, block.password, source)


def manifest_from_block(name: str) -> Manifest:
    """Resolve a pipeline step's ``block: NAME`` (passed to ``load_pipeline(resolve_block=…)``)."""
    return load_algorithm_block(name).to_manifest(f"block {name}")


def load_algorithm_block(name: str) -> AlgorithmBlock:
    """The saved :class:`AlgorithmBlock` ``name``; a manifest saved without this class's checks is
    refused with the errors naming each of its fields."""
    try:
        return AlgorithmBlock.load(name)  # type: ignore[return-value]
    except RuntimeError as exc:  # Prefect's "failed validation": a document saved without this class's checks
        if not isinstance(exc.__cause__, Exception) or "validation" not in str(exc):
            raise
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            doc = client.read_block_document_by_name(name, block_type_slug=AlgorithmBlock.get_block_type_slug())
        raw = (doc.data or {}).get("manifest")
        parse_manifest(raw if isinstance(raw, dict) else {}, f"block {name}")  # raises the errors naming each field
        raise InvalidManifest(f"block {name}: {exc.__cause__}") from None
