"""The device-visits example composed in Python: your tasks and algorithm containers in one flow.

A Python task reads the pings and keeps the fixes that look sane (a table), the two example
algorithms turn them into visits and per-device dwell statistics (containers, in the sandbox,
cached and recorded in the lineage), and a Python task ranks the devices. In the Prefect UI
the run graph shows all four, with their edges.

    python examples/python_flow.py [PINGS_FOLDER] [--store DIR]

``make demo`` runs it after the pipeline; ``prefect.yaml`` deploys it (``device-visits-python``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from prefect import flow, task

from algodock.flows import StepResult, algodock_run, algorithm

HERE = Path(__file__).resolve().parent
visits = algorithm(HERE / "device-visits" / "manifest.json")
stats = algorithm(HERE / "dwell-stats" / "manifest.json")


@task
def clean_pings(folder: str) -> pa.Table:
    """The pings with a plausible position: bad GPS fixes (0/0, out of range) dropped."""
    table = ds.dataset(folder, format="parquet").to_table()
    sane = pc.and_(pc.and_(pc.less_equal(pc.abs(table["lat"]), 90), pc.less_equal(pc.abs(table["lon"]), 180)),
                   pc.or_(pc.not_equal(table["lat"], 0), pc.not_equal(table["lon"], 0)))
    return table.filter(sane)


@task
def top_devices(result: StepResult, n: int = 5) -> list[dict]:
    """The devices with the longest total dwell."""
    table = result.read("stats")
    return table.sort_by([("total_dwell_s", "descending")]).slice(0, n).to_pylist()


@flow(name="device-visits-python", log_prints=True)
def device_visits_python(pings: str = ".algodock/demo/pings", store: str | None = None, look_back_time: int = 86400) -> list[dict]:
    """Pings -> (clean, Python) -> visits -> dwell statistics (containers) -> top devices (Python)."""
    with algodock_run(store=store) as run:
        cleaned = clean_pings.submit(pings)
        found = visits.submit(inputs={"pings": cleaned}, parameters={"look_back_time": look_back_time})
        per_device = stats.submit(inputs={"visits": found})
        top = top_devices.submit(per_device)
        print(f"run {run.run_id}: lineage at {run.store}/runs/{run.run_id}/lineage.json")
        return top.result()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pings", nargs="?", default=".algodock/demo/pings")
    parser.add_argument("--store", default=None)
    args = parser.parse_args()
    for row in device_visits_python(args.pings, args.store):
        print(row)
