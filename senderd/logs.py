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
import functools
import json
import logging
import math
import re
import sys
import time
from collections.abc import Callable, MutableMapping
from typing import Any, Literal, TextIO

import structlog
from structlog.typing import Processor

try:  # an optional extra (`senderd[fast]`): a sixth of the encoder's cost, the same lines
    import orjson
except ImportError:  # pragma: no cover - the stdlib encoder writes the same text
    orjson = None  # type: ignore[assignment]

REDACTED = "[REDACTED]"
LogFormat = Literal["json", "console", "auto"]
LEVELS = logging.getLevelNamesMapping()

_SECRET_KEYS = re.compile(
    r"(secret|password|passphrase|private_?key|access_?token|authorization|^token$|dsn)", re.IGNORECASE
)
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*")
_PEM_KEY = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(-----END [A-Z ]*PRIVATE KEY-----|$)", re.DOTALL)
_BEARER = re.compile(r"(Bearer|Basic)\s+[A-Za-z0-9._~+/=-]+", re.IGNORECASE)

_TRIGGER = re.compile(r"eyJ|-----BEGIN|bearer|basic", re.IGNORECASE)
"""What every shape above starts with: text without it needs none of the three substitutions (most text)."""

_known_secrets: set[str] = set()
_secrets_pattern: re.Pattern[str] | None = None


def register_secret(value: str) -> None:
    """Redact this exact string wherever it would appear in a log line (short values are ignored)."""
    global _secrets_pattern
    if len(value) >= 6 and value not in _known_secrets:
        _known_secrets.add(value)
        alternatives = sorted(_known_secrets, key=len, reverse=True)  # a longer secret before its prefix
        _secrets_pattern = re.compile("|".join(re.escape(secret) for secret in alternatives))


def redact_text(text: str) -> str:
    """`text` with tokens, private keys and registered secrets replaced."""
    if _TRIGGER.search(text) is not None:
        text = _PEM_KEY.sub(REDACTED, text)
        text = _JWT.sub(REDACTED, text)
        text = _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    if _secrets_pattern is not None:
        text = _secrets_pattern.sub(REDACTED, text)
    return text


@functools.lru_cache(maxsize=1024)
def _secret_key(key: str) -> bool:
    """Whether a value under `key` is a secret by its name alone (keys repeat: asked once each)."""
    return _SECRET_KEYS.search(key) is not None


def _redact_value(key: str, value: Any) -> Any:
    if _secret_key(key) and value not in (None, "", 0, False):
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


_PLAIN = (int, float, bool, type(None))


def redact(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: scrub every value of the event (but the known-safe fields)."""
    for key in event.keys() - _SAFE_KEYS:  # in C: most events have no other key
        value = event[key]
        kind = type(value)
        if kind is str:
            event[key] = REDACTED if value and _secret_key(key) else redact_text(value)
        elif kind in _PLAIN:
            if value not in (None, 0, False) and _secret_key(key):
                event[key] = REDACTED
        else:
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
        # structlog's `_proxy_to_logger` without its generality (every processor here returns the event, the
        # renderer a str, none drops): the same event, the same chain, the line straight to the sink
        event_dict: Any = self._context.copy()
        event_dict.update(kw)
        event_dict["event"] = event
        for processor in self._processors:
            event_dict = processor(_SINK, method, event_dict)
        _SINK._emit(level, event_dict)
        return None

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
    """A logger for one part of senderd: every event carries `component`. The logger itself, not structlog's
    lazy proxy (whose attribute lookups cost on every call): `_PROCESSORS` is changed in place, so a
    logger made before `configure_logging` follows it."""
    return structlog.wrap_logger(  # type: ignore[no-any-return]
        _SINK,
        processors=_PROCESSORS,
        wrapper_class=SenderdLogger,
        component=component,
    ).bind()


class _Timestamp:
    """`timestamp`: ISO 8601 UTC with microseconds, as structlog's TimeStamper writes it, with the part up to
    the second formatted once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, _logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second, self._prefix = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        event["timestamp"] = f"{self._prefix}.{int((now - second) * 1_000_000):06d}Z"
        return event


_ENCODER = json.JSONEncoder(default=repr, separators=(",", ":"))
"""One encoder for every line (json.dumps builds one per call), compact as orjson writes."""
_ORJSON_OPTIONS = 0 if orjson is None else orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME
"""Dataclasses and datetimes go to `default=repr`, as with the stdlib encoder."""


def _render_json(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> str:
    if orjson is not None:
        try:
            line = orjson.dumps(event, default=repr, option=_ORJSON_OPTIONS)
        except (orjson.JSONEncodeError, TypeError):  # a non-str key, an int beyond 64 bits: the stdlib takes it
            pass
        else:
            if line.isascii():  # else the stdlib's \u escapes (a line safe on any stream encoding)
                return line.decode()
    return _ENCODER.encode(event)


def _console_pipeline(renderer: Processor) -> list[Processor]:
    return [
        structlog.processors.add_log_level,
        _Timestamp(),
        redact,
        structlog.processors.format_exc_info,
        _scrub_exception,
        _flow_first,
        renderer,
    ]


class _JsonLine:
    """The JSON pipeline in one processor: the same steps as the console one (level, timestamp, redaction,
    the traceback, redacted too) and the line, without a call per step (a line per send)."""

    def __init__(self) -> None:
        self._timestamp = _Timestamp()

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
        event["level"] = "warning" if method == "warn" else method
        self._timestamp(logger, method, event)
        redact(logger, method, event)
        if "exc_info" in event:
            event = _scrub_exception(logger, method, structlog.processors.format_exc_info(logger, method, event))
        return _render_json(logger, method, event)


def _library_defaults() -> None:
    _State.level = logging.DEBUG
    _SINK.stream = None
    _PROCESSORS[:] = [_JsonLine()]


_library_defaults()


def configure_logging(level: str = "info", fmt: LogFormat = "auto", stream: TextIO | None = None) -> None:
    """Write senderd's events to `stream` (stdout by default): JSON lines, or console lines on a terminal or
    when asked. Only senderd's own pipeline changes; the host's structlog and logging stay as they are."""
    stream = stream or sys.stdout
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    _State.level = LEVELS[level.upper()]
    _SINK.stream = stream
    if fmt == "console":
        _PROCESSORS[:] = _console_pipeline(structlog.dev.ConsoleRenderer(colors=stream.isatty(), sort_keys=False))
    else:
        _PROCESSORS[:] = [_JsonLine()]


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
