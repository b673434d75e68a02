"""`algodock cache explain` on a 1,000-step run, against reading that run's lineage document.

Two runs of a 1,000-step pipeline are written as the engine writes them (lineage documents and
the key document each lookup keeps); the second changed one parameter of every step.
``explain`` of one step reads the run, finds the nearest earlier run's step and compares
the two key documents; the baseline is :func:`read_document` of the run alone (the floor:
explain must read it). Reported: best and median of each, and their ratio.

    .venv/bin/python bench/explain.py [--quick]     # --quick: 200 steps
"""

from __future__ import annotations

import _util  # noqa: F401  (environment and sys.path first)

import sys
from datetime import datetime, timedelta, timezone

from _util import best_and_median, exit_status, fmt_s, print_table, quick, scratch_dir, timed, verdict

REPEATS = 7


def build(root: str, steps: int) -> None:
    from algodock.cache import keys_rel
    from algodock.records import InputRecord, LineageDocument, OutputRecord, StepRecord
    from algodock.store.backends import lineage_rel, open_store

    store = open_store(root)
    start = datetime.now(timezone.utc)
    for n, (run_id, k) in enumerate((("before", 1), ("after", 2))):
        records = []
        for i in range(steps):
            rec = StepRecord(id=f"s{i:04d}", status="succeeded", algorithm="a", algorithm_version="1", image="t:1", image_id="sha256:" + "1" * 64,
                             command=["run"], parameters={"k": k, "i": i}, cache_key=f"{n}{i:063d}",
                             inputs=[InputRecord(name="x", uri=f"/data/{i}", sha256="2" * 64)],
                             outputs=[OutputRecord(name="y", uri=f"{root}/runs/{run_id}/y{i}", sha256="3" * 64, format="binary")])
            records.append(rec)
            store.write_json(keys_rel(run_id, rec.id), {"key": rec.cache_key, "use_cache": True, "image": "t:1", "document": {
                "cache_version": "3", "image_id": rec.image_id, "command": rec.command, "parameters": rec.parameters, "env": {}, "gpu": 0,
                "algo_input": {"input_data": [{"name": "x", "files": [f"/work/input/x/{i}"], "source_uri": f"/data/{i}", "sha256": "2" * 64}]}}})
        doc = LineageDocument(run_id=run_id, pipeline="big", spec_sha256="0", status="succeeded", started_at=start + timedelta(minutes=n), store=store.uri(), steps=records)
        store.write_json(lineage_rel(run_id), doc.model_dump(mode="json"))


def main() -> int:
    from algodock.lineage.explain import explain
    from algodock.lineage.queries import read_document
    from algodock.store.backends import open_store

    steps = 200 if quick() else 1000
    with scratch_dir("explain") as root:
        build(str(root), steps)
        store = open_store(str(root))
        ours, base = [], []
        for _ in range(REPEATS):  # alternate, so drift affects both alike
            result: dict = {}
            ours.append(timed(lambda: result.update(explain(store, "after", f"s{steps // 2:04d}"))))
            base.append(timed(lambda: read_document(store, "after")))
        assert [c["part"] for c in result["differences"]] == ["parameter"], result
    (ob, om), (bb, bm) = best_and_median(ours), best_and_median(base)
    print_table(["steps", "explain best", "median", "read_document best", "median", "ratio (median)"], [[steps, fmt_s(ob), fmt_s(om), fmt_s(bb), fmt_s(bm), f"{om / bm:.2f}x"]])
    # explain reads this run and the one before it: about twice the floor
    verdict("cache explain / reading the run's lineage document (medians)", om / bm, 3.0)
    return exit_status()


if __name__ == "__main__":
    sys.exit(main())
