"""Lifecycle: start the components in one task group, stop them in order.

`Daemon.serve()` = start (token refresher, credential watcher, worker pool, scheduler, relay) → wait for a
signal → stop scheduling, drain in-flight sends up to `pool.drain_timeout`, cancel what is left. A second
SIGTERM/SIGINT forces the stop at once. SIGHUP reloads the config file: an invalid one is refused and the
running one stays. `run_once` is the CronJob mode: every selected flow once, through the pool.
"""

from __future__ import annotations

import contextlib
import gc
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import structlog
from anyio.abc import TaskStatus

if TYPE_CHECKING:
    from senderd.relay import Relay

from senderd.auth import CredentialWatcher, load_credentials
from senderd.clock import Clock, SystemClock
from senderd.config import Config, FlowConfig, load_config
from senderd.credentials import ServiceKey
from senderd.engine import Engine
from senderd.errors import SenderdError
from senderd.metrics import Metrics
from senderd.pool import Job, WorkerPool
from senderd.scheduler import run_schedules
from senderd.sender import SendResult
from senderd.server import ObservabilityServer

log = structlog.get_logger(component="daemon")
StartHook = Callable[[Engine, anyio.abc.TaskGroup], Awaitable[None]]


@dataclass
class Daemon:
    """A running senderd: `serve()` until a signal (or `stop()`)."""

    config: Config
    metrics: Metrics
    clock: Clock
    engine: Engine | None = None
    server: ObservabilityServer | None = None
    relay: Relay | None = None
    on_start: StartHook | None = None
    handle_signals: bool = True
    config_path: Path | None = None

    def __post_init__(self) -> None:
        self._stop = anyio.Event()
        self._force = anyio.Event()
        self.started = anyio.Event()
        self._schedules = anyio.CancelScope()
        self.watcher: CredentialWatcher | None = None
        self.reloaded = anyio.Event()

    @classmethod
    def create(cls, config: Config, *, metrics: Metrics | None = None, clock: Clock | None = None,
               on_start: StartHook | None = None, handle_signals: bool = True,
               config_path: Path | None = None) -> Daemon:
        """A daemon for `config` (not started); `config_path` is what SIGHUP re-reads."""
        return cls(config=config, metrics=metrics or Metrics(), clock=clock or SystemClock(), on_start=on_start,
                   handle_signals=handle_signals, config_path=config_path)

    async def reload(self) -> bool:
        """Re-read the config file and apply it; on any error keep the running config (and say so)."""
        engine = self.engine
        if self.config_path is None or engine is None:
            return False
        try:
            new = load_config(self.config_path)
            key = load_credentials(new.credentials) if new.credentials != self.config.credentials else None
        except SenderdError as exc:
            self.metrics.config_reload_ok.set(0)
            log.error("config_reload_failed", error=str(exc), keeping="the running configuration")
            self._reloaded()
            return False
        restart_needed = [name for name in ("server", "relay", "pool", "runtime", "token")
                          if getattr(new, name) != getattr(self.config, name)]
        if key is not None and self.watcher is not None and not await self.watcher.rotate(new.credentials):
            self.metrics.config_reload_ok.set(0)
            log.error("config_reload_failed", error="the new credentials are unusable (see credentials_reload_failed)",
                      keeping="the running configuration")
            self._reloaded()
            return False
        self.config = new
        engine.config = new
        for flow in new.flows:
            self.metrics.declare_flow(flow.name, flow.every)
        self._schedules.cancel()  # the scheduling loop starts again with the new flows
        self.metrics.config_reload_ok.set(1)
        log.info("config_reloaded", flows=[f.name for f in new.flows],
                 **({"restart_needed_for": restart_needed} if restart_needed else {}))
        self._reloaded()
        return True

    def _reloaded(self) -> None:
        self.reloaded.set()
        self.reloaded = anyio.Event()

    def stop(self) -> None:
        """Ask for a graceful stop; a second call forces it."""
        if self._stop.is_set():
            self._force.set()
        self._stop.set()

    async def serve(self) -> None:
        """Run until stopped; raises ConfigError/CredentialsError before anything starts."""
        config = self.config
        async with Engine.open(config, metrics=self.metrics, clock=self.clock) as engine:
            self.engine = engine
            for flow in config.flows:
                self.metrics.declare_flow(flow.name, flow.every)
            pool = WorkerPool(config.pool.workers, config.pool.queue)

            def make_job(flow: FlowConfig, scheduled_at: float) -> Job:
                async def job() -> None:
                    await engine.send(flow, scheduled_at=scheduled_at)
                return job

            async with contextlib.AsyncExitStack() as stack:
                if config.relay is not None:
                    from senderd.relay import Relay  # sqlite3 and the relay only when a relay is configured
                    from senderd.spool import Spool

                    spool = Spool(config.relay.spool_dir, max_messages=config.relay.max_spool_messages,
                                  max_bytes=config.relay.max_spool_bytes)
                    await spool.open()
                    stack.push_async_callback(spool.close)
                    self.relay = Relay(config.relay, engine, spool)
                    await self.relay.start()
                    stack.push_async_callback(self.relay.stop)
                    log.info("relay_listening", url=self.relay.url, spool=str(spool.path),
                             queued=spool.counts["queued"], dead=spool.counts["dead"])
                if config.server.enabled:
                    self.server = ObservabilityServer(engine, config.server.listen)
                    await self.server.start()
                    stack.push_async_callback(self.server.stop)
                    log.info("listening", url=self.server.url,
                             endpoints=["/metrics", "/healthz", "/readyz", "/probe"])
                # What start-up allocated lives as long as the process: keep it out of the collector's full
                # passes, which otherwise pause a large daemon for tens of ms every few seconds.
                gc.collect()
                gc.freeze()
                await self._run(engine, pool, make_job)
        log.info("stopped")

    async def _run(self, engine: Engine, pool: WorkerPool, make_job: Callable[[FlowConfig, float], Job]) -> None:
        config = self.config
        async with anyio.create_task_group() as outer:
            await outer.start(engine.tokens.run)
            if config.credentials.service_key is not None:

                def rotated(key: ServiceKey) -> None:
                    if key.certificate_not_after is not None:
                        self.metrics.certificate_expiry.set(key.certificate_not_after.timestamp())

                self.watcher = CredentialWatcher(config.credentials, engine.tokens, rotated)
                outer.start_soon(self.watcher.run, config.credentials.watch_interval, self.clock)
            relay = self.relay
            if relay is not None:
                await outer.start(relay.spool.run_writer)
            if self.handle_signals:
                outer.start_soon(self._watch_signals)
            if self.on_start is not None:
                await self.on_start(engine, outer)
            async with anyio.create_task_group() as work:
                drained = anyio.Event()

                async def workers(*, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
                    try:
                        await pool.run(task_status=task_status)
                    finally:
                        drained.set()

                async def schedules(*, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
                    status = task_status
                    while not self._stop.is_set():  # a reload cancels one round; the next takes the new flows
                        with anyio.CancelScope() as self._schedules:
                            await run_schedules(self.config.flows, pool, make_job, clock=self.clock,
                                                metrics=self.metrics, task_status=status)
                            status = anyio.TASK_STATUS_IGNORED
                            await anyio.sleep_forever()  # no scheduled flow: wait for a reload or the stop
                        status = anyio.TASK_STATUS_IGNORED

                await work.start(workers)
                await work.start(schedules)
                if relay is not None:
                    await work.start(relay.run_dispatcher)
                log.info("started", flows=len(config.flows), workers=config.pool.workers)
                self.started.set()
                await self._stop.wait()
                log.info("stopping", inflight=pool.running, drain_timeout_s=config.pool.drain_timeout)
                self._schedules.cancel()
                pool.close()
                if relay is not None:
                    await relay.stop_accepting()

                async def all_drained() -> None:
                    await drained.wait()
                    if relay is not None:
                        await relay.wait_idle()

                with anyio.move_on_after(config.pool.drain_timeout) as drain:
                    await _first(all_drained, self._force.wait)
                if drain.cancelled_caught or self._force.is_set():
                    log.warning("drain_cut_short", cancelled=pool.running,
                                requeued=relay.inflight if relay is not None else 0)
                work.cancel_scope.cancel()
            outer.cancel_scope.cancel()

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with anyio.create_task_group() as reloads:  # a reload never delays a stop signal
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        log.info("signal", signal="SIGHUP", action="reload")
                        reloads.start_soon(self.reload)
                        continue
                    log.info("signal", signal=signal.Signals(signum).name, forced=self._stop.is_set())
                    self.stop()


async def _first(*waits: Callable[[], Awaitable[None]]) -> None:
    """Return as soon as the first of `waits` returns."""
    async with anyio.create_task_group() as group:
        for wait in waits:

            async def one(wait: Callable[[], Awaitable[None]] = wait) -> None:
                await wait()
                group.cancel_scope.cancel()

            group.start_soon(one)


async def run_once(engine: Engine, flows: Sequence[FlowConfig]) -> list[SendResult]:
    """Send every flow once through a pool of `pool.workers`; results in the order of `flows`."""
    results: dict[str, SendResult] = {}
    pool = WorkerPool(engine.config.pool.workers, max(1, len(flows)))
    async with anyio.create_task_group() as group:
        await group.start(pool.run)
        for flow in flows:

            async def job(flow: FlowConfig = flow) -> None:
                results[flow.name] = await engine.send(flow)

            await pool.put(flow.name, job)
        pool.close()
    return [results[flow.name] for flow in flows]
