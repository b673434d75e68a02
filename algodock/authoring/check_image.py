"""``algodock check-image``: prove an image meets the contract before a pipeline uses it.

The image runs through the real sandbox (:func:`algodock.runtime.runner.run_step`), on the sample
inputs, as few times as the rules need:

- run 1, as a pipeline would: gives ``exit``, ``outputs``, ``resources`` and the first
  output hashes for ``determinism``;
- run 2, with ``algo_input.json`` mounted elsewhere and ``ALGORITHM_INPUT_PATH`` pointing
  there: gives ``input_path`` and the second hashes for ``determinism``;
- run 3 only when run 1 succeeded and run 2 did not (the second hashes then come from it).

Outputs whose parquet bytes break their slot's declared schema (or a sample input that breaks
its slot's) are charged to ``schema``. A peak far under the memory request is a warning with
the suggested request, never a failure (the sample is small, real inputs are not); an ``oom``
is a failure.

Each failure is charged to the one rule it breaks (an ``oom`` to ``resources``, a write
outside ``/work/output`` to ``outputs``, a non-zero exit to ``exit``); a rule that could not
be judged because of another says so as a warning.

>>> report = check_image(Path("my-algo/manifest.json"))   # doctest: +SKIP
>>> report.verdict, [(c.id, c.status) for c in report.checks][:2]   # doctest: +SKIP
('pass', [('manifest', 'pass'), ('image', 'pass')])
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from algodock.authoring.init import SAMPLE_DIR
from algodock.contract.manifest import ALGO_OUTPUT_NAME, Manifest, load_manifest
from algodock.errors import InvalidInput, InvalidManifest, StepFailure
from algodock.records import ResolvedImage, StepRecord
from algodock.runtime.usage import fmt_bytes, suggest_memory_gb

if TYPE_CHECKING:
    import docker

Status = Literal["pass", "warn", "fail"]
MOVED_DESCRIPTOR = "/algodock-check/elsewhere/algo_input.json"
"""Where run 2 mounts the descriptor: an algorithm that hard-codes /work/algo_input.json fails."""
LARGE_IMAGE_BYTES = 2 * 1024**3
MANY_LAYERS = 40
GROSS_OVER_REQUEST_BYTES = 1024**3
"""An over-request is a warning (never a failure) when the peak is under 10% of it and this much of it is never used."""
HOME_LIKE = ("HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "MPLCONFIGDIR", "HF_HOME", "TORCH_HOME", "PIP_CACHE_DIR")
WRITABLE = ("/tmp", "/work/output")


@dataclass
class Check:
    """One rule's verdict; ``message`` ends with the one-line fix when it is not a pass."""

    id: str
    status: Status
    message: str


@dataclass
class Report:
    """What ``check-image --json`` prints."""

    image: str
    image_id: str | None = None
    repo_digest: str | None = None
    """``repo@sha256:…`` when the image came from a registry."""
    checks: list[Check] = field(default_factory=list)
    usage: dict[str, Any] | None = None

    @property
    def verdict(self) -> Literal["pass", "fail"]:
        return "fail" if any(c.status == "fail" for c in self.checks) else "pass"

    def add(self, id: str, status: Status, message: str, fix: str | None = None) -> None:
        self.checks.append(Check(id, status, f"{message}; fix: {fix}" if fix and status != "pass" else message))

    def as_dict(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "image_id": self.image_id,
            "repo_digest": self.repo_digest,
            "verdict": self.verdict,
            "checks": [asdict(c) for c in self.checks],
            "usage": self.usage,
        }


def sample_inputs(manifest: Manifest, manifest_path: Path, given: Mapping[str, Path]) -> dict[str, Path]:
    """``--input`` bindings, else ``sample/<slot>`` beside the manifest for every slot."""
    inputs = dict(given)
    root = manifest_path.parent / SAMPLE_DIR
    missing = []
    for slot in manifest.inputs:
        if slot.name in inputs:
            continue
        folder = root / slot.name
        if folder.is_dir() and any(folder.iterdir()):
            files = [p for p in folder.iterdir() if not p.name.startswith(".")]
            inputs[slot.name] = folder if slot.multiple or len(files) != 1 else files[0]
        elif slot.required:
            missing.append(slot.name)
    if missing:
        raise InvalidInput(
            "; ".join(f"no sample for required input {s!r}: pass --input {s}=PATH or put files in {root / s}/" for s in missing)
        )
    return inputs


