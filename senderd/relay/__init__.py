"""The relay: the ingest API (`api`), the durable store (`store`: the SQLite `spool` or the shared PostgreSQL
`pgstore`) and the dispatcher that delivers what was stored (`dispatcher`), started and stopped together by
`Relay`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from anyio.abc import TaskStatus

from senderd.config import RelayConfig
from senderd.engine import Engine
from senderd.logs import get_logger
from senderd.relay.api import RelayApi
from senderd.relay.dispatcher import Dispatcher
from senderd.relay.retention import prune_forever
from senderd.relay.store import RelayStore, make_store

log = get_logger("relay")


class Relay:
    """The spool, the API listening on `relay.listen`, and the dispatcher, over one engine."""

    def __init__(self, config: RelayConfig, engine: Engine, spool: RelayStore) -> None:
        self.config = config
        self.spool = spool
        self.api = RelayApi(config, engine.holder, spool, engine.metrics)
        self.dispatcher = Dispatcher(config, engine, spool)
        self.clock = engine.clock
        engine.metrics.watch_relay(spool, self.dispatcher.oldest_age, lambda: self.dispatcher.unconfigured)

    @classmethod
    @asynccontextmanager
    async def open(cls, config: RelayConfig, engine: Engine) -> AsyncIterator[Relay]:
        """Open the store and listen; both are closed on exit. Raises ConfigError (store, address)."""
        spool = make_store(config, engine.clock)
        await spool.open()
        try:
            relay = cls(config, engine, spool)
            await relay.api.start()
            try:
                yield relay
            finally:
                await relay.api.stop()
        finally:
            await spool.close()

    @property
    def url(self) -> str:
        """The base URL of the relay API."""
        return self.api.url

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The spool's writer, the dispatcher and the retention, until cancelled."""
        try:
            async with anyio.create_task_group() as group:
                await group.start(self.spool.run_writer)
                await group.start(self.dispatcher.run)
                await group.start(prune_forever, self.config, self.spool, self.clock)
                task_status.started()
        finally:  # the dispatcher has put back what it held: the spool's counts are final
            self._log_left()

    def _log_left(self) -> None:
        """One line on stop: how many messages wait in the spool (delivered at the next start, from this
        directory; lost with it if it is an emptyDir and the pod is deleted)."""
        counts = self.spool.counts
        left = counts["queued"] + counts["in_flight"]
        (log.warning if left else log.info)(
            "relay_spool_left",
            messages=left,
            dead=counts["dead"],
            delivered_while_stopping=self.dispatcher.delivered_draining,
            spool=self.spool.where,
        )

    def stop_accepting(self) -> None:
        """Answer new posts 503; the dispatcher drains: it goes on delivering what is due."""
        self.api.stop_accepting()
        self.dispatcher.drain()

    def ready(self) -> tuple[bool, str]:
        """Whether posts are taken now (spool open, API listening, not stopping), and why not; holding a
        token is not needed: posts are spooled and delivered once one is held."""
        if self.api.stopping:
            return False, "stopping"
        if not self.spool.is_open:
            return False, f"spool {self.spool.where} is not open"
        problem = self.spool.problem
        if problem is not None:  # a shared database that is down
            return False, f"relay store: {problem}"
        if not self.api.site.listening:
            return False, f"not listening on {self.config.listen}"
        return True, "ok"

    async def wait_idle(self) -> None:
        """Return once the drain is through: nothing due is left to deliver and nothing is in flight."""
        await self.dispatcher.wait_drained()

    @property
    def inflight(self) -> int:
        """Deliveries under way now."""
        return self.dispatcher.inflight
