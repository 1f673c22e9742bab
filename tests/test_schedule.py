"""Schedules driven by explicit fake times: fixed-rate intervals, skipped fires, spreading, cron and DST."""

from __future__ import annotations

import math
import random
from collections import Counter
from datetime import UTC, datetime
from itertools import pairwise
from typing import Any, cast
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from senderd.errors import ConfigError
from senderd.schedule import (
    CronSchedule,
    Fire,
    IntervalSchedule,
    Schedule,
    advance,
    spread_offset,
)

BERLIN = ZoneInfo("Europe/Berlin")
MONO0 = 1000.0


def utc(text: str) -> float:
    """Unix seconds of an ISO time written in UTC."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def berlin(wall: float) -> str:
    """A Unix time as Berlin local time, with the zone's abbreviation (CET/CEST)."""
    return datetime.fromtimestamp(wall, BERLIN).strftime("%Y-%m-%d %H:%M %Z")


class Times:
    """A fake pair of clocks: wall = mono + offset, as on a host whose wall clock does not jump."""

    def __init__(self, wall_at_mono0: float) -> None:
        self.offset = wall_at_mono0 - MONO0

    def wall(self, mono: float) -> float:
        return mono + self.offset

    def mono(self, wall: float) -> float:
        return wall - self.offset


def test_both_schedules_satisfy_the_protocol() -> None:
    schedules: list[Schedule] = [IntervalSchedule(5.0), CronSchedule("*/5 * * * *")]
    assert len(schedules) == 2


# --- intervals -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("every", [0.1, 1 / 3, 7.3, 60.0])
def test_interval_has_no_drift_over_1000_fires(every: float) -> None:
    schedule = IntervalSchedule(every)
    jitter = random.Random(42)  # fixed seed: the scheduler wakes up a little late, differently each time
    start = schedule.first_fire(12_345.678, 0.0, offset=0.0)
    previous = start
    for n in range(1, 1001):
        now = previous + jitter.uniform(0.0, 0.9) * every  # late, but by less than one period
        fire = schedule.advance(previous, now, now + 1.7e9)
        assert fire == Fire(previous + every, 0)  # exactly previous + every: lateness is not carried over
        assert schedule.next_fire(previous, now, now + 1.7e9) == fire.at
        assert math.isclose(fire.at, start + n * every, rel_tol=0.0, abs_tol=1e-8)  # float rounding only
        previous = fire.at


def test_interval_late_by_three_and_a_half_periods_skips_three_and_stays_on_the_grid() -> None:
    schedule = IntervalSchedule(10.0)
    fire = advance(schedule, 1000.0, 1035.0, 1.7e9)
    assert fire == Fire(1040.0, 3)
    at, skipped = fire  # a plain (next, skipped) pair as well
    assert (at, skipped) == (1040.0, 3)
    assert schedule.next_fire(1000.0, 1035.0, 1.7e9) == 1040.0
    # ... and the following fires continue on the same grid.
    assert schedule.advance(1040.0, 1040.2, 1.7e9) == Fire(1050.0, 0)


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (1000.0, Fire(1010.0, 0)),  # just fired
        (1010.0, Fire(1010.0, 0)),  # due now
        (1015.0, Fire(1010.0, 0)),  # half a period late: fire the late tick at once
        (1019.999, Fire(1010.0, 0)),  # almost a full period late: still fire it
        (1020.0, Fire(1020.0, 1)),  # a full period late: skip 1010, 1020 is due now
        (1020.001, Fire(1030.0, 2)),
        (1035.0, Fire(1040.0, 3)),
        (1000.0 + 10.0 * 1_000_000 + 5, Fire(1000.0 + 10.0 * 1_000_001, 1_000_000)),
    ],
)
def test_interval_lateness(now: float, expected: Fire) -> None:
    assert IntervalSchedule(10.0).advance(1000.0, now, 0.0) == expected


@settings(max_examples=300)
@given(
    previous=st.floats(min_value=0.0, max_value=1e7),
    every=st.floats(min_value=0.001, max_value=1e5),
    late=st.floats(min_value=0.0, max_value=1e4),
)
def test_interval_skips_exactly_the_fires_already_past(previous: float, every: float, late: float) -> None:
    now = previous + late * every
    at, skipped = IntervalSchedule(every).advance(previous, now, 0.0)
    assert skipped >= 0
    assert math.isclose(at, previous + (skipped + 1) * every, rel_tol=1e-12)  # on the grid
    if skipped == 0:
        assert at == previous + every
    else:
        assert previous + skipped * every < now <= at  # every fire before now skipped, none after


