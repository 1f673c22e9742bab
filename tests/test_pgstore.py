"""The PostgreSQL store against a real server: schema versions, idempotency across replicas, claims that
never overlap, leases that run out, ordered flows, the database going away and coming back, and a DSN
that never shows."""

from __future__ import annotations

import contextlib
import itertools
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from senderd.errors import ConfigError, IdempotencyConflict, SpoolFull, StoreUnavailable
from senderd.relay.pgstore import SCHEMA_VERSION, PgStore
from senderd.relay.spool import Message, Spool
from senderd.relay.store import RelayStore
from senderd.testing import FakeClock
from tests.pgserver import PostgresServer, postgres_server

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def server() -> Iterator[PostgresServer]:
    with postgres_server() as running:
        yield running


@pytest.fixture
def dsn(server: PostgresServer) -> str:
    """A fresh database on the shared server, for one test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    server.psql(f"CREATE DATABASE {name}")
    return server.dsn.replace("dbname=senderd", f"dbname={name}")


@pytest.fixture
async def stores(dsn: str) -> AsyncIterator[list[PgStore]]:
    """Two replicas' stores on one database (short leases)."""
    opened = [PgStore(dsn, lease=0.6, timeout=3), PgStore(dsn, lease=0.6, timeout=3)]
    for store in opened:
        await store.open()
    yield opened
    for store in opened:
        await store.close()


def test_both_stores_satisfy_the_relay_store_interface() -> None:
    def accepts(_store: RelayStore) -> None:
        pass

    accepts(PgStore("host=127.0.0.1"))  # mypy checks the protocol; this checks the call works
    assert {"where", "problem", "due", "finish"} <= set(dir(PgStore)) & set(dir(Spool))


async def test_the_schema_is_versioned_and_a_newer_one_is_refused(server: PostgresServer, dsn: str) -> None:
    store = PgStore(dsn)
    await store.open()
    await store.close()
    again = PgStore(dsn)  # a second start migrates nothing
    await again.open()
    await again.close()
    name = dsn.split("dbname=")[1].split()[0]
    newer = PgStore(dsn)
    await newer.open()
    async with newer._connection() as conn:
        cursor = await conn.execute("SELECT array_agg(version ORDER BY version) FROM senderd_schema")
        row = await cursor.fetchone()
        assert row is not None and row[0] == list(range(1, SCHEMA_VERSION + 1))
        await conn.execute("INSERT INTO senderd_schema (version) VALUES (%s)", (SCHEMA_VERSION + 1,))
    await newer.close()
    with pytest.raises(ConfigError) as refused:
        await PgStore(dsn).open()
    assert str(refused.value) == (
        f"relay: the database at postgresql://127.0.0.1:{server.port}/{name} has senderd schema version "
        f"{SCHEMA_VERSION + 1}, newer than this senderd's ({SCHEMA_VERSION}): run the newer senderd, or point "
        "relay.dsn_env elsewhere"
    )


async def test_an_idempotency_key_is_unique_across_replicas(stores: list[PgStore]) -> None:
    a, b = stores
    results: list[tuple[str, bool]] = []

    async def post(store: PgStore) -> None:
        results.append(await store.add("orders", b"<o/>", "application/xml", "key-1"))

    async with anyio.create_task_group() as group:
        for n in range(10):
            group.start_soon(post, (a, b)[n % 2])
    assert len({message_id for message_id, _ in results}) == 1
    assert sorted(created for _, created in results) == [False] * 9 + [True]
    assert (await b.add("other-flow", b"x", "text/plain", "key-1"))[1]  # per flow
    message = await a.get(results[0][0])
    assert message is not None and message.state == "queued" and message.idempotency_key == "key-1"


async def test_concurrent_posts_share_a_commit_and_a_key_within_one_batch_stays_one_message(
    stores: list[PgStore],
) -> None:
    a, _ = stores
    results: dict[int, tuple[str, bool] | BaseException] = {}

    async def post(n: int) -> None:
        key = "shared" if n % 5 == 0 else None
        body = b"other body" if n == 45 else b"same body" if key else str(n).encode()
        try:
            results[n] = await a.add("orders", body, "text/plain", key)
        except IdempotencyConflict as exc:
            results[n] = exc

    async with anyio.create_task_group() as group:
        for n in range(60):
            group.start_soon(post, n)
    shared = [results[n] for n in range(0, 60, 5) if n != 45]
    ids = {result[0] for result in shared if isinstance(result, tuple)}
    assert len(ids) == 1 and sum(1 for r in shared if isinstance(r, tuple) and r[1]) == 1
    conflict = results[45]
    assert isinstance(conflict, IdempotencyConflict) and conflict.message_id in ids
    assert sum(1 for r in results.values() if isinstance(r, tuple) and r[1]) == 60 - 12 + 1
    assert a.commits < 60 / 2, a.commits  # posts waiting together went in one transaction
    claimed = await a.due(2e9, 100)
    assert len(claimed) == 49 and [m.body for m in claimed if m.idempotency_key is None][:2] == [b"1", b"2"]


