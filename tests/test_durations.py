"""Durations: what parse_duration accepts, exactly what it says when it refuses, and round trips."""

from __future__ import annotations

import math
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from senderd.durations import format_duration, parse_duration
from senderd.errors import ConfigError

HINT = "use a number with a unit, e.g. 500ms, 30s, 5m, 1h"
POSITIVE = "a duration must be positive, e.g. 30s"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1m30s", 90.0),
        ("1h30m", 5400.0),
        ("1h2m3s4ms", 3723.004),
        ("1s500ms", 1.5),
        ("1h1ms", 3600.001),
        ("1.5s", 1.5),
        ("0.25h", 900.0),
        (".5s", 0.5),
        ("2.m", 120.0),
        ("1m0.1s", 60.1),
        ("0.1ms", 0.0001),
        ("0", 0.0),
        ("0s", 0.0),
        ("10", 10.0),
        ("2.5", 2.5),
        (" 45s\n", 45.0),
        (7, 7.0),
        (0, 0.0),
        (2.5, 2.5),
        (-0.0, 0.0),
    ],
)
def test_valid(text: str | int | float, seconds: float) -> None:
    result = parse_duration(text)
    assert type(result) is float
    assert result == seconds
    assert math.copysign(1.0, result) == 1.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", f"invalid duration '': {HINT}"),
        ("   ", f"invalid duration '   ': {HINT}"),
        ("s", f"invalid duration 's': {HINT}"),
        ("ms", f"invalid duration 'ms': {HINT}"),
        (".s", f"invalid duration '.s': {HINT}"),
        ("1d", f"invalid duration '1d': {HINT}"),
        ("5M", f"invalid duration '5M': {HINT}"),
        ("5sec", f"invalid duration '5sec': {HINT}"),
        ("-5s", f"invalid duration '-5s': {POSITIVE}"),
        ("-1", f"invalid duration '-1': {POSITIVE}"),
        ("-x", f"invalid duration '-x': {HINT}"),
        ("+1s", f"invalid duration '+1s': {HINT}"),
        ("1s1m", f"invalid duration '1s1m': {HINT}"),
        ("1m1m", f"invalid duration '1m1m': {HINT}"),
        ("1h 30m", f"invalid duration '1h 30m': {HINT}"),
        ("1,5s", f"invalid duration '1,5s': {HINT}"),
        ("1e3", f"invalid duration '1e3': {HINT}"),
        ("1_000", f"invalid duration '1_000': {HINT}"),
        ("nan", f"invalid duration 'nan': {HINT}"),
        ("inf", f"invalid duration 'inf': {HINT}"),
        ("PT5S", f"invalid duration 'PT5S': {HINT}"),
        ("\u0663s", f"invalid duration '\u0663s': {HINT}"),  # ARABIC-INDIC DIGIT THREE
        ("5s\n6s", f"invalid duration '5s\\n6s': {HINT}"),
        ("9" * 400 + "h", f"invalid duration '{'9' * 57}...': {HINT}"),
        (True, f"invalid duration 'True': {HINT}"),
        (False, f"invalid duration 'False': {HINT}"),
        (-1, f"invalid duration '-1': {POSITIVE}"),
        (-0.5, f"invalid duration '-0.5': {POSITIVE}"),
        (math.nan, f"invalid duration 'nan': {HINT}"),
        (math.inf, f"invalid duration 'inf': {HINT}"),
        (10**400, f"invalid duration '{'1' + '0' * 56}...': {HINT}"),
        (cast(Any, None), f"invalid duration 'None': {HINT}"),
        (cast(Any, [5]), f"invalid duration '[5]': {HINT}"),
    ],
)
def test_invalid_with_exact_message(text: str | int | float, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_duration(text)
    assert str(caught.value) == message


@given(
    st.one_of(
        st.text(),
        st.text(alphabet="0123456789.hms -+e", max_size=12),
        st.from_regex(r"\A([0-9]{0,3}(\.[0-9]{0,3})?(h|m|s|ms)){1,4}\Z"),
        st.integers(),
        st.floats(allow_nan=True, allow_infinity=True),
        st.booleans(),
    )
)
def test_any_input_gives_seconds_or_config_error(text: str | int | float) -> None:
    try:
        seconds = parse_duration(text)
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith("invalid duration ")
        assert message.endswith((HINT, POSITIVE))
        assert "\n" not in message
    else:
        assert type(seconds) is float
        assert math.isfinite(seconds)
        assert seconds >= 0


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0s"),
        (0.5, "500ms"),
        (0.001, "1ms"),
        (30.0, "30s"),
        (1.5, "1.5s"),
        (300.0, "5m"),
        (90.5, "1m30.5s"),
        (60.05, "1m50ms"),
        (3600.0, "1h"),
        (5400.0, "1h30m"),
        (3600.001, "1h1ms"),
        (86400.0, "24h"),
        (0.0004, "0s"),  # below a millisecond rounds away
        (0.0005, "1ms"),
    ],
)
def test_format(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize("seconds", [-1.0, math.nan, math.inf, cast(Any, True)])
def test_format_rejects_what_is_not_a_duration(seconds: float) -> None:
    with pytest.raises(ValueError, match="format_duration needs finite seconds >= 0"):
        format_duration(seconds)


@given(st.integers(min_value=0, max_value=10**13))
def test_format_then_parse_round_trips_whole_milliseconds(millis: int) -> None:
    seconds = millis / 1000
    text = format_duration(seconds)
    assert parse_duration(text) == seconds
    assert format_duration(parse_duration(text)) == text
