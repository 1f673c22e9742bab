"""What a listener admits: a bounded number of connections, a deadline for each request's head, and a
budget of body bytes held in memory at once. Slow or numerous clients then hold little for long, and
legitimate posts keep getting in."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

# Answered to a connection beyond the limit, before it is closed: no request of it is read.
_BUSY = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"


@dataclass(frozen=True)
class Limits:
    """How much one listener admits."""

    max_connections: int
    header_timeout: float
    """Seconds a connection may take to send a request's head (from connecting, or from the previous
    answer on a kept-alive connection)."""


class ConnectionGuard:
    """Counts a listener's connections, refuses those beyond `max_connections` with a 503, and closes a
    connection whose request head does not arrive within `header_timeout`."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.open = 0
        self.refused = 0
        self.timed_out = 0
        self._waiting: dict[asyncio.BaseTransport, asyncio.TimerHandle] = {}

    def wrap(self, factory: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """A protocol factory whose protocols this guard watches."""
        return lambda: _Guarded(self, factory())

    def request_started(self, transport: asyncio.BaseTransport | None) -> None:
        """A request's head arrived on `transport`: its deadline no longer applies."""
        if transport is not None and (timer := self._waiting.pop(transport, None)) is not None:
            timer.cancel()

    def request_finished(self, transport: asyncio.BaseTransport | None) -> None:
        """An answer went out on `transport`: the next head has `header_timeout` again."""
        if transport is not None and not transport.is_closing():
            self._arm(transport)

    def _admit(self, transport: asyncio.BaseTransport) -> bool:
        if self.open >= self.limits.max_connections:
            self.refused += 1
            if isinstance(transport, asyncio.WriteTransport):
                transport.write(_BUSY)
            transport.close()
            return False
        self.open += 1
        self._arm(transport)
        return True

    def _arm(self, transport: asyncio.BaseTransport) -> None:
        if (timer := self._waiting.pop(transport, None)) is not None:
            timer.cancel()
        loop = asyncio.get_running_loop()
        self._waiting[transport] = loop.call_later(self.limits.header_timeout, self._expire, transport)

    def _expire(self, transport: asyncio.BaseTransport) -> None:
        if self._waiting.pop(transport, None) is not None:
            self.timed_out += 1
            transport.close()

    def _gone(self, transport: asyncio.BaseTransport) -> None:
        self.open -= 1
        if (timer := self._waiting.pop(transport, None)) is not None:
            timer.cancel()


class _Guarded(asyncio.Protocol):
    """aiohttp's protocol for one connection, admitted (or not) by the guard."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self.guard = guard
        self.inner = inner
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.guard._admit(transport):
            self.transport = transport
            self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.guard._gone(self.transport)
            self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.transport is not None:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.transport is not None else None

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class GuardedTCPSite(web.TCPSite):
    """aiohttp's TCP site with every connection's protocol watched by a `ConnectionGuard`."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, guard: ConnectionGuard) -> None:
        super().__init__(runner, host, port)
        self.guard = guard

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self.guard.wrap(server), self._host, self._port)


def guard_middleware(guard: ConnectionGuard) -> Any:
    """The aiohttp middleware that tells `guard` when a request's head arrived and its answer went."""

    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        guard.request_started(request.transport)
        try:
            response: web.StreamResponse = await handler(request)
            return response
        finally:
            guard.request_finished(request.transport)

    return middleware


class ByteBudget:
    """Body bytes held in memory at once, across all requests of a listener."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.waiting = 0
        self._freed = asyncio.Event()

    async def acquire(self, size: int, timeout: float) -> bool:
        """Reserve `size` bytes, waiting up to `timeout` seconds for others to release theirs; False if
        they did not."""
        size = min(size, self.limit)
        if self.held + size <= self.limit:  # room now: no deadline to arm (the common case)
            self.held += size
            return True
        self.waiting += 1
        try:
            async with asyncio.timeout(timeout):
                while self.held + size > self.limit:
                    self._freed.clear()
                    await self._freed.wait()
        except TimeoutError:
            return False
        finally:
            self.waiting -= 1
        self.held += size
        return True

    def release(self, size: int) -> None:
        """Give back what `acquire(size)` reserved."""
        self.held -= min(size, self.limit)
        self._freed.set()
