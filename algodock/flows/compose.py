"""Algorithm containers as Prefect tasks in the user's own flows.

>>> from prefect import flow, task
>>> from algodock.flows import algorithm, algodock_run, output
>>> visits = algorithm("examples/device-visits/manifest.json")
>>> stats = algorithm("examples/dwell-stats/manifest.json")
>>> @flow
... def daily(pings: str):
...     with algodock_run(store="/tmp/store") as run:
...         v = visits.submit(inputs={"pings": pings}, parameters={"look_back_time": 7200})
...         s = stats.submit(inputs={"visits": v})   # the future: an edge in the run graph
...         return s.result().read("stats").num_rows

:func:`algorithm` turns a manifest (or an algorithm block) into a Prefect ``Task``; each call
is one step of the current run (:func:`algodock_run`, or an implicit run per flow run, or a
one-step run outside any flow). The step runs through the engine's
:func:`~algodock.pipeline.execute.execute_step`, exactly as a pipeline's step does: sandbox,
staging, cache, lineage. What a call is given is checked when it is made (``submit``, ``map``
or a direct call), before any container starts: every error names the algorithm, the step
and the field.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import Task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import MaterializingTask
from prefect.utilities.annotations import quote

from algodock.contract.manifest import Manifest, load_manifest
from algodock.errors import InvalidInput
from algodock.runtime.images import RegistryAuth
from algodock.flows.artifacts import MATERIALIZED_BY
from algodock.flows.calls import Deferred, unwrap, check_call, execute_in_task, run_algorithm_step
from algodock.flows.results import AlgorithmFailed, InvalidCall, OutputRef, StepResult, output
from algodock.flows.retries import retry_options
from algodock.flows.runs import (
    CURRENT_RUN,
    RunHandle,
    RunTicket,
    check_pull_policy,
    implicit_run,
    open_run,
    Planned,
    algodock_run,
    check_concurrency_limit,
    current_run,
    default_run_id,
    forget_run,
    open_spec_run,
)


@dataclass(frozen=True)
class _Algorithm:
    manifest: Manifest
    name: str
    """The step name (``name``, ``name-2``, … in a run)."""
    pull_policy: str | None = None
    """The steps' own pull policy; None: the run's."""
    credentials: tuple[RegistryAuth, ...] = ()
    """The credentials of the algorithm block it came from, used before the run's own."""


