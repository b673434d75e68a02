"""The Prefect project's flow entry point (prefect.yaml: ``flows/algodock_flows.py:run_pipeline``).

The flow itself lives in the installed package, :mod:`algodock.flows.pipeline`; this file only
names it for ``prefect deploy``, so nothing is installed under a bare ``flows`` import name.
"""

from algodock.flows.pipeline import run_pipeline

__all__ = ["run_pipeline"]
