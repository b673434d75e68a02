"""The suite's loopback guard (tests/loopback.py) refuses, and records, a bind off loopback."""

from __future__ import annotations

import socket

import pytest

from tests import loopback


@pytest.mark.parametrize("family, address", [(socket.AF_INET, ("0.0.0.0", 0)), (socket.AF_INET, ("", 0)), (socket.AF_INET6, ("::", 0))])
def test_a_bind_off_loopback_is_refused_and_recorded(family: int, address: tuple) -> None:
    before = len(loopback.refused)
    with socket.socket(family, socket.SOCK_STREAM) as s, pytest.raises(PermissionError, match="loopback only"):
        s.bind(address)
    assert len(loopback.refused) == before + 1 and "test_a_bind_off_loopback_is_refused_and_recorded" in loopback.refused[-1]
    del loopback.refused[before:]  # refused on purpose: the session must not fail for it


@pytest.mark.parametrize("family, host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET, "127.0.0.2"), (socket.AF_INET6, "::1"), (socket.AF_INET, "localhost")])
def test_a_bind_to_loopback_goes_through(family: int, host: str) -> None:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        assert s.getsockname()[1] > 0
