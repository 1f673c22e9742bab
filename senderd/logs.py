"""Structured logging: JSON lines (or a readable console form) with a redaction processor.

senderd keeps a logging pipeline of its own and never touches the host program's structlog or `logging`
configuration: as a library (`senderd.Client`) its events go to the standard `logging` logger "senderd"
(silent unless the host configures a handler); the CLI calls `configure_logging` to write JSON lines or
console lines to a stream instead.

The redaction processor runs last before rendering, on every event: values under secret-sounding keys,
anything shaped like a JWT or a PEM private key, and every secret registered with `register_secret`
are replaced by `[REDACTED]`, wherever they appear in the event.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import sys
import time
from collections.abc import Callable, MutableMapping
from typing import Any, Literal, TextIO

import structlog
from structlog.typing import Processor

REDACTED = "[REDACTED]"
LogFormat = Literal["json", "console", "auto"]
LEVELS = logging.getLevelNamesMapping()

_SECRET_KEYS = re.compile(
    r"(secret|password|passphrase|private_?key|access_?token|authorization|^token$|dsn)", re.IGNORECASE
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


def _flow_first(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Console lines read `event flow=... <the rest> component=...`, not in alphabetical order."""
    ordered: dict[str, Any] = {key: event[key] for key in ("timestamp", "level", "event", "flow") if key in event}
    ordered.update((key, value) for key, value in event.items() if key not in ordered and key != "component")
    if "component" in event:
        ordered["component"] = event["component"]
    return ordered


class _Sink:
    """Where rendered lines go: a stream (the CLI) or the standard `logging` logger "senderd" (a library)."""

    def __init__(self) -> None:
        self.stream: TextIO | None = None
        self.library = logging.getLogger("senderd")
        self.library.addHandler(logging.NullHandler())

    def _emit(self, level: int, message: str) -> None:
        stream = self.stream
        if stream is None:
            self.library.log(level, message)
            return
        stream.write(message + "\n")
        stream.flush()  # one line at a time, also into a pipe

    def debug(self, message: str) -> None:
        self._emit(logging.DEBUG, message)

    def info(self, message: str) -> None:
        self._emit(logging.INFO, message)

    def warning(self, message: str) -> None:
        self._emit(logging.WARNING, message)

    def error(self, message: str) -> None:
        self._emit(logging.ERROR, message)

    def critical(self, message: str) -> None:
        self._emit(logging.CRITICAL, message)

    msg = info
    exception = error
    warn = warning
    fatal = critical


class _State:
    level = logging.DEBUG
    """The library default lets `logging` decide; `configure_logging` sets the CLI's level."""


_SINK = _Sink()
_PROCESSORS: list[Processor] = []


def _filtered(method: str, level: int) -> Any:
    def log(self: SenderdLogger, event: str, **kw: Any) -> Any:
        if level < _State.level:
            return None
        return self._proxy_to_logger(method, event, **kw)

    log.__name__ = method
    return log


class SenderdLogger(structlog.BoundLoggerBase):
    """A bound logger on senderd's own pipeline; calls below the configured level cost one comparison."""

    debug = _filtered("debug", logging.DEBUG)
    info = _filtered("info", logging.INFO)
    warning = _filtered("warning", logging.WARNING)
    error = _filtered("error", logging.ERROR)
    critical = _filtered("critical", logging.CRITICAL)

    def exception(self, event: str, **kw: Any) -> Any:
        """An error with the current exception's traceback."""
        kw.setdefault("exc_info", True)
        return self.error(event, **kw)

    def is_enabled_for(self, level: int) -> bool:
        """True when a call at `level` would be written."""
        return level >= _State.level


def get_logger(component: str) -> SenderdLogger:
    """A logger for one part of senderd: every event carries `component`."""
    return structlog.wrap_logger(  # type: ignore[no-any-return]
        _SINK,
        processors=_PROCESSORS,
        wrapper_class=SenderdLogger,
        cache_logger_on_first_use=True,
        component=component,
    )


def _pipeline(renderer: Processor, *, console: bool) -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact,
        structlog.processors.format_exc_info,
        _scrub_exception,
        *([_flow_first] if console else []),
        renderer,
    ]


def _library_defaults() -> None:
    _State.level = logging.DEBUG
    _SINK.stream = None
    _PROCESSORS[:] = _pipeline(structlog.processors.JSONRenderer(), console=False)


_library_defaults()


def configure_logging(level: str = "info", fmt: LogFormat = "auto", stream: TextIO | None = None) -> None:
    """Write senderd's events to `stream` (stdout by default): JSON lines, or console lines on a terminal or
    when asked. Only senderd's own pipeline changes; the host's structlog and logging stay as they are."""
    stream = stream or sys.stdout
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    renderer: Processor = (
        structlog.dev.ConsoleRenderer(colors=stream.isatty(), sort_keys=False)
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    _State.level = LEVELS[level.upper()]
    _SINK.stream = stream
    _PROCESSORS[:] = _pipeline(renderer, console=fmt == "console")


class LoopErrors:
    """An asyncio exception handler that writes the loop's errors as structured events, at most one line per
    kind of error every `interval` seconds (the next one says how many were left out): at the file
    descriptor limit the loop reports every failed accept, hundreds of thousands of lines a minute."""

    def __init__(self, interval: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self._last: dict[str, float] = {}
        self._left_out: dict[str, int] = {}
        self._log = get_logger("loop")

    def __call__(self, _loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = str(context.get("message", "error in the event loop"))
        error = context.get("exception")
        kind = f"{message}|{type(error).__name__}|{getattr(error, 'errno', '')}"
        now = self.clock()
        if now - self._last.get(kind, -math.inf) < self.interval:
            self._left_out[kind] = self._left_out.get(kind, 0) + 1
            return
        self._last[kind] = now
        self._log.error(
            "event_loop_error",
            message=message,
            error=f"{type(error).__name__}: {error}" if error is not None else None,
            left_out_since_last=self._left_out.pop(kind, 0),
        )