async def test_replicas_claiming_together_never_take_the_same_message(stores: list[PgStore]) -> None:
    a, b = stores
    for n in range(200):
        await a.add(f"flow-{n % 7}", b"x", "text/plain")
    taken: dict[str, list[str]] = {"a": [], "b": []}

    async def claim(name: str, store: PgStore) -> None:
        while True:
            batch = await store.due(2e9, 7)
            if not batch:
                return
            taken[name] += [m.id for m in batch]

    async with anyio.create_task_group() as group:
        group.start_soon(claim, "a", a)
        group.start_soon(claim, "b", b)
    assert len(taken["a"]) + len(taken["b"]) == 200
    assert not set(taken["a"]) & set(taken["b"])
    assert taken["a"] and taken["b"]  # both got work


async def test_a_dead_replicas_messages_go_to_another_once_its_lease_runs_out(stores: list[PgStore]) -> None:
    a, b = stores
    ids = [(await a.add("f", b"x", "text/plain"))[0] for _ in range(3)]
    claimed = await a.due(2e9, 10)
    assert [m.id for m in claimed] == ids
    assert await b.due(2e9, 10) == []  # leased to a
    assert await a.renew_leases() == 3
    renewed = anyio.current_time()
    assert await b.due(2e9, 10) == []  # renewed: still a's
    taken: list[Message] = []
    with anyio.fail_after(5):  # a "died": no renewal from now on; b takes them once the lease ran out
        for _ in itertools.count():
            taken = await b.due(2e9, 10)
            if taken:
                break
            await anyio.sleep(0.05)
    assert anyio.current_time() - renewed >= 0.5  # not before the lease (0.6 s, on the database's clock)
    assert [m.id for m in taken] == ids
    await a.finish(claimed[0], "delivered")  # too late: the lease is b's now, a's word does not count
    message = await b.get(ids[0])
    assert message is not None and message.state == "in_flight"
    await b.finish(taken[0], "delivered")
    message = await b.get(ids[0])
    assert message is not None and message.state == "delivered" and message.attempts == 1


async def test_an_ordered_flow_is_delivered_by_one_replica_at_a_time(stores: list[PgStore]) -> None:
    a, b = stores
    ids = [(await a.add("ordered", str(n).encode(), "text/plain"))[0] for n in range(3)]
    await a.add("free", b"x", "text/plain")
    first = await a.due(2e9, 1, ordered_flows=["ordered"])
    assert [m.id for m in first] == [ids[0]]
    others = await b.due(2e9, 10, ordered_flows=["ordered"])
    assert [m.flow for m in others] == ["free"]  # the head is a's: nothing behind it moves
    await a.finish(first[0], "delivered")
    second = await b.due(2e9, 10, ordered_flows=["ordered"])
    assert [m.id for m in second] == [ids[1]]


async def test_a_tick_is_claimed_by_one_replica(stores: list[PgStore]) -> None:
    a, b = stores
    wins: list[bool] = []

    async def claim(store: PgStore) -> None:
        wins.append(await store.claim_tick("heartbeat", 1234))

    async with anyio.create_task_group() as group:
        for n in range(6):
            group.start_soon(claim, (a, b)[n % 2])
    assert sorted(wins) == [False] * 5 + [True]
    assert await a.claim_tick("heartbeat", 1235)
    assert await b.claim_tick("other", 1234)


