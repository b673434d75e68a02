"""algodock: containerized algorithms run in a strict sandbox, alone or as Prefect pipelines.

The engine lives here and never imports Prefect; ``flows/`` and ``blocks/`` build on it.
"""

__version__ = "0.1.0"
