"""Large and chunked relay posts are streamed to the spool, never held in memory whole (issue 11, defect 10):
the body arrives in a staging file under the spool directory, the memory budget holds a few pieces of it,
and what the runtime receives is byte for byte what was posted."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import anyio
import pytest

from senderd.relay.incoming import INLINE_BODY_BYTES, PIECE_BYTES, IncomingBody, clear_incoming
from senderd.relay.spool import Spool
from tests.test_relay import relay_daemon
from tests.tools import all_blocked

pytestmark = pytest.mark.anyio


def staged_bytes(spool: Path) -> int:
    """What the staging directory holds now."""
    return sum(path.stat().st_size for path in (spool / "incoming").iterdir())


async def pieces(body: bytes, size: int, gate: anyio.Event | None = None, after: int = 0) -> AsyncIterator[bytes]:
    """`body` in pieces of `size` (a chunked upload); with `gate`, it stops after `after` bytes until set."""
    for start in range(0, len(body), size):
        if gate is not None and start == after:
            await gate.wait()
        yield body[start : start + size]


@pytest.mark.timeout(60)
async def test_large_and_chunked_posts_reach_the_runtime_byte_for_byte(tmp_path: Path) -> None:
    sized = os.urandom(3 << 20)
    chunked = os.urandom(INLINE_BODY_BYTES // 2)  # small, but of unknown length: streamed all the same
    async with relay_daemon(tmp_path, max_message_bytes=8 << 20) as (stack, _, url, deliveries):
        async with aiohttp.ClientSession() as session:
            headers = {"Content-Type": "application/octet-stream"}
            async with session.post(
                f"{url}/v1/flows/ledger/messages", data=io.BytesIO(sized), headers=headers
            ) as answer:
                assert answer.status == 202
            async with session.post(
                f"{url}/v1/flows/ledger/messages", data=pieces(chunked, 10_000), headers=headers
            ) as answer:
                assert answer.status == 202
        await deliveries.wait_for(2)
        received = [m.body for m in stack.runtime.stats.messages if m.address == "/ledger"]
        assert [hashlib.sha256(b).hexdigest() for b in received] == [
            hashlib.sha256(sized).hexdigest(),
            hashlib.sha256(chunked).hexdigest(),
        ]
        assert staged_bytes(tmp_path / "spool") == 0  # the staging copies are gone once spooled


@pytest.mark.timeout(60)
async def test_a_body_being_posted_is_on_disk_not_in_memory(tmp_path: Path) -> None:
    body = os.urandom(6 << 20)
    half = 3 << 20
    gate = anyio.Event()
    async with relay_daemon(tmp_path, max_message_bytes=8 << 20) as (stack, daemon, url, deliveries):
        assert daemon.relay is not None
        budget = daemon.relay.api.budget
        statuses: list[int] = []

        async def upload() -> None:
            async with (
                aiohttp.ClientSession() as session,
                session.post(
                    f"{url}/v1/flows/ledger/messages",
                    data=pieces(body, 1 << 16, gate, after=half),
                    headers={"Content-Type": "application/octet-stream", "Content-Length": str(len(body))},
                ) as answer,
            ):
                statuses.append(answer.status)

        async with anyio.create_task_group() as group:
            group.start_soon(upload)
            with anyio.fail_after(20):
                while staged_bytes(tmp_path / "spool") < half - 2 * PIECE_BYTES:
                    await all_blocked()  # the upload waits at the gate; the relay writes what it got
            held = budget.held
            gate.set()
        await deliveries.wait_for(1)
        assert statuses == [202]
        assert held <= 2 * PIECE_BYTES  # a few pieces, not the 6 MiB declared
        assert stack.runtime.stats.messages[-1].body == body


@pytest.mark.timeout(60)
async def test_a_chunked_body_past_the_limit_is_413_and_leaves_nothing_behind(tmp_path: Path) -> None:
    async with relay_daemon(tmp_path, max_message_bytes=1 << 20) as (stack, _, url, _deliveries):
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{url}/v1/flows/ledger/messages",
                data=pieces(b"x" * (2 << 20), 1 << 16),
                headers={"Content-Type": "application/octet-stream"},
            ) as answer,
        ):
            assert answer.status == 413
            assert "relay.max_message_bytes" in (await answer.json())["error"]
        assert staged_bytes(tmp_path / "spool") == 0
        assert stack.runtime.stats.requests == 0


async def test_staging_files_left_by_a_crash_are_removed_at_open(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir(mode=0o700)
    clear_incoming(spool_dir)
    (spool_dir / "incoming" / "cut-off-post").write_bytes(b"half a body")
    spool = Spool(spool_dir)
    await spool.open()
    try:
        assert list((spool_dir / "incoming").iterdir()) == []
    finally:
        await spool.close()


async def test_a_staged_body_is_stored_whole_and_its_hash_guards_the_idempotency_key(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    spool = Spool(spool_dir)
    await spool.open()
    body = os.urandom(3 << 20)
    staged = spool_dir / "incoming" / "one"
    staged.write_bytes(body)
    incoming = IncomingBody(staged, len(body), hashlib.sha256(body).hexdigest())
    try:
        async with anyio.create_task_group() as group:
            await group.start(spool.run_writer)
            message_id, created = await spool.add("f", incoming, "application/octet-stream", "key-1")
            again = await spool.add("f", body, "application/octet-stream", "key-1")  # the same body, in memory
            [claimed] = await spool.due(spool.clock.time() + 1, 10)
            group.cancel_scope.cancel()
        assert created
        assert again == (message_id, False)
        assert claimed.body == b""  # too large to come with the claim
        assert claimed.size == len(body)
        assert await spool.body_of(claimed) == body
        assert spool.bytes == len(body)
    finally:
        await spool.close()
