"""The relay on a disk that fills up, for real: a small tmpfs (root only; skipped where mount is not
allowed). Posts are answered 503 while nothing can be committed, nothing acknowledged is lost, the daemon
(also one started on the full disk) keeps running, and it takes posts again by itself once space returns."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.test_relay import get, relay_daemon

pytestmark = pytest.mark.anyio


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `path` for the block."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=False)
    if mounted.returncode != 0:
        pytest.skip("mount -t tmpfs is not allowed here")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> None:
    """Write `path` until the disk is full."""
    with contextlib.suppress(OSError), path.open("wb", buffering=0) as filler:
        while True:
            filler.write(b"\0" * 4096)


async def post_down(
    session: aiohttp.ClientSession, url: str, body: bytes | io.BytesIO
) -> tuple[int, dict[str, str], str]:
    """Post `body` to the flow "down" (the runtime refuses it while `unavailable`); status, headers, id/error."""
    async with session.post(
        f"{url}/v1/flows/down/messages", data=body, headers={"Content-Type": "text/plain"}
    ) as response:
        answer = await response.json()
        return response.status, dict(response.headers), answer.get("id") or answer.get("error", "")


@pytest.mark.timeout(120)
async def test_a_full_disk_is_503_loses_nothing_acked_and_recovers_by_itself(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", "3m") as disk:
        spool = disk / "spool"
        acked: list[str] = []
        body = b"m" * 16_384
        async with (
            relay_daemon(tmp_path, spool=spool, max_deliveries=10_000) as (stack, _d, url, deliveries),
            aiohttp.ClientSession() as session,
        ):
            for _ in range(10):  # acknowledged, then redelivered (the runtime refuses "down" for now)
                status, _, said = await post_down(session, url, body)
                assert status == 202
                acked.append(said)
            fill(disk / "filler")  # the disk is full now (a few pages may still be free)
            refused = None
            for _ in range(200):
                status, headers, said = await post_down(session, url, body)
                if status == 202:
                    acked.append(said)
                    continue
                refused = (status, headers, said)
                break
            assert refused is not None, "the disk never filled"
            assert refused[0] == 503
            assert "Retry-After" in refused[1]
            assert "disk is full" in refused[2], refused
            stack.runtime.flows["/down"].unavailable = 0
            await deliveries.wait_until(lambda sends: set(acked) <= {s.message_id for s in sends if s.ok})
            for message_id in acked:  # delivered though the disk is full; every one is still there
                assert (await get(f"{url}/v1/messages/{message_id}"))[0] == 200
        # a restart on the full disk starts (it crash-looped: the recovery UPDATE at open failed)
        async with (
            relay_daemon(tmp_path, spool=spool, max_deliveries=10_000) as (stack, _d, url, deliveries),
            aiohttp.ClientSession() as session,
        ):
            assert (await post_down(session, url, body))[0] == 503
            await deliveries.wait_for(1)  # what was not recorded as delivered is delivered again
            (disk / "filler").unlink()  # space returns
            status, _, said = await post_down(session, url, body)
            assert status == 202, said  # at once: nobody had to intervene
            stack.runtime.flows["/down"].unavailable = 0
            await deliveries.wait_until(lambda sends: said in {s.message_id for s in sends if s.ok})
            for message_id in acked:
                _, message = await get(f"{url}/v1/messages/{message_id}")
                assert message["status"] in ("delivered", "queued", "in_flight"), message


@pytest.mark.timeout(60)
async def test_a_large_post_on_a_full_disk_is_503_and_leaves_no_staging_file(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", "3m") as disk:
        spool = disk / "spool"
        async with (
            relay_daemon(tmp_path, spool=spool) as (_stack, _d, url, _deliveries),
            aiohttp.ClientSession() as session,
        ):
            fill(disk / "filler")
            status, headers, said = await post_down(session, url, io.BytesIO(b"m" * (1 << 20)))
            assert status == 503, said  # streamed to a staging file, which cannot be written
            assert "Retry-After" in headers
            assert "disk is full" in said
            assert list((spool / "incoming").iterdir()) == []
            (disk / "filler").unlink()
            status, _, said = await post_down(session, url, io.BytesIO(b"m" * (1 << 20)))
            assert status == 202, said
