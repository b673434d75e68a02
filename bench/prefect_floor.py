"""Prefect's own cost of a task, with nothing in it: the floor under every algodock flow step.

A flow of no-op Prefect tasks (``cache_policy=NO_CACHE``, ``persist_result=False``, as the
algorithm tasks are), on a ``ThreadPoolTaskRunner`` of 20 threads, against one Prefect server
started as a user starts it (``prefect server start`` on 127.0.0.1), in two shapes:

* ``chain``: each task waits for the one before (``wait_for``), as the steps of ``bench/chain.py``;
* ``fan-out``: every task at once, as the steps of ``bench/scale.py``'s fan-out.

For each shape, the marginal per task of ``--large`` tasks over ``--small`` (which cancels the
flow run's own costs): the wall, the CPU of this process (the flow's, Prefect's client) and the
CPU of the server's process (it records each task run's three states, sent as events). The
Prefect layer of algodock is imported first, so a flow run ends when its body does
(``algodock/flows/heartbeats.py``), not at the next whole second.

No target: these figures are what a flow step costs before algodock does anything, so the
chain (``bench/chain.py``) and the fan-out (``bench/scale.py``) cannot be cheaper than the
engine alone plus this (see the README's performance table).

    .venv/bin/python bench/prefect_floor.py [--small 10] [--large 110]
"""

from __future__ import annotations

import _util  # noqa: F401  (environment and sys.path first)

import argparse
import statistics
import time

from _util import exit_status, prefect_server, print_table, process_cpu, server_pid


def _settled_server_cpu(server: int) -> float:
    """The server's CPU once it stopped working (no change over 0.5 s): the events of the run
    just ended are recorded after the flow returns, and must count for that run."""
    before = process_cpu(server)
    while True:
        time.sleep(0.5)  # polling the server's CPU until it stops moving, not synchronising on time
        now = process_cpu(server)
        if now - before < 0.005:
            return now
        before = now


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=10)
    parser.add_argument("--large", type=int, default=110)
    args = parser.parse_args()

    with prefect_server():
        import algodock.flows.runs  # noqa: F401  (installs the heartbeat fix: a flow run ends with its body)
        from prefect import flow, task
        from prefect.cache_policies import NO_CACHE
        from prefect.task_runners import ThreadPoolTaskRunner

        @task(cache_policy=NO_CACHE, persist_result=False)
        def noop(i: int) -> int:
            return i

        @flow(task_runner=ThreadPoolTaskRunner(max_workers=20))
        def chain(n: int) -> None:
            future = None
            for i in range(n):
                future = noop.submit(i, wait_for=[future] if future is not None else None)
            future.result()

        @flow(task_runner=ThreadPoolTaskRunner(max_workers=20))
        def fan_out(n: int) -> None:
            for future in [noop.submit(i) for i in range(n)]:
                future.result()

        server = server_pid()  # `prefect server start` is one process: its CPU is the server's
        chain(2)  # warm-up: the flows are registered, imports settle
        fan_out(2)
        rows = []
        for name, shape in (("chain", chain), ("fan-out", fan_out)):
            seen: dict[int, list[tuple[float, float, float]]] = {}
            for n in (args.small, args.large, args.small, args.large):
                busy, cpu, t0 = _settled_server_cpu(server), time.process_time(), time.perf_counter()
                shape(n)
                wall = time.perf_counter() - t0
                seen.setdefault(n, []).append((wall, time.process_time() - cpu, _settled_server_cpu(server) - busy))
            per = [
                statistics.median(b[k] for b in seen[args.large]) - statistics.median(a[k] for a in seen[args.small])
                for k in range(3)
            ]
            rows.append([name, *(f"{v / (args.large - args.small) * 1000:.1f} ms" for v in per)])
        print(f"Prefect's cost of one no-op task: marginal of {args.large} tasks over {args.small}, medians of 2 runs each\n")
        print_table(["shape", "wall", "flow process CPU", "Prefect server CPU"], rows)
    return exit_status()


if __name__ == "__main__":
    raise SystemExit(main())
