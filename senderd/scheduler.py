"""Turns schedules into ticks: one task per scheduled flow sleeps until its next fire and offers a job.

The maths is in `schedule.py` (pure functions); this module only waits on the injected clock.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import anyio
import structlog
from anyio.abc import TaskStatus

from senderd.clock import Clock
from senderd.config import FlowConfig
from senderd.metrics import Metrics
from senderd.pool import Job, WorkerPool
from senderd.schedule import CronSchedule, IntervalSchedule, Schedule, spread_offset

log = structlog.get_logger(component="scheduler")


def schedule_of(flow: FlowConfig) -> Schedule | None:
    """The flow's schedule, or None for an on-demand flow."""
    if flow.every is not None:
        return IntervalSchedule(flow.every)
    if flow.cron is not None:
        return CronSchedule(flow.cron, flow.timezone)
    return None


async def run_schedules(
    flows: Sequence[FlowConfig],
    pool: WorkerPool,
    make_job: Callable[[FlowConfig, float], Job],
    *,
    clock: Clock,
    metrics: Metrics,
    spread: bool = True,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Tick every scheduled flow until cancelled; `make_job(flow, scheduled_at)` builds the work."""
    async with anyio.create_task_group() as group:
        for flow in flows:
            schedule = schedule_of(flow)
            if schedule is not None:
                group.start_soon(_tick, flow, schedule, pool, make_job, clock, metrics, spread)
        task_status.started()


async def _tick(flow: FlowConfig, schedule: Schedule, pool: WorkerPool, make_job: Callable[[FlowConfig, float], Job],
                clock: Clock, metrics: Metrics, spread: bool) -> None:
    spread = spread and flow.start == "spread" and flow.every is not None
    offset = spread_offset(flow.name, flow.every) if spread and flow.every is not None else 0.0
    fire = schedule.first_fire(clock.monotonic(), clock.time(), offset=offset)
    while True:
        await clock.sleep(fire - clock.monotonic())
        verdict = pool.offer(flow.name, make_job(flow, fire))
        if verdict in ("overlap", "queue_full"):
            metrics.skipped_ticks.labels(flow.name, verdict).inc()
            log.warning("tick_skipped", flow=flow.name, reason=verdict)
        elif verdict == "closed":
            return
        following = schedule.advance(fire, clock.monotonic(), clock.time())
        if following.skipped:
            metrics.skipped_ticks.labels(flow.name, "late").inc(following.skipped)
            log.warning("ticks_missed", flow=flow.name, count=following.skipped, reason="late")
        fire = following.at
