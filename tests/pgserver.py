"""A throwaway PostgreSQL server for tests (`bench.pgserver`), whose absence fails the test under CI=true
(CI installs Debian's `postgresql`) and skips it elsewhere."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from bench import pgserver
from bench.pgserver import PostgresServer
from tests.tools import require_tool

__all__ = ["PostgresServer", "postgres_server"]


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """A running throwaway server, stopped and removed on exit."""
    if pgserver.find_pg_tool("initdb") is None:
        require_tool("initdb")
    with pgserver.postgres_server() as server:
        yield server