def test_interval_first_fire_is_now_plus_offset() -> None:
    schedule = IntervalSchedule(60.0)
    assert schedule.first_fire(500.0, 1.7e9, offset=12.5) == 512.5
    assert schedule.first_fire(500.0, 1.7e9, offset=0.0) == 500.0
    for bad in (-0.1, 60.0, math.nan):
        with pytest.raises(ValueError, match=r"offset must be in \[0, 60.0\)"):
            schedule.first_fire(500.0, 1.7e9, offset=bad)


@pytest.mark.parametrize(
    ("every", "shown"),
    [
        (0.0, "0.0"),
        (-5.0, "-5.0"),
        (0.0005, "0.0005"),
        (math.nan, "nan"),
        (math.inf, "inf"),
        (cast(Any, True), "True"),
        (cast(Any, "5s"), "'5s'"),
    ],
)
def test_interval_rejects_bad_periods(every: float, shown: str) -> None:
    with pytest.raises(ConfigError) as caught:
        IntervalSchedule(every)
    assert str(caught.value) == f"invalid interval {shown}: use a duration of at least 1ms, e.g. 30s or 5m"


def test_spread_offset_is_stable() -> None:
    # Pinned: a change here moves every deployed flow's fire times.
    assert spread_offset("orders", 60.0) == spread_offset("orders", 60.0)
    assert spread_offset("orders", 60.0) == 6.583138187460669
    assert spread_offset("orders", 60.0) != spread_offset("invoices", 60.0)
    assert spread_offset("orders", 120.0) == pytest.approx(2 * spread_offset("orders", 60.0))


def test_spread_offsets_are_in_range_and_roughly_uniform() -> None:
    every = 30.0
    names = [f"flow-{i}" for i in range(10_000)]
    offsets = [spread_offset(name, every) for name in names]
    assert all(0.0 <= offset < every for offset in offsets)
    buckets = Counter(int(offset / every * 10) for offset in offsets)
    assert sorted(buckets) == list(range(10))
    assert all(850 <= count <= 1150 for count in buckets.values()), buckets


@given(name=st.text(), every=st.floats(min_value=1e-3, max_value=1e9))
def test_spread_offset_is_always_in_range(name: str, every: float) -> None:
    assert 0.0 <= spread_offset(name, every) < every


def test_spread_offset_rejects_bad_periods() -> None:
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="every must be a positive number of seconds"):
            spread_offset("orders", bad)


# --- cron ----------------------------------------------------------------------------------------------


def test_cron_every_five_minutes() -> None:
    times = Times(utc("2026-01-15T10:02:30"))
    schedule = CronSchedule("*/5 * * * *")
    first = schedule.first_fire(MONO0, times.wall(MONO0), offset=0.0)
    assert first == times.mono(utc("2026-01-15T10:05:00")) == MONO0 + 150.0
    fires = [first]
    for _ in range(4):
        now = fires[-1] + 0.25  # the scheduler runs the tick a little after it was due
        fires.append(schedule.next_fire(fires[-1], now, times.wall(now)))
    assert [times.wall(f) for f in fires] == [
        utc(f"2026-01-15T10:{minute}:00") for minute in ("05", "10", "15", "20", "25")
    ]


def test_cron_first_fire_is_strictly_after_now_and_ignores_offset() -> None:
    times = Times(utc("2026-01-15T10:05:00"))
    schedule = CronSchedule("*/5 * * * *")
    assert times.wall(schedule.first_fire(MONO0, times.wall(MONO0), offset=0.0)) == utc("2026-01-15T10:10:00")
    assert schedule.first_fire(MONO0, times.wall(MONO0), offset=3.0) == MONO0 + 300.0


def test_cron_maps_wall_times_through_the_current_offset() -> None:
    # The monotonic clock has its own origin; only the difference to the wall time matters.
    schedule = CronSchedule("0 * * * *")
    wall = utc("2026-01-15T10:59:00")
    assert schedule.first_fire(5.0, wall, offset=0.0) == 65.0
    assert schedule.first_fire(1e6, wall, offset=0.0) == 1e6 + 60.0


def test_cron_tolerates_a_previous_fire_that_maps_back_slightly_early() -> None:
    # The mono/wall offset moved (NTP slewing, an early wake-up): the previous 10:05 fire now maps to
    # 10:04:59.9 or 10:05:20. Either way the next fire is 10:10, not 10:05 again or 10:15.
    schedule = CronSchedule("*/5 * * * *")
    now_wall = utc("2026-01-15T10:05:01")
    for error in (-0.1, -20.0, 0.1, 20.0):
        previous = MONO0 - 1.0 + error
        fire = schedule.advance(previous, MONO0, now_wall)
        assert fire == Fire(MONO0 + 299.0, 0)


