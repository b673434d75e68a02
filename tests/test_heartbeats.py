"""A flow run that runs algorithms ends when its work ends, not at the next whole second of
Prefect's heartbeat loop (see algodock.flows.heartbeats; the time it saves is measured by
bench/chain.py, not here)."""

from __future__ import annotations

import contextlib

import pytest


def test_the_sync_engine_no_longer_joins_the_heartbeat_thread_and_heartbeats_still_start(monkeypatch):
    from prefect import flow_engine

    from algodock.flows import heartbeats

    calls: list[tuple[object, bool]] = []

    @contextlib.contextmanager
    def prefects(engine, join_on_exit=True):  # stands for Prefect's own: records how it is entered
        calls.append((engine, join_on_exit))
        yield

    monkeypatch.setattr(flow_engine, "_send_heartbeats", prefects)
    assert heartbeats.install() is True
    installed = flow_engine._send_heartbeats
    assert installed is not prefects and installed.__wrapped__ is prefects
    assert heartbeats.install() is True and flow_engine._send_heartbeats is installed  # once only
    with installed("engine"):
        pass
    with installed("engine", join_on_exit=True):
        pass
    assert calls == [("engine", False), ("engine", False)]


def test_importing_the_prefect_layer_installs_it(monkeypatch):
    from prefect import flow_engine

    import algodock.flows.compose  # noqa: F401  (what a user's flow imports)

    assert getattr(flow_engine._send_heartbeats, "_algodock_unjoined", False)


def test_a_prefect_without_it_is_left_alone(monkeypatch):
    from prefect import flow_engine

    from algodock.flows import heartbeats

    monkeypatch.delattr(flow_engine, "_send_heartbeats")
    assert heartbeats.install() is False
    with pytest.raises(AttributeError):
        flow_engine._send_heartbeats  # noqa: B018
