"""Scale up on one host: what grows with the number of steps (no engine needed)."""

from __future__ import annotations

import json
from datetime import datetime, timezone

from algodock.records import LineageDocument, StepRecord
from algodock.store.backends import LocalStore, lineage_rel


class CountingStore(LocalStore):
    """A real local store that counts the bytes of the JSON documents it writes."""

    def __init__(self, root) -> None:
        super().__init__(root)
        self.written: dict[str, int] = {}

    def write_json(self, rel, obj, *, durable=True) -> None:
        name = rel.rsplit("/", 1)[-1]
        self.written[name] = self.written.get(name, 0) + len(json.dumps(obj))
        super().write_json(rel, obj, durable=durable)


def test_the_lineage_of_a_1000_step_run_is_written_in_batches_not_on_every_change(tmp_path):
    from algodock.lineage.ledger import Ledger

    n = 1000
    store = CountingStore(tmp_path / "store")
    doc = LineageDocument(run_id="big", pipeline="p", spec_sha256="0" * 64, store=store.uri(),
                          started_at=datetime.now(timezone.utc), steps=[StepRecord(id=f"s{i}") for i in range(n)])
    ledger = Ledger(doc, store)
    ledger.start()
    one_doc = store.written["lineage.json"]
    for i in range(n):  # every step changes twice: running, then succeeded
        ledger.update(StepRecord(id=f"s{i}", status="running"))
        ledger.update(StepRecord(id=f"s{i}", status="succeeded", command=["true"]))
    ledger.finish("succeeded")
    final = json.loads((tmp_path / "store" / lineage_rel("big")).read_text())
    assert final["status"] == "succeeded" and all(s["status"] == "succeeded" for s in final["steps"])
    assert [s["id"] for s in final["steps"]] == [f"s{i}" for i in range(n)]  # order kept
    # 2000 changes; rewriting the whole document on each would write ~2000 documents
    assert store.written["lineage.json"] < 10 * one_doc * 2, store.written
    assert ledger.interval == 10.0
