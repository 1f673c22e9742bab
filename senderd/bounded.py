"""Reading an HTTP answer without trusting its size or its compression: at most `limit` bytes are kept and
inflated, then reading stops (the connection is closed), so that no answer from a token server or a
runtime can make senderd hold unbounded memory, and no compressed bomb expands past the limit.

Sessions that read with these functions turn aiohttp's own decompression off (`auto_decompress=False`,
which would inflate each network chunk whole) and offer only `ACCEPT_ENCODING`.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import aiohttp

CHUNK = 64 * 1024
ACCEPT_ENCODING = "gzip, deflate"
"""What senderd offers to decode (bounded, here); answers in another coding are kept as they came."""


@dataclass(slots=True)
class BoundedBody:
    """The first bytes of an answer (decoded), and whether there was more (a value, never changed; not a
    frozen dataclass, which is six times as slow to make, once per answer)."""

    data: bytes
    truncated: bool
    declared_size: int | None = None
    """The answer's Content-Length, when it had one (the size on the wire, before decoding)."""


class _Inflater:
    """zlib's decompressor, asked for at most the room that is left each time."""

    def __init__(self, encoding: str) -> None:
        self.wbits = 16 + zlib.MAX_WBITS if encoding in ("gzip", "x-gzip") else zlib.MAX_WBITS
        self.decompressor = zlib.decompressobj(self.wbits)
        self.started = False

    def feed(self, chunk: bytes, room: int) -> tuple[bytes, bool]:
        """Up to `room` inflated bytes of `chunk`; and whether output is left over beyond the room."""
        try:
            data = self.decompressor.decompress(chunk, room)
        except zlib.error:
            if self.started or self.wbits != zlib.MAX_WBITS:
                raise
            self.decompressor = zlib.decompressobj(-zlib.MAX_WBITS)  # "deflate" sent raw, as some servers do
            data = self.decompressor.decompress(chunk, room)
        self.started = True
        return data, bool(self.decompressor.unconsumed_tail)


async def read_bounded(response: aiohttp.ClientResponse, limit: int) -> BoundedBody:
    """Keep at most `limit` bytes of `response`'s body, decoded from gzip or deflate within that bound; stop
    reading there (and close the connection, which cannot be reused with an unread answer on it).

    A body that is not valid in its declared coding ends where it stops decoding, as a truncated answer.
    """
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    inflater = _Inflater(encoding) if encoding in ("gzip", "x-gzip", "deflate") else None
    declared = response.content_length if inflater is None else None
    if declared is not None and declared <= limit:
        first = await response.content.read(declared)  # usually all of it, in one piece
        if len(first) == declared:
            return BoundedBody(first, False, declared)
        kept = bytearray(first)
    else:
        kept = bytearray()
    truncated = False
    while True:
        chunk = await response.content.read(CHUNK)
        if not chunk:
            break
        room = limit - len(kept)
        if inflater is None:
            kept += chunk[:room]
            more = len(chunk) > room
            if not more and len(kept) == declared:  # all there is (aiohttp reads no more than it declares)
                break
        else:
            try:
                data, more = inflater.feed(chunk, room)
            except zlib.error:
                truncated = True
                break
            kept += data
        if more or (len(kept) >= limit and await response.content.read(1)):
            truncated = True
            break
    if truncated:
        response.close()
    return BoundedBody(bytes(kept), truncated, response.content_length)