async def test_the_database_down_refuses_then_recovers_without_a_restart(server: PostgresServer, dsn: str) -> None:
    store = PgStore(dsn, timeout=2)
    await store.open()
    try:
        first, _ = await store.add("f", b"before", "text/plain")
        server.psql("CHECKPOINT")  # the other tests' databases need no replay at the restart
        server.stop("immediate")  # a crash: nothing acknowledged may be lost
        try:
            with pytest.raises(StoreUnavailable):
                await store.add("f", b"during", "text/plain")
            assert store.problem is not None and store.problem.startswith("database unreachable at postgresql://")
        finally:
            server.start()  # the module's other tests use this server too
        second = None
        with anyio.fail_after(20):
            for _ in itertools.count():  # the pool reconnects by itself, with its own backoff
                with contextlib.suppress(StoreUnavailable):
                    second, _ = await store.add("f", b"after", "text/plain")
                    break
                await anyio.sleep(0.2)
        assert store.problem is None
        claimed = await store.due(2e9, 10)
        assert sorted(m.id for m in claimed) == sorted([first, second])
        assert {m.body for m in claimed} == {b"before", b"after"}
    finally:
        await store.close()


async def test_the_dsn_never_shows_in_errors_or_reprs() -> None:
    dsn = "host=127.0.0.1 port=1 dbname=x user=u password=hunter2-secret connect_timeout=1"
    store = PgStore(dsn, timeout=1)
    assert "hunter2" not in repr(store) and store.where == "postgresql://127.0.0.1:1/x"
    with pytest.raises(ConfigError) as failed:
        await store.open()
    assert "hunter2" not in str(failed.value)
    assert str(failed.value).startswith("relay.dsn_env: cannot use the database at postgresql://127.0.0.1:1/x: ")
    uri = PgStore("postgresql://u:hunter2-secret@db.example:6432/relay")
    assert uri.where == "postgresql://db.example:6432/relay" and "hunter2" not in repr(uri)


# --- the contract both stores keep (each test runs on SQLite and on PostgreSQL) -------------------------


@pytest.fixture(scope="module")
def contract_database(server: PostgresServer) -> str:
    """One database for the contract tests (emptied by each: a new database costs a second)."""
    server.psql("CREATE DATABASE contract")
    return server.dsn.replace("dbname=senderd", "dbname=contract")


@pytest.fixture
def where(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Path, str]:
    """(kind, spool directory, DSN) for the test's store; the database only for PostgreSQL."""
    kind: str = request.param
    dsn: str = request.getfixturevalue("contract_database") if kind == "postgresql" else ""
    return kind, tmp_path / "spool", dsn


@contextlib.asynccontextmanager
async def opened(
    where: tuple[str, Path, str], clock: FakeClock, *, fresh: bool = True, **limits: Any
) -> AsyncIterator[RelayStore]:
    """An open store (SQLite or PostgreSQL) with its writer running; `fresh`: emptied first."""
    kind, directory, dsn = where
    store: RelayStore
    if kind == "sqlite":
        store = Spool(directory, clock=clock, **limits)
        await store.open()
    else:
        store = pg = PgStore(dsn, lease=30, timeout=3, clock=clock, **limits)
        await pg.open()
        if fresh:
            async with pg._connection() as conn:
                await conn.execute("TRUNCATE senderd_messages")
            await pg.refresh_counts()
    try:
        async with anyio.create_task_group() as group:
            await group.start(store.run_writer)
            yield store
            group.cancel_scope.cancel()
    finally:
        await store.close()


STORES = pytest.mark.parametrize("where", ["sqlite", "postgresql"], indirect=True)


@STORES
async def test_a_reused_idempotency_key_is_the_same_message_or_a_conflict(where: tuple[str, Path, str]) -> None:
    async with opened(where, FakeClock()) as store:
        first, created = await store.add("orders", b"<o n='1'/>", "application/xml", "key-1")
        again = await store.add("orders", b"<o n='1'/>", "application/xml", "key-1")
        with pytest.raises(IdempotencyConflict) as conflict:
            await store.add("orders", b"<o n='2'/>", "application/xml", "key-1")
        other, other_created = await store.add("invoices", b"<o n='2'/>", "application/xml", "key-1")
    assert created and again == (first, False)
    assert conflict.value.message_id == first and "a new message needs a new key" in str(conflict.value)
    assert other_created and other != first  # keys are per flow


