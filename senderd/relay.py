"""The sidecar relay: the app hands messages to senderd on localhost; senderd delivers them durably.

`POST /v1/flows/{flow}/messages` answers 202 only once the message is committed to the spool; the
dispatcher delivers spooled messages through the flow's sender (token, CSRF, retries) with the message id
as `SAP_ApplicationID`, at least once. Messages whose delivery rounds are used up are `dead`: kept, listed
at `GET /v1/dead` and re-driven with `POST /v1/dead/{id}/retry`. Nothing is dropped silently.
"""

from __future__ import annotations

import contextlib
import hmac
import random
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator

import anyio
import structlog
from aiohttp import web
from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from senderd.config import RelayConfig
from senderd.engine import Engine
from senderd.errors import ConfigError
from senderd.pool import WorkerPool
from senderd.sender import SendResult
from senderd.site import Site, parse_listen
from senderd.spool import STATES, Message, Spool, SpoolError, SpoolFull, State

log = structlog.get_logger(component="relay")
_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")
RETRYABLE_OUTCOMES = frozenset({"timeout", "connection_error"})
"""Besides attempts the sender marks retryable (429/5xx by policy, transient token failures)."""


class SpoolCollector(Collector):
    """`senderd_spool_messages{state}` and `senderd_spool_oldest_message_age_seconds`, read at scrape time."""

    def __init__(self, spool: Spool, oldest: Callable[[], float | None]) -> None:
        self.spool = spool
        self.oldest = oldest

    def collect(self) -> Iterator[GaugeMetricFamily]:
        messages = GaugeMetricFamily("senderd_spool_messages", "Messages in the spool by state.", labels=["state"])
        for state in STATES:
            messages.add_metric([state], self.spool.counts[state])
        yield messages
        oldest = self.oldest()
        yield GaugeMetricFamily("senderd_spool_oldest_message_age_seconds",
                                "Age of the oldest message not yet delivered (0 when none waits).",
                                value=max(0.0, time.time() - oldest) if oldest is not None else 0.0)


