"""The daemon: ticks on a fake clock, the pool's overlap and overflow policy, 20 seconds (of a fake clock)
with 3-second tokens, and the CronJob/one-send commands and SIGTERM drain as real subprocesses."""

from __future__ import annotations

import itertools
import signal
from pathlib import Path
from typing import Any

import anyio
import pytest

from senderd.config import FlowConfig, load_config
from senderd.daemon import Daemon
from senderd.emulator.runtime import FlowSpec
from senderd.emulator.stack import EmulatorStack
from senderd.engine import Engine
from senderd.metrics import Metrics
from senderd.pool import Job, WorkerPool
from senderd.result import SendResult
from senderd.scheduler import run_schedules
from senderd.testing import FakeClock
from tests.tools import Recorder, senderd, senderd_run, settle

pytestmark = pytest.mark.anyio


def flow(name: str, every: str | None = None, **extra: object) -> FlowConfig:
    return FlowConfig.model_validate({"name": name, "path": f"/http/{name}", "every": every, **extra})


async def test_ticks_follow_the_grid_without_drift() -> None:
    clock, metrics = FakeClock(), Metrics()
    fired: dict[str, list[float]] = {"a": [], "b": []}
    pool = WorkerPool(2, 10)

    def make_job(f: FlowConfig, scheduled: float) -> Job:
        async def job() -> None:
            fired[f.name].append(scheduled)

        return job

    start = clock.monotonic()
    async with anyio.create_task_group() as group:
        await group.start(pool.run)
        await group.start(
            lambda task_status: run_schedules(
                [flow("a", "10s"), flow("b", "3s"), flow("c")],
                pool,
                make_job,
                clock=clock,
                on_skip=metrics.tick_skipped,
                task_status=task_status,
            )
        )
        for _ in range(1000):  # 100 s in 0.1 s steps
            clock.advance(0.1)
            await anyio.wait_all_tasks_blocked()
        group.cancel_scope.cancel()
    a, b = fired["a"], fired["b"]
    assert 0 <= a[0] - start < 10 and 0 <= b[0] - start < 3  # first fires spread over the interval
    assert len(a) == 10 and len(b) in (33, 34)
    assert all(later - earlier == pytest.approx(10, abs=1e-9) for earlier, later in itertools.pairwise(a))
    assert b[-1] == pytest.approx(b[0] + 3 * (len(b) - 1), abs=1e-6)  # fixed rate: no accumulated drift


async def test_a_flow_never_overlaps_itself_and_a_full_queue_drops() -> None:
    clock, metrics = FakeClock(), Metrics()
    release = anyio.Event()
    started: list[str] = []
    pool = WorkerPool(1, 1)

    def make_job(f: FlowConfig, _scheduled: float) -> Job:
        async def job() -> None:
            started.append(f.name)
            await release.wait()

        return job

    flows = [flow("slow", "1s"), flow("other", "1s"), flow("third", "1s")]
    async with anyio.create_task_group() as group:
        await group.start(pool.run)
        await group.start(
            lambda task_status: run_schedules(
                flows, pool, make_job, clock=clock, on_skip=metrics.tick_skipped, spread=False, task_status=task_status
            )
        )
        for _ in range(5):
            clock.advance(1.0)
            await anyio.wait_all_tasks_blocked()
        release.set()
        group.cancel_scope.cancel()

    def skipped(name: str, reason: str) -> float:
        return metrics.registry.get_sample_value("senderd_skipped_ticks_total", {"flow": name, "reason": reason}) or 0.0

    assert started == ["slow"]  # one worker, blocked: the rest waited in (or never got into) the queue
    total_overlap = sum(skipped(f.name, "overlap") for f in flows)
    total_full = sum(skipped(f.name, "queue_full") for f in flows)
    assert skipped("slow", "overlap") == 5
    assert total_full >= 5
    assert total_overlap + total_full == 6 * 3 - 2  # every tick but the two that got in was counted


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
        assert out.splitlines()[0].split() == ["flow", "outcome", "status", "attempts", "latency", "correlation", "id"]
        code, out, err = await senderd("once", "-c", config)
        assert code == 1
        assert "2 passed, 1 failed" in out
        assert "failing: HTTP 500: The MPL ID for the failed message is" in err
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


async def test_a_daemon_without_scheduled_flows_does_not_spin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import senderd.scheduler

    rounds = 0
    real = senderd.scheduler.run_schedules

    async def counted(*args: Any, **kwargs: Any) -> None:
        nonlocal rounds
        rounds += 1
        await real(*args, **kwargs)

    monkeypatch.setattr("senderd.daemon.run_schedules", counted)
    extra = '[[flows]]\nname = "on-demand"\npath = "/http/GetTimestamp"\n'  # no every, no cron
    async with EmulatorStack.started(tmp_path / "emu", config_extra=extra) as stack:
        daemon = Daemon.create(load_config(stack.config_path), handle_signals=False)
        async with anyio.create_task_group() as group:
            group.start_soon(daemon.serve)
            await daemon.started.wait()
            for _ in range(20):
                await anyio.wait_all_tasks_blocked()
            daemon.stop()
    assert rounds == 1  # one scheduling round that waits, not a loop that restarts at once
