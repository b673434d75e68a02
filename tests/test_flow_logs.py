"""LogBatches: container lines reach Prefect's logger in a few records, none lost or reordered."""

from __future__ import annotations

import threading

from algodock.flows.logs import LogBatches


def test_lines_go_in_batches_in_order_and_the_last_on_exit() -> None:
    sent: list[str] = []
    with LogBatches(sent.append, max_lines=100, max_delay=60) as on_log:
        for i in range(250):
            on_log(f"line {i}")
        assert len(sent) == 2, "two full batches so far"
    assert len(sent) == 3 and "\n".join(sent).splitlines() == [f"line {i}" for i in range(250)]


def test_a_batch_is_bounded_in_bytes() -> None:
    sent: list[str] = []
    with LogBatches(sent.append, max_lines=10_000, max_bytes=1000, max_delay=60) as on_log:
        for _ in range(50):
            on_log("x" * 99)
    assert all(len(batch) <= 1000 + 99 for batch in sent) and sum(b.count("x" * 99) for b in sent) == 50


def test_a_quiet_container_s_last_lines_are_sent_within_max_delay() -> None:
    arrived = threading.Event()
    sent: list[str] = []

    def emit(text: str) -> None:
        sent.append(text)
        arrived.set()

    batches = LogBatches(emit, max_lines=100, max_delay=0.05)
    batches("only line")
    assert arrived.wait(5), "the timer sent nothing"
    assert sent == ["only line"]
    batches.flush()
    assert sent == ["only line"], "nothing left to send"
