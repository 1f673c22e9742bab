"""Turns schedules into ticks: one task per scheduled flow sleeps until its next fire and offers a job.

The maths is in `schedule.py` (pure functions); this module only waits on the injected clock, and tells
`on_skip` about every tick that did not run (the daemon counts them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import anyio
from anyio.abc import TaskStatus

from senderd.clock import Clock
from senderd.config import FlowConfig
from senderd.logs import get_logger
from senderd.metrics import SkipReason
from senderd.pool import Job, WorkerPool
from senderd.schedule import CronSchedule, IntervalSchedule, Schedule, spread_offset

log = get_logger("scheduler")
SkipListener = Callable[[str, SkipReason, int], None]
"""Called with the flow's name, why its ticks did not run, and how many."""


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
    on_skip: SkipListener,
    spread: bool = True,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Tick every scheduled flow until cancelled; `make_job(flow, scheduled_at)` builds the work."""
    async with anyio.create_task_group() as group:
        for flow in flows:
            schedule = schedule_of(flow)
            if schedule is not None:
                group.start_soon(_tick, flow, schedule, pool, make_job, clock, on_skip, spread)
        task_status.started()


async def _tick(
    flow: FlowConfig,
    schedule: Schedule,
    pool: WorkerPool,
    make_job: Callable[[FlowConfig, float], Job],
    clock: Clock,
    on_skip: SkipListener,
    spread: bool,
) -> None:
    spread = spread and flow.start == "spread" and flow.every is not None
    offset = spread_offset(flow.name, flow.every) if spread and flow.every is not None else 0.0
    fire = schedule.first_fire(clock.monotonic(), clock.time(), offset=offset)
    while True:
        await clock.sleep(fire - clock.monotonic())
        verdict = pool.offer(flow.name, make_job(flow, fire))
        if verdict == "overlap" or verdict == "queue_full":
            on_skip(flow.name, verdict, 1)
            log.warning("tick_skipped", flow=flow.name, reason=verdict)
        elif verdict == "closed":
            return
        following = schedule.advance(fire, clock.monotonic(), clock.time())
        if following.skipped:
            on_skip(flow.name, "late", following.skipped)
            log.warning("ticks_missed", flow=flow.name, count=following.skipped, reason="late")
        fire = following.at
