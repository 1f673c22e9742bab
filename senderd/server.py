"""The observability endpoint: `/metrics`, `/healthz`, `/readyz` and `/probe?flow=NAME` on one port.

`/probe` runs a flow now and answers blackbox_exporter-style metrics from a registry made for that
request, so Prometheus setups built on the multi-target pattern can scrape senderd instead (with the
token cached, where blackbox_exporter fetches one per probe). A probe is a real send: only flows marked
`probe = true` may be probed, within the scrape's own timeout, never beside a send of the same flow, and
counted apart. With `server.token_env`, `/metrics` and `/probe` require that bearer token.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

from senderd.config import FlowConfig, parse_listen
from senderd.engine import Engine
from senderd.errors import ConfigError
from senderd.pool import Verdict
from senderd.result import SendResult
from senderd.site import Site, bearer_authorised

ProbeRunner = Callable[[FlowConfig, float | None], Awaitable[SendResult | Verdict]]
"""Sends a flow for a probe (within the deadline, if given), or says why it cannot now (`overlap`...)."""
SCRAPE_TIMEOUT_HEADER = "X-Prometheus-Scrape-Timeout-Seconds"
SCRAPE_MARGIN = 0.5
"""Seconds the probe leaves of the scrape's timeout, to write its answer in time."""
PROTECTED = frozenset({"/metrics", "/probe"})


class ObservabilityServer:
    """Serves the endpoints for one engine; `ready()` decides /readyz."""

    def __init__(
        self,
        engine: Engine,
        listen: str,
        *,
        ready: Callable[[], tuple[bool, str]] | None = None,
        probe: ProbeRunner | None = None,
        token: str | None = None,
    ) -> None:
        self.engine = engine
        self.token = token
        self._ready = ready or self.token_ready
        self._run_probe = probe or self._probe_directly
        self._probing: set[str] = set()
        self.site = Site(self.app(), *parse_listen(listen), config_key="server.listen")

    @property
    def url(self) -> str:
        """The base URL the server listens on (with the real port once started)."""
        return self.site.url

    def app(self) -> web.Application:
        """The aiohttp application with the four routes."""
        app = web.Application(middlewares=[self._authorise])
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

    def token_ready(self) -> tuple[bool, str]:
        """Ready when every credentials set has a usable token (the default readiness)."""
        for name, credential_set in self.engine.sets.items():
            ready, reason = credential_set.ready()
            if not ready:
                return False, reason if len(self.engine.sets) == 1 else f"credentials {name}: {reason}"
        return True, "ok"

    async def _metrics(self, _request: web.Request) -> web.Response:
        body = generate_latest(self.engine.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})  # answering at all proves the event loop runs

    async def _readyz(self, _request: web.Request) -> web.Response:
        ready, reason = self._ready()
        sets = {}
        for name, credential_set in self.engine.sets.items():
            set_ready, set_reason = credential_set.ready()
            sets[name] = {"ready": set_ready, "auth": credential_set.config.auth, "reason": set_reason}
        body = {"ready": ready, "reason": reason, "credentials": sets}
        return web.json_response(body, status=200 if ready else 503)

    @web.middleware
    async def _authorise(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        token = self.token
        if (
            token is not None
            and request.path in PROTECTED
            and not bearer_authorised(request.headers.get("Authorization"), token)
        ):
            return web.Response(
                status=401, text="unauthorized: send 'Authorization: Bearer <token>'\n",
                headers={"WWW-Authenticate": "Bearer"},
            )  # fmt: skip
        return await handler(request)

    async def _probe(self, request: web.Request) -> web.Response:
        name = request.query.get("flow")
        if not name:
            return web.Response(status=400, text="the 'flow' parameter is missing: /probe?flow=NAME\n")
        try:
            flow = self.engine.config.flow(name)
        except ConfigError:
            return web.Response(status=400, text=f"unknown flow {name[:100]!r}\n")
        if not flow.probe:
            return web.Response(
                status=403, text=f"flow {name!r} is not marked probe = true: a probe is a real send; mark it to allow\n"
            )
        deadline = _scrape_deadline(request.headers.get(SCRAPE_TIMEOUT_HEADER))
        clock = self.engine.clock
        started = clock.monotonic()
        outcome = await self._run_probe(flow, deadline)
        if isinstance(outcome, str):
            return web.Response(status=429 if outcome == "overlap" else 503, headers={"Retry-After": "1"},
                                text=f"flow {name!r} cannot be probed now ({outcome}): try again\n")  # fmt: skip
        registry = CollectorRegistry()
        Gauge("probe_success", "1 if the flow's send succeeded.", registry=registry).set(1 if outcome.ok else 0)
        Gauge("probe_duration_seconds", "How long the probe took.", registry=registry).set(clock.monotonic() - started)
        Gauge("probe_http_status_code", "The last HTTP status (0 without an answer).", registry=registry).set(
            outcome.status or 0
        )
        Gauge("probe_attempts", "HTTP attempts the send made.", registry=registry).set(outcome.attempts)
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _probe_directly(self, flow: FlowConfig, deadline: float | None) -> SendResult | Verdict:
        """Without a daemon's pool: the send right here, one per flow at a time."""
        if flow.name in self._probing:
            return "overlap"
        self._probing.add(flow.name)
        try:
            return await self.engine.send(flow, probe=True, deadline=deadline)
        finally:
            self._probing.discard(flow.name)


def _scrape_deadline(header: str | None) -> float | None:
    """The time a probe may take: Prometheus' scrape timeout less a margin (None when not said)."""
    try:
        timeout = float(header) if header else math.nan
    except ValueError:
        return None
    if not math.isfinite(timeout) or timeout <= 0:
        return None
    return max(0.05, timeout - SCRAPE_MARGIN)
