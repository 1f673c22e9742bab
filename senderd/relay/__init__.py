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
from senderd.relay.api import RelayApi
from senderd.relay.dispatcher import Dispatcher
from senderd.relay.retention import prune_forever
from senderd.relay.store import RelayStore, make_store


class Relay:
    """The spool, the API listening on `relay.listen`, and the dispatcher, over one engine."""

    def __init__(self, config: RelayConfig, engine: Engine, spool: RelayStore) -> None:
        self.config = config
        self.spool = spool
        self.api = RelayApi(config, engine.holder, spool, engine.metrics)
        self.dispatcher = Dispatcher(config, engine, spool)
        self.clock = engine.clock
        engine.metrics.watch_relay(
            lambda: spool.counts, self.dispatcher.oldest_age, lambda: self.dispatcher.unconfigured
        )

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
        async with anyio.create_task_group() as group:
            await group.start(self.spool.run_writer)
            await group.start(self.dispatcher.run)
            await group.start(prune_forever, self.config, self.spool, self.clock)
            task_status.started()

    def stop_accepting(self) -> None:
        """Answer new posts 503 and claim no more messages; deliveries in flight go on."""
        self.api.stop_accepting()
        self.dispatcher.stop_claiming()

    async def wait_idle(self) -> None:
        """Return once no delivery is in flight."""
        await self.dispatcher.wait_idle()

    @property
    def inflight(self) -> int:
        """Deliveries under way now."""
        return self.dispatcher.inflight
