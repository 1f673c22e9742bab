"""Gateway mode end to end: `senderd run` subprocesses sharing one real PostgreSQL database, delivering to
the emulator. Three replicas with one SIGKILLed mid-delivery lose no acknowledged message and duplicate
only what was in flight; the database restarted mid-run loses nothing acknowledged and both sides recover
without a restart; an ordered flow stays ordered across replicas."""

from __future__ import annotations

import contextlib
import itertools
import signal
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import anyio
import pytest

from senderd.emulator.runtime import FlowSpec
from senderd.emulator.stack import EmulatorStack
from tests.pgserver import PostgresServer, postgres_server
from tests.tools import SenderdProcess, senderd_run

pytestmark = pytest.mark.anyio
WORKERS = 4
FLOWS = """
[pool]
workers = 4

[[flows]]
name = "orders"
path = "/http/Orders"
method = "POST"

[[flows]]
name = "ledger"
path = "/http/Ledger"
method = "POST"
ordered = true
retries = 0
"""
RELAY = """
[relay]
listen = "127.0.0.1:0"
store = "postgresql"
dsn_env = "SENDERD_POSTGRES_DSN"
lease = "2s"
redelivery_initial = "50ms"
redelivery_max = "200ms"
"""


@pytest.fixture
def server() -> Iterator[PostgresServer]:
    with postgres_server() as running:
        yield running


@contextlib.asynccontextmanager
async def replicas(stack: EmulatorStack, dsn: str, count: int) -> AsyncIterator[list[tuple[SenderdProcess, str]]]:
    """`count` daemons on one database: each with its relay URL."""
    env = {"SENDERD_POSTGRES_DSN": dsn}
    async with contextlib.AsyncExitStack() as stack_of:
        daemons = [  # started together: they migrate the new database under its advisory lock, once
            await stack_of.enter_async_context(senderd_run("-c", str(stack.config_path), env=env)) for _ in range(count)
        ]
        running = [(daemon, (await daemon.wait_for("relay_listening", timeout=30))["url"]) for daemon in daemons]
        yield running
    for daemon, _ in running:
        assert dsn not in daemon.text + daemon.stderr  # the DSN is a secret


async def eventually(check: Callable[[], bool], timeout: float) -> None:
    """Return once `check()` holds (looked at every 0.1 s); fail after `timeout` seconds."""
    with anyio.fail_after(timeout):
        for _ in itertools.count():
            if check():
                return
            await anyio.sleep(0.1)


def settled(server: PostgresServer) -> bool:
    """Nothing left to deliver on any replica: no message queued or in flight (no late duplicate can come)."""
    return server.psql("SELECT count(*) FROM senderd_messages WHERE state IN ('queued', 'in_flight')").strip() == "0"


