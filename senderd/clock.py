"""The clock protocol every component takes (monotonic time, wall time, a way to wait, a timeout) and the
system clock.

Tests pass the fake clocks of `senderd.testing` instead, so that timing is tested without sleeping."""

from __future__ import annotations

import asyncio
import time
from contextlib import AbstractAsyncContextManager
from typing import Protocol

import anyio


class Clock(Protocol):
    """Monotonic time for scheduling, wall time for reporting, a way to wait, and a timeout."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back."""
        ...

    def time(self) -> float:
        """Unix time in seconds."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds` on this clock."""
        ...

    def fail_after(self, seconds: float) -> AbstractAsyncContextManager[object]:
        """An async context whose body is cancelled, and TimeoutError raised, once `seconds` have passed on
        this clock (what `asyncio.timeout` is for the system clock)."""
        ...


class SystemClock:
    """The real clocks of the machine."""

    monotonic = staticmethod(time.monotonic)
    """Seconds of the monotonic clock (the function itself: a send reads it several times)."""
    time = staticmethod(time.time)
    """Unix time."""

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(max(0.0, seconds))

    def fail_after(self, seconds: float) -> AbstractAsyncContextManager[object]:
        # asyncio's timeout, not anyio.fail_after: it is around every send attempt, and anyio's cancel scope
        # costs about three times as much to enter and leave (70 against 22 us in a loop on this machine)
        return asyncio.timeout(seconds)