def _first_line(result: StepRecord) -> str:
    """``kind: first line of the message``, and for a non-zero exit the last line the algorithm said."""
    assert result.failure is not None
    head = (result.failure.message.strip().splitlines() or [""])[0].removesuffix("; last log lines:")[:200]
    said = next((line.strip() for line in reversed(result.log_tail) if line.strip()), "")
    if result.failure.kind == "exit_code" and said:
        head += f" ({said[:200]})"
    return f"{result.failure.kind}: {head}"


def _wrote_outside(result: StepRecord) -> str | None:
    """The log line of a write the read-only root refused, if any."""
    lines = list(result.log_tail) + (result.failure.message.splitlines() if result.failure else [])
    return next((line.strip() for line in reversed(lines) if "Read-only file system" in line), None)


def _hashes(result: StepRecord) -> dict[str, str]:
    return {o.name: o.sha256 for o in result.outputs}


def _runner(manifest: Manifest, inputs: dict[str, Path], params: dict[str, Any], client: docker.DockerClient, image: ResolvedImage, scratch: Path, on_log: Callable[[str], None] | None) -> Callable[..., StepRecord]:
    from algodock.runtime.runner import run_step

    count = 0
    output_dirs: dict[int, Path] = {}

    def run(**kw: Any) -> StepRecord:
        nonlocal count
        count += 1
        output_dir = scratch / f"run{count}" / "output"
        result = run_step(
            manifest,
            inputs=inputs,
            parameters=params,
            output_dir=output_dir,
            run_id=f"check-{uuid.uuid4().hex[:10]}",
            step_id=manifest.name,
            client=client,
            image=image,
            on_log=(lambda line: on_log(f"run {count}: {line}")) if on_log else None,
            **kw,
        )
        output_dirs[id(result)] = output_dir
        return result

    run.output_dirs = output_dirs  # type: ignore[attr-defined]  (for the undeclared-files rule)
    return run


def check_image(
    manifest_path: Path,
    *,
    inputs: Mapping[str, Path] | None = None,
    params: Mapping[str, Any] | None = None,
    client: docker.DockerClient | None = None,
    on_log: Callable[[str], None] | None = None,
) -> Report:
    """Run every rule on the manifest's image; the report's verdict is ``fail`` when one fails."""
    report = Report(image="?")
    try:
        manifest = load_manifest(manifest_path)
    except InvalidManifest as exc:
        report.add("manifest", "fail", "; ".join(getattr(exc, "errors", None) or [str(exc)]), "correct the fields named (`algodock validate` checks it)")
        return report
    cp = manifest.container_parameters
    report.image = cp.image
    report.add("manifest", "pass", f"{manifest_path}: {manifest.name} {manifest.version} is valid")

    from algodock.runtime.engine import docker_client, resolve_image
    from algodock.runtime.volumes import staging_mode

    client = client or docker_client()
    try:
        resolved = resolve_image(client, cp.image, on_log=on_log)
    except StepFailure as exc:
        report.add("image", "fail", str(exc), f"build it: docker build -t {cp.image} {manifest_path.parent}")
        return report
    report.image_id, report.repo_digest = resolved.id, resolved.repo_digest
    attrs = client.images.get(resolved.id).attrs
    config = attrs.get("Config") or {}
    size = int(attrs.get("Size") or 0)
    layers = len((attrs.get("RootFS") or {}).get("Layers") or [])
    came_from = f", from {resolved.repo_digest}" if resolved.repo_digest else ", built here (no repo digest)"
    report.add("image", "pass", f"{cp.image} = {resolved.id} ({fmt_bytes(size)}, {layers} layers{came_from})")
    _check_user(report, resolved)

    try:
        bound = sample_inputs(manifest, manifest_path, inputs or {})
    except InvalidInput as exc:
        report.add("inputs", "fail", str(exc), f"init creates {SAMPLE_DIR}/<slot>/ beside the manifest; keep a small sample there")
        return report
    scratch = Path(tempfile.mkdtemp(prefix=".algodock-check-"))
    try:
        run = _runner(manifest, bound, dict(params or {}), client, resolved, scratch, on_log)
        first = run()
        report.usage = first.usage.as_dict() if first.usage else None
        _check_exit_and_outputs(report, manifest, first, run.output_dirs.get(id(first)))  # type: ignore[attr-defined]
        _check_schema(report, manifest, first)
        second: StepRecord | None = None
        if first.failure is not None and first.failure.kind == "timeout":
            report.add("input_path", "warn", "not judged: run 1 timed out (see exit)")
        elif staging_mode(client) == "volume":
            report.add("input_path", "warn", "not judged: the engine is remote (named-volume staging cannot move the descriptor)")
            second = run() if first.ok else None
        else:
            second = run(descriptor_path=MOVED_DESCRIPTOR)
            _check_input_path(report, first, second)
            if first.ok and not second.ok:
                second = run()
        _check_determinism(report, first, second)
        _check_resources(report, manifest, first, second)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    _check_lint(report, manifest, config, size, layers)
    return report