class AlgorithmTask(MaterializingTask):  # type: ignore[type-arg]
    """A Prefect task that runs one algorithm container per call (see :func:`algorithm`).

    ``submit``, ``map`` and direct calls check what they are given first and give the step
    its id; everything else is Prefect's own task. Each step materializes its outputs as
    Prefect assets (their store URIs), with the external inputs it reads as asset dependencies.
    """

    _pull_policy: str | None = None
    """Set by ``with_options(pull_policy=…)``: this task's steps' pull policy, over the algorithm's."""

    @property
    def algorithm(self) -> _Algorithm:
        return self.fn.__algodock__  # type: ignore[no-any-return]

    @property
    def pull_policy(self) -> str | None:
        """The pull policy of this task's steps (None: the run's)."""
        return self._pull_policy or self.algorithm.pull_policy

    def with_options(self, *args: Any, pull_policy: str | None = None, **kwargs: Any) -> AlgorithmTask:
        """Prefect's ``with_options``, and ``pull_policy`` for the steps of the new task."""
        if pull_policy is not None:
            check_pull_policy(pull_policy, f"algorithm {self.algorithm.name}")
        new = super().with_options(*args, **kwargs)
        new.__class__ = type(self)
        new._pull_policy = pull_policy or self._pull_policy  # type: ignore[attr-defined]
        return new  # type: ignore[return-value]

    def _call(self, run: RunHandle, inputs: Any, parameters: Any, step_id: str | None) -> dict[str, Any]:
        algo = self.algorithm
        spec = run.composed.spec
        if spec is not None and step_id in spec.steps:  # a step of the run's spec: validated when the spec was loaded
            assert step_id is not None
            run.plan(step_id, Planned(algo.name, algo.manifest))
            ticket = run.ticket(step_id, self.pull_policy or spec.pull_policies.get(step_id), run.composed.ctx.step_credentials.get(step_id, algo.credentials))
            return {"inputs": inputs, "parameters": spec.parameters[step_id], "step_id": step_id, "run_id": run.run_id, "ticket": ticket}
        label = run.composed.peek_step_id(algo.name, step_id)
        try:
            run.composed.check_fits(algo.manifest, f"algorithm {algo.name}, step {label}")
            run.composed.check_image(algo.manifest, f"algorithm {algo.name}, step {label}")
        except InvalidInput as exc:
            raise InvalidCall(exc.message) from None
        resolved, sources = check_call(run, algo.manifest, algo.name, label, inputs, parameters)
        step_id = run.composed.step_id(algo.name, step_id)
        run.composed.image_options(step_id, self.pull_policy, algo.credentials)
        run.plan(step_id, Planned(algo.name, algo.manifest, sources))
        return {"inputs": inputs, "parameters": resolved, "step_id": step_id, "run_id": run.run_id, "ticket": run.ticket(step_id, self.pull_policy, algo.credentials)}

    def _for_step(self, run: RunHandle, call: dict[str, Any]) -> AlgorithmTask:
        """This task as the step's: its task run named by the step id, its assets the outputs it
        materializes, its asset dependencies the external inputs it reads."""
        from algodock.flows.artifacts import spec_externals, step_assets

        step_id = call["step_id"]
        spec = run.composed.spec
        if spec is not None and step_id in spec.steps:
            externals = spec_externals(spec, step_id)
        else:
            externals = [os.fspath(v) for v in unwrap(call["inputs"] or {}).values() if isinstance(unwrap(v), (str, os.PathLike))]
        options = step_assets(run.composed.ctx, step_id, self.algorithm.manifest, externals)
        # spelled out: a pipeline step whose upstream failed (NotReady, its wait_for) is named before it resolves anything
        return self.with_options(task_run_name=step_id, **options)

    def _submit_step(self, run: RunHandle, call: dict[str, Any], wait_for: Any, kwargs: dict[str, Any]) -> Any:
        task = self._for_step(run, call)
        upstream = _futures_in(call["inputs"]) if not _under_dask() else []
        if upstream:  # waited for, then read by the task's body: Prefect names the task run (its step id) before it finds one failed
            call = {**call, "inputs": Deferred(call["inputs"])}
            wait_for = [*(wait_for or []), *upstream]
        with _dask_resources(self.algorithm.manifest):
            if run.runner is not None and not kwargs:
                future = run.runner.submit(task, parameters=_tracked_by_inputs(call), wait_for=wait_for)
            else:
                future = Task.submit(task, **_tracked_by_inputs(call), wait_for=wait_for, **kwargs)
        run.track(call["step_id"], future)
        return future

    def submit(self, inputs: Any = None, parameters: Any = None, step_id: str | None = None, run_id: str | None = None, ticket: Any = None, wait_for: Any = None, **kwargs: Any) -> Any:  # type: ignore[override]
        run = _run_for_call()
        if run is None:
            raise InvalidCall(f"algorithm {self.algorithm.name}: .submit() is for inside a flow; call the task directly to run one step")
        call = self._call(run, inputs, parameters, step_id)
        return self._submit_step(run, call, wait_for, kwargs)

    def map(self, inputs: Any = None, parameters: Any = None, step_id: Any = None, run_id: Any = None, ticket: Any = None, wait_for: Any = None, **kwargs: Any) -> Any:  # type: ignore[override]
        from prefect.futures import PrefectFutureList

        run = _run_for_call()
        if run is None:
            raise InvalidCall(f"algorithm {self.algorithm.name}: .map() is for inside a flow")
        raw_inputs, raw_params = unwrap(inputs), unwrap(parameters)
        mapped_inputs = isinstance(raw_inputs, (list, tuple))
        mapped_params = isinstance(raw_params, (list, tuple))
        sizes = {len(v) for v, m in ((raw_inputs, mapped_inputs), (raw_params, mapped_params)) if m}
        if len(sizes) != 1:
            raise InvalidCall(f"algorithm {self.algorithm.name}: .map() needs inputs and/or parameters as lists of one length (use unmapped(...) for a shared value)")
        n = sizes.pop()
        ids = list(step_id) if isinstance(step_id, (list, tuple)) else [None] * n
        futures = []
        for i in range(n):
            one_inputs = raw_inputs[i] if mapped_inputs else raw_inputs
            one_params = raw_params[i] if mapped_params else raw_params
            call = self._call(run, one_inputs, one_params, ids[i])
            futures.append(self._submit_step(run, call, wait_for, kwargs))
        return PrefectFutureList(futures)

    def __call__(self, inputs: Any = None, parameters: Any = None, step_id: str | None = None, run_id: str | None = None, ticket: Any = None, **kwargs: Any) -> Any:  # type: ignore[override]
        run = _run_for_call()
        if run is not None:
            call = self._call(run, inputs, parameters, step_id)
            return Task.__call__(self._for_step(run, call), **_tracked_by_inputs(call), **kwargs)
        one = open_run(None, None, None, True, None, None, self.algorithm.name)  # outside any flow: a one-step run
        try:
            call = self._call(one, inputs, parameters, step_id)
            return Task.__call__(self._for_step(one, call), **_tracked_by_inputs(call), **kwargs)
        finally:
            one.close()


