"""Schedule precision: many flows every second, how late each send starts.

The sends go to nginx over TLS (as in the throughput bench), the token from the emulator: the Python
emulator itself answers about 960 requests a second on this machine, and sending to it measured its
capacity (the pool filled behind its answers, `queue_full`), not the scheduler. Without nginx they go to
the emulator.

The daemon (`senderd.daemon.Daemon`, as `senderd run` builds it, info logs to a file) runs in a subprocess
with N flows `every = "1s"` (spread over the second, the default). Its `senderd_schedule_lag_seconds`
observations (start of `engine.send` minus the tick's scheduled monotonic time) are recorded exactly, so
p50/p99 are not limited to the histogram's buckets. Over a window of D whole seconds after a warm-up,
every flow has exactly D grid points, so `missed = N*D - ticks started`; ticks the scheduler or pool
skipped (`senderd_skipped_ticks_total`) are reported beside it.

Child role: python -m bench.schedule CONFIG --warmup-s W --window-s D --out FILE
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any, get_args

import anyio

from bench.common import Mode, Section, child_env, flow_toml, percentile, rounded, say
from bench.peers import find_tool, started_nginx
from bench.proc import Child, python_argv
from senderd.metrics import SkipReason

TARGET_P99_MS = 10.0
WORKERS = 32
"""Pool size for the run: 1,000 sends a second against a Python emulator need more than the default 8 in
flight; the point here is the scheduler's precision, not the pool's size."""


# --- the child ---------------------------------------------------------------------------------------------


class _LagTap:
    """Stands in for the schedule-lag histogram: records (scheduled_at, lag) and still feeds the histogram."""

    def __init__(self, histogram: Any, sink: list[tuple[float, float]]) -> None:
        self._histogram = histogram
        self._sink = sink

    def labels(self, *names: str) -> _LagChild:
        return _LagChild(self._histogram.labels(*names), self._sink)


class _LagChild:
    def __init__(self, child: Any, sink: list[tuple[float, float]]) -> None:
        self._child = child
        self._sink = sink

    def observe(self, lag: float) -> None:
        self._sink.append((time.monotonic() - lag, lag))
        self._child.observe(lag)


async def child(config_path: Path, warmup_s: float, window_s: float, log_path: Path, out: Path) -> None:
    """Run the daemon until SIGTERM; write the window's lags, tick counts, skipped ticks and CPU to `out`."""
    from senderd.config import load_config
    from senderd.daemon import Daemon
    from senderd.engine import Engine
    from senderd.logs import configure_logging
    from senderd.metrics import Metrics
    from senderd.result import SendResult

    records: list[tuple[float, float]] = []
    outcomes: Counter[str] = Counter()
    window: dict[str, float] = {}
    with log_path.open("w", encoding="utf-8") as log:
        configure_logging("info", "json", stream=log)
        config = load_config(config_path)
        metrics = Metrics()
        metrics.schedule_lag = _LagTap(metrics.schedule_lag, records)  # type: ignore[assignment]

        async def on_start(engine: Engine, group: anyio.abc.TaskGroup) -> None:
            def count(result: SendResult) -> None:
                outcomes[result.outcome] += 1

            engine.listeners.append(count)
            begin = time.monotonic() + warmup_s
            window["start"] = begin

            async def sample_cpu() -> None:
                await anyio.sleep_until(begin)
                window["cpu_start"] = time.process_time()
                await anyio.sleep_until(begin + window_s)
                window["cpu_end"] = time.process_time()

            group.start_soon(sample_cpu)

        daemon = Daemon.create(config, metrics=metrics, on_start=on_start)
        await daemon.serve()
    start = window["start"]
    lags = [lag for scheduled, lag in records if start <= scheduled < start + window_s]
    skipped = {reason: 0.0 for reason in get_args(SkipReason)}  # every reason the daemon may count
    for family in metrics.registry.collect():
        if family.name == "senderd_skipped_ticks":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    skipped[sample.labels["reason"]] += sample.value
    await anyio.Path(out).write_text(
        json.dumps(
            {
                "ticks": len(lags),
                "lags": lags,
                "skipped": skipped,
                "outcomes": dict(outcomes),
                "cpu_s": window.get("cpu_end", time.process_time()) - window.get("cpu_start", 0.0),
            }
        )
    )


