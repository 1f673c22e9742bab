"""Scheduled flows across replicas: each tick fires once in total.

- **With a shared database** (`relay.store = "postgresql"`): every replica ticks every flow, and before
  sending claims the tick, `(flow, tick number)`, in the database; the first claim wins, the others count
  `senderd_skipped_ticks_total{reason="claimed_elsewhere"}`. A replica that dies simply stops claiming:
  the others win its ticks from the next one on. The tick number comes from the wall clock, which replicas
  share: for `every`, the index of the period of length `every` the fire falls in; for `cron`, the minute.
  Replicas need not start in phase: whoever fires first in a period sends it. If the database cannot be
  reached the tick is sent anyway (a tick is never lost to an outage; during one, each replica sends).
- **Without one**: static shards, `[cluster] shard = "I/N"`: this replica schedules only the flows whose
  stable hash modulo N is I (MD5 of the name, its last 8 bytes big-endian, as Prometheus' `hashmod`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from senderd.clock import Clock
from senderd.config import FlowConfig
from senderd.errors import SpoolError
from senderd.logs import get_logger
from senderd.metrics import Metrics

log = get_logger("cluster")


def shard_hash(name: str) -> int:
    """A flow name's stable 64-bit hash: the last 8 bytes of its MD5, big-endian (Prometheus' hashmod)."""
    digest = hashlib.md5(name.encode("utf-8", "surrogatepass"), usedforsecurity=False).digest()
    return int.from_bytes(digest[8:], "big")


def in_shard(name: str, shard: tuple[int, int] | None) -> bool:
    """Whether shard `(I, N)` schedules the flow `name` (every flow when not sharded)."""
    if shard is None:
        return True
    index, count = shard
    return shard_hash(name) % count == index


def mine(flows: Sequence[FlowConfig], shard: tuple[int, int] | None) -> list[FlowConfig]:
    """The flows this shard schedules (on-demand flows are kept: they are not ticked anyway)."""
    return [flow for flow in flows if in_shard(flow.name, shard)]


def tick_number(flow: FlowConfig, wall: float) -> int:
    """Which tick a fire at Unix time `wall` is, the same on every replica."""
    if flow.every is not None:
        return math.floor(wall / flow.every)
    return round(wall / 60)  # cron: minute resolution, replicas agree to well within half a minute


@runtime_checkable
class TickClaimer(Protocol):
    """A store that can record who fires a tick (the PostgreSQL store)."""

    async def claim_tick(self, flow: str, tick: int) -> bool:
        """True if this replica is the first to claim the tick."""
        ...


class TickGate:
    """Decides, per scheduled send, whether this replica fires that tick."""

    def __init__(self, claimer: TickClaimer, clock: Clock, metrics: Metrics) -> None:
        self.claimer = claimer
        self.clock = clock
        self.metrics = metrics

    async def admit(self, flow: FlowConfig, scheduled_at: float) -> bool:
        """Claim the tick scheduled at monotonic `scheduled_at`; False (and counted) if another replica has."""
        wall = scheduled_at + (self.clock.time() - self.clock.monotonic())
        tick = tick_number(flow, wall)
        try:
            claimed = await self.claimer.claim_tick(flow.name, tick)
        except SpoolError as exc:
            log.warning("tick_claim_failed", flow=flow.name, tick=tick, error=str(exc), sending="anyway")
            return True
        if not claimed:
            self.metrics.tick_skipped(flow.name, "claimed_elsewhere")
        return claimed


def gate_for(store: object | None, clock: Clock, metrics: Metrics) -> TickGate | None:
    """A tick gate over `store` if it can claim ticks (the PostgreSQL store), else None."""
    return TickGate(store, clock, metrics) if isinstance(store, TickClaimer) else None