@STORES
async def test_a_paused_round_is_not_counted_and_errors_are_stored_redacted(
    where: tuple[str, Path, str],
) -> None:
    clock = FakeClock()
    secret = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzZW5kZXJkIn0.c2lnbmF0dXJlLW9mLXRoZS10b2tlbg"
    async with opened(where, clock) as store:
        message_id, _ = await store.add("orders", b"x", "text/plain")
        (claimed,) = await store.due(clock.time(), 10)
        await store.finish(claimed, "queued", error="token server down", retry_at=clock.time(), counted=False)
        paused = await store.get(message_id)
        (claimed,) = await store.due(clock.time(), 10)
        await store.finish(claimed, "queued", error=f"Authorization: Bearer {secret}", retry_at=clock.time() + 60)
        counted = await store.get(message_id)
        assert await store.due(clock.time(), 10) == []  # not due before retry_at
        assert await store.next_due_at(clock.time()) == pytest.approx(clock.time() + 60)
    assert paused is not None and paused.attempts == 0 and paused.state == "queued"
    assert counted is not None and counted.attempts == 1 and counted.last_error is not None
    assert secret[:20] not in counted.last_error and "[REDACTED]" in counted.last_error


@STORES
async def test_messages_of_unconfigured_flows_stay_queued_and_are_counted(where: tuple[str, Path, str]) -> None:
    clock = FakeClock()
    async with opened(where, clock) as store:
        kept, _ = await store.add("dropped", b"x", "text/plain")
        wanted, _ = await store.add("orders", b"x", "text/plain")
        claimed = await store.due(clock.time(), 10, only_flows=["orders"])
        outside = await store.queued_outside(["orders"])
        left = await store.get(kept)
    assert [m.id for m in claimed] == [wanted]
    assert outside == 1 and left is not None and left.state == "queued"


@STORES
async def test_an_unwritten_end_is_claimed_again_first(where: tuple[str, Path, str]) -> None:
    clock = FakeClock()
    async with opened(where, clock) as store:
        ids = [(await store.add("orders", b"x", "text/plain"))[0] for _ in range(3)]
        (first,) = await store.due(clock.time(), 1)
        again = await store.due(clock.time(), 2, exclude_ids=[first.id], again_ids=[first.id])
        assert [m.id for m in again][:1] == [first.id] and len(again) == 2
        back = await store.requeue_all(again)
        rest = await store.due(clock.time(), 10)
    assert first.id == ids[0]
    assert back == 2 and sorted(m.id for m in rest) == sorted(ids)  # the two given back and the third


@STORES
async def test_retention_removes_delivered_and_old_dead_messages(where: tuple[str, Path, str]) -> None:
    clock = FakeClock()
    async with opened(where, clock) as store:
        for _ in range(3):
            await store.add("orders", b"x" * 100, "text/plain")
        delivered, dead, waiting = await store.due(clock.time(), 3)
        await store.finish(delivered, "delivered")
        await store.finish(dead, "dead")
        await store.finish(waiting, "queued", retry_at=clock.time() + 1e6)
        clock.advance(3600)
        removed_delivered = await store.prune(clock.time() - 60)
        removed_dead = await store.prune(clock.time() - 60, clock.time() - 60)
        left = [await store.get(m.id) for m in (delivered, dead, waiting)]
    assert (removed_delivered, removed_dead) == (1, 1)
    assert left[0] is None and left[1] is None and left[2] is not None and left[2].state == "queued"


@STORES
async def test_a_full_store_refuses_and_plans_are_bounded_at_open(where: tuple[str, Path, str]) -> None:
    clock = FakeClock()
    async with opened(where, clock, max_messages=2) as store:
        await store.add("orders", b"x", "text/plain")
        await store.add("orders", b"x", "text/plain")
        with pytest.raises(SpoolFull):
            await store.add("orders", b"x", "text/plain")
        claimed = await store.due(clock.time(), 2)
        for message in claimed:
            await store.finish(message, "queued", retry_at=clock.time() + 86_400)  # a plan a day ahead
    async with opened(where, clock, fresh=False, max_delay=300) as store:  # redelivery_max: 5 minutes
        due_at = await store.next_due_at(clock.time())
    assert due_at == pytest.approx(clock.time() + 300)


@STORES
async def test_a_dead_message_is_listed_and_redriven_once(where: tuple[str, Path, str]) -> None:
    clock = FakeClock()
    async with opened(where, clock) as store:
        message_id, _ = await store.add("orders", b"x", "text/plain")
        (claimed,) = await store.due(clock.time(), 10)
        await store.finish(claimed, "dead", error="HTTP 400", status=400)
        listed = [m.id for m in await store.dead()]
        first, again = await store.redrive(message_id), await store.redrive(message_id)
        redriven = await store.due(clock.time(), 10)
    assert listed == [message_id]
    assert (first, again) == (True, False)  # only a dead message is re-driven
    assert [m.id for m in redriven] == [message_id] and redriven[0].body == b"x" and redriven[0].status == 400
