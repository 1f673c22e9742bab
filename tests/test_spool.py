"""The relay's spool on its own: a WAL database that syncs every commit, group commit, crash recovery, a
full disk and a damaged file."""

from __future__ import annotations

import functools
import signal
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from senderd.relay.spool import Spool

pytestmark = pytest.mark.anyio


async def test_the_spool_is_a_wal_database_that_syncs_every_commit(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    await spool.open()
    try:
        synchronous = spool.db.execute("PRAGMA synchronous").fetchone()[0]
        journal_mode = spool.db.execute("PRAGMA journal_mode").fetchone()[0]
    finally:
        await spool.close()
    assert synchronous == 2  # FULL: a commit is on disk when it returns (NORMAL, 1, may lose it on power loss)
    assert journal_mode == "wal"


async def test_group_commit_shares_fsyncs(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    await spool.open()
    async with anyio.create_task_group() as group:
        await group.start(spool.run_writer)
        ids: list[str] = []

        async def add(n: int) -> None:
            ids.append((await spool.add("f", b"x" * n, "text/plain"))[0])

        async with anyio.create_task_group() as posters:
            for n in range(200):
                posters.start_soon(add, n)
        group.cancel_scope.cancel()
    await spool.close()
    assert len(set(ids)) == 200
    assert spool.commits < 50, spool.commits  # 200 durable adds, far fewer commits
    reopened = Spool(tmp_path / "spool")
    await reopened.open()
    assert reopened.counts["queued"] == 200
    await reopened.close()


CLAIM_THEN_CRASH = """
import os, signal, sys
from pathlib import Path

import anyio

from senderd.relay.spool import Spool


async def main() -> None:
    spool = Spool(Path(sys.argv[1]))
    await spool.open()
    async with anyio.create_task_group() as group:
        await group.start(spool.run_writer)
        await spool.add("f", b"a", "text/plain")
        group.cancel_scope.cancel()
    claimed = await spool.due(1e12, 10)
    assert [m.state for m in claimed] == ["queued"] and spool.counts["in_flight"] == 1, claimed
    os.kill(os.getpid(), signal.SIGKILL)  # the process dies here: nothing else is written


anyio.run(main)
"""
"""A process that spools one message, claims it for delivery, and is killed before delivering it."""


async def test_in_flight_messages_are_queued_again_after_a_crash(tmp_path: Path) -> None:
    crashed = await anyio.run_process([sys.executable, "-c", CLAIM_THEN_CRASH, str(tmp_path / "spool")], check=False)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr.decode()
    reopened = Spool(tmp_path / "spool")
    await reopened.open()
    assert reopened.counts == {"queued": 1, "in_flight": 0, "delivered": 0, "dead": 0}
    await reopened.close()


async def test_a_full_disk_refuses_the_batch_and_the_writer_lives_on(tmp_path: Path) -> None:
    from senderd.errors import SpoolError

    spool = Spool(tmp_path / "spool")
    await spool.open()
    async with anyio.create_task_group() as group:
        await group.start(spool.run_writer)
        await spool.add("f", b"small", "text/plain")
        pages = spool.db.execute("PRAGMA page_count").fetchone()[0]
        spool.db.execute(f"PRAGMA max_page_count = {pages + 1}")  # the disk is full now
        with pytest.raises(SpoolError, match="spool unavailable"):
            await spool.add("f", b"x" * 200_000, "text/plain")
        spool.db.execute("PRAGMA max_page_count = 1000000")  # space again
        message_id, created = await spool.add("f", b"after", "text/plain")
        group.cancel_scope.cancel()
    assert created and message_id
    assert spool.counts["queued"] == 2
    with pytest.raises(SpoolError, match="spool closed"):
        await spool.add("f", b"late", "text/plain")  # the writer has stopped: answered at once
    await spool.close()


async def test_ends_of_deliveries_share_the_posts_transactions(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    await spool.open()
    async with anyio.create_task_group() as group:
        await group.start(spool.run_writer)
        for _ in range(100):
            await spool.add("f", b"x" * 100, "text/plain")
        claimed = await spool.due(spool.clock.time(), 100)
        db, transactions = spool.db, []

        def on_statement(sql: str) -> None:  # a COMMIT, or a change outside a transaction (its own one)
            if sql == "COMMIT" or (not db.in_transaction and sql.startswith(("INSERT", "UPDATE", "DELETE"))):
                transactions.append(sql)

        db.set_trace_callback(on_statement)
        async with anyio.create_task_group() as work:  # 100 ends and 50 posts at once, as under load
            for message in claimed:
                work.start_soon(functools.partial(spool.finish, message, "delivered", correlation_id="mpl"))
            for _ in range(50):
                work.start_soon(spool.add, "f", b"y" * 100, "text/plain")
        db.set_trace_callback(None)
        commits = len(transactions)
        counts, size = dict(spool.counts), spool.bytes
        group.cancel_scope.cancel()
    await spool.close()
    assert commits < 20, commits  # 150 durable writes, a few transactions
    assert counts == {"queued": 50, "in_flight": 0, "delivered": 100, "dead": 0}
    assert size == 50 * 100  # delivered bodies no longer count
    reopened = Spool(tmp_path / "spool")
    await reopened.open()
    rows = reopened.db.execute(
        "SELECT state, correlation_id, LENGTH(body), COUNT(*) FROM messages GROUP BY state, correlation_id"
    ).fetchall()
    assert (reopened.counts, reopened.bytes) == (counts, size)
    await reopened.close()
    assert sorted(rows) == [("delivered", "mpl", 0, 100), ("queued", None, 100, 50)]


async def test_a_full_disk_refuses_the_posts_but_records_the_ends_written_with_them(tmp_path: Path) -> None:
    from senderd.errors import SpoolError

    spool = Spool(tmp_path / "spool")
    await spool.open()
    async with anyio.create_task_group() as group:
        await group.start(spool.run_writer)
        await spool.add("f", b"small", "text/plain")
        (message,) = await spool.due(spool.clock.time(), 1)
        pages = spool.db.execute("PRAGMA page_count").fetchone()[0]
        spool.db.execute(f"PRAGMA max_page_count = {pages + 1}")  # the disk is full now
        refused: list[BaseException] = []

        async def post() -> None:
            try:
                await spool.add("f", b"x" * 200_000, "text/plain")
            except SpoolError as exc:
                refused.append(exc)

        async with anyio.create_task_group() as work:  # both wait for the same round of the writer
            work.start_soon(post)
            work.start_soon(spool.finish, message, "delivered")
        group.cancel_scope.cancel()
    state = spool.db.execute("SELECT state FROM messages WHERE id=?", (message.id,)).fetchone()[0]
    await spool.close()
    assert len(refused) == 1 and "spool unavailable" in str(refused[0])
    assert state == "delivered"
    assert spool.counts == {"queued": 0, "in_flight": 0, "delivered": 1, "dead": 0}


async def test_an_end_the_stopping_writer_did_not_write_is_written_by_its_caller(tmp_path: Path) -> None:
    from tests.tools import all_blocked

    spool = Spool(tmp_path / "spool")
    await spool.open()
    async with anyio.create_task_group() as group:
        await group.start(spool.run_writer)
        await spool.add("f", b"x", "text/plain")
        (message,) = await spool.due(spool.clock.time(), 1)
        writer = anyio.CancelScope()

        async def write() -> None:
            with writer:
                await spool.run_writer()

        group.start_soon(write)
        await all_blocked()
        finished = anyio.Event()

        async def finish() -> None:
            with anyio.CancelScope(shield=True):  # as the dispatcher records an end
                await spool.finish(message, "delivered")
            finished.set()

        async with spool._thread:  # the spool's thread is busy: the writer's round waits for it
            group.start_soon(finish)
            await all_blocked()
            writer.cancel()  # the stop: the writer goes before it could write the end
            await all_blocked()
            assert not finished.is_set()
        await finished.wait()
        group.cancel_scope.cancel()
    state = spool.db.execute("SELECT state FROM messages WHERE id=?", (message.id,)).fetchone()[0]
    await spool.close()
    assert state == "delivered"


async def test_a_claim_leaves_every_other_commit_durable(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    await spool.open()
    async with anyio.create_task_group() as group:
        await group.start(spool.run_writer)
        for _ in range(3):
            await spool.add("f", b"x", "text/plain")
        group.cancel_scope.cancel()
    claimed = await spool.due(spool.clock.time(), 2)
    synchronous = spool.db.execute("PRAGMA synchronous").fetchone()[0]
    states = [row[0] for row in spool.db.execute("SELECT state FROM messages ORDER BY seq")]
    await spool.close()
    assert len(claimed) == 2
    assert synchronous == 2  # FULL again after the claim's own commit
    assert states == ["in_flight", "in_flight", "queued"]


async def test_the_oldest_waiting_message_and_the_messages_of_other_flows(tmp_path: Path) -> None:
    from senderd.testing import FakeClock

    clock = FakeClock()
    spool = Spool(tmp_path / "spool", clock=clock)
    await spool.open()
    async with anyio.create_task_group() as group:
        await group.start(spool.run_writer)
        assert await spool.oldest_queued_at() is None
        created = []
        for flow in ("a", "a", "b"):
            created.append(clock.time())
            await spool.add(flow, b"x", "text/plain")
            clock.advance(10)
        first, second = await spool.due(clock.time(), 2, only_flows=["a"])
        assert await spool.oldest_queued_at() == created[0]  # in flight still waits
        await spool.finish(first, "delivered")
        assert await spool.oldest_queued_at() == created[1]
        await spool.finish(second, "queued", retry_at=clock.time() + 60)  # due again later: still waiting
        assert await spool.oldest_queued_at() == created[1]
        assert await spool.queued_outside(["a", "b"]) == 0
        assert await spool.queued_outside(["a"]) == 1
        group.cancel_scope.cancel()
    await spool.close()
    reopened = Spool(tmp_path / "spool", clock=clock)
    await reopened.open()
    assert await reopened.queued_outside(["a"]) == 1  # known from the rows found at open
    assert await reopened.queued_outside(["b", "a"]) == 0
    await reopened.close()


async def test_a_file_that_is_not_a_database_is_quarantined_and_a_fresh_spool_starts(tmp_path: Path) -> None:
    (tmp_path / "spool").mkdir()
    (tmp_path / "spool" / "spool.db").write_bytes(b"this is not a database" * 100)
    spool = Spool(tmp_path / "spool")
    await spool.open()
    counts = dict(spool.counts)
    await spool.close()
    quarantined = list((tmp_path / "spool").glob("spool.db.damaged-*"))
    assert counts == {"queued": 0, "in_flight": 0, "delivered": 0, "dead": 0}
    assert [p.read_bytes()[:22] for p in quarantined] == [b"this is not a database"]


async def test_a_damaged_page_is_quarantined_and_what_can_be_read_is_salvaged(tmp_path: Path, logs: Any) -> None:
    spool = Spool(tmp_path / "spool")
    await spool.open()
    async with anyio.create_task_group() as group:
        await group.start(spool.run_writer)
        for n in range(60):
            await spool.add("f", bytes([65 + n % 26]) * 1500, "text/plain")
        group.cancel_scope.cancel()
    await spool.close()
    path = tmp_path / "spool" / "spool.db"
    data = bytearray(path.read_bytes())
    page = 4096
    pages = len(data) // page
    data[page * (pages // 2) : page * (pages // 2 + 1)] = b"\xde\xad" * (page // 2)  # one page in the middle
    path.write_bytes(bytes(data))
    reopened = Spool(tmp_path / "spool")
    await reopened.open()
    counts = dict(reopened.counts)
    await reopened.close()
    assert list((tmp_path / "spool").glob("spool.db.damaged-*"))
    assert '"spool_quarantined"' in logs.text
    assert 30 <= counts["queued"] < 60, counts  # the rows on the damaged page are lost, the rest kept


async def test_retention_removes_delivered_and_dead_messages_within_a_minute(tmp_path: Path) -> None:
    from senderd.config import RelayConfig
    from senderd.relay.retention import prune_forever
    from senderd.testing import FakeClock
    from tests.tools import Recorder, all_blocked

    clock = FakeClock()
    config = RelayConfig(spool_dir=tmp_path / "spool", retention=3600, dead_retention=7200)
    spool = Spool(config.spool_dir, clock=clock)
    await spool.open()
    pruned = Recorder[int]()
    async with anyio.create_task_group() as group:
        await group.start(spool.run_writer)
        for _ in range(3):
            await spool.add("f", b"x" * 1000, "text/plain")
        delivered, dead, waiting = await spool.due(clock.time(), 3)
        await spool.finish(delivered, "delivered")
        await spool.finish(dead, "dead")
        await spool.finish(waiting, "queued", retry_at=clock.time() + 1e6)
        body = spool.db.execute("SELECT LENGTH(body) FROM messages WHERE id=?", (delivered.id,)).fetchone()[0]
        await group.start(functools.partial(prune_forever, config, spool, clock, on_pruned=pruned))
        clock.advance(3600 + 60)  # an hour and a minute: the delivered one is gone
        await pruned.wait_until(lambda counts: sum(counts) >= 1)
        after_an_hour = dict(spool.counts)
        await all_blocked()
        clock.advance(3600)
        await pruned.wait_until(lambda counts: sum(counts) >= 2)
        group.cancel_scope.cancel()
    left = [row[0] for row in spool.db.execute("SELECT id FROM messages")]
    await spool.close()
    assert body == 0  # a delivered message's body is dropped at once: the file does not grow with history
    assert after_an_hour == {"queued": 1, "in_flight": 0, "delivered": 0, "dead": 1}
    assert left == [waiting.id]
    assert spool.bytes == 1000


async def test_a_second_spool_on_the_same_directory_is_refused(tmp_path: Path) -> None:
    from senderd.errors import ConfigError

    first = Spool(tmp_path / "spool")
    await first.open()
    try:
        with pytest.raises(ConfigError, match=r"relay.spool_dir: .* is in use by another senderd \(pid \d+\)"):
            await Spool(tmp_path / "spool").open()
    finally:
        await first.close()
    again = Spool(tmp_path / "spool")  # the lock goes with the first
    await again.open()
    await again.close()


async def test_the_spool_is_private_to_its_owner(tmp_path: Path) -> None:
    import os
    import stat

    old = os.umask(0o022)  # a common umask: files 0644, readable by everyone
    try:
        spool = Spool(tmp_path / "spool")
        await spool.open()
        async with anyio.create_task_group() as group:
            await group.start(spool.run_writer)
            await spool.add("f", b"a body", "text/plain")
            group.cancel_scope.cancel()
        files = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "spool").iterdir() if p.is_file()}
        staging = stat.S_IMODE((tmp_path / "spool" / "incoming").stat().st_mode)
        directory = stat.S_IMODE((tmp_path / "spool").stat().st_mode)
        await spool.close()
        (tmp_path / "spool").chmod(0o755)  # an older spool, too open: tightened at the next start
        (tmp_path / "spool" / "spool.db").chmod(0o644)
        reopened = Spool(tmp_path / "spool")
        await reopened.open()
        tightened = stat.S_IMODE((tmp_path / "spool" / "spool.db").stat().st_mode)
        await reopened.close()
    finally:
        os.umask(old)
    assert directory == 0o700
    assert "spool.db-wal" in files
    assert set(files.values()) == {0o600}, files
    assert staging == 0o700  # bodies are staged there as they arrive
    assert tightened == 0o600
    assert stat.S_IMODE((tmp_path / "spool").stat().st_mode) == 0o700
