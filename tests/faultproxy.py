"""A small fault-injecting TCP proxy on 127.0.0.1 for tests (TLS passes through: it works below it).

Each accepted connection takes the next mode from `plan` (or `mode` once the plan is used up):

- `Pass()`: forward both ways until either side closes;
- `ResetAfterResponseBytes(n)`: forward, but after `n` bytes of the upstream's answer abort the client
  connection with a RST (SO_LINGER 0), as a crashed load balancer or a dropped NAT entry does;
- `Blackhole()`: accept, read and discard, never answer (until the client gives up or the proxy stops);
- `CloseImmediately()`: accept and close at once, before any byte.

    async with FaultProxy.running("127.0.0.1", upstream_port, ResetAfterResponseBytes(4096)) as proxy:
        ... proxy.url ...; proxy.connections[0].reset

Loops are bounded: at most `max_connections` are served (later ones are closed at once), each direction
forwards at most `max_bytes`, and leaving the context cancels every connection still open.
"""

from __future__ import annotations

import socket
import struct
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

CHUNK = 65536


@dataclass(frozen=True)
class Pass:
    """Forward both ways."""


@dataclass(frozen=True)
class ResetAfterResponseBytes:
    """Forward, then RST the client connection once `n` bytes of the upstream's answer have gone to it."""

    n: int


@dataclass(frozen=True)
class Blackhole:
    """Accept and never answer."""


@dataclass(frozen=True)
class CloseImmediately:
    """Accept and close at once."""


Mode = Pass | ResetAfterResponseBytes | Blackhole | CloseImmediately

# Errors that end a connection: the other side went away, or we closed the stream ourselves.
_GONE = (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


@dataclass
class Connection:
    """What happened on one accepted connection."""

    mode: Mode
    request_bytes: int = 0
    response_bytes: int = 0
    reset: bool = False
    closed: bool = False


class FaultProxy:
    """Forwards 127.0.0.1:<port> to target_host:target_port, injecting the configured faults."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        mode: Mode | None = None,
        *,
        max_connections: int = 256,
        max_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.mode: Mode = mode if mode is not None else Pass()
        self.plan: deque[Mode] = deque()
        self.connections: list[Connection] = []
        self.max_connections = max_connections
        self._accepted = anyio.Event()
        self.max_bytes = max_bytes
        self._port: int | None = None

    @classmethod
    @asynccontextmanager
    async def running(
        cls, target_host: str, target_port: int, mode: Mode | None = None, **options: int
    ) -> AsyncIterator[FaultProxy]:
        """Listen on a free port of 127.0.0.1; every connection is closed when the block is left."""
        proxy = cls(target_host, target_port, mode, **options)
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        async with listener, anyio.create_task_group() as group:
            proxy._port = listener.extra(SocketAttribute.local_port)  # noqa: S610 - anyio, not Django
            group.start_soon(listener.serve, proxy._handle, group)
            try:
                yield proxy
            finally:
                group.cancel_scope.cancel()

    @property
    def port(self) -> int:
        """The port the proxy listens on."""
        if self._port is None:
            raise RuntimeError("proxy not running")
        return self._port

    @property
    def url(self) -> str:
        """`https://127.0.0.1:<port>`: what a client should use instead of the target's URL."""
        return f"https://127.0.0.1:{self.port}"

    async def wait_for_connections(self, count: int) -> None:
        """Return once `count` connections have been accepted (a test driving a fake clock waits for the real
        connect before it moves time on)."""
        while len(self.connections) < count:
            await self._accepted.wait()

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        mode = self.plan.popleft() if self.plan else self.mode
        record = Connection(mode)
        async with client:
            if len(self.connections) >= self.max_connections:
                return
            self.connections.append(record)
            self._accepted.set()
            self._accepted = anyio.Event()
            try:
                if isinstance(mode, CloseImmediately):
                    return
                if isinstance(mode, Blackhole):
                    await self._discard(client, record)
                    return
                try:
                    upstream = await anyio.connect_tcp(self.target_host, self.target_port)
                except OSError:
                    abort_with_rst(client)
                    record.reset = True
                    return
                async with upstream, anyio.create_task_group() as group:
                    group.start_soon(self._forward_request, client, upstream, record)
                    await self._forward_response(upstream, client, record, mode)
                    group.cancel_scope.cancel()
            finally:
                record.closed = True

    async def _discard(self, client: anyio.abc.SocketStream, record: Connection) -> None:
        while record.request_bytes < self.max_bytes:
            try:
                record.request_bytes += len(await client.receive(CHUNK))
            except _GONE:
                return

    async def _forward_request(
        self, client: anyio.abc.SocketStream, upstream: anyio.abc.SocketStream, record: Connection
    ) -> None:
        while record.request_bytes < self.max_bytes:
            try:
                data = await client.receive(CHUNK)
                await upstream.send(data)
            except anyio.EndOfStream:
                await upstream.send_eof()
                return
            except _GONE:
                return
            record.request_bytes += len(data)

    async def _forward_response(
        self, upstream: anyio.abc.SocketStream, client: anyio.abc.SocketStream, record: Connection, mode: Mode
    ) -> None:
        """Upstream to client until the upstream is done (or the fault strikes); then the connection ends."""
        limit = mode.n if isinstance(mode, ResetAfterResponseBytes) else self.max_bytes
        while record.response_bytes < limit:
            try:
                data = (await upstream.receive(CHUNK))[: limit - record.response_bytes]
                await client.send(data)
            except _GONE:
                return
            record.response_bytes += len(data)
        if isinstance(mode, ResetAfterResponseBytes):
            abort_with_rst(client)
            record.reset = True


def abort_with_rst(stream: anyio.abc.SocketStream) -> None:
    """Make the coming close send a RST instead of a FIN (unsent data is dropped)."""
    raw = stream.extra(SocketAttribute.raw_socket)  # noqa: S610 - anyio, not Django
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
