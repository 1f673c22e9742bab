"""The relay's store on PostgreSQL, shared by every replica of a gateway.

- **Acknowledged means committed**: an `add` returns once its transaction committed with
  `synchronous_commit` at least `on` (raised from `off` per session), so a 202 follows a commit that is
  on disk (and on the synchronous standbys the server names). Group commit: the posts that arrive while
  one batch commits go in the next, one INSERT for all.
- **Idempotency keys** are unique per flow across all replicas: a unique index, `ON CONFLICT DO NOTHING`;
  the body's SHA-256 is kept, so a key reused with a different body is refused (`IdempotencyConflict`).
- **Claims are leases**: `due` takes messages with `FOR UPDATE SKIP LOCKED` (replicas never wait for each
  other, never take the same row), marks them `in_flight` with this replica's owner id and a lease until
  `now() + lease` in the database's clock (replicas' clocks may differ). A replica renews its leases every
  third of `lease`; one that dies (kill -9, a node lost) stops renewing and its messages are claimed by the
  others once the lease has run out: at least once, duplicates only for messages in flight at the death.
- **Ordered flows**: only a flow's head (the oldest queued or in-flight message) can be claimed, so while
  one replica holds it no replica delivers the message behind it.
- **Database down** (or its disk full): every operation raises `StoreUnavailable` (the API answers 503,
  the dispatcher waits and writes the ends of deliveries again later); the pool reconnects on its own and
  `problem` (shown by `/readyz`) says why meanwhile.
- **Redelivery plans** are "not before" times from the dispatcher's monotonic plan clock; at open, plans
  further ahead than `max_delay` are pulled in (a replica's clock stepped since must not hold them back).
- **Schema**: versioned in `senderd_schema`; migrations run at start under an advisory lock (replicas
  starting together migrate once); a database whose schema is newer than this senderd is refused.

The DSN is a secret: it is never logged, never in an error, never in a repr (`where` names host, port and
database only).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import psycopg
from anyio.abc import TaskStatus
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool

from senderd.clock import Clock, SystemClock
from senderd.errors import ConfigError, IdempotencyConflict, SpoolError, SpoolFull, StoreUnavailable
from senderd.logs import get_logger, redact_text
from senderd.metrics import SPOOL_STATES
from senderd.metrics import SpoolState as State
from senderd.relay.incoming import IncomingBody
from senderd.relay.spool import Message, message_from_row

log = get_logger("pgstore")

SCHEMA_VERSION = 1
"""The schema this senderd writes; migration N brings a database from version N-1 to N."""
MIGRATIONS: dict[int, str] = {
    1: """
