"""Retention: delivered messages older than `relay.retention` are removed, dead ones older than
`relay.dead_retention` (if set), looked at once a minute (or once per retention, if that is shorter)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

import anyio

from senderd.clock import Clock
from senderd.config import RelayConfig
from senderd.errors import SpoolError
from senderd.logs import get_logger
from senderd.relay.store import RelayStore

log = get_logger("relay")
MAX_INTERVAL = 60.0


async def prune_forever(
    config: RelayConfig,
    spool: RelayStore,
    clock: Clock,
    *,
    on_pruned: Callable[[int], None] | None = None,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Prune the spool every `min(60 s, retention)` until cancelled; `on_pruned` hears each count."""
    interval = max(0.01, min(MAX_INTERVAL, config.retention, config.dead_retention or MAX_INTERVAL))
    task_status.started()
    while True:
        await clock.sleep(interval)
        now = clock.time()
        dead_before = now - config.dead_retention if config.dead_retention is not None else None
        try:
            removed = await spool.prune(now - config.retention, dead_before)
        except (sqlite3.Error, SpoolError) as exc:  # a full disk, a database down: the next round tries again
            log.error("spool_prune_failed", error=str(exc))
            continue
        if removed:
            log.info("spool_pruned", messages=removed)
        if on_pruned is not None:
            on_pruned(removed)
