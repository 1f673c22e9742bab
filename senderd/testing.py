"""Test helpers shipped with the package (tests and benchmarks use them): fake clocks that move only when
told, so that timing is tested without sleeping."""

from __future__ import annotations

import heapq
import itertools

import anyio


class FakeClock:
    """A clock that moves only when `advance` is called; sleepers wake when their deadline is reached."""

    def __init__(self, monotonic: float = 1000.0, wall: float = 1_800_000_000.0) -> None:
        self._mono = monotonic
        self._wall_offset = wall - monotonic
        self._sleepers: list[tuple[float, int, anyio.Event]] = []
        self._seq = itertools.count()

    def monotonic(self) -> float:
        return self._mono

    def time(self) -> float:
        return self._mono + self._wall_offset

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await anyio.lowlevel.checkpoint()
            return
        event = anyio.Event()
        heapq.heappush(self._sleepers, (self._mono + seconds, next(self._seq), event))
        try:
            await event.wait()
        finally:
            event.set()

    def advance(self, seconds: float) -> None:
        """Move time forward and wake every sleeper whose deadline has come."""
        self._mono += seconds
        while self._sleepers and self._sleepers[0][0] <= self._mono:
            _, _, event = heapq.heappop(self._sleepers)
            event.set()


class StepClock(FakeClock):
    """A fake clock whose sleeps return at once after moving time on: waits are recorded, not spent."""

    def __init__(self) -> None:
        super().__init__()
        self.sleeps: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.advance(max(0.0, seconds))
        await anyio.lowlevel.checkpoint()
