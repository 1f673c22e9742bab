"""A bounded queue in front of N workers, with the overlap and overflow policy.

`offer` never waits: a job whose key is still queued or running is refused as `overlap`, a full queue
refuses as `queue_full`; the caller counts it. Nothing is queued without bound. `close` stops taking
jobs; the workers finish what was queued and `run` returns.

The queue is a deque and workers are tasks started when a job comes and no worker is free (up to
`workers`); a worker that finishes a job takes the next one without waiting for the event loop (only
`checkpoint_if_cancelled`), and ends when the queue is empty. A memory stream in between cost a full
event-loop iteration per job.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Literal

import anyio
from anyio.abc import TaskGroup, TaskStatus
from anyio.lowlevel import checkpoint_if_cancelled

from senderd.logs import get_logger

log = get_logger("pool")
Job = Callable[[], Awaitable[None]]
Verdict = Literal["queued", "overlap", "queue_full", "closed"]


class WorkerPool:
    """At most `workers` jobs running at once, and at most `queue_size` more waiting for a worker."""

    def __init__(self, workers: int, queue_size: int, *, on_error: Callable[[], None] | None = None) -> None:
        self.workers = workers
        self.queue_size = queue_size
        self.on_error = on_error
        """Told of every job that ended with an exception (the daemon counts them)."""
        self._queue: deque[tuple[str, Job]] = deque()
        self._busy: set[str] = set()
        self._closed = False
        self._done = anyio.Event()
        self._room: anyio.Event | None = None  # set when a queued job is taken (for `put`)
        self._group: TaskGroup | None = None
        self._tasks = 0  # worker tasks started and not ended
        self.running = 0

    def offer(self, key: str, job: Job) -> Verdict:
        """Queue `job` unless `key` is busy, the queue is full or the pool is closed; never waits."""
        if self._closed:
            return "closed"
        if key in self._busy:
            return "overlap"
        if not self._take(key, job):
            return "queue_full"
        return "queued"

    async def put(self, key: str, job: Job) -> None:
        """Queue `job`, waiting for room (for callers that must not drop, such as `once`); raises
        `anyio.ClosedResourceError` once the pool is closed. With room it returns at once, without a
        checkpoint (the caller's loop is bounded by its jobs; a worker checks for cancellation before each)."""
        while True:
            if self._closed:
                raise anyio.ClosedResourceError
            if self._take(key, job):
                return
            room = self._room = self._room or anyio.Event()
            await room.wait()

    def _take(self, key: str, job: Job) -> bool:
        """Start `job` on a free worker, or queue it if there is room; False if neither."""
        if self._tasks < self.workers and self._group is not None:
            self._tasks += 1
            self._busy.add(key)
            self._group.start_soon(self._worker, key, job)
            return True
        if len(self._queue) >= self.queue_size:
            return False
        self._busy.add(key)
        self._queue.append((key, job))
        return True

    def close(self) -> None:
        """Take no more jobs; queued ones still run."""
        if not self._closed:
            self._closed = True
            self._done.set()
            self._made_room()

    def _made_room(self) -> None:
        if self._room is not None:
            self._room.set()
            self._room = None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run the workers until the pool is closed and drained (or cancelled)."""
        try:
            async with anyio.create_task_group() as group:
                self._group = group
                while self._queue and self._tasks < self.workers:  # jobs queued before the pool ran
                    self._tasks += 1
                    group.start_soon(self._worker, *self._queue.popleft())
                self._made_room()
                task_status.started()
                await self._done.wait()
        finally:
            self._group = None
            self.close()

    async def _worker(self, key: str, job: Job) -> None:
        try:
            while True:
                await self._run(key, job)
                await checkpoint_if_cancelled()
                if not self._queue:
                    return
                key, job = self._queue.popleft()
                if len(self._queue) <= self.queue_size // 2:  # `put` wakes once per half queue, not per job
                    self._made_room()
        finally:
            self._tasks -= 1

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
