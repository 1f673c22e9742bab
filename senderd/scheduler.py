"""Turns schedules into ticks: one task per scheduled flow sleeps until its next fire and offers a job;
a reload changes only the flows whose schedule changed.

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
from senderd.pool import Job, Verdict, WorkerPool
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


class Scheduler:
    """One tick task per scheduled flow; `update` applies a new set of flows without disturbing the
    flows whose schedule did not change (they keep their phase, their next fire and their overlap rule)."""

    def __init__(
        self,
        offer: Callable[[FlowConfig, Job], Verdict],
        make_job: Callable[[FlowConfig, float], Job],
        *,
        clock: Clock,
        on_skip: SkipListener,
        spread: bool = True,
    ) -> None:
        self.offer = offer
        """Hands a tick's job to a pool (its verdict: queued, overlap, queue_full or closed)."""
        self.make_job = make_job
        self.clock = clock
        self.on_skip = on_skip
        self.spread = spread
        self._ticks: dict[str, _Ticker] = {}
        self._group: anyio.abc.TaskGroup | None = None
        self._stopped = False

    @property
    def scheduled(self) -> list[str]:
        """Names of the flows that have a tick task now."""
        return sorted(self._ticks)

    async def run(
        self, flows: Sequence[FlowConfig] = (), *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Tick `flows` (and whatever `update` brings) until cancelled."""
        async with anyio.create_task_group() as group:
            self._group = group
            self.update(flows)
            task_status.started()
            await anyio.sleep_forever()

    def stop(self) -> None:
        """End every tick task: nothing more is scheduled."""
        self._stopped = True
        for ticker in self._ticks.values():
            ticker.scope.cancel()
        self._ticks.clear()

    def update(self, flows: Sequence[FlowConfig]) -> list[str]:
        """Schedule `flows` from now on; returns the names whose tick task was (re)started."""
        group = self._group
        if group is None:
            raise RuntimeError("the scheduler is not running")
        if self._stopped:
            return []
        wanted = {flow.name: flow for flow in flows if schedule_of(flow) is not None}
        for name in list(self._ticks):
            if name not in wanted or self._ticks[name].timing != _timing(wanted[name]):
                self._ticks.pop(name).scope.cancel()
        started = []
        for name, flow in wanted.items():
            ticker = self._ticks.get(name)
            if ticker is not None:
                ticker.flow = flow  # same schedule: the next tick sends the new settings
                continue
            ticker = self._ticks[name] = _Ticker(flow)
            group.start_soon(self._tick, ticker)
            started.append(name)
        return started

    async def _tick(self, ticker: _Ticker) -> None:
        with ticker.scope:
            flow, clock = ticker.flow, self.clock
            schedule = schedule_of(flow)
            assert schedule is not None
            spread = self.spread and flow.start == "spread" and flow.every is not None
            offset = spread_offset(flow.name, flow.every) if spread and flow.every is not None else 0.0
            fire = schedule.first_fire(clock.monotonic(), clock.time(), offset=offset)
            while True:
                await clock.sleep(fire - clock.monotonic())
                flow = ticker.flow
                verdict = self.offer(flow, self.make_job(flow, fire))
                if verdict == "overlap" or verdict == "queue_full":
                    self.on_skip(flow.name, verdict, 1)
                    log.warning("tick_skipped", flow=flow.name, reason=verdict)
                elif verdict == "closed":
                    return
                following = schedule.advance(fire, clock.monotonic(), clock.time())
                if following.skipped:
                    self.on_skip(flow.name, "late", following.skipped)
                    log.warning("ticks_missed", flow=flow.name, count=following.skipped, reason="late")
                fire = following.at


class _Ticker:
    """A flow's tick task: the flow to send (swapped by `update`) and the scope that ends the task."""

    def __init__(self, flow: FlowConfig) -> None:
        self.flow = flow
        self.timing = _timing(flow)
        self.scope = anyio.CancelScope()


def _timing(flow: FlowConfig) -> tuple[object, ...]:
    """What decides when a flow fires: a change here restarts its ticks, anything else does not."""
    return (flow.every, flow.cron, flow.timezone, flow.start)


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
    scheduler = Scheduler(
        lambda flow, job: pool.offer(flow.name, job), make_job, clock=clock, on_skip=on_skip, spread=spread
    )
    await scheduler.run(flows, task_status=task_status)
