"""The daemon: 20 seconds (of a fake clock) with 3-second tokens, the CronJob/one-send commands and SIGTERM
drain as real subprocesses, and no busy loop without scheduled flows. (Ticks and the pool: test_scheduler.)"""

from __future__ import annotations

import signal
from pathlib import Path

import anyio
import pytest

from senderd.config import load_config
from senderd.daemon import Daemon
from senderd.emulator.runtime import FlowSpec
from senderd.emulator.stack import EmulatorStack
from senderd.engine import Engine
from senderd.result import SendResult
from senderd.testing import FakeClock
from tests.tools import Recorder, all_blocked, senderd, senderd_run, settle

pytestmark = pytest.mark.anyio


async def test_three_second_tokens_over_20_seconds_never_expire_at_the_runtime(tmp_path: Path) -> None:
    """20 s of a 200 ms flow with 3 s tokens, on one fake clock for senderd and the emulator: it moves in
    50 ms steps, and the sends and token fetches (real HTTPS) that a step starts finish before the next."""
    clock, step = FakeClock(), 0.05
    extra = '[[flows]]\nname = "ts"\npath = "/http/GetTimestamp"\nevery = "200ms"\nretries = 0\n'
    async with EmulatorStack.started(tmp_path / "emu", token_lifetime=3, config_extra=extra, now=clock.time) as stack:
        daemon = Daemon.create(load_config(stack.config_path), handle_signals=False, clock=clock)
        sends = Recorder[SendResult]()

        async def hook(engine: Engine, _group: object) -> None:
            engine.listeners.append(sends)

        daemon.on_start = hook
        async with anyio.create_task_group() as group:
            group.start_soon(daemon.serve)
            await daemon.started.wait()
            assert daemon.engine is not None
            for _ in range(round(20 / step)):  # the duration under test, in fake time
                clock.advance(step)
                await settle(daemon.engine, sends)
            daemon.stop()
    stats = stack.runtime.stats
    print(
        f"\n20 s with 3 s tokens: {len(stats.messages)} sends, {stack.token_server.stats.issued} tokens, "
        f"{stats.expired_tokens} expired, {stats.by_status.get(401, 0)} x 401"
    )
    assert len(stats.messages) >= 99  # one every 200 ms, the first within the first 200 ms
    assert all(result.ok for result in sends.items)
    assert stats.expired_tokens == 0
    assert stats.by_status.get(401, 0) == 0
    assert stack.token_server.stats.issued >= 10
    assert len({m.token_jti for m in stats.messages}) >= 10


async def test_once_exit_codes_and_summary(tmp_path: Path) -> None:
    extra = (
        '[[flows]]\nname = "ts"\npath = "/http/GetTimestamp"\nexpect_body = "Current time"\n'
        '[[flows]]\nname = "failing"\npath = "/http/Failing"\n'
        '[[flows]]\nname = "orders"\npath = "/http/Orders"\nmethod = "POST"\ncsrf = true\nbody = "<o/>"\n'
    )
    async with EmulatorStack.started(tmp_path / "emu", config_extra=extra) as stack:
        config = str(stack.config_path)
        code, out, err = await senderd("once", "-c", config, "--flow", "ts", "--flow", "orders")
        assert code == 0, err
        assert "2 passed, 0 failed" in out
        assert out.splitlines()[0].split() == ["flow", "outcome", "status", "attempts", "latency", "mpl", "id"]
        code, out, err = await senderd("once", "-c", config)
        assert code == 1
        assert "2 passed, 1 failed" in out
        assert "failing: HTTP 500: the iFlow failed to process the message (MPL ID " in err
        code, _, err = await senderd("once", "-c", config, "--flow", "nope")
        assert code == 2
        assert "no flow named 'nope' (flows: ts, failing, orders)" in err
        code, out, err = await senderd("send", "-c", config, "orders", "--body", "<hello/>")
        assert code == 0, err
        assert out.startswith("status: 200 (success, 1 attempt")
        assert "SAP_MessageProcessingLogID: " in out
        assert out.rstrip().endswith("<hello/>")


async def test_sigterm_drains_the_send_in_flight(tmp_path: Path) -> None:
    extra = (
        '[pool]\ndrain_timeout = "20s"\n'
        '[[flows]]\nname = "slow"\npath = "/http/Slow"\nevery = "1h"\nstart = "now"\ntimeout = "30s"\n'
    )
    async with EmulatorStack.started(tmp_path / "emu", config_extra=extra) as stack:
        stack.runtime.add_flow(FlowSpec("/Slow", latency=1.5, body="done"))
        async with senderd_run("-c", str(stack.config_path)) as daemon:
            with anyio.fail_after(20):
                await daemon.wait_for("started")
                await stack.runtime.wait_for_requests(1)
                daemon.send_signal(signal.SIGTERM)
                code = await daemon.wait()
    assert code == 0
    assert stack.runtime.stats.by_status[200] == 1
    assert daemon.logged("stopping")
    assert [e["outcome"] for e in daemon.logged("send_finished")] == ["success"]  # it finished during the drain
    assert daemon.logged("stopped")


async def test_a_second_sigterm_forces_the_stop(tmp_path: Path) -> None:
    extra = (
        '[pool]\ndrain_timeout = "60s"\n'
        '[[flows]]\nname = "slow"\npath = "/http/Slow"\nevery = "1h"\nstart = "now"\ntimeout = "60s"\n'
    )
    async with EmulatorStack.started(tmp_path / "emu", config_extra=extra) as stack:
        stack.runtime.add_flow(FlowSpec("/Slow", latency=30, body="done"))
        async with senderd_run("-c", str(stack.config_path)) as daemon:
            with anyio.fail_after(15):  # far less than the 30 s send or the 60 s drain
                await stack.runtime.wait_for_requests(1)
                daemon.send_signal(signal.SIGTERM)
                await daemon.wait_for("stopping")
                daemon.send_signal(signal.SIGTERM)
                code = await daemon.wait()
    assert code == 0
    assert daemon.logged("drain_cut_short")
    assert stack.runtime.stats.by_status.get(200, 0) == 0


async def test_a_daemon_without_scheduled_flows_idles(tmp_path: Path) -> None:
    extra = '[[flows]]\nname = "on-demand"\npath = "/http/GetTimestamp"\n'  # no every, no cron
    async with EmulatorStack.started(tmp_path / "emu", config_extra=extra) as stack:
        daemon = Daemon.create(load_config(stack.config_path), handle_signals=False)
        async with anyio.create_task_group() as group:
            group.start_soon(daemon.serve)
            await daemon.started.wait()
            await all_blocked()  # everything waits: nothing loops
            assert daemon.scheduler is not None and daemon.scheduler.scheduled == []
            daemon.stop()
    assert stack.runtime.stats.requests == 0