UNTRACKED = ("parameters", "step_id", "run_id", "ticket")
"""An algorithm call's arguments that carry no data from other tasks (see :func:`_tracked_by_inputs`)."""


def _tracked_by_inputs(call: dict[str, Any]) -> dict[str, Any]:
    """``call`` as the task's arguments, all but its inputs quoted: Prefect draws an edge in the
    run graph to any task whose result holds an object passed to another task (by identity), and
    every step's result holds the run's id, which every step is passed. Unquoted, a step would
    depend on whichever step ended last before it started. The task's body gets them unquoted.
    Not under a ``DaskTaskRunner``: Dask rebuilds a quote (a namedtuple) as a plain tuple."""
    if _under_dask():
        return call
    return {**call, **{key: quote(call[key]) for key in UNTRACKED}}


def _futures_in(inputs: Any) -> list[Any]:
    """The Prefect futures anywhere in an algorithm call's ``inputs`` (not inside a ``quote``), once each."""
    from prefect.futures import PrefectFuture
    from prefect.utilities.collections import StopVisiting, visit_collection

    found: dict[int, Any] = {}

    def visit(value: Any) -> Any:
        if isinstance(value, (quote, Deferred)):
            raise StopVisiting
        if isinstance(value, PrefectFuture):
            found.setdefault(id(value), value)
        return value

    visit_collection(inputs, visit, return_data=False)
    return list(found.values())


def _run_for_call() -> RunHandle | None:
    return CURRENT_RUN.get() or implicit_run()


def _under_dask() -> bool:
    """The current flow runs its tasks with a ``DaskTaskRunner`` (its futures are read by Dask, not in a task's body)."""
    from prefect.context import FlowRunContext

    flow_ctx = FlowRunContext.get()
    runner = getattr(flow_ctx, "task_runner", None) if flow_ctx is not None else None
    return runner is not None and type(runner).__name__ == "DaskTaskRunner"


@contextlib.contextmanager
def _dask_resources(manifest: Manifest) -> Iterator[None]:
    """Under a ``DaskTaskRunner``, the step's resource request as Dask resources (as ``run --cluster`` places steps)."""
    if not _under_dask():
        yield
        return
    import dask

    from algodock.pipeline.placement import step_resources

    with dask.annotate(resources=step_resources(manifest.container_parameters.resource_request)):
        yield


