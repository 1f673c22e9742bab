"""Test helpers shipped with the package (tests and benchmarks use them): fake clocks that move only when
told, so that timing is tested without sleeping."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

import anyio


class FakeClock:
    """A clock that moves only when `advance` is called; sleepers wake, and timeouts expire, when their
    deadline is reached."""

    def __init__(self, monotonic: float = 1000.0, wall: float = 1_800_000_000.0) -> None:
        self._mono = monotonic
        self._wall_offset = wall - monotonic
        self._due: list[tuple[float, int, Callable[[], None]]] = []  # (deadline, order, what to do then)
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
        heapq.heappush(self._due, (self._mono + seconds, next(self._seq), event.set))
        try:
            await event.wait()
        finally:
            event.set()

    def fail_after(self, seconds: float) -> AbstractAsyncContextManager[object]:
        """Like `asyncio.timeout`, on this clock: the body is cancelled, and TimeoutError raised, once
        `advance` has moved time `seconds` on."""
        return self._fail_after(seconds)

    @contextlib.asynccontextmanager
    async def _fail_after(self, seconds: float) -> AsyncIterator[anyio.CancelScope]:
        deadline = self._mono + seconds
        with anyio.CancelScope() as scope:
            entry = (deadline, next(self._seq), scope.cancel)
            if deadline <= self._mono:
                scope.cancel()
            else:
                heapq.heappush(self._due, entry)
            try:
                yield scope
            finally:
                if entry in self._due:  # the body ended first: nothing to cancel any more
                    self._due.remove(entry)
                    heapq.heapify(self._due)
        if scope.cancelled_caught and self._mono >= deadline:
            raise TimeoutError

    def advance(self, seconds: float) -> None:
        """Move time forward; wake every sleeper and expire every timeout whose deadline has come."""
        self._mono += seconds
        while self._due and self._due[0][0] <= self._mono:
            _, _, due = heapq.heappop(self._due)
            due()


class StepClock(FakeClock):
    """A fake clock whose sleeps return at once after moving time on: waits are recorded, not spent.

    Its timeouts are real (`asyncio.timeout`): they bound real I/O, and this clock moves only in sleeps."""

    def __init__(self) -> None:
        super().__init__()
        self.sleeps: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.advance(max(0.0, seconds))
        await anyio.lowlevel.checkpoint()

    def fail_after(self, seconds: float) -> AbstractAsyncContextManager[object]:
        return asyncio.timeout(seconds)
