"""What the relay's API and dispatcher need from a message store, and the factory that picks one.

Two stores satisfy `RelayStore`: `spool.Spool` (SQLite in `relay.spool_dir`, one daemon) and
`pgstore.PgStore` (PostgreSQL, shared by replicas). Both acknowledge only what is committed, keep
idempotency keys unique per flow, and deliver at least once. A store that cannot be reached raises
`SpoolError` (`StoreUnavailable`); the API turns that into 503 and the dispatcher waits and tries again.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from anyio.abc import TaskStatus

from senderd.clock import Clock
from senderd.config import RelayConfig
from senderd.errors import ConfigError
from senderd.metrics import SpoolState as State
from senderd.relay.incoming import IncomingBody
from senderd.relay.spool import Message, Spool


class RelayStore(Protocol):
    """The durable outbox, as the relay uses it."""

    counts: dict[State, int]
    """Messages per state (for a shared store: all replicas', refreshed every few seconds)."""
    bytes: int
    """Body bytes of the queued, in-flight and dead messages (what `max_bytes` bounds)."""
    max_bytes: int
    """`relay.max_spool_bytes`."""
    max_messages: int
    """`relay.max_spool_messages`."""
    on_change: Callable[[], None] | None
    """Called after a change that may make a message due (the dispatcher's wake-up)."""

    @property
    def where(self) -> str:
        """Where the messages are, for the log (never a secret: no password, no DSN)."""
        ...

    @property
    def problem(self) -> str | None:
        """Why the store cannot take messages now (None when it can): `/readyz` shows it."""
        ...

    @property
    def is_open(self) -> bool:
        """Between `open` and `close`."""
        ...

    @property
    def staging_dir(self) -> Path | None:
        """Where large posts are streamed before `add` takes them (`IncomingBody`); None: bodies come to
        `add` in memory (bounded by `relay.max_buffered_bytes`)."""
        ...

    async def open(self) -> None:
        """Create or migrate the schema and load the counters; ConfigError if the store is unusable."""

    async def close(self) -> None:
        """Release the store."""

    async def run_writer(self, *, task_status: TaskStatus[None]) -> None:
        """The store's background work (group commit, lease renewal, counters) until cancelled."""

    async def add(
        self,
        flow: str,
        body: builtins.bytes | IncomingBody,
        content_type: str | None,
        idempotency_key: str | None = None,
    ) -> tuple[str, bool]:
        """Store a message durably; (id, created). A known (flow, idempotency key) returns the first id."""
        ...

    async def body_of(self, message: Message) -> builtins.bytes:
        """The body of a claimed message (a claim may leave a large one to be read when it is delivered)."""
        ...

    async def get(self, message_id: str) -> Message | None:
        """The message with this id, without its body."""
        ...

    async def due(
        self,
        now: float,
        limit: int,
        exclude_flows: Sequence[str] = (),
        ordered_flows: Sequence[str] = (),
        exclude_ids: Sequence[str] = (),
        again_ids: Sequence[str] = (),
        only_flows: Sequence[str] | None = None,
    ) -> list[Message]:
        """Claim up to `limit` due messages for delivery, oldest first; an ordered flow offers its head only.
        `exclude_ids` are handled already, `again_ids` (ends not written yet) are claimed first, and only
        `only_flows` (the flows configured now), when given, are claimed."""
        ...

    async def finish(
        self,
        message: Message,
        state: State,
        *,
        error: str | None = None,
        correlation_id: str | None = None,
        status: int | None = None,
        retry_at: float = 0.0,
        counted: bool = True,
    ) -> None:
        """Record the end of a delivery attempt (a round not `counted`, a pause, leaves `attempts`); raises
        (sqlite3.Error, SpoolError) when it cannot be written now: the caller writes it again later."""

    async def requeue(self, message: Message) -> None:
        """Give back a claimed message without counting an attempt."""

    async def requeue_all(self, messages: Sequence[Message]) -> int:
        """Give back claimed messages (a stop interrupted them) without counting attempts; how many."""
        ...

    async def dead(self, limit: int = 1000) -> list[Message]:
        """Dead messages, oldest first (without bodies)."""
        ...

    async def redrive(self, message_id: str) -> bool:
        """Queue a dead message again; False if there is none with that id."""
        ...

    async def prune(self, older_than: float, dead_older_than: float | None = None) -> int:
        """Delete delivered messages last touched before `older_than` (Unix time), dead ones before
        `dead_older_than` if given; how many."""
        ...

    async def queued_outside(self, flows: Sequence[str]) -> int:
        """Queued messages whose flow is not one of `flows`."""
        ...

    async def oldest_queued_at(self) -> float | None:
        """Creation time of the oldest message not yet delivered or dead."""
        ...

    async def next_due_at(self, after: float) -> float | None:
        """When the next queued message that is not due yet becomes due."""
        ...


def make_store(config: RelayConfig, clock: Clock) -> RelayStore:
    """The store `relay.store` names (ConfigError if its DSN variable is unset)."""
    if config.store == "postgresql":
        try:
            from senderd.relay.pgstore import PgStore  # psycopg only when PostgreSQL is configured
        except ImportError:
            raise ConfigError(
                'relay.store: "postgresql" needs psycopg: pip install "senderd[postgresql]" (the image has it)'
            ) from None

        return PgStore(
            config.dsn(),
            lease=config.lease,
            pool_size=config.pool_size,
            max_messages=config.max_spool_messages,
            max_bytes=config.max_spool_bytes,
            clock=clock,
            max_delay=config.redelivery_max,
        )
    return Spool(
        config.spool_dir,
        max_messages=config.max_spool_messages,
        max_bytes=config.max_spool_bytes,
        clock=clock,
        max_delay=config.redelivery_max,
    )
