"""When flows fire: interval and cron schedules as pure functions of time.

Nothing here sleeps, reads a clock or does I/O; the scheduler passes the current monotonic and wall
times in and gets monotonic fire times back. Fire times are planned on the monotonic clock, fixed-rate:
the next fire follows from the previous *scheduled* fire, never from when the tick actually ran, so
lateness does not accumulate into drift.

Missed fires: a scheduler that falls behind by less than one period fires the late tick at once; one
that falls behind further (a stalled process, a suspended host) skips the fires it missed, resumes on
the schedule's own grid, and is told how many it skipped (`advance`), so it can count them.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from typing import Any, NamedTuple, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from senderd.errors import ConfigError

__all__ = [
    "MAX_COUNTED_SKIPS",
    "MIN_INTERVAL",
    "CronSchedule",
    "Fire",
    "IntervalSchedule",
    "Schedule",
    "advance",
    "spread_offset",
]

MIN_INTERVAL = 0.001
"""The shortest interval (1 ms); shorter ones vanish in the rounding of large monotonic times."""

MAX_COUNTED_SKIPS = 10_000
"""A cron schedule counts skipped fires one by one up to this many, then reports this number."""


class Fire(NamedTuple):
    """The next fire of a schedule and how many scheduled fires were skipped to reach it."""

    at: float
    """Monotonic time of the next fire; it may be at or before "now", meaning "fire at once"."""
    skipped: int
    """Scheduled fires between the previous fire and `at` that were passed over because it was late."""


class Schedule(Protocol):
    """A schedule maps times to monotonic fire times; it never sleeps and never reads a clock."""

    def first_fire(self, now_mono: float, now_wall: float, *, offset: float) -> float:
        """Monotonic time of the first fire after start-up at (`now_mono`, `now_wall`)."""
        ...

    def next_fire(self, previous_fire_mono: float, now_mono: float, now_wall: float) -> float:
        """Monotonic time of the fire after the one scheduled at `previous_fire_mono`."""
        ...

    def advance(self, previous_fire_mono: float, now_mono: float, now_wall: float) -> Fire:
        """Like `next_fire`, and also how many fires were skipped because the caller was late."""
        ...


def advance(schedule: Schedule, previous_fire_mono: float, now_mono: float, now_wall: float) -> Fire:
    """The fire after `previous_fire_mono` and the number of fires skipped: `(at, skipped)`."""
    return schedule.advance(previous_fire_mono, now_mono, now_wall)


@dataclass(frozen=True)
class IntervalSchedule:
    """Fire every `every` seconds, fixed-rate on the monotonic clock."""

    every: float

    def __post_init__(self) -> None:
        every = self.every
        number = not isinstance(every, bool) and isinstance(every, int | float)
        if not number or not math.isfinite(every) or every < MIN_INTERVAL:
            raise ConfigError(f"invalid interval {every!r}: use a duration of at least 1ms, e.g. 30s or 5m")

    def first_fire(self, now_mono: float, now_wall: float, *, offset: float = 0.0) -> float:
        """`now_mono + offset`; `offset` in [0, every) spreads flows over the interval (`spread_offset`)."""
        if not 0.0 <= offset < self.every:
            raise ValueError(f"offset must be in [0, {self.every}), got {offset!r}")
        return now_mono + offset

    def next_fire(self, previous_fire_mono: float, now_mono: float, now_wall: float) -> float:
        """`previous_fire_mono + every`, unless more than one period late (see `advance`)."""
        return self.advance(previous_fire_mono, now_mono, now_wall).at

    def advance(self, previous_fire_mono: float, now_mono: float, now_wall: float) -> Fire:
        """`previous + every`; if that is a full period or more behind `now_mono`, the first grid point
        `previous + k*every` at or after `now_mono` instead, with the k-1 fires before it skipped."""
        every = self.every
        following = previous_fire_mono + every
        if following > now_mono - every:
            return Fire(following, 0)
        k = math.ceil((now_mono - previous_fire_mono) / every)
        # Correct the division's rounding: k is the smallest count that reaches now_mono.
        while k > 2 and previous_fire_mono + (k - 1) * every >= now_mono:
            k -= 1
        while previous_fire_mono + k * every < now_mono:
            k += 1
        return Fire(previous_fire_mono + k * every, k - 1)


# Cron fields have minute resolution. A previous fire maps back to the wall clock through the current
# mono-to-wall offset, which can be off by a little (an early wake-up, NTP slewing); looking for the next
# cron time from half a minute after it finds the right one as long as that error stays below 30 s.
_SLACK = 30.0
_FIELDS = (
    ("minute", "0-59"),
    ("hour", "0-23"),
    ("day-of-month", "1-31 or L"),
    ("month", "1-12 or jan-dec"),
    ("day-of-week", "0-7 or sun-sat"),
)
_PROBE_START = datetime(2001, 1, 1, tzinfo=UTC)


def _croniter() -> Any:
    """croniter, imported on first use: a daemon without cron flows does not carry it."""
    from croniter import croniter

    return croniter


# What croniter raises for expressions it cannot read; its own errors are ValueErrors.
_CRONITER_ERRORS = (ValueError, TypeError, KeyError, IndexError, OverflowError)


def _cron_error(expression: str, reason: str) -> ConfigError:
    return ConfigError(f"invalid cron expression {expression!r}: {reason}; use 5 fields, e.g. */5 * * * *")


def _cron_reason(fields: list[str], exc: Exception) -> str:
    """A short reason: which field is wrong, or croniter's own first line when no single field is."""
    for index, (name, allowed) in enumerate(_FIELDS):
        alone = " ".join(value if i == index else "*" for i, value in enumerate(fields))
        try:
            _croniter()(alone, _PROBE_START)
        except _CRONITER_ERRORS:
            return f"bad {name} field {fields[index]!r} (allowed: {allowed})"
    if "find next date" in str(exc) or "find prev date" in str(exc):
        return "it matches no date"
    detail = str(exc).strip().splitlines()
    return detail[0][:80] if detail else type(exc).__name__


