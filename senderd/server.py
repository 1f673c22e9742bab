"""The observability endpoint: `/metrics`, `/healthz`, `/readyz` and `/probe?flow=NAME` on one port.

`/probe` runs a flow now and answers blackbox_exporter-style metrics from a registry made for that
request, so Prometheus setups built on the multi-target pattern can scrape senderd instead (with the
token cached, where blackbox_exporter fetches one per probe).
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

from senderd.config import parse_listen
from senderd.engine import Engine
from senderd.errors import ConfigError
from senderd.site import Site


class ObservabilityServer:
    """Serves the endpoints for one engine; `ready()` decides /readyz."""

    def __init__(self, engine: Engine, listen: str, *, ready: Callable[[], tuple[bool, str]] | None = None) -> None:
        self.engine = engine
        self._ready = ready or self._token_ready
        self.site = Site(self.app(), *parse_listen(listen), config_key="server.listen")

    @property
    def url(self) -> str:
        """The base URL the server listens on (with the real port once started)."""
        return self.site.url

    def app(self) -> web.Application:
        """The aiohttp application with the four routes."""
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/probe", self._probe)
        return app

    async def start(self) -> None:
        """Listen; the port is known afterwards even when 0 was asked for."""
        await self.site.start()

    async def stop(self) -> None:
        """Stop listening."""
        await self.site.stop()

    def _token_ready(self) -> tuple[bool, str]:
        tokens = self.engine.tokens
        if tokens.has_valid_token():
            return True, "ok"
        error = tokens.last_error
        return False, f"no valid token: {error}" if error is not None else "no valid token yet"

    async def _metrics(self, _request: web.Request) -> web.Response:
        body = generate_latest(self.engine.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})  # answering at all proves the event loop runs

    async def _readyz(self, _request: web.Request) -> web.Response:
        ready, reason = self._ready()
        return web.json_response({"ready": ready, "reason": reason}, status=200 if ready else 503)

    async def _probe(self, request: web.Request) -> web.Response:
        name = request.query.get("flow")
        if not name:
            return web.Response(status=400, text="the 'flow' parameter is missing: /probe?flow=NAME\n")
        try:
            flow = self.engine.config.flow(name)
        except ConfigError:
            return web.Response(status=400, text=f"unknown flow {name!r}\n")
        clock = self.engine.clock
        started = clock.monotonic()
        result = await self.engine.send(flow)
        registry = CollectorRegistry()
        Gauge("probe_success", "1 if the flow's send succeeded.", registry=registry).set(1 if result.ok else 0)
        Gauge("probe_duration_seconds", "How long the probe took.", registry=registry).set(clock.monotonic() - started)
        Gauge("probe_http_status_code", "The last HTTP status (0 without an answer).", registry=registry).set(
            result.status or 0
        )
        Gauge("probe_attempts", "HTTP attempts the send made.", registry=registry).set(result.attempts)
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})
