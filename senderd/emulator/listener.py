"""An aiohttp application served over TLS on one address: the emulator's servers (its own, not senderd's)."""

from __future__ import annotations

import ssl
from typing import Any

from aiohttp import web


class TlsListener:
    """`app` with TLS on `host:port` (port 0: any free port, known after `start`)."""

    def __init__(self, app: web.Application, ssl_context: ssl.SSLContext) -> None:
        self.app = app
        self.ssl_context = ssl_context
        self.host = "127.0.0.1"
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int) -> None:
        """Listen; nothing stays open when that fails."""
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port, ssl_context=self.ssl_context).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.host = host
        self.port = int(runner.addresses[0][1]) if runner.addresses else port

    async def stop(self) -> None:
        """Stop listening and close connections."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    @property
    def running(self) -> bool:
        """True between `start` and `stop`."""
        return self._runner is not None

    @property
    def url(self) -> str:
        """`https://host:port`."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"


class TlsServer:
    """What every emulator server shares: one `TlsListener`, opened by `_listen` and closed by `stop`."""

    what = "server"
    """Its name in the error for a use before `start`."""
    _listener: TlsListener | None = None

    async def _listen(self, app: web.Application, ssl_context: ssl.SSLContext, host: str, port: int) -> None:
        listener = TlsListener(app, ssl_context)
        await listener.start(host, port)
        self._listener = listener

    async def stop(self) -> None:
        """Stop listening and close connections."""
        if self._listener is not None:
            await self._listener.stop()

    def _started(self) -> TlsListener:
        if self._listener is None:
            raise RuntimeError(f"{self.what} not started")
        return self._listener


def peer_chain(request: web.Request) -> list[bytes]:
    """The certificates the client sent in the TLS handshake, as DER, leaf first (empty without any).

    What was sent, not what the server built: a leaf sent without its intermediate shows as the leaf alone.
    (`get_unverified_chain` is public from Python 3.13; before, it is on the private `_sslobj`.)"""
    transport = request.transport
    ssl_object: Any = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return []
    getter = getattr(ssl_object, "get_unverified_chain", None) or getattr(
        getattr(ssl_object, "_sslobj", None), "get_unverified_chain", None
    )
    if getter is None:  # pragma: no cover - every supported Python has one of the two
        leaf = ssl_object.getpeercert(binary_form=True)
        return [leaf] if leaf else []
    chain = getter() or []
    return [c if isinstance(c, bytes) else c.public_bytes(_DER) for c in chain if c is not None]


_DER = 2
"""`_ssl.ENCODING_DER`, the format `_ssl.Certificate.public_bytes` takes for DER."""
