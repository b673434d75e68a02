"""The Prefect project's flow entry points (prefect.yaml: ``flows/algodock_flows.py:run_pipeline``
and ``flows/algodock_flows.py:gc_store``).

The flows themselves live in the installed package, :mod:`algodock.flows.pipeline` and
:mod:`algodock.flows.gc`; this file only names them for ``prefect deploy``, so nothing is
installed under a bare ``flows`` import name.
"""

from algodock.flows.gc import gc_store
from algodock.flows.pipeline import run_pipeline

__all__ = ["gc_store", "run_pipeline"]
