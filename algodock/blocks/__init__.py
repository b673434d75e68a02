"""Prefect blocks of algodock: saved algorithms, stores, and the Docker engine connection.

Register them with ``prefect block register -m algodock.blocks``; then create and save them in the
UI or in code::

    AlgorithmBlock.from_manifest_file("examples/device-visits/manifest.json").save("device-visits")
    StoreBlock(uri="s3://lake/algodock", endpoint_url="http://127.0.0.1:9000").save("lake")

A pipeline step can then say ``block: device-visits`` instead of ``manifest: …``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect.blocks.core import Block
from prefect_docker import DockerHost
from pydantic import Field, SecretStr

from algodock.contract.manifest import Manifest, load_manifest, parse_manifest

__all__ = ["AlgorithmBlock", "StoreBlock", "DockerHost", "manifest_from_block"]


class AlgorithmBlock(Block):
    """A saved algorithm manifest that pipeline specs can name with ``block: NAME``."""

    _block_type_name = "algodock Algorithm"
    _block_type_slug = "algodock-algorithm"
    _logo_url = None  # type: ignore[assignment]
    _description = "An algorithm manifest (image, command, resources, parameter schema, inputs, outputs)."

    manifest: dict[str, Any] = Field(
        description="The manifest document of CONTRACT.md §1, validated when the block is loaded.",
        examples=[{"manifest_version": "0.1", "name": "device-visits", "version": "1.0.0", "container_parameters": {"image": "myorg/device-visits:1.0.0", "command": ["python3", "/app/device_visits.py"]}}],
    )

    @classmethod
    def from_manifest_file(cls, path: str | Path) -> AlgorithmBlock:
        """A block holding the (validated) manifest at ``path``."""
        return cls(manifest=load_manifest(path).model_dump(mode="json", exclude_unset=True))

    def to_manifest(self, source: str = "block") -> Manifest:
        return parse_manifest(self.manifest, source)


class StoreBlock(Block):
    """Where runs keep their outputs and records: a local folder or an S3 prefix."""

    _block_type_name = "algodock Store"
    _block_type_slug = "algodock-store"
    _logo_url = None  # type: ignore[assignment]
    _description = "A local folder or s3://bucket/prefix, with optional S3 credentials and endpoint."

    uri: str = Field(
        default=".algodock/store",
        description="A local folder, file:// URI, or s3://bucket/prefix.",
        examples=[".algodock/store", "s3://lake/algodock"],
    )
    endpoint_url: str | None = Field(default=None, description="S3 endpoint (MinIO, moto, …); default AWS.", examples=["http://127.0.0.1:9000"])
    region_name: str | None = Field(default=None, description="S3 region.", examples=["us-east-1"])
    aws_access_key_id: str | None = Field(default=None, description="Access key id; default: the standard AWS environment.")
    aws_secret_access_key: SecretStr | None = Field(default=None, description="Secret access key.")

    def open(self) -> Any:
        """The :class:`algodock.store.backends.Store` this block describes."""
        from algodock.store.backends import S3Store, open_store, s3_filesystem

        if not self.uri.startswith("s3://"):
            return open_store(self.uri)
        kwargs: dict[str, Any] = {}
        if self.aws_access_key_id:
            kwargs["key"] = self.aws_access_key_id
        if self.aws_secret_access_key:
            kwargs["secret"] = self.aws_secret_access_key.get_secret_value()
        client_kwargs = {k: v for k, v in {"endpoint_url": self.endpoint_url, "region_name": self.region_name}.items() if v}
        if client_kwargs:
            kwargs["client_kwargs"] = client_kwargs
        return S3Store(self.uri, fs=s3_filesystem(**kwargs))

    def export_environment(self) -> None:
        """Set the standard AWS variables in this process (for fsspec users and containers' helpers)."""
        for var, value in (
            ("AWS_ENDPOINT_URL", self.endpoint_url),
            ("AWS_DEFAULT_REGION", self.region_name),
            ("AWS_ACCESS_KEY_ID", self.aws_access_key_id),
            ("AWS_SECRET_ACCESS_KEY", self.aws_secret_access_key.get_secret_value() if self.aws_secret_access_key else None),
        ):
            if value:
                os.environ[var] = value


def manifest_from_block(name: str) -> Manifest:
    """Resolve a pipeline step's ``block: NAME`` (passed to ``load_pipeline(resolve_block=…)``)."""
    return AlgorithmBlock.load(name).to_manifest(f"block {name}")  # type: ignore[union-attr]
