"""The session's Prefect server records task runs late on purpose (see ``prefect_harness``), and
:func:`tests.waiting.settled_task_runs` waits for them."""

from __future__ import annotations

from tests.conftest import RECORDER_FLUSH_SECONDS
from tests.waiting import settled_task_runs


def test_the_session_server_records_task_runs_in_batches(prefect_harness):
    """The lag is the server's own setting, read back from its admin API: a read that does not
    wait for the task runs fails here every time."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        recorder = client.request("GET", "/admin/settings").json()["server"]["services"]["task_run_recorder"]
    assert recorder["batch_size"] >= 1000 and recorder["flush_interval"] == RECORDER_FLUSH_SECONDS, recorder


def test_settled_task_runs_waits_for_every_task_run_to_be_recorded_ended(prefect_harness):
    from prefect import flow, task
    from prefect.runtime import flow_run

    @task
    def one(x: int) -> int:
        return x

    @task
    def fails() -> None:
        raise ValueError("no")

    @flow
    def three() -> str:
        a = one.submit(1)
        one.submit(a).wait()
        fails.submit().wait()
        return str(flow_run.id)

    flow_run_id = three(return_state=True).state_details.flow_run_id
    runs = settled_task_runs(flow_run_id, 3)
    assert sorted(r.state.name for r in runs.values()) == ["Completed", "Completed", "Failed"], runs
