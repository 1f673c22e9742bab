"""The relay's HTTP API: the app hands messages to senderd on localhost, acknowledged once durable.

`POST /v1/flows/{flow}/messages` answers 202 only once the message is committed to the spool; `GET
/v1/messages/{id}` tells its state; `GET /v1/dead` lists dead letters and `POST /v1/dead/{id}/retry`
re-drives one. Nothing is dropped silently.
"""

from __future__ import annotations

import errno
import re
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
from aiohttp import web

from senderd.admission import ByteBudget, ConnectionGuard, Limits, guard_middleware
from senderd.config import ConfigHolder, RelayConfig, parse_listen
from senderd.errors import IdempotencyConflict, SpoolError, SpoolFull
from senderd.logs import get_logger
from senderd.metrics import Metrics
from senderd.relay.incoming import INLINE_BODY_BYTES, PIECE_BYTES, BodyTooLarge, IncomingBody, receive
from senderd.relay.store import RelayStore
from senderd.site import Site, bearer_authorised

log = get_logger("relay")
_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")
_MESSAGE_ID = re.compile(r"^[0-9a-f]{32}$")
_MEDIA_TYPE = re.compile(r"^[\x20-\x7e\t]{1,255}$")
"""A Content-Type the spool stores and the runtime is sent: visible ASCII, spaces and tabs, at most 255."""


