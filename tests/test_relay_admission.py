"""What the relay's listener admits (issue 11, defect 10), on a real socket: a client that trickles its
request head is cut off, connections beyond `relay.max_connections` get a 503 while posts go on, and
the body bytes held in memory at once stay within `relay.max_buffered_bytes`."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

from tests.test_relay import post, relay_daemon
from tests.test_relay_abuse import status_of
from tests.tools import all_blocked

pytestmark = pytest.mark.anyio
HEAD = b"POST /v1/flows/orders/messages HTTP/1.1\r\nHost: relay\r\nContent-Type: application/xml\r\n"


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait (at most 10 s) for the daemon to reach `condition`: each look comes once every task of the
    loop is blocked again (on a socket the test's client writes to, say)."""
    with anyio.fail_after(10):
        while not condition():
            await all_blocked()
    assert condition(), what


def trickle(host: str, port: int) -> tuple[int, float]:
    """A slow-loris: one header byte every 0.1 s until the server closes (at most 200 bytes). Returns the
    bytes sent and the seconds the connection lasted."""
    started = time.monotonic()
    sent = 0
    with socket.create_connection((host, port), timeout=5) as conn:
        conn.sendall(HEAD)
        try:
            for _ in range(200):
                conn.sendall(b"X")
                sent += 1
                conn.settimeout(0.1)
                try:
                    if conn.recv(1) == b"":
                        break
                except TimeoutError:
                    continue
        except (BrokenPipeError, ConnectionResetError):
            pass
    return sent, time.monotonic() - started


async def test_a_client_that_trickles_its_head_is_cut_off(tmp_path: Path) -> None:
    async with relay_daemon(tmp_path, header_timeout="1s") as (_, daemon, url, _d):
        assert daemon.relay is not None
        site = daemon.relay.api.site
        sent, lasted = await anyio.to_thread.run_sync(trickle, site.host, site.port)
        assert daemon.relay.api.guard.timed_out == 1
        assert sent < 100 and lasted < 8  # cut after about 1 s, not after 200 bytes at 0.1 s each
        status, _, _ = await post(f"{url}/v1/flows/orders/messages")
    assert status == 202


async def test_connections_beyond_the_limit_get_a_503_and_posts_go_on(tmp_path: Path) -> None:
    async with relay_daemon(tmp_path, max_connections=3, header_timeout="30s") as (_, daemon, url, _d):
        assert daemon.relay is not None
        guard, site = daemon.relay.api.guard, daemon.relay.api.site
        idle = [socket.create_connection((site.host, site.port), timeout=5) for _ in range(3)]
        try:
            for conn in idle:
                conn.sendall(HEAD)  # a head never finished: each holds its connection
            await until(lambda: guard.open == 3, "three connections held")

            def one_more() -> bytes:
                with socket.create_connection((site.host, site.port), timeout=5) as conn:
                    conn.sendall(HEAD + b"Content-Length: 0\r\n\r\n")
                    return conn.recv(4096)

            answer = await anyio.to_thread.run_sync(one_more)
            assert status_of(answer) == 503 and guard.refused == 1
        finally:
            for conn in idle:
                conn.close()
        await until(lambda: guard.open == 0, "the held connections are gone")
        status, _, _ = await post(f"{url}/v1/flows/orders/messages")
    assert status == 202


async def test_bodies_held_at_once_stay_within_the_budget(tmp_path: Path) -> None:
    async with relay_daemon(tmp_path, max_buffered_bytes=1000, max_message_bytes=1000, read_timeout="20s") as (
        _,
        daemon,
        url,
        _d,
    ):
        assert daemon.relay is not None
        budget, site = daemon.relay.api.budget, daemon.relay.api.site
        with socket.create_connection((site.host, site.port), timeout=10) as slow:
            slow.sendall(HEAD + b"Content-Length: 800\r\n\r\n" + b"a" * 10)
            await until(lambda: budget.held == 800, "the slow post holds its share")
            async with anyio.create_task_group() as group:
                answers: list[int] = []

                async def second() -> None:
                    status, _, _ = await post(f"{url}/v1/flows/orders/messages", b"b" * 500)
                    answers.append(status)

                group.start_soon(second)
                await until(lambda: budget.waiting == 1, "the second post waits for its share")
                assert budget.held == 800  # not 1,300: it is not read while the first holds the budget
                slow.sendall(b"a" * 790)
                first = await anyio.to_thread.run_sync(slow.recv, 4096)
        assert status_of(first) == 202 and answers == [202]
        assert budget.held == 0
