"""Structured logging: JSON lines (or a readable console form) with a redaction processor.

The redaction processor runs last before rendering, on every event: values under secret-sounding keys,
anything shaped like a JWT or a PEM private key, and every secret registered with `register_secret`
are replaced by `[REDACTED]`, wherever they appear in the event.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, Literal, TextIO

import structlog

REDACTED = "[REDACTED]"
LogFormat = Literal["json", "console", "auto"]

_SECRET_KEYS = re.compile(
    r"(secret|password|passphrase|private_?key|access_?token|authorization|^token$)", re.IGNORECASE
)
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*")
_PEM_KEY = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(-----END [A-Z ]*PRIVATE KEY-----|$)", re.DOTALL)
_BEARER = re.compile(r"(Bearer|Basic)\s+[A-Za-z0-9._~+/=-]+", re.IGNORECASE)

_known_secrets: set[str] = set()


def register_secret(value: str) -> None:
    """Redact this exact string wherever it would appear in a log line (short values are ignored)."""
    if len(value) >= 6:
        _known_secrets.add(value)


def redact_text(text: str) -> str:
    """`text` with tokens, private keys and registered secrets replaced."""
    text = _PEM_KEY.sub(REDACTED, text)
    text = _JWT.sub(REDACTED, text)
    text = _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    for secret in _known_secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def _redact_value(key: str, value: Any) -> Any:
    if _SECRET_KEYS.search(key) and value not in (None, "", 0, False):
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: _redact_value(str(k), v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact_value(key, v) for v in value]
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    return redact_text(repr(value))


_SAFE_KEYS = frozenset(
    {
        "exc_info",
        "event",
        "level",
        "timestamp",
        "component",
        "flow",
        "method",
        "outcome",
        "status",
        "latency_ms",
        "attempts",
        "reason",
        "result",
    }
)
"""Keys whose values senderd itself sets from its own vocabulary (names, codes, numbers): not scanned."""


def redact(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: scrub every value of the event (but the known-safe fields)."""
    for key, value in event.items():
        if key not in _SAFE_KEYS or not isinstance(value, (str, int, float, type(None))):
            event[key] = _redact_value(key, value)
    return event


def _scrub_exception(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    if "exception" in event and isinstance(event["exception"], str):
        event["exception"] = redact_text(event["exception"])
    return event


def configure_logging(level: str = "info", fmt: LogFormat = "auto", stream: TextIO | None = None) -> None:
    """Set structlog up for the process: JSON by default, console on a terminal or when asked."""
    stream = stream or sys.stdout
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=stream.isatty())
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact,
            structlog.processors.format_exc_info,
            _scrub_exception,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
