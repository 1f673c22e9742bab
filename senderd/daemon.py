"""Lifecycle only: startup → main loop → shutdown, signals, drain, and reload by swapping the config holder.

- **startup**: the engine (credentials, token provider, sessions), the relay (spool, API) and the metrics
  server; then the background tasks (token refresher, credential watcher, signal handler) and the work
  (worker pool, schedules, relay delivery). A mistake found here is a ConfigError/CredentialsError before
  anything runs.
- **main loop**: wait for a stop; SIGHUP reloads the config file (one reload at a time; an invalid file is
  refused and the running config stays).
- **shutdown**: stop scheduling, answer relay posts 503, let sends and deliveries in flight finish for up to
  `pool.drain_timeout` (a second SIGTERM/SIGINT cuts it short), then cancel what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import resource
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskGroup, TaskStatus

from senderd import cluster
from senderd.auth.rotation import CredentialWatcher
from senderd.clock import Clock, SystemClock
from senderd.config import Config, FlowConfig, load_config
from senderd.engine import Engine
from senderd.errors import SenderdError
from senderd.logs import LoopErrors, get_logger
from senderd.metrics import Metrics
from senderd.pool import Job, PoolSet, Verdict
from senderd.result import SendResult
from senderd.scheduler import Scheduler
from senderd.server import ObservabilityServer, Readiness

if TYPE_CHECKING:
    from senderd.forward import Forwarder
    from senderd.relay import Relay

log = get_logger("daemon")
StartHook = Callable[[Engine, TaskGroup], Awaitable[None]]
ConfigLoader = Callable[[], Config]
RESTART_SECTIONS = ("server", "relay", "pool", "runtime", "token", "forward", "cluster")
"""Config sections a reload cannot apply to a running daemon (logged as needing a restart)."""


@dataclass
class Daemon:
    """A running senderd: `serve()` until a signal (or `stop()`)."""

    config: Config
    metrics: Metrics = field(default_factory=Metrics)
    clock: Clock = field(default_factory=SystemClock)
    on_start: StartHook | None = None
    handle_signals: bool = True
    loader: ConfigLoader | None = None
    """What SIGHUP re-reads: the config file with the command line's flags applied again (None: no reload)."""
    engine: Engine | None = None
    server: ObservabilityServer | None = None
    relay: Relay | None = None
    forwarder: Forwarder | None = None
    watchers: dict[str, CredentialWatcher] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._stop = anyio.Event()
        self._force = anyio.Event()
        self.started = anyio.Event()
        self.scheduler: Scheduler | None = None
        self._reload_lock = anyio.Lock()
        self._pools: PoolSet | None = None
        self._drained = anyio.Event()
        self._shard: tuple[int, int] | None = None

    @classmethod
    def create(
        cls,
        config: Config,
        *,
        metrics: Metrics | None = None,
        clock: Clock | None = None,
        on_start: StartHook | None = None,
        handle_signals: bool = True,
        config_path: Path | None = None,
        loader: ConfigLoader | None = None,
    ) -> Daemon:
        """A daemon for `config` (not started); SIGHUP re-reads `config_path` (or calls `loader`)."""
        if loader is None and config_path is not None:
            path = config_path

            def loader() -> Config:
                return load_config(path)

        return cls(
            config=config,
            metrics=metrics or Metrics(),
            clock=clock or SystemClock(),
            on_start=on_start,
            handle_signals=handle_signals,
            loader=loader,
        )

    def stop(self) -> None:
        """Ask for a graceful stop; a second call forces it."""
        if self._stop.is_set():
            self._force.set()
        self._stop.set()

    async def serve(self) -> None:
        """Run until stopped; raises ConfigError/CredentialsError before anything starts."""
        async with contextlib.AsyncExitStack() as resources:
            engine = await self._startup(resources)
            async with anyio.create_task_group() as background:
                await self._start_background(engine, background)
                async with anyio.create_task_group() as work:
                    await self._start_work(engine, work)
                    await self._main_loop()
                    await self._shutdown(work)
                background.cancel_scope.cancel()
        log.info("stopped")

    # --- startup --------------------------------------------------------------------------------------------

    async def _startup(self, resources: contextlib.AsyncExitStack) -> Engine:
        config = self.config
        asyncio.get_running_loop().set_exception_handler(LoopErrors())
        raise_open_files_limit()
        self._shard = config.cluster.shard_of()  # a bad shard index is a ConfigError before anything runs
        engine = await resources.enter_async_context(Engine.open(config, metrics=self.metrics, clock=self.clock))
        self.engine = engine
        for flow in config.flows:
            self.metrics.declare_flow(flow.name, flow.every, confirms=flow.confirm == "mpl")
        if config.relay is not None:
            from senderd.relay import Relay  # sqlite3 and the relay only when a relay is configured

            relay = self.relay = await resources.enter_async_context(Relay.open(config.relay, engine))
            log.info(
                "relay_listening",
                url=relay.url,
                spool=relay.spool.where,
                queued=relay.spool.counts["queued"],
                dead=relay.spool.counts["dead"],
            )
        if config.forward is not None:
            from senderd.forward import Forwarder

            forwarder = self.forwarder = await resources.enter_async_context(Forwarder.open(config.forward, engine))
            log.info("forward_listening", url=forwarder.url, credentials=forwarder.set.name, allow=config.forward.allow)
        if config.server.enabled:
            server = self.server = ObservabilityServer(
                engine, config.server.listen, ready=self.ready, probe=self._probe, token=config.server.token()
            )
            await server.start()
            resources.push_async_callback(server.stop)
            log.info(
                "listening", url=server.url, endpoints=["/metrics", "/healthz", "/readyz", "/readyz/token", "/probe"]
            )
        # What start-up allocated lives as long as the process: keep it out of the collector's full
        # passes, which otherwise pause a large daemon for tens of ms every few seconds.
        gc.collect()
        gc.freeze()
        return engine

    async def _start_background(self, engine: Engine, group: TaskGroup) -> None:
        for name, credential_set in engine.sets.items():
            where = "credentials" if len(engine.sets) == 1 else f"credentials.{name}"
            watcher = self.watchers[name] = CredentialWatcher(credential_set, self.clock, where=where)
            if watcher.watching:
                group.start_soon(watcher.run)
        if self.handle_signals:
            group.start_soon(self._watch_signals)
        if self.on_start is not None:
            await self.on_start(engine, group)

    async def _start_work(self, engine: Engine, work: TaskGroup) -> None:
        pools = self._pools = PoolSet(  # one per credentials set: a stuck set holds only its own workers
            engine.sets, self.config.pool.workers, self.config.pool.queue,
            on_error=lambda: self.metrics.internal_error("job"),
        )  # fmt: skip

        async def workers(*, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
            try:
                await pools.run(task_status=task_status)
            finally:
                self._drained.set()

        await work.start(workers)

        gate = cluster.gate_for(self.relay.spool if self.relay is not None else None, self.clock, self.metrics)

        def make_job(flow: FlowConfig, scheduled_at: float) -> Job:
            async def job() -> None:
                if gate is None or await gate.admit(flow, scheduled_at):  # one replica fires each tick
                    await engine.send(flow, scheduled_at=scheduled_at)

            return job

        def offer(flow: FlowConfig, job: Job) -> Verdict:
            return pools.offer(engine.config.set_of(flow), flow.name, job)

        self.scheduler = Scheduler(offer, make_job, clock=self.clock, on_skip=self.metrics.tick_skipped)
        await work.start(self.scheduler.run, cluster.mine(engine.config.flows, self._shard))
        if self.relay is not None:
            await work.start(self.relay.run)
        log.info("started", flows=len(self.config.flows), workers=self.config.pool.workers)
        self.started.set()

    async def _probe(self, flow: FlowConfig, deadline: float | None) -> SendResult | Verdict:
        """A `/probe` send through the pool, under its overlap rule and its bound on sends at once."""
        pools, engine = self._pools, self.engine
        if pools is None or engine is None:
            return "closed"
        done = anyio.Event()
        results: list[SendResult] = []

        async def job() -> None:
            try:
                results.append(await engine.send(flow, probe=True, deadline=deadline))
            finally:
                done.set()

        verdict = pools.offer(engine.config.set_of(flow), flow.name, job)
        if verdict != "queued":
            return verdict
        await done.wait()
        return results[0] if results else "closed"

    def ready(self) -> Readiness:
        """`/readyz`: ready to take relay and forward requests (spool open, listeners up, not stopping); with
        neither configured, started and not stopping. Holding a token is not asked: that is `/readyz/token`
        (and `senderd_credentials_ready`), since the relay exists to absorb a token-server outage."""
        checks: dict[str, tuple[bool, str]] = {}
        if self._stop.is_set():
            checks["daemon"] = (False, "stopping")
        else:
            checks["daemon"] = (True, "ok") if self.started.is_set() else (False, "starting")
        if self.relay is not None:
            checks["relay"] = self.relay.ready()
        if self.forwarder is not None:
            checks["forward"] = self.forwarder.ready()
        failing = [f"{name}: {reason}" for name, (ready, reason) in checks.items() if not ready]
        details: dict[str, object] = {
            "checks": {name: {"ready": ready, "reason": reason} for name, (ready, reason) in checks.items()}
        }
        return not failing, failing[0] if failing else "ok", details

    # --- main loop ------------------------------------------------------------------------------------------

    async def _main_loop(self) -> None:
        await self._stop.wait()

    async def reload(self) -> bool:
        """Re-read the config file and apply it; on any error keep the running config (and say so)."""
        async with self._reload_lock:
            return await self._reload()

    async def _reload(self) -> bool:
        engine, scheduler = self.engine, self.scheduler
        if self.loader is None or engine is None or scheduler is None:
            return False
        running = engine.config
        try:
            new = self.loader()
        except SenderdError as exc:
            return self._reload_failed(str(exc))
        restart_needed = [name for name in RESTART_SECTIONS if getattr(new, name) != getattr(running, name)]
        if set(new.credentials) != set(running.credentials) or new.api_sets != running.api_sets:
            restart_needed.append("credentials")  # sets come and go with their sessions (and pollers): a restart
        # What a running daemon cannot change stays as it runs, for every component alike (said below).
        new = new.model_copy(update={name: getattr(running, name) for name in restart_needed})
        for name, credentials in new.credentials.items():  # the same key and settings: nothing happens
            if not await engine.sets[name].rotate(credentials, where=self.watchers[name].where):
                return self._reload_failed(
                    f"the new credentials of set {name!r} are unusable (see credentials_reload_failed)"
                )
        self.config = new
        engine.holder.swap(new)
        for flow in new.flows:
            self.metrics.declare_flow(flow.name, flow.every, confirms=flow.confirm == "mpl")
        restarted = scheduler.update(cluster.mine(new.flows, self._shard))
        self.metrics.config_reload_ok.set(1)
        log.info(
            "config_reloaded",
            flows=[f.name for f in new.flows],
            rescheduled=restarted,
            **({"restart_needed_for": restart_needed} if restart_needed else {}),
        )
        return True

    def _reload_failed(self, error: str) -> bool:
        self.metrics.config_reload_ok.set(0)
        log.error("config_reload_failed", error=error, keeping="the running configuration")
        return False

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

    # --- shutdown -------------------------------------------------------------------------------------------

    async def _shutdown(self, work: TaskGroup) -> None:
        pool, relay = self._pools, self.relay
        assert pool is not None
        log.info("stopping", inflight=pool.running, drain_timeout_s=self.config.pool.drain_timeout)
        if self.scheduler is not None:
            self.scheduler.stop()
        pool.close()
        assert self.engine is not None
        self.engine.stop_waiting()  # only exchanges already on the wire drain
        if relay is not None:
            relay.stop_accepting()
        if self.forwarder is not None:
            self.forwarder.stop_accepting()

        async def all_drained() -> None:
            await self._drained.wait()
            if relay is not None:
                await relay.wait_idle()
            if self.forwarder is not None:
                await self.forwarder.wait_idle()

        with anyio.move_on_after(self.config.pool.drain_timeout) as drain:
            await _first(all_drained, self._force.wait)
        if drain.cancelled_caught or self._force.is_set():
            log.warning("drain_cut_short", cancelled=pool.running)  # the relay logs relay_requeued: rows put back
        work.cancel_scope.cancel()


def raise_open_files_limit(wanted: int = 65536) -> None:
    """Lift the soft limit on open files towards the hard one (as Go programs do at start): every relay
    client, scrape and outbound connection is a file descriptor, and 1024 is soon reached."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.info("open_files_limit_raised", soft=soft, now=target)


async def _first(*waits: Callable[[], Awaitable[None]]) -> None:
    """Return as soon as the first of `waits` returns."""
    async with anyio.create_task_group() as group:
        for wait in waits:

            async def one(wait: Callable[[], Awaitable[None]] = wait) -> None:
                await wait()
                group.cancel_scope.cancel()

            group.start_soon(one)
