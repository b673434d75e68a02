"""The Prefect layer: algorithms as Prefect tasks in your own flows (``compose``), a pipeline as
a Prefect flow (``pipeline``), its UI artifacts (``artifacts``) and the ``algodock run``
command (``cli``). Built on the engine; the engine never imports it.

>>> from algodock.flows import algorithm, algodock_run, output, AlgorithmFailed, StepResult

The names are loaded on first use, so importing a submodule (the CLI's) stays light.
"""

from __future__ import annotations

from typing import Any

_PUBLIC = ("AlgorithmFailed", "StepResult", "algodock_run", "algorithm", "output")

__all__ = list(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        from algodock.flows import compose

        return getattr(compose, name)
    raise AttributeError(f"module 'algodock.flows' has no attribute {name!r}")
