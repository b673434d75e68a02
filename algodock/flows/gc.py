"""The ``algodock-gc`` flow: :func:`algodock.store.gc.collect` on a schedule, with a summary artifact.

The engine does the work (leases, pins, the plan, the order that survives a kill); this flow
only resolves the store parameter (a path, an ``s3://`` URI or a saved store block), logs,
and publishes what went as a markdown artifact under the stable key ``algodock-gc`` (the
Artifacts page keeps the history of every gc).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from algodock.blocks import StoreBlock, resolve_store
from algodock.store.gc import GcReport, Retention, collect, parse_duration

ARTIFACT_KEY = "algodock-gc"


def summary_markdown(store_uri: str, report: GcReport) -> str:
    """The artifact: figures first, then the runs removed, kept and left alone."""
    verb = "would remove" if report.dry_run else "removed"
    lines = [
        f"# algodock gc {report.gc_id}{' (dry run)' if report.dry_run else ''}",
        f"Store `{store_uri}`: {verb} **{len(report.runs_removed)}** run(s), **{report.files}** file(s), **{report.bytes}** bytes; "
        f"kept {len(report.runs_kept)} run(s).",
        "",
        "| what | count |",
        "|---|---|",
        f"| cache entries | {report.cache_entries} |",
        f"| content objects | {report.objects} |",
        f"| pins | {report.pins} |",
        f"| work folders | {report.work_folders} |",
        f"| files listed | {report.listed} |",
        "",
        f"**Removed:** {', '.join(f'`{r}`' for r in report.runs_removed) or 'none'}",
        "",
        f"**Kept:** {', '.join(f'`{r}`' for r in report.runs_kept) or 'none'}",
    ]
    if report.runs_busy:
        lines += ["", f"**Left alone (a live process writes them):** {', '.join(f'`{r}`' for r in report.runs_busy)}"]
    return "\n".join(lines)


@flow(name="algodock-gc", log_prints=False)
def gc_store(
    store: str | StoreBlock | None = None,
    keep_last: int | None = None,
    older_than: str | None = None,
    keep: list[str] | None = None,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Collect ``store`` as ``algodock gc`` does; return the ``--json`` document.

    ``keep_last``: the newest N runs of each pipeline stay; ``older_than``: runs that started
    longer ago than this go (``30d``, ``12h``); a run either rule keeps stays; ``keep``: run
    ids that stay whatever the rules say; ``dry_run``: only say what would go.
    """
    logger = get_run_logger()
    the_store = resolve_store(store)
    retention = Retention(keep_last=keep_last, older_than=parse_duration(older_than) if older_than else None, keep=frozenset(keep or ()))
    report = collect(the_store, retention, dry_run=dry_run)
    logger.info(
        "gc %s of %s: %s %d runs, %d files, %d bytes; kept %d runs",
        report.gc_id, the_store.uri(), "would remove" if dry_run else "removed", len(report.runs_removed), report.files, report.bytes, len(report.runs_kept),
    )
    create_markdown_artifact(summary_markdown(the_store.uri(), report), key=ARTIFACT_KEY, description=f"algodock gc {report.gc_id}")
    return report.as_json()
