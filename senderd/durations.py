"""Durations as people write them in config ("500ms", "30s", "1m30s") and back again.

Every duration inside senderd is a float number of seconds; this module is the one place that turns
text into seconds (`parse_duration`, and `parse_retry_after` for the HTTP header) and seconds into text
(`format_duration`).
"""

from __future__ import annotations

import email.utils
import math
import re
from fractions import Fraction

from senderd.errors import ConfigError

__all__ = ["format_duration", "parse_duration", "parse_retry_after"]

# ASCII digits only: `\d` would also accept other scripts' digits, which float() happens to understand.
_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_BARE_NUMBER = re.compile(_NUMBER)
# Units largest first, each at most once: "1h30m", "1m30s", "1s500ms". `m(?!s)` keeps "5ms" out of minutes.
_WITH_UNITS = re.compile(
    rf"(?:(?P<h>{_NUMBER})h)?(?:(?P<m>{_NUMBER})m(?!s))?(?:(?P<s>{_NUMBER})s)?(?:(?P<ms>{_NUMBER})ms)?"
)
_UNIT_SECONDS = {"h": Fraction(3600), "m": Fraction(60), "s": Fraction(1), "ms": Fraction(1, 1000)}
_SHOWN_MAX = 60


def _shown(value: object) -> str:
    try:
        text = str(value)
    except ValueError:  # an int too long to print (sys.get_int_max_str_digits)
        text = "a number too large to show"
    return text[: _SHOWN_MAX - 3] + "..." if len(text) > _SHOWN_MAX else text


def _invalid(value: object) -> ConfigError:
    # repr() quotes the text and escapes control characters, so the message stays on one line.
    return ConfigError(f"invalid duration {_shown(value)!r}: use a number with a unit, e.g. 500ms, 30s, 5m, 1h")


def parse_duration(text: str | int | float) -> float:
    """Seconds in `text`: "500ms", "30s", "5m", "1h", "1m30s", "1.5s", or a plain number of seconds.

    Units are ms, s, m and h, largest first, each at most once. Raises `ConfigError` (one line, without
    the file and field, which the caller adds) for negatives, NaN, infinity, booleans and anything else.
    """
    if isinstance(text, bool):
        raise _invalid(text)
    if isinstance(text, int | float):
        try:
            seconds = float(text)
        except OverflowError:
            raise _invalid(text) from None
    elif isinstance(text, str):
        seconds = _parse_text(text.strip(), original=text)
    else:
        raise _invalid(text)
    if not math.isfinite(seconds):
        raise _invalid(text)
    if seconds < 0:
        raise ConfigError(f"invalid duration {_shown(text)!r}: a duration must be positive, e.g. 30s")
    return seconds + 0.0  # -0.0 becomes 0.0


def _parse_text(text: str, *, original: str) -> float:
    if text.startswith("-") and len(text) > 1:
        _parse_text(text[1:], original=original)  # a valid duration behind the sign: say what is wrong
        raise ConfigError(f"invalid duration {_shown(original)!r}: a duration must be positive, e.g. 30s")
    if _BARE_NUMBER.fullmatch(text):
        numbers = {"s": text}
    else:
        match = _WITH_UNITS.fullmatch(text)
        if match is None or not any(match.groups()):
            raise _invalid(original)
        numbers = {unit: number for unit, number in match.groupdict().items() if number}
    try:
        # Exact arithmetic, rounded once: "1m0.1s" is the float nearest 60.1, not 60 + 0.1's error.
        total = sum((Fraction(n) * _UNIT_SECONDS[unit] for unit, n in numbers.items()), Fraction(0))
        return float(total)
    except (ValueError, OverflowError):  # more digits than int() accepts, or beyond the float range
        raise _invalid(original) from None


def format_duration(seconds: float) -> str:
    """A compact form of `seconds` that `parse_duration` reads back: "500ms", "30s", "5m", "1h30m", "1.5s".

    Rounded to whole milliseconds; raises ValueError for negative or non-finite values.
    """
    if isinstance(seconds, bool) or not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"format_duration needs finite seconds >= 0, got {seconds!r}")
    total_ms = round(Fraction(seconds) * 1000)
    hours, rest = divmod(total_ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, millis = divmod(rest, 1000)
    parts = []
    if hours:
        parts.append(f"{hours}h")
    if minutes:
        parts.append(f"{minutes}m")
    if secs and millis:
        parts.append(f"{secs}.{millis:03d}".rstrip("0") + "s")
    elif secs:
        parts.append(f"{secs}s")
    elif millis:
        parts.append(f"{millis}ms")
    return "".join(parts) or "0s"


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """A `Retry-After` header (delay-seconds or an HTTP date) as seconds from `now` (Unix time), or None.

    Never negative; a value that is neither form (or not finite) is None, as if the header were absent.
    """
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return max(0.0, when.timestamp() - now)
