"""Tests listen on loopback only: a bind of this test process to any other address is refused and recorded.

Every server a test starts in this process (an in-process Dask cluster's HTTP servers, moto,
uvicorn) goes through ``socket.socket.bind``. A bind to an address outside 127.0.0.0/8 and ::1
raises ``PermissionError`` (a server handles it as a port it could not take) and is recorded with
the test that made it; ``conftest.pytest_sessionfinish`` fails the session when any was recorded,
so a library that swallows the error does not hide it. Unix sockets pass. A test that must listen
elsewhere says so with :func:`bind_outside_loopback` (the sandbox's network probe listens on the
Docker bridge's host address). Servers in subprocesses are bound by their flags.
"""

from __future__ import annotations

import ipaddress
import os
import socket

refused: list[str] = []
_bind = socket.socket.bind


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return host == "localhost"


def _checked_bind(self: socket.socket, address, /) -> None:
    if self.family in (socket.AF_INET, socket.AF_INET6) and isinstance(address, tuple) and not _loopback(str(address[0])):
        test = os.environ.get("PYTEST_CURRENT_TEST", "outside a test").rsplit(" ", 1)[0]
        refused.append(f"{test}: bind to {address!r}")
        raise PermissionError(f"the tests listen on loopback only (127.0.0.1, ::1), not {address!r}: tests/loopback.py")
    _bind(self, address)


def bind_outside_loopback(sock: socket.socket, address: tuple, *, why: str) -> None:
    """Bind off loopback on purpose, the one way past the guard; ``why`` says what for (a reader's record)."""
    _bind(sock, address)


def install() -> None:
    socket.socket.bind = _checked_bind  # type: ignore[method-assign]
