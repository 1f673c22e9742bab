"""The sending engine: everything one send needs, built once from a config and shared by all callers.

`Engine.open(config)` loads the service key, opens the token session and the runtime session (each
created once and reused), and gives `send(flow)`: a whole delivery with retries, metrics and one log event.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
import structlog

from senderd.auth import load_credentials, token_provider
from senderd.clock import Clock, SystemClock
from senderd.config import Config, FlowConfig
from senderd.credentials import ServiceKey
from senderd.errors import ConfigError, TokenError
from senderd.metrics import Metrics
from senderd.retry import RetryPolicy, deliver
from senderd.sender import Sender, SendResult, new_message_id
from senderd.tls import trust_context
from senderd.token import Token, TokenProvider

log = structlog.get_logger(component="sender")
SendListener = Callable[[SendResult], None]


@dataclass
class Engine:
    """Credentials, token provider, runtime session and metrics of one running senderd."""

    config: Config
    key: ServiceKey
    tokens: TokenProvider
    sender: Sender
    metrics: Metrics
    clock: Clock
    listeners: list[SendListener] = field(default_factory=list)

    @classmethod
    @asynccontextmanager
    async def open(cls, config: Config, *, metrics: Metrics | None = None, clock: Clock | None = None,
                   key: ServiceKey | None = None) -> AsyncIterator[Engine]:
        """Build the engine from `config`; sessions close on exit. Raises ConfigError/CredentialsError."""
        clock = clock or SystemClock()
        metrics = metrics or Metrics()
        key = key or load_credentials(config.credentials)
        for note in key.notes:
            log.warning("credentials_note", note=note)
        if key.certificate_not_after is not None:
            metrics.certificate_expiry.set(key.certificate_not_after.timestamp())
        runtime_url = config.runtime.url or key.runtime_url
        if runtime_url is None:
            raise ConfigError(f"{config.source}: runtime.url: the service key has no 'url': set runtime.url")
        listener = _token_metrics(metrics)
        async with token_provider(key, config.credentials, config.token, clock=clock,
                                  listeners=[listener]) as tokens:
            context = trust_context(config.runtime.ca_file or config.credentials.ca_file)
            connector = aiohttp.TCPConnector(ssl=context, limit=max(10, config.pool.workers * 2))
            # unsafe=True keeps cookies from IP-address hosts too (the CSRF session must come back)
            async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
                sender = Sender(s, tokens, runtime_url, metrics)
                yield cls(config=config, key=key, tokens=tokens, sender=sender, metrics=metrics, clock=clock)

    async def send(self, flow: FlowConfig, *, body: bytes | None = None, headers: dict[str, str] | None = None,
                   message_id: str | None = None, scheduled_at: float | None = None) -> SendResult:
        """Deliver to `flow` with its retry policy; counts, logs and tells the listeners."""
        if scheduled_at is not None:
            self.metrics.schedule_lag.labels(flow.name).observe(max(0.0, self.clock.monotonic() - scheduled_at))
        if message_id is None and flow.application_id is not None:
            message_id = new_message_id() if flow.application_id == "auto" else flow.application_id
        payload = body if body is not None else flow.body_bytes()
        self.metrics.inflight.inc()
        deadline_at = self.clock.monotonic() + flow.deadline
        try:
            result = await deliver(
                flow.name,
                lambda: self.sender.attempt(flow, payload, headers, message_id,
                                            timeout=deadline_at - self.clock.monotonic()),
                RetryPolicy.of(flow), sleep=self.clock.sleep, monotonic=self.clock.monotonic, message_id=message_id)
        finally:
            self.metrics.inflight.dec()
        self._record(flow, result)
        return result

    def _record(self, flow: FlowConfig, result: SendResult) -> None:
        sends, duration, last_success = self.metrics.flow_series(flow.name)
        sends[result.outcome].inc()
        duration.observe(result.duration)
        if result.ok:
            last_success.set(time.time())
        event = log.info if result.ok else log.warning
        event("send_finished", flow=flow.name, method=flow.method, status=result.status, outcome=result.outcome,
              latency_ms=round(result.duration * 1000, 1), attempts=result.attempts,
              **{_snake(k): v for k, v in result.last.correlation.items()},
              **({"error": result.last.error} if result.last.error else {}),
              **({"message_id": result.message_id} if result.message_id else {}))
        for listener in self.listeners:
            listener(result)


def _snake(header: str) -> str:
    return header.lower().replace("-", "_")


def _token_metrics(metrics: Metrics) -> Callable[[float, Token | None, TokenError | None], None]:
    def observe(duration: float, token: Token | None, error: TokenError | None) -> None:
        metrics.token_fetch_duration.observe(duration)
        if token is not None:
            metrics.token_fetches.labels("success").inc()
            metrics.token_expiry.set(token.expires_at_wall)
        elif error is not None:
            metrics.token_fetches.labels("failure").inc()
            metrics.auth_failures.labels("token", error.reason).inc()

    return observe