def _manifest_of(source: Any) -> tuple[Manifest, tuple[RegistryAuth, ...]]:
    """The manifest of ``source``, and the registry credentials of its algorithm block (if any)."""
    from algodock.blocks import AlgorithmBlock, algorithm_block_auths, load_algorithm_block

    if isinstance(source, Manifest):
        return source, ()
    if isinstance(source, Path):
        return load_manifest(source), ()
    if isinstance(source, str) and (Path(source).is_file() or source.endswith(".json")):
        return load_manifest(Path(source)), ()
    if isinstance(source, str):
        block, name = load_algorithm_block(source), source
        return block.to_manifest(f"block {source}"), algorithm_block_auths(block, name)
    if isinstance(source, AlgorithmBlock):
        name = getattr(source, "_block_document_name", None) or source.manifest.name
        return source.to_manifest(), algorithm_block_auths(source, name)
    raise InvalidCall(f"algorithm({type(source).__name__}): expected a manifest file path, a Manifest, an AlgorithmBlock or a saved AlgorithmBlock's name")


def algorithm(source: Any, *, name: str | None = None, retries: int | None = None, pull_policy: str | None = None) -> AlgorithmTask:
    """An algorithm as a Prefect task: ``source`` a manifest file, a ``Manifest``, an
    ``AlgorithmBlock`` or a saved block's name.

    Call it like any Prefect task with ``inputs`` (slot -> a path, URI, ``pathlib.Path``, a
    list of them for a ``multiple`` slot, a ``pyarrow.Table``, an upstream algorithm's future
    or :class:`StepResult`, or :func:`output`) and ``parameters`` (checked against the
    manifest's schema, defaults filled); ``step_id`` names the step (default ``name``,
    ``name-2``, …). ``retries``: retries after ``exit_code``, ``timeout`` or ``oom``
    (``infrastructure`` is always retried, as in pipelines). ``pull_policy``: ``if_not_present``,
    ``always`` or ``never`` for this algorithm's steps (default: the run's; also
    ``.with_options(pull_policy=…)``). An algorithm block's ``registry_credentials`` are used
    for its image before the run's own.
    """
    manifest, credentials = _manifest_of(source)
    step_name = name or manifest.name
    if pull_policy is not None:
        check_pull_policy(pull_policy, f"algorithm {step_name}")
    user_retries = int(retries or 0)

    def run_algorithm(inputs: dict[str, Any], parameters: dict[str, Any] | None = None, step_id: str | None = None, run_id: str | None = None, ticket: RunTicket | None = None) -> Any:
        assert step_id is not None and run_id is not None, "algorithm tasks are called through submit/map/__call__"
        return run_algorithm_step(step_name, manifest, inputs, dict(parameters or {}), step_id, run_id, ticket)

    run_algorithm.__name__ = run_algorithm.__qualname__ = step_name.replace("-", "_")
    run_algorithm.__algodock__ = _Algorithm(manifest, step_name, pull_policy, credentials)  # type: ignore[attr-defined]
    return AlgorithmTask(
        fn=run_algorithm,
        assets=[],  # each step's own, given at its call (see AlgorithmTask._for_step)
        materialized_by=MATERIALIZED_BY,
        name=step_name,
        task_run_name="{step_id}",
        cache_policy=NO_CACHE,
        persist_result=False,
        **retry_options(user_retries),
    )


__all__ = [
    "AlgorithmFailed", "AlgorithmTask", "InvalidCall", "OutputRef", "RunHandle", "RunTicket", "StepResult", "algodock_run", "algorithm", "output",
    # for the pipeline flow, which submits its steps as algorithm tasks
    "check_concurrency_limit", "current_run", "default_run_id", "execute_in_task", "forget_run", "open_spec_run", "retry_options",
]