class Relay:
    """The ingest API and the dispatcher over one spool."""

    def __init__(self, config: RelayConfig, engine: Engine, spool: Spool) -> None:
        self.config = config
        self.engine = engine
        self.spool = spool
        self.token = config.token()
        self.stopping = False
        self._wake = anyio.Event()
        self._inflight: dict[str, Message] = {}
        self._settled = anyio.Event()
        self.rounds = 0
        """Dispatcher loop iterations (a test can tell waiting from spinning)."""
        self._oldest: float | None = None
        self._oldest_checked = 0.0
        self._rng = random.Random()
        registry = engine.metrics.registry
        self.requests = Counter("senderd_relay_requests", "Relay API requests by HTTP status.", ["code"],
                                registry=registry)
        self.deliveries = Counter("senderd_relay_deliveries", "Relay delivery rounds by result.", ["flow", "result"],
                                  registry=registry)
        registry.register(SpoolCollector(spool, lambda: self._oldest))
        spool.on_change = self._wake.set
        self.site = Site(self.app(), *parse_listen(config.listen), config_key="relay.listen")

    @property
    def url(self) -> str:
        """The base URL of the relay API (with the real port once started)."""
        return self.site.url()

    # --- the HTTP API -----------------------------------------------------------------------------------

    def app(self) -> web.Application:
        """The relay's aiohttp application."""
        app = web.Application(client_max_size=self.config.max_message_bytes, middlewares=[self._middleware])
        app.router.add_post("/v1/flows/{flow}/messages", self._post)
        app.router.add_get("/v1/messages/{id}", self._status)
        app.router.add_get("/v1/dead", self._dead)
        app.router.add_post("/v1/dead/{id}/retry", self._redrive)
        return app

    async def start(self) -> None:
        """Listen on `relay.listen`."""
        await self.site.start()

    async def stop_accepting(self) -> None:
        """From now on, posts are answered 503 (the stop has begun)."""
        self.stopping = True

    async def stop(self) -> None:
        """Close the listener."""
        await self.site.stop()

    @web.middleware
    async def _middleware(self, request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        try:
            if self.token is not None and not self._authorised(request):
                response: web.StreamResponse = _error(401, "unauthorized: send 'Authorization: Bearer <token>'",
                                                      headers={"WWW-Authenticate": "Bearer"})
            else:
                response = await handler(request)
        except web.HTTPRequestEntityTooLarge:
            response = _error(413, f"message larger than relay.max_message_bytes ({self.config.max_message_bytes})")
        except web.HTTPException as exc:
            response = _error(exc.status, exc.reason)
        except sqlite3.Error as exc:  # the spool's disk failed under a status query
            log.error("spool_read_failed", error=str(exc))
            response = _error(503, "spool unavailable: retry later", headers={"Retry-After": "5"})
        self.requests.labels(str(response.status)).inc()
        return response

    def _authorised(self, request: web.Request) -> bool:
        assert self.token is not None
        given = request.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode())

    async def _post(self, request: web.Request) -> web.Response:
        if self.stopping:
            return _error(503, "senderd is stopping", headers={"Retry-After": "5"})
        name = request.match_info["flow"]
        if not any(flow.name == name for flow in self.engine.config.flows):
            return _error(404, f"unknown flow {name!r}")
        if request.content_length is not None and request.content_length > self.config.max_message_bytes:
            return _error(413, f"message larger than relay.max_message_bytes ({self.config.max_message_bytes})")
        content_type = request.headers.get("Content-Type")
        if not content_type:
            return _error(415, "Content-Type is missing: send the payload's media type (e.g. application/xml)")
        key = request.headers.get("Idempotency-Key")
        if key is not None and not _IDEMPOTENCY_KEY.match(key):
            return _error(400, "Idempotency-Key must be 1-255 visible ASCII characters")
        body: bytes | None = None
        with anyio.move_on_after(self.config.read_timeout):
            body = await request.read()
        if body is None:
            return _error(408, f"the body did not arrive within relay.read_timeout ({self.config.read_timeout:g}s)",
                          headers={"Connection": "close"})
        try:
            message_id, created = await self.spool.add(name, body, content_type, key)
        except SpoolFull:
            return _error(503, "spool full: retry later", headers={"Retry-After": "10"})
        except SpoolError as exc:
            return _error(503, f"{exc}: retry later", headers={"Retry-After": "5"})
        if created:
            return web.json_response({"id": message_id, "status": "queued"}, status=202)
        existing = await self.spool.get(message_id)
        state = existing.state if existing is not None else "queued"
        return web.json_response({"id": message_id, "status": state, "duplicate": True}, status=200)

    async def _status(self, request: web.Request) -> web.Response:
        message = await self.spool.get(request.match_info["id"])
        if message is None:
            return _error(404, "no such message")
        return web.json_response(message.summary())

    async def _dead(self, _request: web.Request) -> web.Response:
        return web.json_response({"messages": [m.summary() for m in await self.spool.dead()]})

    async def _redrive(self, request: web.Request) -> web.Response:
        message_id = request.match_info["id"]
        if not await self.spool.redrive(message_id):
            return _error(404, "no dead message with that id")
        log.info("message_redriven", id=message_id)
        return web.json_response({"id": message_id, "status": "queued"}, status=202)

    # --- the dispatcher ---------------------------------------------------------------------------------

    async def run_dispatcher(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Deliver due messages until cancelled; ordered flows one at a time, in order."""
        workers = self.engine.config.pool.workers  # the pool's size is fixed until a restart
        pool = WorkerPool(workers, workers)
        async with anyio.create_task_group() as group:
            await group.start(pool.run)
            task_status.started()
            while True:
                self.rounds += 1
                self._wake = anyio.Event()  # before looking, so that no change in between is missed
                self.spool.on_change = self._wake.set
                ordered = [flow.name for flow in self.engine.config.flows if flow.ordered]  # a reload may change it
                free = workers * 2 - len(self._inflight)
                claimed: list[Message] = []
                try:
                    await self._refresh_oldest()
                    if free > 0 and not self.stopping:
                        busy_ordered = [m.flow for m in self._inflight.values() if m.flow in ordered]
                        claimed = await self.spool.due(time.time(), free, exclude_flows=busy_ordered,
                                                       ordered_flows=ordered)
                except sqlite3.Error as exc:  # the spool's disk is failing: say so, try again shortly
                    log.error("spool_read_failed", error=str(exc))
                for message in claimed:
                    self._inflight[message.id] = message
                    await pool.put(message.id, self._job(message))
                if not claimed:
                    await self._wait_for_work(can_claim=free > 0 and not self.stopping)

    @property
    def inflight(self) -> int:
        """Deliveries under way now."""
        return len(self._inflight)

    async def wait_idle(self) -> None:
        """Return once no delivery is in flight (used by the drain on stop)."""
        while self._inflight:
            self._settled = anyio.Event()
            await self._settled.wait()

    async def _wait_for_work(self, *, can_claim: bool) -> None:
        """Sleep until a post, a finished delivery or a re-drive (`_wake`), or until a queued message that
        is not due yet becomes due; never less than a moment, so that nothing spins."""
        delay = 1.0
        if can_claim:
            with contextlib.suppress(sqlite3.Error):
                now = time.time()
                next_due = await self.spool.next_due_at(after=now)
                if next_due is not None:
                    delay = min(1.0, max(0.01, next_due - now))
        with anyio.move_on_after(delay):
            await self._wake.wait()

    async def _refresh_oldest(self) -> None:
        now = time.monotonic()
        if now - self._oldest_checked >= 1.0:
            self._oldest_checked = now
            self._oldest = await self.spool.oldest_queued_at()

    def _job(self, message: Message) -> Callable[[], Awaitable[None]]:
        async def deliver() -> None:
            try:
                await self._deliver(message)
            except anyio.get_cancelled_exc_class():
                with anyio.CancelScope(shield=True):
                    await self.spool.requeue(message)  # interrupted by a stop: delivered after restart
                raise
            finally:
                self._inflight.pop(message.id, None)
                self._wake.set()
                self._settled.set()

        return deliver

    async def _deliver(self, message: Message) -> None:
        try:
            flow = self.engine.config.flow(message.flow)
        except ConfigError:
            await self._finish(message, None, "dead", error=f"flow {message.flow!r} is no longer configured")
            return
        headers = {self.config.application_id_header: message.id}
        if message.content_type:
            headers["Content-Type"] = message.content_type
        result = await self.engine.send(flow, body=message.body, headers=headers, message_id=message.id)
        if result.ok:
            await self._finish(message, result, "delivered")
            return
        rounds = message.attempts + 1
        retryable = result.last.retryable or result.outcome in RETRYABLE_OUTCOMES
        if retryable and rounds < self.config.max_deliveries:
            delay = min(self.config.redelivery_max, self.config.redelivery_initial * 2.0 ** min(rounds - 1, 64))
            retry_at = time.time() + delay * self._rng.uniform(0.8, 1.0)
            await self._finish(message, result, "queued", retry_at=retry_at)
        else:
            await self._finish(message, result, "dead")

    async def _finish(self, message: Message, result: SendResult | None, state: State, *, error: str | None = None,
                      retry_at: float = 0.0) -> None:
        if result is not None:
            error = result.last.error
        with anyio.CancelScope(shield=True):
            await self.spool.finish(message, state, error=error, retry_at=retry_at,
                                    correlation_id=result.correlation_id if result else None,
                                    status=result.status if result else None)
        outcome = {"delivered": "delivered", "queued": "retry", "dead": "dead"}[state]
        self.deliveries.labels(message.flow, outcome).inc()
        if state != "delivered":
            log.warning("relay_delivery_failed", id=message.id, flow=message.flow, result=outcome,
                        attempts=message.attempts + 1, error=error)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)
