"""Pipelines of steps.

``spec`` the spec as written (models), ``load`` reads the spec and its manifests or blocks,
``validate`` checks the whole without I/O and resolves one record per step, ``capacity`` the
shared resource pool, ``execute`` one step against a store (announcing step events to its
observers).

>>> from algodock.pipeline import PipelineBuilder, load_pipeline  # the public entry points
"""

from algodock.pipeline.load import PipelineBuilder, build_pipeline, load_pipeline
from algodock.pipeline.spec import PipelineSpec, Ref, StepSpec, parse_overrides
from algodock.pipeline.validate import Pipeline, ResolvedStep, validate_pipeline

__all__ = [
    "Pipeline",
    "PipelineBuilder",
    "PipelineSpec",
    "Ref",
    "ResolvedStep",
    "StepSpec",
    "build_pipeline",
    "load_pipeline",
    "parse_overrides",
    "validate_pipeline",
]
