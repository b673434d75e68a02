"""Console plumbing shared by the command-line commands: logging on stderr, errors, signals."""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any

import click

from algodock.errors import AlgodockError, shorten

log = logging.getLogger("algodock")


_HANDLER = logging.StreamHandler(sys.stderr)


def setup_logging(verbose: bool) -> None:
    """algodock's own messages at INFO, everyone else's (httpx, docker, Prefect's console) at WARNING."""
    _HANDLER.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S"))
    _HANDLER.setLevel(logging.DEBUG if verbose else logging.WARNING)
    logging.getLogger().addHandler(_HANDLER)
    ours = logging.getLogger("algodock")
    ours.setLevel(logging.DEBUG if verbose else logging.INFO)
    mine = logging.StreamHandler(sys.stderr)
    mine.setFormatter(_HANDLER.formatter)
    ours.addHandler(mine)
    ours.propagate = False
    # A temporary Prefect server can take a while on a busy machine; 20 s is Prefect's default.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def log_to(stream: Any) -> None:
    """Point our log handlers at ``stream`` (the live view's proxy, so lines print above the table)."""
    for handler in (_HANDLER, *logging.getLogger("algodock").handlers):
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(stream)


def terminate_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so running containers are removed on the way out."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


MAX_LINE = 2000
"""Characters of one error line printed at most (a message can quote a value someone else wrote)."""


def print_errors(exc: AlgodockError) -> None:
    """One ``error:`` line per error on stderr, each shortened to :data:`MAX_LINE`."""
    for line in getattr(exc, "errors", None) or [str(exc)]:
        click.echo(f"error: {shorten(line, MAX_LINE)}", err=True)
