"""Reading an HTTP answer without trusting its size: at most `limit` bytes are kept, the rest is counted
and dropped, so that no answer from a token server or a runtime can make senderd hold unbounded memory."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp

CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True)
class BoundedBody:
    """The first bytes of an answer, and how many bytes it had in all (as far as it was read)."""

    data: bytes
    size: int

    @property
    def truncated(self) -> bool:
        """True when the answer was longer than what was kept."""
        return self.size > len(self.data)


async def read_bounded(response: aiohttp.ClientResponse, limit: int, *, drain: bool = True) -> BoundedBody:
    """Keep at most `limit` bytes of `response`'s body; count the rest without keeping it (`drain`), or stop
    reading at the limit and close the connection (`drain=False`)."""
    kept = bytearray()
    size = 0
    while True:
        chunk = await response.content.read(CHUNK)
        if not chunk:
            break
        size += len(chunk)
        room = limit - len(kept)
        if room > 0:
            kept += chunk[:room]
        if size > limit and not drain:
            response.close()  # the connection cannot be reused with an unread answer on it
            break
    return BoundedBody(bytes(kept), size)