def delivered_ids(stack: EmulatorStack, address: str = "/orders") -> list[str]:
    return [m.headers["sap_applicationid"] for m in stack.runtime.stats.messages if m.address == address]


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_three_replicas_one_killed_lose_nothing_acknowledged(tmp_path: Path, server: PostgresServer) -> None:
    async with EmulatorStack.started(tmp_path / "emu", config_extra=FLOWS + RELAY) as stack:
        stack.runtime.flows["/orders"].latency = 0.02  # deliveries are in flight when the kill comes
        async with replicas(stack, server.dsn, 3) as running:
            urls = [url for _, url in running]
            acked: set[str] = set()
            refused = 0
            killed = anyio.Event()

            async def poster(worker: int) -> None:
                nonlocal refused
                async with aiohttp.ClientSession() as session:
                    for n in range(worker, 3000, 16):
                        url = urls[n % 3]
                        if killed.is_set() and url == urls[0]:
                            url = urls[1 + n % 2]
                        try:
                            async with session.post(
                                f"{url}/v1/flows/orders/messages",
                                data=f"<m n='{n}'/>",
                                headers={"Content-Type": "application/xml"},
                            ) as response:
                                if response.status == 202:
                                    acked.add((await response.json())["id"])
                                else:
                                    refused += 1
                        except aiohttp.ClientError:
                            refused += 1  # replica 0 died under this post: not acknowledged
                        if len(acked) >= 1000 and not killed.is_set():
                            killed.set()
                            running[0][0].send_signal(signal.SIGKILL)

            async with anyio.create_task_group() as posters:
                for worker in range(16):
                    posters.start_soon(poster, worker)
            assert killed.is_set()
            await eventually(lambda: acked <= set(delivered_ids(stack)), 120)
            await eventually(lambda: settled(server), 30)  # the dead replica's leases ran out and were redone
            delivered = delivered_ids(stack)
            duplicates = len(delivered) - len(set(delivered))
            print(
                f"\n3 replicas, SIGKILL of one: {len(acked)} acked, {refused} refused, {len(set(delivered))} "
                f"delivered, {duplicates} duplicates"
            )
            assert len(acked) + refused == 3000
            assert acked <= set(delivered)  # nothing acknowledged lost
            assert len(set(delivered)) <= len(acked) + refused  # (a post cut off by the kill may have committed)
            assert duplicates <= 2 * WORKERS  # at most the dead replica's claim window was in flight
            counts = Counter(delivered)
            assert all(n <= 2 for n in counts.values())


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_a_database_restart_loses_nothing_and_needs_no_restart(tmp_path: Path, server: PostgresServer) -> None:
    async with (
        EmulatorStack.started(tmp_path / "emu", config_extra=FLOWS + RELAY) as stack,
        replicas(stack, server.dsn, 2) as running,
    ):
        urls = [url for _, url in running]
        acked: set[str] = set()
        statuses: Counter[int] = Counter()
        ready_during: list[tuple[int, dict[str, object]]] = []
        server_url = (await running[0][0].wait_for("listening"))["url"]
        done = anyio.Event()

        async def poster(worker: int) -> None:
            async with aiohttp.ClientSession() as session:
                n = worker
                while not done.is_set():
                    n += 1
                    try:
                        async with session.post(
                            f"{urls[n % 2]}/v1/flows/orders/messages",
                            data=f"<m n='{n}'/>",
                            headers={"Content-Type": "application/xml"},
                        ) as response:
                            statuses[response.status] += 1
                            if response.status == 202:
                                acked.add((await response.json())["id"])
                    except aiohttp.ClientError:
                        statuses[0] += 1
                    await anyio.sleep(0.01)

        async with anyio.create_task_group() as posters:
            for worker in range(4):
                posters.start_soon(poster, worker * 1_000_000)
            await eventually(lambda: len(acked) >= 100, 60)
            before = len(acked)
            server.stop("immediate")  # a crash of the database: only committed transactions survive
            async with aiohttp.ClientSession() as session:
                for _ in range(100):  # /readyz says why within a few seconds (one failed operation)
                    async with session.get(f"{server_url}/readyz") as response:
                        if response.status == 503:
                            ready_during.append((response.status, await response.json()))
                            break
                    await anyio.sleep(0.1)
            await eventually(lambda: statuses[503] >= 4, 30)  # posts refused while it is down
            server.start()
            await eventually(lambda: len(acked) >= before + 200, 30)  # ingest came back by itself
            done.set()
        await eventually(lambda: acked <= set(delivered_ids(stack)), 60)
        await eventually(lambda: settled(server), 30)
        async with aiohttp.ClientSession() as session, session.get(f"{server_url}/readyz") as response:
            ready_after = response.status
    print(f"\ndatabase restart: {len(acked)} acked, answers {dict(statuses)}, readyz during {ready_during}")
    assert statuses[503] > 0  # refused while down, never acknowledged
    status, body = ready_during[0]
    assert status == 503 and str(body["reason"]).startswith("relay: relay store: database unreachable at postgresql://")
    assert body["checks"] == {
        "daemon": {"ready": True, "reason": "ok"},
        "relay": {"ready": False, "reason": str(body["reason"]).removeprefix("relay: ")},
    }
    assert ready_after == 200


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_an_ordered_flow_stays_ordered_across_replicas(tmp_path: Path, server: PostgresServer) -> None:
    async with EmulatorStack.started(tmp_path / "emu", config_extra=FLOWS + RELAY) as stack:
        stack.runtime.add_flow(FlowSpec("/Ledger", kind="echo"))
        async with replicas(stack, server.dsn, 2) as running:
            urls = [url for _, url in running]
            async with aiohttp.ClientSession() as session:
                for n in range(60):  # posted in order, alternately to either replica
                    async with session.post(
                        f"{urls[n % 2]}/v1/flows/ledger/messages",
                        data=f"{n}",
                        headers={"Content-Type": "text/plain", "Idempotency-Key": f"ledger-{uuid.uuid4().hex}"},
                    ) as response:
                        assert response.status == 202
            await eventually(lambda: len(delivered_ids(stack, "/ledger")) >= 60, 60)
    bodies = [int(m.body) for m in stack.runtime.stats.messages if m.address == "/ledger"]
    assert bodies == list(range(60))