@dataclass(frozen=True)
class CronSchedule:
    """Fire at the times a 5-field cron `expression` names on the wall clock of `timezone`.

    Validated on construction. Across daylight-saving changes: a time skipped by the spring jump fires
    at the first minute after the jump; a time that occurs twice in autumn fires once (its first
    occurrence), except for jobs whose minute or hour field starts with `*` (e.g. `*/5 * * * *`,
    `0 * * * *`), which keep firing through the repeated hour at their real-time pace.
    """

    expression: str
    timezone: str = "UTC"
    _zone: tzinfo = field(init=False, repr=False, compare=False)
    _cron: str = field(init=False, repr=False, compare=False)
    _repeats_in_fold: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        expression = self.expression
        if not isinstance(expression, str):
            raise _cron_error(str(expression), "not a string")
        fields = expression.split()
        if len(fields) != len(_FIELDS):
            raise _cron_error(expression, f"expected 5 fields, got {len(fields)}")
        cron = " ".join(fields)
        try:
            _croniter()(cron, _PROBE_START).get_next(float)
        except _CRONITER_ERRORS as exc:
            raise _cron_error(expression, _cron_reason(fields, exc)) from None
        object.__setattr__(self, "_cron", cron)
        object.__setattr__(self, "_repeats_in_fold", fields[0].startswith("*") or fields[1].startswith("*"))
        object.__setattr__(self, "_zone", _load_zone(self.timezone))

    def first_fire(self, now_mono: float, now_wall: float, *, offset: float = 0.0) -> float:
        """The first cron time after `now_wall`, on the monotonic clock. `offset` is ignored: cron
        times are absolute, and spreading them would move them off the times the user asked for."""
        return now_mono + (next(self._walls_after(now_wall)) - now_wall)

    def next_fire(self, previous_fire_mono: float, now_mono: float, now_wall: float) -> float:
        """The cron time after the previous fire, unless more than one period late (see `advance`)."""
        return self.advance(previous_fire_mono, now_mono, now_wall).at

    def advance(self, previous_fire_mono: float, now_mono: float, now_wall: float) -> Fire:
        """The cron time after the previous fire; if the one after that has also come, the first cron
        time at or after `now_wall` instead, with the ones before it skipped.

        Cron times are found on the wall clock in the schedule's zone and mapped to the monotonic clock
        by the current offset between them: `mono = now_mono + (wall - now_wall)`.
        """
        previous_wall = now_wall - (now_mono - previous_fire_mono)
        walls = self._walls_after(previous_wall + _SLACK)
        following = next(walls)
        after = next(walls)
        if after > now_wall:  # on time, or less than one period late: fire the late one
            return Fire(now_mono + (following - now_wall), 0)
        skipped = 1
        while after < now_wall and skipped < MAX_COUNTED_SKIPS:
            after = next(walls)
            skipped += 1
        if after < now_wall:  # too many to count one by one: the first cron time at or after now_wall
            after = next(self._walls_after(math.ceil(now_wall) - 1.0))
        return Fire(now_mono + (after - now_wall), skipped)

    def _walls_after(self, wall: float) -> Iterator[float]:
        """The cron times strictly after `wall` (Unix seconds), in order, as Unix seconds."""
        it = _croniter()(self._cron, datetime.fromtimestamp(wall, self._zone))
        while True:
            candidate = it.get_next(float)
            if self._repeats_in_fold or not _second_occurrence(candidate, self._zone):
                yield candidate


def _load_zone(name: str) -> tzinfo:
    if isinstance(name, str) and name:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a folder such as "Europe"
            pass
    raise ConfigError(f"unknown time zone {str(name)!r}: use an IANA name such as Europe/Berlin")


def _second_occurrence(wall: float, zone: tzinfo) -> bool:
    """Whether `wall` is the second time its local clock reading occurs (autumn's repeated hour)."""
    local = datetime.fromtimestamp(wall, zone)
    return local.fold == 1 and local.replace(fold=0).utcoffset() != local.utcoffset()


def spread_offset(name: str, every: float) -> float:
    """A stable offset in [0, every) for the flow `name`, so flows sharing an interval do not all fire
    together. Derived from SHA-256 of the name: the same on every run and every machine."""
    if not math.isfinite(every) or every <= 0:
        raise ValueError(f"every must be a positive number of seconds, got {every!r}")
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).digest()
    fraction = (int.from_bytes(digest[:8], "big") >> 11) / (1 << 53)  # uniform in [0, 1), exact
    offset = fraction * every
    return offset if offset < every else math.nextafter(every, 0.0)
