"""The durable outbox: SQLite in WAL mode, with group commit.

`add` returns only after the message is on disk (a committed transaction with `synchronous=FULL`);
whatever waits when the writer is free (posts, and the ends of deliveries: `finish`) goes into one
transaction, so many share one fsync, with no timer: a lone post is committed at once. All SQLite work
runs in one dedicated thread, one statement batch at a time. States: `queued` → `in_flight` → `delivered`, or
back to `queued` (retry later), or `dead` (kept for re-drive). After a crash, `in_flight` rows are queued
again: delivery is at least once.

A full disk: adds fail (the API answers 503, nothing is acknowledged that is not committed), reads go on.
The connection holds its locks (`locking_mode=EXCLUSIVE`: one daemon per spool anyway), so the WAL index
lives in memory and the spool opens and is read even on a disk without a free byte. A claim whose
bookkeeping cannot be written is still handed out (in memory: `in_flight` exists only to be queued again
after a crash, and an unwritten claim leaves the row queued, which is the same); a `finish` that cannot be
written raises, and the dispatcher writes it again later. For the same reason a claim is committed without
an fsync of its own (`synchronous=NORMAL` for that one transaction): lost only with the machine's power, it
leaves the rows queued, and the next durable commit writes it to disk with its own.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import sqlite3
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from anyio import CapacityLimiter

from senderd.clock import Clock, SystemClock
from senderd.errors import ConfigError, IdempotencyConflict, SpoolError, SpoolFull
from senderd.logs import get_logger, redact_text
from senderd.metrics import SPOOL_STATES
from senderd.metrics import SpoolState as State
from senderd.relay.incoming import INLINE_BODY_BYTES, IncomingBody, clear_incoming
from senderd.relay.salvage import damaged, quarantine, salvage
from senderd.relay.spooldir import SpoolDir

log = get_logger("spool")
T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    flow TEXT NOT NULL,
    idempotency_key TEXT,
    content_type TEXT,
    body BLOB NOT NULL,
    body_sha256 TEXT,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    correlation_id TEXT,
    status INTEGER,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    next_attempt_at REAL NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS messages_idempotency ON messages (flow, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_due ON messages (state, next_attempt_at, seq);
CREATE INDEX IF NOT EXISTS messages_queued ON messages (seq) WHERE state='queued';
"""


