"""One aiohttp application listening on one address: what the metrics server and the relay each need."""

from __future__ import annotations

import hmac
from typing import Any

from aiohttp import web

from senderd.admission import ConnectionGuard, GuardedTCPSite
from senderd.errors import ConfigError


class Site:
    """`app` on `host:port` (port 0: any free port, known after `start`); with a `guard`, its connections
    are admitted by it."""

    def __init__(
        self,
        app: web.Application,
        host: str,
        port: int,
        *,
        config_key: str,
        guard: ConnectionGuard | None = None,
        **runner_options: Any,
    ) -> None:
        self.app = app
        self.guard = guard
        self.config_key = config_key
        self.host = host
        self.port = port
        self.runner_options = {"access_log": None, "handle_signals": False, **runner_options}
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Listen, with nothing left open on failure: the address in use (or the like) is a ConfigError
        naming `config_key`."""
        runner = web.AppRunner(self.app, **self.runner_options)
        await runner.setup()
        try:
            site = (
                web.TCPSite(runner, self.host, self.port)
                if self.guard is None
                else GuardedTCPSite(runner, self.host, self.port, self.guard)
            )
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise ConfigError(
                f"{self.config_key}: cannot listen on {self.host}:{self.port} ({exc.strerror or exc})"
            ) from None
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        if runner.addresses:
            self.port = int(runner.addresses[0][1])

    async def stop(self) -> None:
        """Stop listening and close connections."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    @property
    def listening(self) -> bool:
        """Whether the site has started and not stopped."""
        return self._runner is not None

    @property
    def url(self) -> str:
        """The base URL, with the real port once started."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def bearer_authorised(header: str | None, token: str) -> bool:
    """Whether an `Authorization` header presents `token` as a Bearer token (the scheme case-insensitive, as
    RFC 6750 has it), compared in constant time. Bytes that are not ASCII simply do not match."""
    scheme, _, given = (header or "").strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), token.encode("utf-8"))
