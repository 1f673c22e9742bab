"""The relay's dispatcher: delivers spooled messages through the flow's sender (token, CSRF, retries),
with the message id as `SAP_ApplicationID`, at least once.

Ordered flows have one message in flight at a time, in order; other flows are delivered concurrently. A
message whose send failed in a way another round may fix is queued again with a growing delay; one whose
rounds are used up (or that the flow refused) is `dead`, kept for re-drive.

On a stop (`drain`), it goes on claiming what is due until nothing due is left to claim and nothing is in
flight (`wait_drained`), or until the daemon's drain timeout cancels it: what is left stays in the spool.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import sqlite3
from collections.abc import Awaitable, Callable

import anyio

from senderd.config import RelayConfig
from senderd.engine import Engine
from senderd.errors import ConfigError, SpoolError
from senderd.logs import get_logger
from senderd.metrics import DeliveryResult
from senderd.metrics import SpoolState as State
from senderd.pool import WorkerPool
from senderd.relay.spool import Message
from senderd.relay.store import RelayStore
from senderd.relay.verdict import verdict
from senderd.result import SendResult
from senderd.retry import backoff

log = get_logger("relay")
_MAX_UNRECORDED = 1000
"""Ends of deliveries held in memory while the disk is full; no more claims beyond that."""
_RESULTS: dict[State, DeliveryResult] = {"delivered": "delivered", "queued": "retry", "dead": "dead"}


class Dispatcher:
    """Claims due messages from the spool and delivers them."""

    def __init__(self, config: RelayConfig, engine: Engine, spool: RelayStore) -> None:
        self.config = config
        self.engine = engine
        self.spool = spool
        self.clock = engine.clock
        self.draining = False
        self._drained = anyio.Event()
        self.delivered_draining = 0
        """Messages delivered since the drain began."""
        self._wake = anyio.Event()
        self._inflight: dict[str, Message] = {}
        self._unrecorded: dict[str, tuple[Callable[[], Awaitable[None]], float]] = {}
        """Ends of deliveries the spool could not write (a full disk), by message id, with the time before
        which the message is not claimed again (infinite once delivered or dead): written again each round;
        a message claimed again meanwhile (a redelivery that came due) drops its old record."""
        self.rounds = 0
        """Loop iterations (a test can tell waiting from spinning)."""
        self._oldest: float | None = None
        self._oldest_checked = float("-inf")
        self.unconfigured = 0
        """Queued messages of flows that are not configured now (a reload dropped them), as last counted."""
        self._rng = random.Random()
        self._wall_at_start = self.clock.time()
        self._monotonic_at_start = self.clock.monotonic()
        self._pauses: dict[str, tuple[int, float]] = {}
        """Credentials sets whose deliveries pause (a 401, a token-server failure): consecutive pauses and
        the monotonic time they end."""
        spool.on_change = self._wake.set

    def plan_time(self) -> float:
        """Now, for planning redeliveries: the wall-clock time at start moved on by the monotonic clock, so
        that a clock stepped back (or forward) while running delays nothing. Persisted as a "not before"
        that reads as wall-clock time after a restart (where the spool bounds it by `redelivery_max`)."""
        return self._wall_at_start + self.clock.monotonic() - self._monotonic_at_start

    def _redelivery_delay(self, count: int) -> float:
        """The jittered wait before the next round, after `count` rounds (or pauses) in a row."""
        return backoff(
            count,
            initial=self.config.redelivery_initial,
            maximum=self.config.redelivery_max,
            jitter=0.1,
            rng=self._rng,
        )

    def oldest_age(self) -> float:
        """Seconds since the oldest message still waiting for delivery was accepted (0 when none waits)."""
        return max(0.0, self.clock.time() - self._oldest) if self._oldest is not None else 0.0

    @property
    def inflight(self) -> int:
        """Deliveries under way now."""
        return len(self._inflight)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Deliver due messages until cancelled; ordered flows one at a time, in order."""
        try:
            await self._run(task_status)
        finally:  # stopped: what is still claimed (running or waiting for a worker) goes back, counted
            with anyio.CancelScope(shield=True):
                left = list(self._inflight.values())
                requeued = await self.spool.requeue_all(left)
                self._inflight.clear()
            if left:
                log.info("relay_requeued", messages=requeued)

    async def _run(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        workers = self.config.workers or self.engine.config.pool.workers  # fixed until a restart
        pool = WorkerPool(workers, workers)
        async with anyio.create_task_group() as group:
            await group.start(pool.run)
            task_status.started()
            while True:
                self.rounds += 1
                self._wake = anyio.Event()  # before looking, so that no change in between is missed
                self.spool.on_change = self._wake.set
                ordered = [flow.name for flow in self.engine.config.flows if flow.ordered]  # a reload may change it
                free = workers * 2 - len(self._inflight)
                if len(self._inflight) > workers or len(self._unrecorded) >= _MAX_UNRECORDED:
                    free = 0  # all workers busy with jobs queued behind them: claim once half the window is free
                claimed: list[Message] = []
                try:
                    await self._record_again()
                    await self._refresh_oldest()
                    if free > 0:
                        busy_ordered = [m.flow for m in self._inflight.values() if m.flow in ordered]
                        busy_ordered += self._paused_flows()
                        now = self.plan_time()
                        again = [i for i, (_, not_before) in self._unrecorded.items() if not_before <= now]
                        claimed = await self.spool.due(
                            now, free, exclude_flows=busy_ordered, ordered_flows=ordered,
                            exclude_ids=[*self._inflight, *self._unrecorded], again_ids=again,
                            only_flows=[flow.name for flow in self.engine.config.flows],
                        )  # fmt: skip
                except (sqlite3.Error, SpoolError) as exc:  # a failing disk, a database down: try again shortly
                    log.error("spool_read_failed", error=str(exc))
                for message in claimed:
                    self._unrecorded.pop(message.id, None)
                    self._inflight[message.id] = message
                    await pool.put(message.id, self._job(message))
                if not claimed:
                    if self.draining and not self._inflight:
                        self._drained.set()  # nothing due that can be claimed, nothing under way
                    await self._wait_for_work(can_claim=free > 0)

    def _paused_flows(self) -> list[str]:
        now = self.clock.monotonic()
        paused = {name for name, (_, until) in self._pauses.items() if until > now}
        config = self.engine.config
        return [flow.name for flow in config.flows if paused and config.set_of(flow) in paused]

    def drain(self) -> None:
        """The stop has begun: deliver what is due now (and what comes due meanwhile), then report drained."""
        self.draining = True
        self._wake.set()

    async def wait_drained(self) -> None:
        """Return once draining found nothing due to claim and nothing in flight."""
        await self._drained.wait()

    async def _wait_for_work(self, *, can_claim: bool) -> None:
        """Sleep until a post, a finished delivery or a re-drive (`_wake`), or until a queued message that
        is not due yet becomes due; never less than a moment, so that nothing spins."""
        delay = 1.0
        if can_claim:
            with contextlib.suppress(sqlite3.Error, SpoolError):
                now = self.plan_time()
                next_due = await self.spool.next_due_at(after=now)
                if next_due is not None:
                    delay = min(1.0, max(0.01, next_due - now))
        with anyio.move_on_after(delay):
            await self._wake.wait()

    async def _record_again(self) -> None:
        """Write the ends of deliveries that a full disk refused, oldest first, until one fails again."""
        for message_id, (record, _) in list(self._unrecorded.items()):
            try:
                with anyio.CancelScope(shield=True):
                    await record()
            except (sqlite3.Error, SpoolError):
                return
            del self._unrecorded[message_id]

    async def _refresh_oldest(self) -> None:
        now = self.clock.monotonic()
        if now - self._oldest_checked >= 1.0:
            self._oldest_checked = now
            await self.refresh_gauges()

    async def refresh_gauges(self) -> None:
        """Look up the oldest waiting message and the messages of flows no longer configured."""
        self._oldest = await self.spool.oldest_queued_at()
        self.unconfigured = await self.spool.queued_outside([flow.name for flow in self.engine.config.flows])

    def _job(self, message: Message) -> Callable[[], Awaitable[None]]:
        async def deliver() -> None:
            try:
                await self._deliver(message)
            except anyio.get_cancelled_exc_class():
                raise  # interrupted by a stop: it stays claimed, and `run` queues it again with the rest
            except BaseException:
                self._inflight.pop(message.id, None)
                raise
            else:
                self._inflight.pop(message.id, None)
            finally:
                self._wake.set()

        return deliver

    async def _deliver(self, message: Message) -> None:
        try:
            flow = self.engine.config.flow(message.flow)
        except ConfigError:  # a reload dropped it: kept queued until it returns (or an operator acts)
            await self._finish(
                message,
                None,
                "queued",
                error=f"flow {message.flow!r} is not configured now: kept until it is again",
                retry_at=self.plan_time() + self.config.redelivery_max,
                counted=False,
            )
            return
        headers = {self.config.application_id_header: message.id}
        if message.content_type:
            headers["Content-Type"] = message.content_type
        body = await self.spool.body_of(message)
        result = await self.engine.send(flow, body=body, headers=headers, message_id=message.id)
        credentials = self.engine.config.set_of(flow)
        decided = verdict(result)
        if decided != "pause":
            self._pauses.pop(credentials, None)
        if decided == "delivered":
            await self._finish(message, result, "delivered")
            self.delivered_draining += self.draining
            return
        if decided == "pause":  # our credentials or the token server: not the message's fault
            failures = self._pauses.get(credentials, (0, 0.0))[0] + 1
            delay = self._redelivery_delay(failures)
            self._pauses[credentials] = (failures, self.clock.monotonic() + delay)
            log.warning(
                "relay_delivery_paused", credentials=credentials, seconds=round(delay, 3), error=result.last.error
            )
            await self._finish(message, result, "queued", retry_at=self.plan_time() + delay, counted=False)
            return
        rounds = message.attempts + 1
        if decided == "redeliver" and rounds < self.config.max_deliveries:
            delay = self._redelivery_delay(rounds)
            await self._finish(message, result, "queued", retry_at=self.plan_time() + delay)
        else:
            await self._finish(message, result, "dead")

    async def _finish(
        self,
        message: Message,
        result: SendResult | None,
        state: State,
        *,
        error: str | None = None,
        retry_at: float = 0.0,
        counted: bool = True,
    ) -> None:
        if result is not None:
            error = result.last.error
        record = functools.partial(
            self.spool.finish,
            message,
            state,
            error=error,
            retry_at=retry_at,
            correlation_id=result.correlation_id if result else None,
            status=result.status if result else None,
            counted=counted,
        )
        try:
            with anyio.CancelScope(shield=True):
                await record()
        except (sqlite3.Error, SpoolError) as exc:  # a full disk, a database down: written again later
            log.error("spool_write_failed", id=message.id, error=str(exc), retry="each dispatcher round")
            self._unrecorded[message.id] = (record, retry_at if state == "queued" else math.inf)
        outcome: DeliveryResult = _RESULTS[state] if counted else "paused"
        self.engine.metrics.relay_delivery(message.flow, outcome)
        if state != "delivered":
            log.warning(
                "relay_delivery_failed",
                id=message.id,
                flow=message.flow,
                result=outcome,
                attempts=message.attempts + counted,
                error=error,
            )
