"""One aiohttp application listening on one address: what the metrics server, the relay and the
emulator's two servers each need."""

from __future__ import annotations

import ssl
from typing import Any

from aiohttp import web

from senderd.config import check_listen
from senderd.errors import ConfigError


def parse_listen(value: str) -> tuple[str, int]:
    """`host:port` (IPv6 as `[::1]:9464`) → (host, port); the checks are `config.check_listen`'s."""
    try:
        check_listen(value)
    except ValueError as exc:
        raise ConfigError(f"invalid listen address: {exc}") from None
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


class Site:
    """`app` on `host:port` (port 0: any free port, known after `start`)."""

    def __init__(self, app: web.Application, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None,
                 config_key: str | None = None, **runner_options: Any) -> None:
        self.app = app
        self.config_key = config_key
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.runner_options = {"access_log": None, "handle_signals": False, **runner_options}
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Listen, with nothing left open on failure: the address in use (or the like) is a ConfigError
        naming `config_key` when one was given, else the OSError."""
        runner = web.AppRunner(self.app, **self.runner_options)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port, ssl_context=self.ssl_context).start()
        except BaseException as exc:
            await runner.cleanup()
            if self.config_key is not None and isinstance(exc, OSError):
                raise ConfigError(
                    f"{self.config_key}: cannot listen on {self.host}:{self.port} ({exc.strerror or exc})"
                ) from None
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
    def started(self) -> bool:
        """True between `start` and `stop`."""
        return self._runner is not None

    def url(self, scheme: str = "http") -> str:
        """The base URL, with the real port once started."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"
