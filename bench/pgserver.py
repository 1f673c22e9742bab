"""A throwaway PostgreSQL server for the tests and the benchmark: `initdb` + `pg_ctl` from Debian's
`postgresql` package into a temporary directory, listening on 127.0.0.1 at a free port. As root the
server runs as the `postgres` user (PostgreSQL refuses to run as root). Durable settings are the
defaults (fsync and synchronous_commit on): what is measured and tested is what survives.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.common import free_port

_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


def find_pg_tool(name: str) -> str | None:
    """A PostgreSQL program: Debian keeps them in /usr/lib/postgresql/VERSION/bin, off PATH."""
    for directory in _BIN_DIRS:
        if (directory / name).exists():
            return str(directory / name)
    return shutil.which(name)


def _tool(name: str) -> str:
    found = find_pg_tool(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found (apt-get install postgresql)")
    return found


class PostgresServer:
    """One cluster in `directory`; `dsn` connects as the superuser `senderd` to database `senderd`."""

    def __init__(self, directory: Path, port: int) -> None:
        self.directory = directory
        self.data = directory / "data"
        self.port = port
        self.dsn = f"host=127.0.0.1 port={port} dbname=senderd user=senderd connect_timeout=3"
        self._user = "postgres" if os.geteuid() == 0 else None

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = list(args)
        if self._user is not None:
            command = ["runuser", "-u", self._user, "--", *command]
        return subprocess.run(command, check=True, capture_output=True, text=True, timeout=60)

    def init(self) -> None:
        """Create the cluster and the `senderd` role and database (trust auth on 127.0.0.1 only)."""
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            os.chown(self.directory, entry.pw_uid, entry.pw_gid)
        self._run(_tool("initdb"), "-D", str(self.data), "-U", "senderd", "--auth=trust", "-E", "UTF8", "--no-sync")
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"listen_addresses = '127.0.0.1'\nport = {self.port}\nunix_socket_directories = '{self.directory}'\n"
                "max_connections = 200\nshared_buffers = 32MB\nlog_min_messages = warning\n"
            )
        self.start()
        self._run(_tool("createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "senderd", "senderd")

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        self._run(_tool("pg_ctl"), "-D", str(self.data), "-l", str(self.directory / "log"), "-w", "-t", "30", "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (`immediate` is a crash: no checkpoint, recovery at the next start)."""
        self._run(_tool("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def psql(self, sql: str) -> str:
        """Run `sql` with psql; its unaligned output."""
        return self._run(
            _tool("psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "senderd", "-d", "senderd",
            "-At", "-v", "ON_ERROR_STOP=1", "-c", sql,
        ).stdout  # fmt: skip


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """A running throwaway server, stopped and removed on exit."""
    directory = Path(tempfile.mkdtemp(prefix="senderd-pg-"))  # not under pytest's 0700 tmp: postgres must enter
    server = PostgresServer(directory, free_port())
    try:
        server.init()
        yield server
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
            server.stop("immediate")
        shutil.rmtree(directory, ignore_errors=True)