@dataclass(frozen=True)
class Message:
    """A spooled message (the body is loaded only where needed)."""

    id: str
    flow: str
    state: State
    attempts: int
    created_at: float
    updated_at: float
    content_type: str | None = None
    body: bytes = b""
    """Loaded by claims up to `INLINE_BODY_BYTES`; a larger one is read by `Spool.body_of` when delivered."""
    size: int = 0
    """The body's length in bytes (0 where it was not asked for, as in status queries)."""
    last_error: str | None = None
    correlation_id: str | None = None
    status: int | None = None
    idempotency_key: str | None = None

    def summary(self) -> dict[str, Any]:
        """The JSON the relay API shows for this message."""
        return {
            "id": self.id,
            "flow": self.flow,
            "status": self.state,
            "attempts": self.attempts,
            "last_error": redact_text(self.last_error) if self.last_error else self.last_error,
            "correlation_id": self.correlation_id,
            "http_status": self.status,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


_COLUMNS = (
    "id, flow, state, attempts, created_at, updated_at, content_type, body, last_error, correlation_id, "
    "status, idempotency_key"
)


_CLAIMED_BODY = f"CASE WHEN LENGTH(body) <= {INLINE_BODY_BYTES} THEN body END"
"""A claim brings small bodies with it; large ones are read one at a time as they are delivered."""
_SELECT = f"SELECT {_COLUMNS.replace('body', _CLAIMED_BODY)}, LENGTH(body) FROM messages"  # noqa: S608 - constants
_SELECT_NO_BODY = f"SELECT {_COLUMNS.replace('body', 'NULL')}, 0 FROM messages"  # noqa: S608 - as above
_INSERT = (
    "INSERT INTO messages (id, flow, idempotency_key, content_type, body, body_sha256, state, created_at, "
    "updated_at) VALUES (?, ?, ?, ?, ?, ?, 'queued', ?, ?)"
)
_INSERT_STAGED = _INSERT.replace("?, ?, 'queued'", "zeroblob(?), ?, 'queued'")
"""A staged body's row is inserted with a zero-filled blob of its size, which `_copy_into` then fills."""
_OLDEST_WAITING = (
    "SELECT MIN(created_at) FROM (SELECT created_at FROM messages WHERE seq=(SELECT MIN(seq) FROM messages "
    "INDEXED BY messages_queued WHERE state='queued') UNION ALL SELECT created_at FROM messages "
    "INDEXED BY messages_due WHERE state='in_flight')"
)
_END = (
    "UPDATE messages SET state=?, attempts=attempts+?, last_error=?, correlation_id=?, status=?, updated_at=?, "
    "next_attempt_at=? WHERE id=?"
)
_END_DELIVERED = _END.replace(" WHERE", ", body=x'' WHERE")
"""A delivered message's body is emptied in the same statement: it is never sent again."""
COPY_BYTES = 1 << 20
"""A staged body is copied into the database in pieces of this size."""


def _message(row: Sequence[Any]) -> Message:
    return message_from_row(row, row[12])


def message_from_row(row: Sequence[Any], size: int) -> Message:
    """A `Message` from a row of `_COLUMNS` (the PostgreSQL store's too), its body `size` bytes long."""
    return Message(
        id=row[0],
        flow=row[1],
        state=row[2],
        attempts=row[3],
        created_at=row[4],
        updated_at=row[5],
        content_type=row[6],
        body=bytes(row[7]) if row[7] is not None else b"",
        last_error=row[8],
        correlation_id=row[9],
        status=row[10],
        idempotency_key=row[11],
        size=size,
    )


@dataclass
class _Pending:
    flow: str
    body: bytes | IncomingBody
    content_type: str | None
    idempotency_key: str | None
    done: asyncio.Event
    """asyncio's own (as the aiohttp handler that waits on it): cheaper than anyio's, per post."""
    result: tuple[str, bool] | None = None
    error: BaseException | None = None


@dataclass
class _Finish:
    """The end of a delivery, waiting for the writer's next transaction."""

    message: Message
    state: State
    error: str | None
    correlation_id: str | None
    status: int | None
    retry_at: float
    counted: bool
    done: asyncio.Event
    failure: BaseException | None = None
    alone: bool = False
    """The writer stopped before writing it: the caller writes it in a transaction of its own."""


class Spool:
    """The outbox at `directory/spool.db`; open with `Spool.open` in an async context."""

    def __init__(
        self,
        directory: Path,
        *,
        max_messages: int = 100_000,
        max_bytes: int = 1 << 30,
        clock: Clock | None = None,
        max_delay: float | None = None,
    ) -> None:
        """`max_delay` bounds, at open, how far ahead a planned redelivery may lie (plans are "not before"
        times in the last run's frame: a clock stepped since must not hold a message back longer)."""
        self.path = directory / "spool.db"
        self.directory = SpoolDir(directory)
        self.clock = clock or SystemClock()
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.max_delay = max_delay
        self._db: sqlite3.Connection | None = None
        self._thread = CapacityLimiter(1)  # one thread owns the connection's work at a time
        self._pending: list[_Pending] = []
        self._finishes: list[_Finish] = []
        self._writing = False
        """Whether `run_writer` runs: a `finish` waits for its next transaction (else it writes its own)."""
        self._closed = False
        self._wake = anyio.Event()
        self.counts: dict[State, int] = dict.fromkeys(SPOOL_STATES, 0)
        self.bytes = 0
        self.commits = 0
        self.on_change: Callable[[], None] | None = None
        self._requeue_pending = False
        """The `in_flight` rows of the last run could not be queued again at open (a full disk): retried
        before each claim, and claimed as they are meanwhile."""
        self._claims_unwritten = False
        self._flows: set[str] = set()
        """Every flow that may have a message waiting (queued, in flight or dead): those of the rows found at
        open and of every post since; `queued_outside` needs no query when they are all configured."""

    # --- lifecycle -------------------------------------------------------------------------------------

    async def open(self) -> None:
        """Lock the directory, create or open the database, requeue what was in flight at a crash, load the
        counters. Raises ConfigError (the directory, the lock, the file)."""
        self.directory.acquire()
        try:
            left = clear_incoming(self.directory.directory)
            if left:
                log.info("spool_staging_cleared", files=left)  # bodies of posts a crash cut off: never acknowledged
            self.directory.create_private(self.path)
            await self._call(self._open_sync)
        except BaseException:
            self.directory.release()
            raise

    def _open_sync(self, *, may_salvage: bool = True) -> None:
        db: sqlite3.Connection | None = None
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA locking_mode=EXCLUSIVE")  # WAL index in memory: no -shm to grow on a full disk
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"journal mode is {mode}, not wal")
            db.execute("PRAGMA synchronous=FULL")  # a commit is on disk when it returns
            if db.execute("SELECT 1 FROM sqlite_master WHERE name='messages_queued'").fetchone() is None:
                db.executescript(_SCHEMA)
            if "body_sha256" not in {row[1] for row in db.execute("PRAGMA table_info(messages)")}:
                db.execute("ALTER TABLE messages ADD COLUMN body_sha256 TEXT")  # spools of older versions
            try:
                if self.max_delay is not None:
                    bound = self.clock.time() + self.max_delay
                    db.execute(
                        "UPDATE messages SET next_attempt_at=? WHERE state='queued' AND next_attempt_at>?",
                        (bound, bound),
                    )
                db.execute("UPDATE messages SET state='queued' WHERE state='in_flight'")
            except sqlite3.OperationalError as exc:  # a full disk: start anyway, queue them again later
                log.error("spool_requeue_deferred", error=str(exc), path=str(self.path))
                self._requeue_pending = True
            # The counts come from the state index; bodies are read only for what waits (delivered ones
            # carry none), so that the cost of a start does not grow with the history kept.
            rows = db.execute("SELECT state, COUNT(*) FROM messages INDEXED BY messages_due GROUP BY state").fetchall()
            waiting = db.execute(
                "SELECT flow, SUM(LENGTH(body)) FROM messages WHERE state IN ('queued', 'in_flight', 'dead') "
                "GROUP BY flow"
            ).fetchall()
        except sqlite3.Error as exc:
            if db is not None:
                db.close()
            if may_salvage and damaged(exc):  # one damaged page must not stop the relay: start afresh
                self._start_afresh(quarantine(self.path, str(exc)))
                return
            raise ConfigError(
                f"relay.spool_dir: cannot use {self.path} ({exc}): check the disk, or move the damaged file aside"
            ) from None
        for state, count in rows:
            self.counts[state] = count
        self.bytes = sum(int(size) for _, size in waiting)
        self._flows = {flow for flow, _ in waiting}
        self._db = db

    def _start_afresh(self, damaged_copy: Path) -> None:
        """A fresh spool in place of the quarantined one, with what could be read from it."""
        self.directory.create_private(self.path)
        self._open_sync(may_salvage=False)
        salvage(damaged_copy, self.db)
        db, self._db = self.db, None
        db.close()
        self.counts = dict.fromkeys(SPOOL_STATES, 0)
        self.bytes = 0
        self._open_sync(may_salvage=False)

    async def close(self) -> None:
        """Close the database (pending adds must have finished)."""
        if self._db is not None:
            db, self._db = self._db, None
            await self._call(db.close)
        self.directory.release()

    async def _call(self, function: Callable[[], T]) -> T:
        return await anyio.to_thread.run_sync(function, limiter=self._thread)

    @property
    def is_open(self) -> bool:
        """Whether the database is open (between `open` and `close`)."""
        return self._db is not None

    @property
    def where(self) -> str:
        """The database file."""
        return str(self.path)

    @property
    def problem(self) -> None:
        """A local file has no outage to report (a full or failing disk answers 503 per message)."""
        return None

    @property
    def staging_dir(self) -> Path:
        """The spool directory: large posts are staged in its `incoming/`."""
        return self.directory.directory

    @property
    def db(self) -> sqlite3.Connection:
        """The open connection."""
        if self._db is None:
            raise RuntimeError("spool is not open")
        return self._db

    # --- adding, with group commit ---------------------------------------------------------------------

    async def add(
        self, flow: str, body: bytes | IncomingBody, content_type: str | None, idempotency_key: str | None = None
    ) -> tuple[str, bool]:
        """Store a message durably; returns (id, created). A known idempotency key returns the first id.

        A staged body (`IncomingBody`) is copied into the database in pieces; its file stays the caller's."""
        if self._closed:
            raise SpoolError("spool closed: senderd is stopping")
        pending = _Pending(flow, body, content_type, idempotency_key, asyncio.Event())
        self._pending.append(pending)
        self._wake.set()
        await pending.done.wait()
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None
        return pending.result

    async def run_writer(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Commit pending adds in batches until cancelled: everything waiting shares one transaction."""
        self._writing = True
        task_status.started()
        try:
            while True:
                await self._wake.wait()
                self._wake = anyio.Event()
                batch, self._pending = self._pending, []
                ends, self._finishes = self._finishes, []
                if batch or ends:
                    await self._commit(batch, ends)
        finally:  # stopping: whoever still waits gets an answer (503), nobody waits forever
            self._closed = True
            self._writing = False
            batch, self._pending = self._pending, []
            for pending in batch:
                if not pending.done.is_set():
                    pending.error = SpoolError("spool closed: senderd is stopping")
                    pending.done.set()
            ends, self._finishes = self._finishes, []
            for end in ends:  # the dispatcher still records them as it puts the rest back
                end.alone = True
                end.done.set()

    async def _commit(self, batch: list[_Pending], ends: list[_Finish]) -> None:
        finish_failure: BaseException | None = None
        try:
            written, finish_failure = await self._call(functools.partial(self._write_sync, batch, ends))
        except Exception as exc:  # a bug: this batch is refused (503), the writer and the daemon go on
            log.exception("spool_write_crashed", messages=len(batch), ends=len(ends))
            written = [SpoolError("spool could not store the message") for _ in batch]
            finish_failure = exc
        except BaseException:  # cancelled waiting for the thread: nothing of it was written
            for pending in batch:
                pending.error = SpoolError("spool closed: senderd is stopping")
                pending.done.set()
            for end in ends:  # the dispatcher records them itself, shielded, as it puts the rest back
                end.alone = True
                end.done.set()
            raise
        if isinstance(written, sqlite3.Error):  # a full disk, an I/O error: refuse this batch, keep running
            log.error("spool_write_failed", error=str(written), messages=len(batch))
            written = [SpoolError(f"spool unavailable ({written})") for _ in batch]
        results: list[tuple[str, bool] | BaseException] = written
        for pending, result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                pending.error = result
            else:
                pending.result = result
            pending.done.set()
        for end in ends:
            end.failure = finish_failure
            end.done.set()
        if self.on_change is not None:
            self.on_change()

    def _write_sync(
        self, batch: list[_Pending], ends: list[_Finish]
    ) -> tuple[list[tuple[str, bool] | BaseException] | sqlite3.Error, sqlite3.Error | None]:
        """One transaction for the posts and the ends that wait: the posts' results (or the error that
        refused them all) and the error that refused the ends, if any."""
        if batch and ends:
            try:
                return self._transaction(batch, ends), None
            except sqlite3.Error:  # a full disk may refuse the posts yet take the ends (which free bytes)
                pass
        finish_failure: sqlite3.Error | None = None
        if ends:
            try:
                self._transaction([], ends)
            except sqlite3.Error as exc:
                finish_failure = exc
        if not batch:
            return [], finish_failure
        try:
            return self._transaction(batch, []), finish_failure
        except sqlite3.Error as exc:
            return exc, finish_failure

    def _transaction(self, batch: list[_Pending], ends: list[_Finish]) -> list[tuple[str, bool] | BaseException]:
        """Write `ends`, then insert `batch`, in one committed transaction; the counters move after it."""
        db = self.db
        now = self.clock.time()
        results: list[tuple[str, bool] | BaseException] = []
        added_count = added_bytes = 0
        moves: list[tuple[State, State, int]] = []
        db.execute("BEGIN IMMEDIATE")
        try:
            for end in ends:
                move = _write_end(db, end, now)
                if move is not None:
                    moves.append(move)
            freed = sum(size for _, _, size in moves)
            left = sum(1 for _, state, _ in moves if state == "delivered")
            for item in batch:
                staged, inline = (item.body, b"") if isinstance(item.body, IncomingBody) else (None, item.body)
                size = staged.size if staged is not None else len(inline)
                digest = staged.sha256 if staged is not None else hashlib.sha256(inline).hexdigest()
                if item.idempotency_key is not None:
                    row = db.execute(
                        "SELECT id, body_sha256, CASE WHEN body_sha256 IS NULL THEN body END FROM messages "
                        "WHERE flow=? AND idempotency_key=?",
                        (item.flow, item.idempotency_key),
                    ).fetchone()
                    if row is not None:
                        known = row[1] or hashlib.sha256(bytes(row[2] or b"")).hexdigest()
                        if known != digest:
                            results.append(
                                IdempotencyConflict(
                                    f"Idempotency-Key {item.idempotency_key!r} was used for a different body "
                                    f"(message {row[0]}): a new message needs a new key",
                                    message_id=row[0],
                                )
                            )
                        else:
                            results.append((row[0], False))
                        continue
                live = self.counts["queued"] + self.counts["in_flight"] + self.counts["dead"] + added_count - left
                if live >= self.max_messages or self.bytes - freed + added_bytes + size > self.max_bytes:
                    results.append(SpoolFull("spool full"))
                    continue
                message_id = uuid.uuid4().hex
                row_id = db.execute(
                    _INSERT_STAGED if staged is not None else _INSERT,
                    (
                        message_id,
                        item.flow,
                        item.idempotency_key,
                        item.content_type,
                        size if staged is not None else inline,
                        digest,
                        now,
                        now,
                    ),
                ).lastrowid
                if staged is not None and size:
                    _copy_into(db, staged, row_id)
                results.append((message_id, True))
                self._flows.add(item.flow)
                added_count += 1
                added_bytes += size
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # SQLite may have rolled back already (e.g. on a full disk)
                db.execute("ROLLBACK")
            raise
        self.commits += 1
        for old, new, size in moves:
            self.counts[old] -= 1
            self.counts[new] += 1
            self.bytes -= size
        self.counts["queued"] += added_count
        self.bytes += added_bytes
        return results

    # --- reading and moving ----------------------------------------------------------------------------

    async def body_of(self, message: Message) -> bytes:
        """The body of a claimed message: as claimed if it came with it, else read from the database now.

        Raises SpoolError if the message is gone (pruned or replaced by a salvage meanwhile)."""
        if len(message.body) == message.size:
            return message.body
        row = await self._call(
            lambda: self.db.execute("SELECT body FROM messages WHERE id=?", (message.id,)).fetchone()
        )
        if row is None:
            raise SpoolError(f"message {message.id} is no longer in the spool")
        return bytes(row[0])

    async def get(self, message_id: str) -> Message | None:
        """The message with this id, without its body."""
        row = await self._call(lambda: self.db.execute(_SELECT_NO_BODY + " WHERE id=?", (message_id,)).fetchone())
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
        """Up to `limit` queued messages due by `now`, oldest first, marked in_flight (in memory only, when
        the disk is full: see the module's note). `exclude_ids` are being handled already; `again_ids` (whose
        last end could not be written) are claimed first, whatever their state says.

        For a flow in `ordered_flows`, only its oldest queued message is eligible (and only if due), so
        a message waiting for a retry holds back the ones behind it.
        """

        def claim() -> list[Message]:
            db = self.db
            if self._requeue_pending:
                self._requeue_stale()
            blocked = tuple(exclude_flows)
            ordered = tuple(f for f in ordered_flows if f not in blocked)
            sql = _SELECT + " INDEXED BY messages_queued WHERE state='queued' AND next_attempt_at<=?"
            params: list[Any] = [now]
            if blocked:  # left out in SQL, so that they cannot fill the window and starve other flows
                sql += f" AND flow NOT IN ({','.join('?' * len(blocked))})"
                params += blocked
            if ordered:  # an ordered flow offers only its head (the oldest queued or in flight)
                marks = ",".join("?" * len(ordered))
                sql += (
                    f" AND (flow NOT IN ({marks}) OR seq IN (SELECT MIN(seq) FROM messages WHERE "  # noqa: S608
                    f"state IN ('queued', 'in_flight') AND flow IN ({marks}) GROUP BY flow))"
                )  # only '?' marks
                params += ordered + ordered
            if only_flows is not None:  # messages of flows not configured now stay queued
                sql += f" AND flow IN ({','.join('?' * len(only_flows))})"
                params += tuple(only_flows)
            skipped = tuple(exclude_ids)
            if skipped:
                sql += f" AND id NOT IN ({','.join('?' * len(skipped))})"
                params += skipped
            sql += " ORDER BY seq LIMIT ?"
            params.append(limit)
            again = tuple(again_ids)[:limit]
            chosen = [
                _message(row)
                for row in db.execute(
                    _SELECT + f" WHERE id IN ({','.join('?' * len(again))}) AND state IN ('queued', 'in_flight')",
                    again,
                )
            ] if again else []  # fmt: skip
            params[-1] = limit - len(chosen)
            chosen += [_message(row) for row in db.execute(sql, params).fetchall()]
            if self._requeue_pending and len(chosen) < limit:  # last run's, not yet queued again
                marks = ",".join("?" * len(skipped))
                stale = _SELECT + " WHERE state='in_flight'" + (f" AND id NOT IN ({marks})" if skipped else "")
                chosen += [_message(r) for r in db.execute(stale + " ORDER BY seq LIMIT ?", (*skipped, limit))]
            queued = [m for m in chosen if m.state == "queued"]
            if not queued:
                return chosen
            db.execute("PRAGMA synchronous=NORMAL")  # no fsync of its own: see the module's note
            try:
                db.execute("BEGIN IMMEDIATE")
                db.executemany(
                    "UPDATE messages SET state='in_flight', updated_at=? WHERE id=?", [(now, m.id) for m in queued]
                )
                db.execute("COMMIT")
            except sqlite3.Error as exc:  # a full disk: hand them out all the same (the rows stay queued)
                if db.in_transaction:
                    db.execute("ROLLBACK")
                if not self._claims_unwritten:
                    log.error("spool_claims_unwritten", error=str(exc))
                self._claims_unwritten = True
                return chosen
            finally:
                db.execute("PRAGMA synchronous=FULL")  # every other commit is on disk when it returns
            self._claims_unwritten = False
            self.counts["queued"] -= len(queued)
            self.counts["in_flight"] += len(queued)
            return chosen

        return await self._call(claim)

    def _requeue_stale(self) -> None:
        try:
            count = self.db.execute("UPDATE messages SET state='queued' WHERE state='in_flight'").rowcount
        except sqlite3.OperationalError:
            return
        self._requeue_pending = False
        self.counts["in_flight"] -= count
        self.counts["queued"] += count
        log.info("spool_requeued", messages=count)

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
        """Record the end of a delivery attempt: delivered, back to queued (at `retry_at`), or dead; a round
        that is not `counted` (a pause) leaves `attempts` as it was.

        Raises sqlite3.Error when it cannot be written (a full disk): the caller tries again later. The
        error is stored redacted as the logs are (it may quote the runtime's answer)."""
        stored_error = redact_text(error) if error else error
        end = _Finish(message, state, stored_error, correlation_id, status, retry_at, counted, asyncio.Event())
        if self._writing:  # group-committed with whatever else waits for the writer
            self._finishes.append(end)
            self._wake.set()
            await end.done.wait()
            if end.failure is not None:
                raise end.failure
            if not end.alone:
                return
        await self._call(functools.partial(self._transaction, [], [end]))  # no writer (now): its own transaction
        if self.on_change is not None:
            self.on_change()

    async def requeue(self, message: Message) -> None:
        """Put an in-flight message back (a stop interrupted it), without counting an attempt."""

        def update() -> None:
            try:
                cursor = self.db.execute(
                    "UPDATE messages SET state='queued', updated_at=? WHERE id=? AND state='in_flight'",
                    (self.clock.time(), message.id),
                )
            except sqlite3.Error as exc:  # a full disk: it is queued again at the next start
                log.error("spool_requeue_failed", id=message.id, error=str(exc))
                return
            if cursor.rowcount:
                self.counts["in_flight"] -= 1
                self.counts["queued"] += 1

        await self._call(update)

    async def requeue_all(self, messages: Sequence[Message]) -> int:
        """Put in-flight messages back (a stop interrupted them) without counting an attempt; returns how
        many rows went back (a full disk: none now, all at the next start)."""

        def update() -> int:
            try:
                cursor = self.db.executemany(
                    "UPDATE messages SET state='queued', updated_at=? WHERE id=? AND state='in_flight'",
                    [(self.clock.time(), m.id) for m in messages],
                )
            except sqlite3.Error as exc:
                log.error("spool_requeue_failed", messages=len(messages), error=str(exc))
                return 0
            self.counts["in_flight"] -= cursor.rowcount
            self.counts["queued"] += cursor.rowcount
            return cursor.rowcount

        return await self._call(update) if messages and self._db is not None else 0

    async def dead(self, limit: int = 1000) -> list[Message]:
        """Dead messages, oldest first (without bodies)."""
        rows = await self._call(
            lambda: self.db.execute(_SELECT_NO_BODY + " WHERE state='dead' ORDER BY seq LIMIT ?", (limit,)).fetchall()
        )
        return [_message(row) for row in rows]

    async def redrive(self, message_id: str) -> bool:
        """Queue a dead message again; False if there is no dead message with that id."""

        def update() -> bool:
            cursor = self.db.execute(
                "UPDATE messages SET state='queued', next_attempt_at=0, updated_at=? WHERE id=? AND state='dead'",
                (self.clock.time(), message_id),
            )
            if cursor.rowcount:
                self.counts["dead"] -= 1
                self.counts["queued"] += 1
            return cursor.rowcount > 0

        changed = await self._call(update)
        if changed and self.on_change is not None:
            self.on_change()
        return changed

    async def prune(self, older_than: float, dead_older_than: float | None = None) -> int:
        """Delete delivered messages last touched before `older_than` (Unix time), and dead ones before
        `dead_older_than` if given; returns how many."""

        def delete() -> int:
            db = self.db
            cursor = db.execute("DELETE FROM messages WHERE state='delivered' AND updated_at<?", (older_than,))
            self.counts["delivered"] -= cursor.rowcount
            removed = cursor.rowcount
            if dead_older_than is not None:
                size = db.execute(
                    "SELECT COALESCE(SUM(LENGTH(body)), 0) FROM messages WHERE state='dead' AND updated_at<?",
                    (dead_older_than,),
                ).fetchone()[0]
                cursor = db.execute("DELETE FROM messages WHERE state='dead' AND updated_at<?", (dead_older_than,))
                self.counts["dead"] -= cursor.rowcount
                self.bytes -= int(size)
                removed += cursor.rowcount
            return removed

        return await self._call(delete)

    async def queued_outside(self, flows: Sequence[str]) -> int:
        """Queued messages whose flow is not one of `flows`."""
        if self._flows.issubset(flows):  # no message of another flow was ever here (the common case)
            return 0
        marks = ",".join("?" * len(flows))
        outside = f" AND flow NOT IN ({marks})" if flows else ""
        sql = "SELECT COUNT(*) FROM messages WHERE state='queued'" + outside  # noqa: S608 - only '?' marks
        return int(await self._call(lambda: self.db.execute(sql, tuple(flows)).fetchone()[0]))

    async def oldest_queued_at(self) -> float | None:
        """Creation time of the oldest message not yet delivered or dead: the first one queued (by order of
        acceptance) or one in flight, found through the indexes without a scan of what waits."""
        row = await self._call(lambda: self.db.execute(_OLDEST_WAITING).fetchone())
        return float(row[0]) if row and row[0] is not None else None

    async def next_due_at(self, after: float) -> float | None:
        """When the next queued message that is not yet due (due after `after`) becomes due, if any."""
        row = await self._call(
            lambda: self.db.execute(
                "SELECT MIN(next_attempt_at) FROM messages WHERE state='queued' AND next_attempt_at>?", (after,)
            ).fetchone()
        )
        return float(row[0]) if row and row[0] is not None else None


def _write_end(db: sqlite3.Connection, end: _Finish, now: float) -> tuple[State, State, int] | None:
    """Record the end of a delivery in the open transaction; the state it leaves and enters, and the body
    bytes freed (None if the row is gone or no longer claimable, as after a re-drive race)."""
    message = end.message
    row = db.execute("SELECT state FROM messages WHERE id=?", (message.id,)).fetchone()
    if row is None or row[0] not in ("in_flight", "queued"):  # a claim unwritten leaves it queued
        return None
    delivered = end.state == "delivered"
    db.execute(
        _END_DELIVERED if delivered else _END,
        (end.state, int(end.counted), end.error, end.correlation_id, end.status, now, end.retry_at, message.id),
    )
    return row[0], end.state, message.size if delivered else 0


def _copy_into(db: sqlite3.Connection, staged: IncomingBody, row_id: int | None) -> None:
    """Copy a staged body into the zero-filled blob of row `row_id`, a piece at a time (in the insert's
    transaction: the message is committed with its whole body or not at all)."""
    assert row_id is not None
    with db.blobopen("messages", "body", row_id) as blob, staged.path.open("rb") as source:
        while piece := source.read(COPY_BYTES):
            blob.write(piece)