@pytest.mark.parametrize(
    ("now", "expected_wall", "skipped"),
    [
        ("10:05:00.5", "10:10", 0),
        ("10:12:00", "10:10", 0),  # late by less than a period: fire the 10:10 tick at once
        ("10:15:00", "10:15", 1),  # a full period late: 10:10 skipped, 10:15 due now
        ("10:23:00", "10:25", 3),  # 10:10, 10:15, 10:20 skipped
    ],
)
def test_cron_lateness(now: str, expected_wall: str, skipped: int) -> None:
    times = Times(utc("2026-01-15T10:05:00"))  # the previous fire was at MONO0 = 10:05
    schedule = CronSchedule("*/5 * * * *")
    now_mono = times.mono(utc(f"2026-01-15T{now}"))
    at, count = advance(schedule, MONO0, now_mono, times.wall(now_mono))
    assert times.wall(at) == utc(f"2026-01-15T{expected_wall}:00")
    assert count == skipped


def test_cron_counts_many_skipped_fires_up_to_a_cap() -> None:
    times = Times(utc("2026-01-01T00:00:00"))
    schedule = CronSchedule("* * * * *")
    week = 7 * 86400.0
    at, skipped = schedule.advance(MONO0, MONO0 + week + 30, times.wall(MONO0 + week + 30))
    assert times.wall(at) == utc("2026-01-08T00:01:00")
    assert skipped == 10_000  # 10080 were missed; counting stops at MAX_COUNTED_SKIPS


def berlin_fires(expression: str, start: float, count: int) -> list[float]:
    """`count` consecutive fires (as wall times) of `expression` in Berlin, from the wall time `start`."""
    times = Times(start)
    schedule = CronSchedule(expression, timezone="Europe/Berlin")
    fires = [schedule.first_fire(MONO0, times.wall(MONO0), offset=0.0)]
    while len(fires) < count:
        now = fires[-1] + 0.01
        fires.append(schedule.next_fire(fires[-1], now, times.wall(now)))
    return [times.wall(f) for f in fires]


def test_cron_dst_spring_forward_fires_the_missing_time_once_after_the_jump() -> None:
    # 2026-03-29: at 02:00 CET Berlin jumps to 03:00 CEST; 02:30 does not exist that night.
    fires = berlin_fires("30 2 * * *", utc("2026-03-27T12:00:00"), 4)
    assert [berlin(f) for f in fires] == [
        "2026-03-28 02:30 CET",
        "2026-03-29 03:00 CEST",
        "2026-03-30 02:30 CEST",
        "2026-03-31 02:30 CEST",
    ]


def test_cron_dst_fall_back_fires_a_fixed_time_once() -> None:
    # 2026-10-25: at 03:00 CEST Berlin goes back to 02:00 CET; 02:30 happens twice that night.
    fires = berlin_fires("30 2 * * *", utc("2026-10-23T12:00:00"), 4)
    assert [berlin(f) for f in fires] == [
        "2026-10-24 02:30 CEST",
        "2026-10-25 02:30 CEST",
        "2026-10-26 02:30 CET",
        "2026-10-27 02:30 CET",
    ]
    assert [b - a for a, b in pairwise(fires)] == [86400.0, 90000.0, 86400.0]


def test_cron_dst_fall_back_keeps_wildcard_hours_running_in_real_time() -> None:
    fires = berlin_fires("0 * * * *", utc("2026-10-24T22:30:00"), 5)
    assert [berlin(f) for f in fires] == [
        "2026-10-25 01:00 CEST",
        "2026-10-25 02:00 CEST",
        "2026-10-25 02:00 CET",
        "2026-10-25 03:00 CET",
        "2026-10-25 04:00 CET",
    ]
    assert {b - a for a, b in pairwise(fires)} == {3600.0}


def test_cron_dst_fall_back_fixed_minutes_in_the_repeated_hour_fire_once() -> None:
    fires = berlin_fires("15,45 2 * * *", utc("2026-10-24T12:00:00"), 4)
    assert [berlin(f) for f in fires] == [
        "2026-10-25 02:15 CEST",
        "2026-10-25 02:45 CEST",
        "2026-10-26 02:15 CET",
        "2026-10-26 02:45 CET",
    ]


@settings(max_examples=60, deadline=None)
@given(
    expression=st.sampled_from(["30 2 * * *", "0 * * * *", "*/7 * * * *", "*/30 1-4 * * *", "59 1 * * 0"]),
    start=st.floats(min_value=utc("2026-03-28T20:00:00"), max_value=utc("2026-03-29T04:00:00"))
    | st.floats(min_value=utc("2026-10-24T20:00:00"), max_value=utc("2026-10-25T04:00:00")),
)
def test_cron_fires_strictly_increase_across_dst(expression: str, start: float) -> None:
    fires = berlin_fires(expression, start, 6)
    assert all(b > a for a, b in pairwise(fires))
    assert fires[0] > start - 1e-6


