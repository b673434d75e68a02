"""A real S3 endpoint for tests: moto's server over HTTP, as s3fs's own tests do (no mocks).

``tests/conftest.py`` can re-export :func:`s3_endpoint`; test modules may also import it
directly (``from tests.s3server import s3_endpoint  # noqa: F401``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from tests.waiting import poll

_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def start_moto_server() -> tuple[str, Callable[[], None]]:
    """Start moto's threaded server on a free port of 127.0.0.1; return ``(endpoint_url, stop)``."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return f"http://{host}:{port}", server.stop


@contextmanager
def moto_in_process() -> Iterator[tuple[str, subprocess.Popen]]:
    """A moto server in its own process (so it can be SIGSTOPped), on a free port of 127.0.0.1:
    ``(endpoint_url, process)``; resumed and killed on exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def up() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    try:
        poll("the moto server process", up, deadline=60)
        yield f"http://127.0.0.1:{port}", proc
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """The moto endpoint URL, with the AWS environment (``AWS_ENDPOINT_URL`` included) pointing at it."""
    endpoint, stop = start_moto_server()
    saved = {k: os.environ.get(k) for k in (*_ENV, "AWS_ENDPOINT_URL")}
    os.environ.update(_ENV, AWS_ENDPOINT_URL=endpoint)
    try:
        yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        stop()


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    """A new, empty bucket on the moto endpoint."""
    from algodock.store.backends import s3_filesystem

    name = f"algodock-{uuid.uuid4().hex[:12]}"
    s3_filesystem().mkdir(name)
    return name
