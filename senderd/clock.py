"""The clock protocol every component takes (monotonic time, wall time, a way to wait) and the system clock.

Tests pass the fake clocks of `senderd.testing` instead, so that timing is tested without sleeping."""

from __future__ import annotations

import time
from typing import Protocol

import anyio


class Clock(Protocol):
    """Monotonic time for scheduling, wall time for reporting, and a way to wait."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back."""
        ...

    def time(self) -> float:
        """Unix time in seconds."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds` on this clock."""
        ...


class SystemClock:
    """The real clocks of the machine."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(max(0.0, seconds))
