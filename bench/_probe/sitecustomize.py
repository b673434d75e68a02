"""Bench-only probe, loaded by the processes a bench starts with this folder on ``PYTHONPATH``
(``algodock worker``s in bench/cluster.py): when ``ALGODOCK_BENCH_PROBE`` names a file, every
HTTP request to a Prefect API (``/api/``) made through httpx is appended to it as one line
``<unix time> <method> <path>``, so the bench can count the Prefect API calls a step makes.
Nothing in algodock imports this.
"""

from __future__ import annotations

import os

_PATH = os.environ.get("ALGODOCK_BENCH_PROBE")


def _install(path: str) -> None:
    import time

    try:
        import httpx
    except ImportError:
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def note(request: object) -> None:
        url = str(getattr(request, "url", ""))
        if "/api/" in url:
            tail = url.split("/api/", 1)[1].split("?", 1)[0]
            os.write(fd, f"{time.time():.6f} {getattr(request, 'method', '?')} {tail}\n".encode())

    sync_send, async_send = httpx.Client.send, httpx.AsyncClient.send

    def send(self, request, *args, **kwargs):  # type: ignore[no-untyped-def]
        note(request)
        return sync_send(self, request, *args, **kwargs)

    async def asend(self, request, *args, **kwargs):  # type: ignore[no-untyped-def]
        note(request)
        return await async_send(self, request, *args, **kwargs)

    httpx.Client.send = send  # type: ignore[method-assign]
    httpx.AsyncClient.send = asend  # type: ignore[method-assign]


if _PATH:
    _install(_PATH)