@pytest.mark.parametrize(
    ("expression", "reason"),
    [
        ("*/5 * * *", "expected 5 fields, got 4"),
        ("", "expected 5 fields, got 0"),
        ("@hourly", "expected 5 fields, got 1"),
        ("0 */5 * * * *", "expected 5 fields, got 6"),
        ("61 * * * *", "bad minute field '61' (allowed: 0-59)"),
        ("*/0 * * * *", "bad minute field '*/0' (allowed: 0-59)"),
        ("H * * * *", "bad minute field 'H' (allowed: 0-59)"),
        ("0 24 * * *", "bad hour field '24' (allowed: 0-23)"),
        ("0 0 0 * *", "bad day-of-month field '0' (allowed: 1-31 or L)"),
        ("0 0 * 13 *", "bad month field '13' (allowed: 1-12 or jan-dec)"),
        ("0 0 * foo *", "bad month field 'foo' (allowed: 1-12 or jan-dec)"),
        ("0 0 * * 8", "bad day-of-week field '8' (allowed: 0-7 or sun-sat)"),
        ("0 0 * * 1#6", "bad day-of-week field '1#6' (allowed: 0-7 or sun-sat)"),
        ("0 0 31 2 *", "it matches no date"),
        ("0 0 30 2 *", "it matches no date"),
    ],
)
def test_cron_invalid_expressions_with_exact_messages(expression: str, reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        CronSchedule(expression)
    assert str(caught.value) == (f"invalid cron expression {expression!r}: {reason}; use 5 fields, e.g. */5 * * * *")


@pytest.mark.parametrize(
    "zone", ["Mars/Olympus", "", "Europe", "europe/berlin", "../etc/passwd", "/etc/localtime", "Europe/Berlin "]
)
def test_cron_unknown_time_zones_with_exact_messages(zone: str) -> None:
    with pytest.raises(ConfigError) as caught:
        CronSchedule("*/5 * * * *", timezone=zone)
    assert str(caught.value) == f"unknown time zone {zone!r}: use an IANA name such as Europe/Berlin"


def test_cron_valid_forms() -> None:
    for expression in ("0 0 29 2 *", "0 9 * * mon-fri", "0 0 L * *", "0 0 * * 1#2", " 5  4 * * * "):
        assert CronSchedule(expression, timezone="America/New_York").expression == expression
    assert CronSchedule("0 0 * * *") == CronSchedule("0 0 * * *", timezone="UTC")


def _cron_field(low: int, high: int, *names: str) -> st.SearchStrategy[str]:
    """Mostly valid values of one cron field: numbers in range, names, ranges, steps and lists."""
    number = st.integers(min_value=low, max_value=high).map(str)
    atom = st.one_of(number, st.just("*"), st.sampled_from(names))
    part = st.one_of(
        atom,
        st.tuples(atom, atom).map("-".join),
        st.tuples(atom, st.integers(min_value=0, max_value=20)).map(lambda pair: f"{pair[0]}/{pair[1]}"),
    )
    return st.lists(part, min_size=1, max_size=3).map(",".join)


_CRON_FIELDS = st.tuples(
    _cron_field(0, 59, "0"),
    _cron_field(0, 23, "0"),
    _cron_field(1, 31, "L", "15W", "LW", "?"),
    _cron_field(1, 12, "jan", "Dec"),
    _cron_field(0, 7, "mon", "SUN", "1#2", "5#5", "5L", "?"),
)
_JUNK = st.one_of(
    st.text(alphabet="0123456789*/-,#?LWH" + "janfebmonsu", min_size=1, max_size=6),
    st.integers(min_value=-5, max_value=100).map(str),
)


@st.composite
def _cron_expressions(draw: st.DrawFn) -> str:
    """Five fields, mostly valid, one of them sometimes replaced by junk."""
    fields = list(draw(_CRON_FIELDS))
    index = draw(st.integers(min_value=0, max_value=5))
    if index < 5:
        fields[index] = draw(_JUNK)
    return " ".join(fields)


@settings(max_examples=400, deadline=None)
@given(
    expression=st.one_of(
        _cron_expressions(),
        st.text(max_size=30),
    ),
    wall=st.floats(min_value=utc("2000-01-01T00:00:00"), max_value=utc("2060-01-01T00:00:00")),
)
def test_cron_random_expressions_raise_only_config_error(expression: str, wall: float) -> None:
    try:
        schedule = CronSchedule(expression, timezone="Europe/Berlin")
    except ConfigError as exc:
        message = str(exc)
        assert "\n" not in message
        assert message.startswith("invalid cron expression ")
        return
    # A schedule that constructs also computes fire times.
    first = schedule.first_fire(MONO0, wall, offset=0.0)
    assert first > MONO0
    following = schedule.next_fire(first, first, wall + (first - MONO0))
    assert following > first