def _check_user(report: Report, image: ResolvedImage) -> None:
    from algodock.runtime.sandbox import run_as

    who = run_as(image.user)
    if who.uid is not None and who.user.split(":")[0] == image.user.split(":")[0] and image.user:
        report.add("user", "pass", f"runs as USER {image.user}")
    elif who.uid is None:
        report.add("user", "pass", f"runs as USER {image.user!r} (a name, resolved with the image's /etc/passwd at run time; a numeric USER is surer)")
    else:
        shown = image.user or "(none: root)"
        report.add("user", "warn", f"the image's USER is {shown}; the platform remaps it to uid {who.uid}", "add `USER 1000:1000` (numeric, non-root) to the Dockerfile")


def _check_exit_and_outputs(report: Report, manifest: Manifest, first: StepRecord, output_dir: Path | None = None) -> None:
    cp = manifest.container_parameters
    wall = first.usage.wall_seconds if first.usage else None
    took = f" in {wall:.1f} s" if wall is not None else ""
    kind = first.failure.kind if first.failure else None
    outside = _wrote_outside(first) if kind == "exit_code" else None
    if _schema_mismatch(first):  # the schema rule judges it; the container itself did its part
        if kind == "invalid_input":
            report.add("exit", "warn", "not started: the sample input does not match the declared schema (see schema)")
            report.add("outputs", "warn", "not judged: the container did not start (see schema)")
        else:
            report.add("exit", "pass", f"exited 0{took} (timeout_seconds {cp.timeout_seconds:g})")
            report.add("outputs", "pass", "every declared output was found (their columns: see schema)")
        return
    if kind is None:
        report.add("exit", "pass", f"exited 0{took} (timeout_seconds {cp.timeout_seconds:g})")
    elif outside:
        report.add("exit", "warn", f"exited {first.exit_code}{took}: a write outside /work/output failed (see outputs)")
    elif kind == "oom":
        report.add("exit", "warn", f"killed by the memory limit{took} (see resources)")
    elif kind in ("missing_output", "invalid_output", "disk_limit"):
        report.add("exit", "pass", f"exited 0{took} (timeout_seconds {cp.timeout_seconds:g})")
    elif kind == "timeout":
        report.add("exit", "fail", f"ran past timeout_seconds={cp.timeout_seconds:g} and was killed", "make it faster on the sample, or raise container_parameters.timeout_seconds")
    elif kind == "invalid_input":
        report.add("exit", "fail", f"did not start: {_first_line(first)}", "fix the sample inputs or --param values named")
    else:
        report.add("exit", "fail", _first_line(first), "run it with `algodock run-step` and read the log; exit 0 only on success")

    if outside:
        report.add("outputs", "fail", f"wrote outside /work/output: {outside[:200]}", "write results to the descriptor's output_path and scratch to /tmp ($HOME is /tmp)")
    elif kind in ("missing_output", "invalid_output", "disk_limit"):
        fixes = {
            "missing_output": "write every required output as <name>.<format> or <name>/ in /work/output, or list it in algo_output.json",
            "invalid_output": f"keep {ALGO_OUTPUT_NAME} valid (docs/contract.md §3) and paths inside /work/output",
            "disk_limit": "write less, or raise container_parameters.output_mb / output_files",
        }
        report.add("outputs", "fail", _first_line(first), fixes[kind])
    elif first.ok:
        names = ", ".join(f"{o.name} ({o.rows} rows)" if o.rows is not None else o.name for o in first.outputs)
        stray = _undeclared(first, output_dir)
        if stray:
            report.add("outputs", "warn", f"wrote {names}; also files no output declares, which are not stored: {', '.join(stray[:5])}", "declare them in the manifest's outputs, or write them to /tmp")
        else:
            report.add("outputs", "pass", f"wrote {names or 'no declared outputs'}" + (f" and a valid {ALGO_OUTPUT_NAME}" if first.metrics or first.message is not None else ""))
    else:
        report.add("outputs", "warn", "not judged: run 1 did not finish (see exit)")


