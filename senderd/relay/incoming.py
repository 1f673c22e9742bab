"""A message body streamed to a private file in the spool directory as it arrives.

A large or chunked post is never held in memory whole: its bytes go to `incoming/` in pieces of
`PIECE_BYTES`, hashed on the way, and the spool's writer copies the file into its database in pieces too.
So a relay taking 64 posts of 10 MiB at once holds a few MiB of bodies, not 640. The file is only a
staging copy (the commit to the spool is what makes a message durable): it is removed once the spool has
it or the request failed, and leftovers of a crash are removed when the spool opens.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import anyio
from aiohttp import StreamReader

INCOMING_DIR = "incoming"
PIECE_BYTES = 256 * 1024
"""Body bytes gathered in memory before each write to the staging file."""
INLINE_BODY_BYTES = 256 * 1024
"""A post that declares at most this many bytes is read into memory (the fast path for small messages);
larger ones, and those of unknown length, are streamed."""


class BodyTooLarge(Exception):
    """The body went past the relay's limit while it arrived."""


@dataclass(frozen=True)
class IncomingBody:
    """A body staged at `path`: `size` bytes with this SHA-256."""

    path: Path
    size: int
    sha256: str

    def discard(self) -> None:
        """Remove the staging file (it may be gone already)."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def incoming_dir(spool_dir: Path) -> Path:
    """Where bodies are staged for the spool in `spool_dir`."""
    return spool_dir / INCOMING_DIR


def clear_incoming(spool_dir: Path) -> int:
    """Create `spool_dir/incoming` (0700) and remove what a crash left there; how many files."""
    directory = incoming_dir(spool_dir)
    directory.mkdir(mode=0o700, exist_ok=True)
    removed = 0
    for leftover in directory.iterdir():
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            leftover.unlink()
            removed += 1
    return removed


async def receive(content: StreamReader, spool_dir: Path, limit: int) -> IncomingBody:
    """Stream `content` to a new file under `spool_dir/incoming` (mode 0600).

    Raises BodyTooLarge past `limit` bytes, OSError when the file cannot be written (a full disk); the file
    is removed on any failure, cancellation included."""
    path = incoming_dir(spool_dir) / uuid.uuid4().hex
    digest = hashlib.sha256()
    size = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            piece = bytearray()
            async for chunk in content.iter_chunked(PIECE_BYTES):
                size += len(chunk)
                if size > limit:
                    raise BodyTooLarge(f"body larger than {limit} bytes")
                digest.update(chunk)
                piece += chunk
                if len(piece) >= PIECE_BYTES:
                    await anyio.to_thread.run_sync(_write_all, fd, piece)  # written before it is cleared
                    piece.clear()
            if piece:
                await anyio.to_thread.run_sync(_write_all, fd, piece)
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        raise
    return IncomingBody(path, size, digest.hexdigest())


def _write_all(fd: int, data: bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
