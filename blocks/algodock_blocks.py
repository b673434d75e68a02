"""The Prefect project's block entry point: ``prefect block register --file blocks/algodock_blocks.py``
(or, equivalently, ``prefect block register -m algodock.blocks``).

The blocks live in the installed package, :mod:`algodock.blocks`.
"""

from algodock.blocks import AlgorithmBlock, DockerHost, DockerRegistryCredentials, StoreBlock

__all__ = ["AlgorithmBlock", "DockerHost", "DockerRegistryCredentials", "StoreBlock"]