def _schema_mismatch(result: StepRecord) -> bool:
    from algodock.runtime.handoff import MISMATCH_HEAD

    return result.failure is not None and result.failure.kind in ("invalid_input", "invalid_output") and MISMATCH_HEAD in result.failure.message.splitlines()[0]


def _check_schema(report: Report, manifest: Manifest, first: StepRecord) -> None:
    """The outputs' (and sample inputs') bytes against the slots' declared schemas."""
    fix = "make the data match, or correct the declaration: `algodock schema FILE_OR_DIR` prints what the data holds"
    if _schema_mismatch(first):
        assert first.failure is not None
        lines = first.failure.message.splitlines()
        report.add("schema", "fail", "; ".join(lines[1:6]) + (f"; … ({len(lines) - 6} more)" if len(lines) > 6 else ""), fix)
        return
    declared = [o.name for o in manifest.outputs if o.schema_ is not None]
    undeclared = [o.name for o in manifest.outputs if o.format == "parquet" and o.schema_ is None]
    hint = f"; {', '.join(undeclared)} declare(s) no schema (manifest 0.3: `algodock schema` prints one to paste)" if undeclared else ""
    if not first.ok:
        report.add("schema", "warn", f"not judged: run 1 did not finish (see exit){hint}")
    elif declared:
        report.add("schema", "pass", f"{', '.join(declared)} match(es) the declared schema{hint}")
    else:
        report.add("schema", "pass", f"no output declares a schema{hint}")


def _undeclared(result: StepRecord, root: Path | None) -> list[str]:
    """Top-level entries of the output folder ``root`` that no declared output covers."""
    if root is None:
        return []
    kept = {ALGO_OUTPUT_NAME}
    for o in result.outputs:
        try:
            kept.add(Path(o.path or o.uri).relative_to(root).parts[0])
        except ValueError:
            continue
    try:
        return sorted(p.name for p in root.iterdir() if p.name not in kept)
    except OSError:
        return []


def _check_input_path(report: Report, first: StepRecord, second: StepRecord) -> None:
    fix = "read the descriptor from os.environ['ALGORITHM_INPUT_PATH'], never a fixed /work/algo_input.json"
    if first.ok and second.ok:
        report.add("input_path", "pass", f"honours ALGORITHM_INPUT_PATH (run 2 had the descriptor at {MOVED_DESCRIPTOR})")
    elif first.ok:
        report.add("input_path", "fail", f"with the descriptor at {MOVED_DESCRIPTOR} (ALGORITHM_INPUT_PATH) run 2 failed: {_first_line(second)}", fix)
    elif second.ok:
        report.add("input_path", "warn", "run 1 failed but run 2 (descriptor moved) succeeded: the image behaves differently between runs")
    elif first.failure.kind == second.failure.kind:  # type: ignore[union-attr]
        report.add("input_path", "pass", f"run 2, with the descriptor moved, ended the same way as run 1 ({first.failure.kind})")  # type: ignore[union-attr]
    else:
        report.add("input_path", "fail", f"run 1 ended with {first.failure.kind}, run 2 with the descriptor moved with {_first_line(second)}", fix)  # type: ignore[union-attr]


def _check_determinism(report: Report, first: StepRecord, second: StepRecord | None) -> None:
    if not first.ok or second is None or not second.ok:
        report.add("determinism", "warn", "not judged: two successful runs are needed (see exit / input_path)")
        return
    a, b = _hashes(first), _hashes(second)
    differ = sorted(n for n in a.keys() | b.keys() if a.get(n) != b.get(n))
    if differ:
        report.add("determinism", "warn", f"two runs on the same input wrote different bytes for: {', '.join(differ)} (the cache assumes the same input gives the same output)", "sort rows, seed random generators from a parameter, keep clocks and hostnames out of outputs")
    else:
        report.add("determinism", "pass", f"two runs gave the same sha256 for {len(a)} output(s)")