CREATE TABLE senderd_messages (
    seq bigserial PRIMARY KEY,
    id text NOT NULL UNIQUE,
    flow text NOT NULL,
    idempotency_key text,
    content_type text,
    body bytea NOT NULL,
    body_sha256 text NOT NULL,
    state text NOT NULL CHECK (state IN ('queued', 'in_flight', 'delivered', 'dead')),
    attempts integer NOT NULL DEFAULT 0,
    last_error text,
    correlation_id text,
    status integer,
    created_at double precision NOT NULL,
    updated_at double precision NOT NULL,
    next_attempt_at double precision NOT NULL DEFAULT 0,
    lease_owner text,
    lease_until timestamptz
);
CREATE UNIQUE INDEX senderd_messages_idempotency ON senderd_messages (flow, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX senderd_messages_queued ON senderd_messages (seq) WHERE state = 'queued';
CREATE INDEX senderd_messages_leased ON senderd_messages (lease_until) WHERE state = 'in_flight';
CREATE INDEX senderd_messages_live ON senderd_messages (flow, seq) WHERE state IN ('queued', 'in_flight');
CREATE INDEX senderd_messages_delivered ON senderd_messages (updated_at) WHERE state = 'delivered';
CREATE INDEX senderd_messages_dead ON senderd_messages (seq) WHERE state = 'dead';
CREATE TABLE senderd_ticks (
    flow text NOT NULL,
    tick bigint NOT NULL,
    owner text NOT NULL,
    claimed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (flow, tick)
);
""",
}
_MIGRATION_LOCK = 0x73656E6464  # pg_advisory_xact_lock key: one replica migrates, the others wait
_COLUMNS = (
    "id, flow, state, attempts, created_at, updated_at, content_type, body, last_error, correlation_id, "
    "status, idempotency_key, seq"
)
_NO_BODY = _COLUMNS.replace("body", "NULL::bytea")
_UNAVAILABLE = (psycopg.OperationalError, psycopg.InternalError, TimeoutError)
"""What an unreachable, restarting or failing-over database raises (PoolTimeout is an OperationalError)."""
_CLAIM = f"""
WITH again AS (
    SELECT seq FROM senderd_messages
    WHERE id = ANY(%(again)s::text[])
      AND (state = 'queued' OR (state = 'in_flight' AND lease_owner = %(owner)s))
    FOR UPDATE SKIP LOCKED
), fresh AS (
    SELECT seq FROM senderd_messages
    WHERE ((state = 'queued' AND next_attempt_at <= %(now)s)
           OR (state = 'in_flight' AND lease_until < clock_timestamp()))
      AND NOT (flow = ANY(%(blocked)s::text[]))
      AND (%(only)s::text[] IS NULL OR flow = ANY(%(only)s::text[]))
      AND NOT (id = ANY(%(skipped)s::text[]))
      AND (NOT (flow = ANY(%(ordered)s::text[])) OR seq IN (
          SELECT min(seq) FROM senderd_messages
          WHERE state IN ('queued', 'in_flight') AND flow = ANY(%(ordered)s::text[]) GROUP BY flow))
    ORDER BY seq LIMIT greatest(0, %(limit)s - (SELECT count(*) FROM again))
    FOR UPDATE SKIP LOCKED
), picked AS (
    SELECT seq FROM again UNION SELECT seq FROM fresh
)
UPDATE senderd_messages AS m
SET state = 'in_flight', lease_owner = %(owner)s, updated_at = %(now)s,
    lease_until = clock_timestamp() + %(lease)s * interval '1 second'
FROM picked WHERE m.seq = picked.seq
RETURNING {", ".join("m." + c.strip() for c in _COLUMNS.split(","))}
"""  # noqa: S608 - constant column list, values are parameters


@dataclass
class _Pending:
    """A post waiting for its batch's commit."""

    flow: str
    body: bytes
    content_type: str | None
    idempotency_key: str | None
    digest: str
    done: bool = False
    result: tuple[str, bool] | None = None
    error: BaseException | None = None


_WAITING_COUNTS = " UNION ALL ".join(
    f"SELECT '{state}', COUNT(*), COALESCE(SUM(octet_length(body)), 0) FROM senderd_messages "  # noqa: S608
    f"WHERE state = '{state}'"  # constant states
    for state in ("queued", "in_flight", "dead")
)  # one SELECT per state, so that each reads its partial index (an IN list would scan the whole table)


def _message(row: Sequence[Any]) -> Message:
    return message_from_row(row, len(row[7]) if row[7] is not None else 0)  # claims bring every body


def describe_dsn(dsn: str) -> str:
    """`postgresql://host:port/dbname` for the log: no user, no password, no options."""
    try:
        parts = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "postgresql://<unparsable DSN>"
    host = str(parts.get("host") or parts.get("hostaddr") or "localhost")
    return f"postgresql://{host}:{parts.get('port') or 5432}/{parts.get('dbname') or ''}"


class PgStore:
    """The relay's messages in PostgreSQL; `open` it in an async context, run `run_writer` beside it."""

    def __init__(
        self,
        dsn: str,
        *,
        lease: float = 30.0,
        pool_size: int = 10,
        max_messages: int = 100_000,
        max_bytes: int = 1 << 30,
        clock: Clock | None = None,
        max_delay: float | None = None,
        timeout: float = 10.0,
        acquire_timeout: float = 2.0,
        owner: str | None = None,
    ) -> None:
        self._dsn = dsn
        self._secrets = [dsn, *(str(v) for k, v in _conninfo(dsn).items() if k == "password" and v)]
        self.lease = lease
        self.pool_size = pool_size
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.clock = clock or SystemClock()
        self.max_delay = max_delay
        self.timeout = timeout
        self.acquire_timeout = min(acquire_timeout, timeout)
        """How long an operation waits for a connection: with the database down, a post hears 503 soon."""
        self.owner = owner or uuid.uuid4().hex
        """This replica's name on its leases and tick claims (new at every start)."""
        self.counts: dict[State, int] = dict.fromkeys(SPOOL_STATES, 0)
        self.bytes = 0
        self.on_change: Callable[[], None] | None = None
        self._pool: AsyncConnectionPool | None = None
        self._problem: str | None = None
        self._closed = False
        self._pending: list[_Pending] = []
        self._commit_lock = anyio.Lock()
        self.commits = 0
        """Transactions that stored posts (fewer than the posts: group commit)."""

    def __repr__(self) -> str:
        return f"PgStore({self.where!r}, owner={self.owner!r})"

    @property
    def where(self) -> str:
        """Host, port and database (no credentials)."""
        return describe_dsn(self._dsn)

    @property
    def problem(self) -> str | None:
        """Why the database cannot be used now (None when the last operation succeeded)."""
        return self._problem

    @property
    def is_open(self) -> bool:
        """Whether the pool to the database is open (between `open` and `close`)."""
        return self._pool is not None

    @property
    def staging_dir(self) -> None:
        """None: a replica may have no writable disk, so posts come in memory (bounded by
        `relay.max_buffered_bytes`, each up to `relay.max_message_bytes`)."""
        return None

    # --- lifecycle -------------------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, create or migrate the schema, load the counters; ConfigError if that fails."""
        pool = AsyncConnectionPool(
            self._dsn,
            min_size=1,
            max_size=self.pool_size,
            open=False,
            timeout=self.timeout,
            kwargs={"autocommit": True, "application_name": "senderd"},
            configure=_configure,
            # No check per checkout (a round trip per operation, half the rate of posts): a connection the
            # database dropped fails its next operation once (503, or a delivery end written again later)
            # and the pool replaces it.
            reconnect_timeout=math.inf,  # the database comes back: never give up on it
            name="senderd-relay",
        )
        try:
            await pool.open(wait=True, timeout=self.timeout)
            self._pool = pool
            await self.migrate()
            await self.bound_plans()
            await self.refresh_counts()
        except (psycopg.Error, StoreUnavailable) as exc:
            await pool.close()
            self._pool = None
            raise ConfigError(f"relay.dsn_env: cannot use the database at {self.where}: {self._clean(exc)}") from None

    async def close(self) -> None:
        """Give back this replica's leases (others take them at once) and close the connections."""
        self._closed = True
        if self._pool is None:
            return
        with contextlib.suppress(StoreUnavailable):
            async with self._connection() as conn:
                await conn.execute(
                    "UPDATE senderd_messages SET state = 'queued', lease_owner = NULL, lease_until = NULL "
                    "WHERE state = 'in_flight' AND lease_owner = %s",
                    (self.owner,),
                )
        pool, self._pool = self._pool, None
        await pool.close()

    async def migrate(self) -> None:
        """Bring the schema to `SCHEMA_VERSION`; ConfigError if the database's schema is newer."""
        async with self._connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS senderd_schema "
                "(version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            cursor = await conn.execute("SELECT COALESCE(MAX(version), 0) FROM senderd_schema")
            row = await cursor.fetchone()
            version = int(row[0]) if row else 0
            if version > SCHEMA_VERSION:
                raise ConfigError(
                    f"relay: the database at {self.where} has senderd schema version {version}, newer than this "
                    f"senderd's ({SCHEMA_VERSION}): run the newer senderd, or point relay.dsn_env elsewhere"
                )
            for step in range(version + 1, SCHEMA_VERSION + 1):
                await conn.execute(MIGRATIONS[step])
                await conn.execute("INSERT INTO senderd_schema (version) VALUES (%s)", (step,))
                log.info("store_migrated", where=self.where, version=step)

    async def bound_plans(self) -> int:
        """Pull redeliveries planned further ahead than `max_delay` in to that bound; how many."""
        if self.max_delay is None:
            return 0
        bound = self.clock.time() + self.max_delay
        async with self._connection() as conn:
            cursor = await conn.execute(
                "UPDATE senderd_messages SET next_attempt_at = %s WHERE state = 'queued' AND next_attempt_at > %s",
                (bound, bound),
            )
            return cursor.rowcount

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A pooled connection; an unreachable database becomes StoreUnavailable (and `problem`)."""
        if self._pool is None:
            raise StoreUnavailable("relay store is not open")
        try:
            with anyio.fail_after(self.timeout):
                async with self._pool.connection(timeout=self.acquire_timeout) as conn:
                    yield conn
        except _UNAVAILABLE as exc:
            self._problem = f"database unreachable at {self.where}: {self._clean(exc)}"
            raise StoreUnavailable(f"relay store unavailable ({self._clean(exc)})") from None
        self._problem = None

    def _clean(self, exc: BaseException) -> str:
        """The error's first line, with anything from the DSN that could be secret removed."""
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text or type(exc).__name__

    async def run_writer(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Renew this replica's leases every third of `lease` and refresh the counters, until cancelled."""
        task_status.started()
        period = max(0.05, self.lease / 3)
        last_prune = -math.inf
        while True:
            await anyio.sleep(period)
            try:
                await self.renew_leases()
                await self.refresh_counts()
                if self.clock.monotonic() - last_prune >= 60:
                    last_prune = self.clock.monotonic()
                    async with self._connection() as conn:  # tick claims older than a day decide nothing
                        await conn.execute("DELETE FROM senderd_ticks WHERE claimed_at < now() - interval '1 day'")
            except StoreUnavailable as exc:
                log.warning("store_unavailable", where=self.where, error=str(exc))

    async def renew_leases(self) -> int:
        """Extend the leases this replica holds; how many."""
        async with self._connection() as conn:
            cursor = await conn.execute(
                "UPDATE senderd_messages SET lease_until = clock_timestamp() + %s * interval '1 second' "
                "WHERE state = 'in_flight' AND lease_owner = %s",
                (self.lease, self.owner),
            )
            return cursor.rowcount

    async def refresh_counts(self) -> None:
        """Messages and bytes per state, all replicas together: the waiting ones through their partial
        indexes (3.5 ms instead of 63 ms beside 300,000 delivered rows), the delivered ones only counted."""
        async with self._connection() as conn:
            cursor = await conn.execute(_WAITING_COUNTS)
            rows = await cursor.fetchall()
            cursor = await conn.execute("SELECT COUNT(*) FROM senderd_messages WHERE state = 'delivered'")
            delivered = await cursor.fetchone()
        counts: dict[State, int] = dict.fromkeys(SPOOL_STATES, 0)
        size = 0
        for state, count, state_bytes in rows:
            counts[state] = int(count)
            size += int(state_bytes)
        counts["delivered"] = int(delivered[0]) if delivered else 0
        self.counts, self.bytes = counts, size

    # --- adding ----------------------------------------------------------------------------------------

    async def add(
        self, flow: str, body: bytes | IncomingBody, content_type: str | None, idempotency_key: str | None = None
    ) -> tuple[str, bool]:
        """Commit a message; (id, created). The first id for a known (flow, idempotency key) with the same
        body; IdempotencyConflict for one with a different body.

        Group commit: posts that arrive while a batch commits wait for the lock, and the first to get it
        commits everything waiting in one transaction (one round trip and one WAL flush for all)."""
        if self._closed:
            raise StoreUnavailable("relay store closed: senderd is stopping")
        if isinstance(body, IncomingBody):  # not staged for this store (staging_dir is None), but allowed
            body = await anyio.Path(body.path).read_bytes()
        pending = _Pending(flow, body, content_type, idempotency_key, hashlib.sha256(body).hexdigest())
        self._pending.append(pending)
        async with self._commit_lock:
            if not pending.done:
                batch, self._pending = self._pending, []
                with anyio.CancelScope(shield=True):  # the others in the batch wait on this commit
                    await self._commit(batch)
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None
        return pending.result

    async def _commit(self, batch: list[_Pending]) -> None:
        """Insert `batch` in one transaction; each gets its result or its error."""
        try:
            async with self._connection() as conn, conn.transaction():
                added, added_bytes = await self._insert(conn, batch)
        except Exception as exc:  # the database down, or a bug: this batch is refused (503), the next tries again
            error = exc if isinstance(exc, SpoolError) else SpoolError("relay store could not store the message")
            if not isinstance(exc, SpoolError):
                log.exception("store_write_crashed", messages=len(batch))
            for item in batch:
                item.result, item.error = None, error
        else:
            self.commits += 1
            self.counts["queued"] += added
            self.bytes += added_bytes
        finally:
            for item in batch:
                item.done = True
        if self.on_change is not None:
            self.on_change()

    async def _insert(self, conn: psycopg.AsyncConnection[Any], batch: list[_Pending]) -> tuple[int, int]:
        """The batch's rows, in order; sets each item's result (or its SpoolFull / IdempotencyConflict)."""
        now = self.clock.time()
        live = self.counts["queued"] + self.counts["in_flight"] + self.counts["dead"]
        size = self.bytes
        fresh: list[_Pending] = []
        for item in batch:
            if live + len(fresh) >= self.max_messages or size + len(item.body) > self.max_bytes:
                item.error = SpoolFull("spool full")
                continue
            item.result = (uuid.uuid4().hex, True)
            size += len(item.body)
            fresh.append(item)
        if not fresh:
            return 0, 0
        columns: list[list[Any]] = [[], [], [], [], [], []]
        for item in fresh:
            assert item.result is not None
            for column, value in zip(
                columns,
                (item.result[0], item.flow, item.idempotency_key, item.content_type, item.body, item.digest),
                strict=True,
            ):
                column.append(value)
        cursor = await conn.execute(
            "INSERT INTO senderd_messages (id, flow, idempotency_key, content_type, body, body_sha256, state, "
            "created_at, updated_at) SELECT i, f, k, c, b, d, 'queued', %s, %s FROM unnest(%s::text[], %s::text[], "
            "%s::text[], %s::text[], %s::bytea[], %s::text[]) WITH ORDINALITY AS t(i, f, k, c, b, d, n) ORDER BY n "
            "ON CONFLICT (flow, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING RETURNING id",
            (now, now, *columns),
        )
        inserted = {str(row[0]) for row in await cursor.fetchall()}
        known = [item for item in fresh if item.result is not None and item.result[0] not in inserted]
        if known:  # the key names a message already (an earlier post, or one before it in this batch)
            cursor = await conn.execute(
                "SELECT m.flow, m.idempotency_key, m.id, m.body_sha256 FROM senderd_messages m JOIN "
                "unnest(%s::text[], %s::text[]) AS k(f, k) ON m.flow = k.f AND m.idempotency_key = k.k",
                ([item.flow for item in known], [item.idempotency_key for item in known]),
            )
            found = {(row[0], row[1]): (str(row[2]), row[3]) for row in await cursor.fetchall()}
            for item in known:
                first = found.get((item.flow, item.idempotency_key))
                if first is None:  # removed meanwhile (retention): the client's retry stores it afresh
                    item.result, item.error = None, StoreUnavailable("relay store: the message changed: retry")
                elif first[1] != item.digest:
                    item.result, item.error = (
                        None,
                        IdempotencyConflict(
                            f"Idempotency-Key {item.idempotency_key!r} was used for a different body (message "
                            f"{first[0]}): a new message needs a new key",
                            message_id=first[0],
                        ),
                    )
                else:
                    item.result = (first[0], False)
        return len(inserted), sum(len(item.body) for item in fresh if item.result and item.result[1])

    # --- reading and moving ----------------------------------------------------------------------------

    async def body_of(self, message: Message) -> bytes:
        """Claims bring every body."""
        return message.body

    async def get(self, message_id: str) -> Message | None:
        """The message with this id, without its body."""
        async with self._connection() as conn:
            cursor = await conn.execute(
                f"SELECT {_NO_BODY} FROM senderd_messages WHERE id = %s",  # noqa: S608 - constant columns
                (message_id,),
            )
            row = await cursor.fetchone()
        return _message(row) if row is not None else None

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
        """Claim up to `limit` due messages (and any whose lease ran out), oldest first, leased to us.

        `exclude_ids` are being handled here already; `again_ids` (whose last end could not be written,
        still leased to us) are claimed first; only flows in `only_flows` (when given) are claimed: the
        messages of a flow not configured now stay queued. An ordered flow offers only its head."""
        params = {
            "now": now,
            "blocked": list(exclude_flows),
            "ordered": [f for f in ordered_flows if f not in exclude_flows],
            "only": list(only_flows) if only_flows is not None else None,
            "skipped": list(exclude_ids),
            "again": list(again_ids)[:limit],
            "limit": limit,
            "owner": self.owner,
            "lease": self.lease,
        }
        async with self._connection() as conn:
            cursor = await conn.execute(_CLAIM, params)
            rows = sorted(await cursor.fetchall(), key=lambda row: int(row[12]))
        return [_message(row) for row in rows]

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
        """Record the end of a delivery attempt, if the lease is still ours; a round not `counted` (a pause)
        leaves `attempts` as it was. A delivered message's body is dropped. Raises StoreUnavailable while
        the database is down: the dispatcher writes it again later (meanwhile this replica's lease is
        renewed; if it runs out first, another replica may deliver the message again)."""
        stored_error = redact_text(error) if error else error
        async with self._connection() as conn:
            await conn.execute(
                "UPDATE senderd_messages SET state = %s, attempts = attempts + %s, last_error = %s, "
                "correlation_id = %s, status = %s, updated_at = %s, next_attempt_at = %s, "
                "lease_owner = NULL, lease_until = NULL, body = CASE WHEN %s THEN ''::bytea ELSE body END "
                "WHERE id = %s AND state = 'in_flight' AND lease_owner = %s",
                (
                    state,
                    int(counted),
                    stored_error,
                    correlation_id,
                    status,
                    self.clock.time(),
                    retry_at,
                    state == "delivered",
                    message.id,
                    self.owner,
                ),
            )
        if self.on_change is not None:
            self.on_change()

    async def requeue(self, message: Message) -> None:
        """Give a claimed message back now (a stop interrupted it), without counting an attempt."""
        with contextlib.suppress(StoreUnavailable):  # otherwise the lease runs out: the same, later
            async with self._connection() as conn:
                await conn.execute(
                    "UPDATE senderd_messages SET state = 'queued', lease_owner = NULL, lease_until = NULL, "
                    "updated_at = %s WHERE id = %s AND state = 'in_flight' AND lease_owner = %s",
                    (self.clock.time(), message.id, self.owner),
                )

    async def requeue_all(self, messages: Sequence[Message]) -> int:
        """Give claimed messages back now (a stop interrupted them), without counting an attempt; how many
        went back (none while the database is down: their leases run out instead)."""
        if not messages or self._pool is None:
            return 0
        try:
            async with self._connection() as conn:
                cursor = await conn.execute(
                    "UPDATE senderd_messages SET state = 'queued', lease_owner = NULL, lease_until = NULL, "
                    "updated_at = %s WHERE id = ANY(%s::text[]) AND state = 'in_flight' AND lease_owner = %s",
                    (self.clock.time(), [m.id for m in messages], self.owner),
                )
                return cursor.rowcount
        except StoreUnavailable as exc:
            log.error("spool_requeue_failed", messages=len(messages), error=str(exc))
            return 0

    async def dead(self, limit: int = 1000) -> list[Message]:
        """Dead messages, oldest first (without bodies)."""
        async with self._connection() as conn:
            cursor = await conn.execute(
                f"SELECT {_NO_BODY} FROM senderd_messages WHERE state = 'dead' ORDER BY seq LIMIT %s",  # noqa: S608
                (limit,),
            )
            rows = await cursor.fetchall()
        return [_message(row) for row in rows]

    async def redrive(self, message_id: str) -> bool:
        """Queue a dead message again; False if there is no dead message with that id."""
        async with self._connection() as conn:
            cursor = await conn.execute(
                "UPDATE senderd_messages SET state = 'queued', next_attempt_at = 0, updated_at = %s "
                "WHERE id = %s AND state = 'dead'",
                (self.clock.time(), message_id),
            )
            changed = cursor.rowcount > 0
        if changed and self.on_change is not None:
            self.on_change()
        return changed

    async def prune(self, older_than: float, dead_older_than: float | None = None) -> int:
        """Delete delivered messages last touched before `older_than` (Unix time), and dead ones before
        `dead_older_than` if given; returns how many (any replica may prune: the deletes are idempotent)."""
        async with self._connection() as conn:
            cursor = await conn.execute(
                "DELETE FROM senderd_messages WHERE state = 'delivered' AND updated_at < %s", (older_than,)
            )
            removed = cursor.rowcount
            if dead_older_than is not None:
                cursor = await conn.execute(
                    "DELETE FROM senderd_messages WHERE state = 'dead' AND updated_at < %s", (dead_older_than,)
                )
                removed += cursor.rowcount
        return removed

    async def queued_outside(self, flows: Sequence[str]) -> int:
        """Queued messages whose flow is not one of `flows` (any replica's)."""
        async with self._connection() as conn:
            cursor = await conn.execute(
                "SELECT COUNT(*) FROM senderd_messages WHERE state = 'queued' AND NOT (flow = ANY(%s::text[]))",
                (list(flows),),
            )
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    async def oldest_queued_at(self) -> float | None:
        """Creation time of the oldest message not yet delivered or dead (any replica's)."""
        async with self._connection() as conn:
            cursor = await conn.execute(
                "SELECT MIN(created_at) FROM senderd_messages WHERE state IN ('queued', 'in_flight')"
            )
            row = await cursor.fetchone()
        return float(row[0]) if row and row[0] is not None else None

    async def next_due_at(self, after: float) -> float | None:
        """When the next queued message that is not due yet becomes due."""
        async with self._connection() as conn:
            cursor = await conn.execute(
                "SELECT MIN(next_attempt_at) FROM senderd_messages WHERE state = 'queued' AND next_attempt_at > %s",
                (after,),
            )
            row = await cursor.fetchone()
        return float(row[0]) if row and row[0] is not None else None

    # --- scheduled flows across replicas ---------------------------------------------------------------

    async def claim_tick(self, flow: str, tick: int) -> bool:
        """Claim the tick `tick` of scheduled flow `flow` for this replica; False if another has it."""
        async with self._connection() as conn:
            cursor = await conn.execute(
                "INSERT INTO senderd_ticks (flow, tick, owner) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                (flow, tick, self.owner),
            )
            return cursor.rowcount > 0


def _conninfo(dsn: str) -> dict[str, Any]:
    try:
        return conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return {}


async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
    """Per new connection: commits wait for the disk (a server or role set to `off` is overridden)."""
    cursor = await conn.execute("SHOW synchronous_commit")
    row = await cursor.fetchone()
    if row is not None and row[0] == "off":
        await conn.execute("SET synchronous_commit TO on")