class RelayApi:
    """The ingest and status API over one spool."""

    def __init__(self, config: RelayConfig, holder: ConfigHolder, spool: RelayStore, metrics: Metrics) -> None:
        self.config = config
        self.holder = holder
        self.spool = spool
        self.metrics = metrics
        self.token = config.token()
        self.stopping = False
        self.guard = ConnectionGuard(Limits(config.max_connections, config.header_timeout))
        self.budget = ByteBudget(config.max_buffered_bytes)
        self.site = Site(self.app(), *parse_listen(config.listen), config_key="relay.listen", guard=self.guard)

    @property
    def url(self) -> str:
        """The base URL of the relay API (with the real port once started)."""
        return self.site.url

    def app(self) -> web.Application:
        """The relay's aiohttp application."""
        app = web.Application(
            client_max_size=self.config.max_message_bytes, middlewares=[guard_middleware(self.guard), self._middleware]
        )
        app.router.add_post("/v1/flows/{flow}/messages", self._post)
        app.router.add_get("/v1/messages/{id}", self._status)
        app.router.add_get("/v1/dead", self._dead)
        app.router.add_post("/v1/dead/{id}/retry", self._redrive)
        return app

    async def start(self) -> None:
        """Listen on `relay.listen`."""
        await self.site.start()

    def stop_accepting(self) -> None:
        """From now on, posts are answered 503 (the stop has begun)."""
        self.stopping = True

    async def stop(self) -> None:
        """Close the listener."""
        await self.site.stop()

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            if self.token is not None and not self._authorised(request):
                response: web.StreamResponse = _error(
                    401, "unauthorized: send 'Authorization: Bearer <token>'", headers={"WWW-Authenticate": "Bearer"}
                )
            else:
                response = await handler(request)
        except web.HTTPRequestEntityTooLarge:
            response = _error(413, f"message larger than relay.max_message_bytes ({self.config.max_message_bytes})")
        except web.HTTPException as exc:
            response = _error(exc.status, exc.reason)
        except (sqlite3.Error, SpoolError) as exc:  # the spool's disk failed, or the database is down
            log.error("spool_read_failed", error=str(exc))
            response = _error(503, "spool unavailable: retry later", headers={"Retry-After": "5"})
        except Exception:  # a bug: that request's answer, never the daemon's end
            log.exception("relay_request_crashed", path=request.path.encode("utf-8", "backslashreplace").decode())
            self.metrics.internal_error("relay_api")
            response = _error(500, "internal error (logged)")
        self.metrics.relay_request(response.status)
        return response

    def _authorised(self, request: web.Request) -> bool:
        assert self.token is not None
        return bearer_authorised(request.headers.get("Authorization"), self.token)

    async def _post(self, request: web.Request) -> web.Response:
        if self.stopping:
            return _error(503, "senderd is stopping", headers={"Retry-After": "5"})
        name = request.match_info["flow"]
        if not any(flow.name == name for flow in self.holder.current.flows):
            return _error(404, f"unknown flow {name!r}")
        if request.content_length is not None and request.content_length > self.config.max_message_bytes:
            return _error(413, f"message larger than relay.max_message_bytes ({self.config.max_message_bytes})")
        content_type = request.headers.get("Content-Type")
        if not content_type:
            return _error(415, "Content-Type is missing: send the payload's media type (e.g. application/xml)")
        if not _MEDIA_TYPE.match(content_type):
            return _error(415, "Content-Type must be 1-255 ASCII characters (e.g. application/xml; charset=utf-8)")
        key = request.headers.get("Idempotency-Key")
        if key is not None and not _IDEMPOTENCY_KEY.match(key):
            return _error(400, "Idempotency-Key must be 1-255 visible ASCII characters")
        staging = self.spool.staging_dir
        declared = request.content_length
        inline = staging is None or (declared is not None and declared <= INLINE_BODY_BYTES)
        share = 2 * PIECE_BYTES  # a streamed body holds a piece being gathered and one being written
        if inline:
            share = declared if declared is not None else self.config.max_message_bytes
        if not await self.budget.acquire(share, self.config.read_timeout):
            return _error(
                503,
                "too many message bodies in memory at once (relay.max_buffered_bytes): retry later",
                headers={"Retry-After": "1"},
            )
        try:
            if staging is None or inline:
                return await self._spool_inline(request, name, content_type, key)
            return await self._spool_streamed(request, staging, name, content_type, key)
        finally:
            self.budget.release(share)

    async def _spool_inline(self, request: web.Request, name: str, content_type: str, key: str | None) -> web.Response:
        """A small body: read into memory, then stored."""
        body: bytes | None = None
        if request.content.is_eof():  # all of it arrived with the head: nothing to wait for
            body = await request.read()
        else:
            with anyio.move_on_after(self.config.read_timeout):
                body = await request.read()
        if body is None:
            return _late_body(self.config.read_timeout)
        return await self._store(name, body, content_type, key)

    async def _spool_streamed(
        self, request: web.Request, staging: Path, name: str, content_type: str, key: str | None
    ) -> web.Response:
        """A large body, or one of unknown length: streamed to a staging file, then copied into the spool."""
        staged: IncomingBody | None = None
        limit = self.config.max_message_bytes
        try:
            with anyio.move_on_after(self.config.read_timeout):
                staged = await receive(request.content, staging, limit)
        except BodyTooLarge:
            return _error(
                413, f"message larger than relay.max_message_bytes ({limit})", headers={"Connection": "close"}
            )
        except OSError as exc:  # a full disk: nothing was acknowledged
            log.error("relay_staging_failed", error=exc.strerror or str(exc))
            why = "the disk is full" if exc.errno == errno.ENOSPC else exc.strerror or "cannot write"
            return _error(503, f"spool unavailable ({why}): retry later", headers={"Retry-After": "5"})
        if staged is None:
            return _late_body(self.config.read_timeout)
        try:
            return await self._store(name, staged, content_type, key)
        finally:
            staged.discard()

    async def _store(self, name: str, body: bytes | IncomingBody, content_type: str, key: str | None) -> web.Response:
        try:
            message_id, created = await self.spool.add(name, body, content_type, key)
        except SpoolFull:
            return _error(503, "spool full: retry later", headers={"Retry-After": "10"})
        except IdempotencyConflict as exc:
            return _error(409, str(exc))
        except SpoolError as exc:
            return _error(503, f"{exc}: retry later", headers={"Retry-After": "5"})
        if created:
            return web.json_response({"id": message_id, "status": "queued"}, status=202)
        existing = await self.spool.get(message_id)
        state = existing.state if existing is not None else "queued"
        return web.json_response({"id": message_id, "status": state, "duplicate": True}, status=200)

    async def _status(self, request: web.Request) -> web.Response:
        message_id = request.match_info["id"]
        message = await self.spool.get(message_id) if _MESSAGE_ID.match(message_id) else None
        if message is None:
            return _error(404, "no such message")
        return web.json_response(message.summary())

    async def _dead(self, _request: web.Request) -> web.Response:
        return web.json_response({"messages": [m.summary() for m in await self.spool.dead()]})

    async def _redrive(self, request: web.Request) -> web.Response:
        message_id = request.match_info["id"]
        if not _MESSAGE_ID.match(message_id) or not await self.spool.redrive(message_id):
            return _error(404, "no dead message with that id")
        log.info("message_redriven", id=message_id)
        return web.json_response({"id": message_id, "status": "queued"}, status=202)


def _late_body(seconds: float) -> web.Response:
    return _error(
        408, f"the body did not arrive within relay.read_timeout ({seconds:g}s)", headers={"Connection": "close"}
    )


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)
