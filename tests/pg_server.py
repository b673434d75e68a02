"""A throwaway PostgreSQL cluster, and a real ``prefect server start`` whose database it is.

What a team runs (README, "For a team"): one Prefect server backed by Postgres,
``PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://...``. The cluster is Debian's
postgresql (``make postgres`` installs it), initialised in a temporary folder, listening on
127.0.0.1 only with its unix socket inside its data folder, and removed by :meth:`Postgres.stop`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.prefect_server import PrefectServer, free_port

PG_ROOT = Path("/usr/lib/postgresql")


def pg_bin() -> Path:
    """The newest ``/usr/lib/postgresql/*/bin`` holding initdb; without one, fail under CI, else skip."""
    found = sorted(PG_ROOT.glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    if found:
        return found[-1].parent
    reason = f"no PostgreSQL server in {PG_ROOT}/*/bin (`make postgres` installs Debian's postgresql)"
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but {reason}", pytrace=False)
    pytest.skip(reason)


class Postgres:
    """``initdb`` + ``pg_ctl start`` on a free port of 127.0.0.1 and a database ``prefect`` of user ``prefect``, until :meth:`stop`."""

    user = database = "prefect"

    def __init__(self, bindir: Path, *, timeout: float = 60) -> None:
        self.bin = bindir
        # Not under pytest's tmp_path: its parents are root's and 0700, closed to user postgres.
        self.root = Path(tempfile.mkdtemp(prefix="algodock-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = free_port()
        self._started = False
        # initdb and postgres refuse to run as root: as root, the cluster is user postgres'.
        self._as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as_owner:
            shutil.chown(self.root, "postgres", "postgres")
        try:
            self._run(self.bin / "initdb", "-D", self.data, "-U", self.user, "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync",
                      owner=True, timeout=timeout)
            options = f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.data} -c max_connections=200"
            self._started = True  # from here on, stop() must try pg_ctl stop
            self._run(self.bin / "pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", str(int(timeout)), "-o", options, "start",
                      owner=True, timeout=timeout + 10)
            self._run(self.bin / "createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, self.database, timeout=timeout)
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        """The SQLAlchemy URL a Prefect server takes as PREFECT_API_DATABASE_CONNECTION_URL."""
        return f"postgresql+asyncpg://{self.user}@127.0.0.1:{self.port}/{self.database}"

    def query(self, sql: str) -> str:
        """``psql -tA -c sql`` against the database: the rows, unaligned, one a line."""
        return self._run(self.bin / "psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, "-d", self.database,
                         "-X", "-tA", "-v", "ON_ERROR_STOP=1", "-c", sql, timeout=60).strip()

    def stop(self) -> None:
        """Stop the server at once (its data is thrown away) and remove its folder."""
        if self._started:
            subprocess.run([*self._as_owner, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"],
                           capture_output=True, timeout=60)
            self._started = False
        shutil.rmtree(self.root, ignore_errors=True)

    def _run(self, *argv: str | Path, owner: bool = False, timeout: float) -> str:
        """Run a PostgreSQL program (as the cluster's owner when ``owner``); its stdout, or RuntimeError with its stderr and the server log."""
        cmd = [*(self._as_owner if owner else []), *map(str, argv)]
        proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout)
        if proc.returncode != 0:
            log = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{Path(argv[0]).name} exited with {proc.returncode}: {proc.stderr[-2000:]}\n{log}")
        return proc.stdout


class PostgresPrefectServer(PrefectServer):
    """:class:`PrefectServer` (127.0.0.1, its own home) whose database is ``postgres``, not a SQLite file."""

    def __init__(self, home: Path, postgres: Postgres, **kwargs) -> None:
        self.postgres = postgres
        super().__init__(home, env={"PREFECT_API_DATABASE_CONNECTION_URL": postgres.url}, **kwargs)
