"""Schedules running into the worker pool, on a fake clock: ticks follow the grid without drift, a flow
never overlaps itself, and a full queue drops ticks (each skip counted)."""

from __future__ import annotations

import itertools

import anyio
import anyio.lowlevel
import pytest

from senderd.config import FlowConfig
from senderd.metrics import Metrics
from senderd.pool import Job, WorkerPool
from senderd.scheduler import run_schedules
from senderd.testing import FakeClock
from tests.tools import all_blocked

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
            await all_blocked()
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
            await all_blocked()
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


async def test_the_pool_runs_every_put_job_at_most_workers_at_once_and_drains_on_close() -> None:
    pool = WorkerPool(2, 2)
    running, most, done = 0, 0, []

    def make(index: int) -> Job:
        async def job() -> None:
            nonlocal running, most
            running += 1
            most = max(most, running)
            await anyio.lowlevel.checkpoint()
            running -= 1
            done.append(index)

        return job

    async with anyio.create_task_group() as group:
        await group.start(pool.run)
        for index in range(20):
            await pool.put(str(index), make(index))  # waits for room: never more than 2 queued
            assert len(pool._queue) <= 2
        pool.close()
        assert pool.offer("late", make(99)) == "closed"
    assert sorted(done) == list(range(20)) and most == 2