# --- the parent --------------------------------------------------------------------------------------------


async def measure(mode: Mode, workdir: Path) -> Section:
    """schedule.flows, p50_lateness_ms, p99_lateness_ms, missed_ticks, cpu."""
    from senderd.emulator.runtime import FlowSpec
    from senderd.emulator.stack import EmulatorStack

    flows = mode.count(200, 1000)
    window_s = mode.count(15, 60)
    warmup_s = 3.0
    tables = f"[pool]\nworkers = {WORKERS}\n" + "".join(
        flow_toml(f"tick-{index:04d}", "/http/Tick", every="1s") for index in range(flows)
    )
    nginx = find_tool("nginx", needed_for="schedule.* against nginx (the emulator is the target without it)")
    async with contextlib.AsyncExitStack() as targets:
        stack = await targets.enter_async_context(
            EmulatorStack.started(workdir / "emulator", config_extra=tables, flows=[FlowSpec("/Tick", body="ok")])
        )
        target = "emulator"
        if nginx is not None:
            server = await targets.enter_async_context(started_nginx(nginx, stack.pki, workdir / "nginx"))
            stack.write_files(f'[runtime]\nurl = "{server.url}"\n' + tables)
            target = "nginx"
        out = workdir / "schedule.json"
        log = (workdir / "schedule-child.log").open("wb")
        say(f"schedule: {flows} flows every 1s, {window_s}s window after {warmup_s:g}s warm-up")
        process = Child(
            python_argv(
                "-m",
                "bench.schedule",
                str(stack.config_path),
                "--warmup-s",
                str(warmup_s),
                "--window-s",
                str(window_s),
                "--log",
                str(workdir / "schedule-senderd.log"),
                "--out",
                str(out),
            ),
            env=child_env(),
            stdout=log,
            stderr=log,
        )
        stats = stack.runtime.stats
        gc.collect()
        gc.freeze()  # the emulator shares this machine: keep its collector's pauses out of the figures
        try:
            deadline = time.monotonic() + warmup_s + window_s + 2.5  # + start-up and the window's last sends
            rss = 0.0
            while time.monotonic() < deadline and process.running:
                rss = max(rss, process.rss_mb())
                stats.messages.clear()  # only counts are needed; a growing list makes the emulator slower
                await anyio.sleep(0.25)
            usage = await process.stop(15)
        finally:
            process.kill()
            log.close()
            gc.unfreeze()
        received = stats.by_status[200] if target == "emulator" else None
    if usage.returncode != 0 or not out.exists():
        tail = (workdir / "schedule-child.log").read_text(errors="replace")[-800:]
        raise RuntimeError(f"schedule child failed (exit {usage.returncode}): {tail}")
    figures: dict[str, Any] = json.loads(out.read_text())
    lags_ms = [lag * 1000 for lag in figures["lags"]]
    expected = flows * window_s
    failed = sum(count for outcome, count in figures["outcomes"].items() if outcome != "success")
    return {
        "flows": flows,
        "workers": WORKERS,
        "window_s": window_s,
        "p50_lateness_ms": rounded(percentile(lags_ms, 0.50), 2),
        "p99_lateness_ms": rounded(percentile(lags_ms, 0.99), 2),
        "max_lateness_ms": rounded(max(lags_ms), 2) if lags_ms else None,
        "missed_ticks": expected - figures["ticks"],
        "expected_ticks": expected,
        "skipped_ticks": {reason: int(value) for reason, value in figures["skipped"].items()},
        "failed_sends": failed,
        "cpu_pct": rounded(figures["cpu_s"] * 100 / window_s),
        "cpu_ms_per_1k_sends": rounded(figures["cpu_s"] * 1e6 / max(1, figures["ticks"])),
        "rss_mb": rounded(rss),
        "runtime_received": received,
        "target": target,
    }


def main() -> None:
    """The child role (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m bench.schedule")
    parser.add_argument("config", type=Path)
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--window-s", type=float, default=15.0)
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    anyio.run(child, args.config, args.warmup_s, args.window_s, args.log, args.out)


if __name__ == "__main__":
    main()
