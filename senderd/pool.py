"""A bounded queue in front of N workers, with the overlap and overflow policy.

`offer` never waits: a job whose key is still queued or running is refused as `overlap`, a full queue
refuses as `queue_full`; the caller counts it. Nothing is queued without bound. `close` stops taking
jobs; the workers finish what was queued and `run` returns.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Literal

import anyio
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream

from senderd.logs import get_logger

log = get_logger("pool")
Job = Callable[[], Awaitable[None]]
Verdict = Literal["queued", "overlap", "queue_full", "closed"]


class WorkerPool:
    """`workers` tasks taking jobs from a queue of at most `queue_size`."""

    def __init__(self, workers: int, queue_size: int, *, on_error: Callable[[], None] | None = None) -> None:
        self.workers = workers
        self.on_error = on_error
        """Told of every job that ended with an exception (the daemon counts them)."""
        self._send, self._receive = anyio.create_memory_object_stream[tuple[str, Job]](queue_size)
        self._busy: set[str] = set()
        self._closed = False
        self.running = 0

    def offer(self, key: str, job: Job) -> Verdict:
        """Queue `job` unless `key` is busy, the queue is full or the pool is closed; never waits."""
        if self._closed:
            return "closed"
        if key in self._busy:
            return "overlap"
        try:
            self._send.send_nowait((key, job))
        except anyio.WouldBlock:
            return "queue_full"
        self._busy.add(key)
        return "queued"

    async def put(self, key: str, job: Job) -> None:
        """Queue `job`, waiting for room (for callers that must not drop, such as `once`)."""
        self._busy.add(key)
        await self._send.send((key, job))

    def close(self) -> None:
        """Take no more jobs; queued ones still run."""
        if not self._closed:
            self._closed = True
            self._send.close()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run the workers until the pool is closed and drained (or cancelled)."""
        try:
            async with anyio.create_task_group() as group:
                for _ in range(self.workers):
                    group.start_soon(self._worker, self._receive.clone())
                task_status.started()
        finally:
            self.close()
            self._receive.close()

    async def _worker(self, jobs: MemoryObjectReceiveStream[tuple[str, Job]]) -> None:
        with jobs:
            async for key, job in jobs:
                await self._run(key, job)

    async def _run(self, key: str, job: Job) -> None:
        self.running += 1
        try:
            await job()
        except Exception:  # a job's own bug ends that job, never the pool (and with it the daemon)
            log.exception("job_crashed", key=key)
            if self.on_error is not None:
                self.on_error()
        finally:
            self.running -= 1
            self._busy.discard(key)


class PoolSet:
    """One `WorkerPool` per group (a credentials set, in the daemon), so that one group's jobs stuck waiting
    (for a slow token server, say) never hold another group's workers."""

    def __init__(self, groups: Iterable[str], workers: int, queue_size: int, *,
                 on_error: Callable[[], None] | None = None) -> None:  # fmt: skip
        self.pools = {group: WorkerPool(workers, queue_size, on_error=on_error) for group in groups}

    def offer(self, group: str, key: str, job: Job) -> Verdict:
        """`WorkerPool.offer` on `group`'s pool ("closed" for a group that has none)."""
        pool = self.pools.get(group)
        return pool.offer(key, job) if pool is not None else "closed"

    @property
    def running(self) -> int:
        """Jobs running now, in all pools."""
        return sum(pool.running for pool in self.pools.values())

    def close(self) -> None:
        """Take no more jobs in any pool; queued ones still run."""
        for pool in self.pools.values():
            pool.close()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run every pool until all are closed and drained (or cancelled)."""
        async with anyio.create_task_group() as group:
            for pool in self.pools.values():
                await group.start(pool.run)
            task_status.started()
