"""A damaged spool file: moved aside (quarantined) with a clear line, a fresh spool started in its place,
and every message that can still be read from the damaged copy put back in the queue. Messages that were
delivered are not salvaged; queued, in-flight and dead ones are (queued again, dead ones stay dead)."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from pathlib import Path

from senderd.logs import get_logger

log = get_logger("spool")
_COLUMNS = "id, flow, idempotency_key, content_type, body, body_sha256, state, attempts, last_error, created_at"


def damaged(exc: sqlite3.Error) -> bool:
    """Whether `exc` says the file is damaged (not a database, a malformed page), not that the disk failed."""
    return getattr(exc, "sqlite_errorname", "") in ("SQLITE_CORRUPT", "SQLITE_NOTADB") or "malformed" in str(exc)


def quarantine(path: Path, error: str) -> Path:
    """Move `path` (and its -wal and -shm) aside as `path.damaged-<UTC time>`; returns the new path."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.damaged-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            path.with_name(path.name + suffix).rename(target.with_name(target.name + suffix))
    log.error(
        "spool_quarantined",
        path=str(path),
        moved_to=str(target),
        error=error,
        action="started a fresh spool and put back every message that could be read; keep the damaged file "
        "for inspection, delete it when done",
    )
    return target


def salvage(damaged_copy: Path, fresh: sqlite3.Connection) -> tuple[int, int]:
    """Copy the readable queued, in-flight and dead messages of `damaged_copy` into `fresh` (in-flight ones
    queued again); returns (salvaged, unreadable rows)."""
    saved = unreadable = 0
    try:
        old = sqlite3.connect(f"file:{damaged_copy}?mode=ro", uri=True)
    except sqlite3.Error:
        return 0, 0
    try:
        try:
            last = int(old.execute("SELECT MAX(seq) FROM messages").fetchone()[0] or 0)
        except sqlite3.Error:
            return 0, 0
        for seq in range(1, last + 1):
            try:
                row = old.execute(
                    f"SELECT {_COLUMNS} FROM messages WHERE seq=? AND state!='delivered'",  # noqa: S608 - constant
                    (seq,),
                ).fetchone()
            except sqlite3.Error:
                unreadable += 1
                continue
            if row is None:
                continue
            state = "dead" if row[6] == "dead" else "queued"
            with contextlib.suppress(sqlite3.Error):  # e.g. a duplicate id: skip it
                fresh.execute(
                    f"INSERT INTO messages ({_COLUMNS}, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                    (*row[:6], state, *row[7:], time.time()),
                )
                saved += 1
    finally:
        old.close()
    log.warning("spool_salvaged", messages=saved, unreadable_rows=unreadable, source=str(damaged_copy))
    return saved, unreadable
