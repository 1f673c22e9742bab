"""SIGTERM and the relay's spool, with a real signal to a `senderd run` subprocess: what is due is delivered
within `pool.drain_timeout`, and one `relay_spool_left` line says how many messages remain in the spool."""

from __future__ import annotations

import signal
from pathlib import Path

import aiohttp
import anyio
import pytest

from senderd.emulator.runtime import FlowSpec
from senderd.emulator.stack import EmulatorStack
from senderd.relay.spool import Spool
from tests.tools import senderd_run

pytestmark = pytest.mark.anyio

LEDGER = '[[flows]]\nname = "ledger"\npath = "/http/Ledger"\nmethod = "POST"\nordered = true\nretries = 0\n'
"""An ordered flow: one message in flight at a time, so that a backlog drains at the runtime's pace."""


def config(spool: Path, drain: str) -> str:
    return f'[pool]\ndrain_timeout = "{drain}"\n[relay]\nlisten = "127.0.0.1:0"\nspool_dir = "{spool}"\n' + LEDGER


async def post_backlog(relay_url: str, count: int) -> list[str]:
    ids = []
    async with aiohttp.ClientSession() as session:
        for n in range(count):
            async with session.post(f"{relay_url}/v1/flows/ledger/messages", data=f"<e n='{n}'/>") as answer:
                assert answer.status == 202
                ids.append((await answer.json())["id"])
    return ids


async def queued_in(spool_dir: Path) -> int:
    spool = Spool(spool_dir)
    await spool.open()
    try:
        return spool.counts["queued"] + spool.counts["in_flight"]
    finally:
        await spool.close()


async def test_sigterm_delivers_the_backlog_that_is_due_before_exiting(tmp_path: Path) -> None:
    async with EmulatorStack.started(tmp_path / "emu", config_extra=config(tmp_path / "spool", "30s")) as stack:
        stack.runtime.add_flow(FlowSpec("/Ledger", kind="echo", latency=0.1))  # 10 messages: a second in all
        async with senderd_run("-c", str(stack.config_path)) as daemon:
            relay_url = (await daemon.wait_for("relay_listening", timeout=15))["url"]
            with anyio.fail_after(30):
                ids = await post_backlog(relay_url, 10)
                await stack.runtime.wait_for_requests(1)  # the first delivery is on the wire, nine wait
                daemon.send_signal(signal.SIGTERM)
                left = await daemon.wait_for("relay_spool_left")
                code = await daemon.wait()
    delivered = [m.headers["sap_applicationid"] for m in stack.runtime.stats.messages]
    assert code == 0
    assert delivered == ids  # all of them, in order, before the exit (not only the one in flight)
    assert left["messages"] == 0 and left["dead"] == 0
    assert left["delivered_while_stopping"] >= 9
    assert left["level"] == "info"
    assert await queued_in(tmp_path / "spool") == 0


async def test_a_drain_cut_short_logs_what_remains_in_the_spool(tmp_path: Path) -> None:
    async with EmulatorStack.started(tmp_path / "emu", config_extra=config(tmp_path / "spool", "1s")) as stack:
        stack.runtime.add_flow(FlowSpec("/Ledger", kind="echo", latency=0.2))  # 30 messages: 6 s, the drain 1 s
        async with senderd_run("-c", str(stack.config_path)) as daemon:
            relay_url = (await daemon.wait_for("relay_listening", timeout=15))["url"]
            with anyio.fail_after(30):
                ids = await post_backlog(relay_url, 30)
                await stack.runtime.wait_for_requests(1)
                daemon.send_signal(signal.SIGTERM)
                left = await daemon.wait_for("relay_spool_left")
                code = await daemon.wait()
    assert code == 0
    assert daemon.logged("drain_cut_short")
    delivered = {m.headers["sap_applicationid"] for m in stack.runtime.stats.messages}
    remaining = await queued_in(tmp_path / "spool")
    assert 0 < left["messages"] == remaining  # the line tells what the next start finds
    assert left["level"] == "warning"
    # each message is delivered or waits (the one cut mid-delivery may be both: at least once)
    assert len(delivered) + remaining in (len(ids), len(ids) + 1)
    assert 1 <= left["delivered_while_stopping"] < len(ids)