def _check_resources(report: Report, manifest: Manifest, first: StepRecord, second: StepRecord | None) -> None:
    rr = manifest.container_parameters.resource_request
    limit = rr.memory_bytes
    runs = [r for r in (first, second) if r is not None and r.usage is not None]
    peaks = [r.usage.peak_memory_bytes for r in runs if r.usage.peak_memory_bytes is not None]  # type: ignore[union-attr]
    peak = max(peaks) if peaks else None
    u = first.usage
    cpu = ""
    if u is not None and u.cpu_seconds is not None and u.wall_seconds:
        cores = u.cpu_seconds / u.wall_seconds
        cpu = f"; cpu {u.cpu_seconds:.2f} s over {u.wall_seconds:.1f} s wall ({cores:.2f} of {rr.cpu_millicore / 1000:g} cores)"
        if cores > 0.9 * rr.cpu_millicore / 1000:
            cpu += ": at its CPU quota, more cpu_millicore would make it faster"
    if first.failure is not None and first.failure.kind == "oom":
        shown = fmt_bytes(peak) if peak else "unknown"
        report.add("resources", "fail", f"killed at its memory limit: peak {shown} of {fmt_bytes(limit)} ({rr.memory_gb:g} GB){cpu}", f"raise resource_request.memory_gb above {rr.memory_gb:g} (to {rr.memory_gb * 2:g} to start), or use less memory")
        return
    if peak is None:
        report.add("resources", "warn", f"peak memory not measured (no cgroup accounting and no engine stats){cpu}", "run check-image on a local engine to measure it")
        return
    share = peak / limit
    suggested = suggest_memory_gb(peak)
    head = f"peak memory {fmt_bytes(peak)} of {rr.memory_gb:g} GB requested ({share:.0%}){cpu}"
    if share > 0.9:
        report.add("resources", "warn", f"{head}: close to the limit, the next input may be killed", f"set resource_request.memory_gb to {max(suggested, rr.memory_gb * 1.5):g}")
    elif share < 0.1 and limit - peak >= GROSS_OVER_REQUEST_BYTES:
        # A warning, never a failure: check-image runs on the small sample/ input and real inputs
        # are larger; failing here would push authors to ask for too little and meet oom in production.
        report.add(
            "resources", "warn",
            f"{head}: far under the request on the sample input (real inputs are larger: size it on one of those); suggested request: memory_gb {suggested:g}",
            f"if the sample is representative, set resource_request.memory_gb to {suggested:g}; the unused memory is held from other steps",
        )
    elif share < 0.5 and suggested < rr.memory_gb:
        report.add("resources", "pass", f"{head}; suggested request: memory_gb {suggested:g}")
    else:
        report.add("resources", "pass", head)


def _latest_tag(ref: str) -> bool:
    if "@" in ref or ref.startswith("sha256:"):
        return False
    last = ref.rsplit("/", 1)[-1]
    return ":" not in last or last.endswith(":latest")


def _check_lint(report: Report, manifest: Manifest, config: dict[str, Any], size: int, layers: int) -> None:
    cp = manifest.container_parameters
    issues: list[tuple[str, str]] = []
    entrypoint = config.get("Entrypoint") or []
    if entrypoint:
        issues.append((f"ENTRYPOINT {entrypoint} receives the manifest's command {cp.command} as its arguments", "remove the ENTRYPOINT (or `ENTRYPOINT []`) so the command runs as written"))
    if _latest_tag(cp.image):
        issues.append((f"image {cp.image!r} uses the moving `latest` tag", "tag each build with a version (myorg/algo:1.2.0) or use a digest"))
    if size > LARGE_IMAGE_BYTES:
        issues.append((f"the image is {fmt_bytes(size)}", "use a slim base and a multi-stage build; keep data out of the image"))
    if layers > MANY_LAYERS:
        issues.append((f"the image has {layers} layers", "merge RUN steps"))
    env = dict(e.split("=", 1) for e in config.get("Env") or [] if "=" in e)
    for key in HOME_LIKE:
        value = env.get(key)
        if value and key != "HOME" and not value.startswith(WRITABLE):
            issues.append((f"ENV {key}={value} points into the read-only image", f"point {key} under /tmp (the sandbox sets HOME=/tmp)"))
    if issues:
        report.add("lint", "warn", "; ".join(i for i, _ in issues), "; ".join(f for _, f in issues))
    else:
        report.add("lint", "pass", f"no ENTRYPOINT, versioned tag, {fmt_bytes(size)} in {layers} layers")
