"""Forwarder: request-reply through the sidecar beside a bare aiohttp client calling the runtime directly.

The daemon (`senderd run` with `[forward]` only) runs as a subprocess; the emulator serves GetTimestamp
over TLS; a load generator (another subprocess, an aiohttp client) calls either the runtime directly with a
Bearer header (a token the parent fetched once) or the forwarder on loopback, with the same client, in two
regimes: closed loop at concurrency 32 (throughput), and open loop at a fixed offered rate (latency measured
from each request's scheduled start, so queueing counts). Added latency = forwarder's percentile minus
direct's.

Runnable alone: python -m bench.forward [--quick] [--rate R]
Child role (the load generator): python -m bench.forward --loadgen URL --mode closed|open ... --out FILE
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import anyio

from bench.common import LOOPBACK, Mode, Section, child_env, percentile, rounded, say, wait_for_port
from bench.proc import Child, python_argv, senderd_argv

CONCURRENCY = 32
RATE = 500.0
TARGET_P99_ADDED_MS = 2.0
TARGET_RATIO = 0.7
PATH = "/http/GetTimestamp"


# --- the load generator (child) ----------------------------------------------------------------------------


async def loadgen(
    url: str, mode: str, count: int, concurrency: int, rate: float, token_file: Path | None, ca: Path | None, out: Path
) -> None:
    """`count` GETs of `url`: closed loop (`concurrency` clients back to back) or open loop (`rate` per
    second, each started on its schedule); latencies and statuses to `out`."""
    headers = {}
    if token_file is not None:
        headers["Authorization"] = "Bearer " + (await anyio.Path(token_file).read_text()).strip()
    context = ssl.create_default_context(cafile=str(ca)) if ca is not None else None
    connector = aiohttp.TCPConnector(ssl=context if context is not None else False, limit=concurrency)
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def one(scheduled: float) -> None:
            try:
                async with session.get(url) as response:
                    await response.read()
                    statuses[response.status] += 1
            except (aiohttp.ClientError, OSError):
                statuses[0] += 1
            latencies.append(time.perf_counter() - scheduled)

        for _ in range(min(200, count)):  # warm the pool and the token
            await one(time.perf_counter())
        latencies.clear()
        statuses.clear()
        started = time.perf_counter()
        if mode == "closed":
            left = count

            async def client() -> None:
                nonlocal left
                while left > 0:
                    left -= 1
                    await one(time.perf_counter())

            async with anyio.create_task_group() as group:
                for _ in range(concurrency):
                    group.start_soon(client)
        else:
            async with anyio.create_task_group() as group:
                for index in range(count):
                    at = started + index / rate
                    delay = at - time.perf_counter()
                    if delay > 0:
                        await anyio.sleep(delay)
                    group.start_soon(one, at)
        wall = time.perf_counter() - started
    counts = {str(k): v for k, v in statuses.items()}
    await anyio.Path(out).write_text(json.dumps({"latencies": latencies, "wall_s": wall, "statuses": counts}))


# --- the parent --------------------------------------------------------------------------------------------


async def _run_loadgen(
    workdir: Path, log: Any, url: str, mode: str, count: int, rate: float, token: Path | None, ca: Path | None
) -> dict[str, Any]:
    out = workdir / f"loadgen-{mode}-{'direct' if token else 'forward'}.json"
    argv = ["-m", "bench.forward", "--loadgen", url, "--mode", mode, "--count", str(count),
            "--concurrency", str(CONCURRENCY), "--rate", str(rate), "--out", str(out)]  # fmt: skip
    if token is not None:
        argv += ["--token-file", str(token)]
    if ca is not None:
        argv += ["--ca", str(ca)]
    generator = Child(python_argv(*argv), env=child_env(), stdout=log, stderr=log)
    usage = await generator.wait_async(240)
    if usage.returncode != 0 or not out.exists():
        raise RuntimeError(f"forward load generator failed (exit {usage.returncode})")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


async def measure(mode: Mode, workdir: Path, *, rate: float = RATE) -> Section:
    """forward.rps, forward.ratio_vs_direct, forward.p50_added_ms, forward.p99_added_ms, forward.cpu_ms_per_1k"""
    from senderd.config import load_config
    from senderd.emulator.stack import EmulatorStack
    from senderd.engine import Engine

    closed_count = mode.count(3000, 12000)
    open_count = int(rate * mode.pick(4, 12))
    port = _free_port()
    extra = f'[forward]\nlisten = "{LOOPBACK}:{port}"\n'
    async with EmulatorStack.started(workdir / "emulator", token_lifetime=3600, config_extra=extra) as stack:
        async with Engine.open(load_config(stack.config_path), refresh=False) as engine:  # the direct client's token
            token = (await engine.tokens.get()).value
        token_file = workdir / "token"
        token_file.touch(mode=0o600)
        token_file.write_text(token)
        direct_url = stack.runtime.url + PATH
        forward_url = f"http://{LOOPBACK}:{port}{PATH}"
        log = (workdir / "forward-daemon.log").open("wb")
        daemon = Child(
            senderd_argv("run", "-c", str(stack.config_path), "--log-level", "info"),  # its one line per request counts
            env=child_env(),
            stdout=log,
            stderr=log,
        )
        figures: dict[str, dict[str, Any]] = {}
        try:
            await wait_for_port(port, 20, alive=lambda: daemon.running)
            for regime, count in (("closed", closed_count), ("open", open_count)):
                for target, url, bearer, ca in (
                    ("direct", direct_url, token_file, stack.ca_path),
                    ("forward", forward_url, None, None),
                ):
                    say(f"forward: {regime} loop, {target}, {count} requests")
                    cpu_before = daemon.cpu_s()
                    figures[f"{regime}_{target}"] = await _run_loadgen(
                        workdir, log, url, regime, count, rate, bearer, ca
                    )
                    figures[f"{regime}_{target}"]["daemon_cpu_s"] = daemon.cpu_s() - cpu_before
            rss = daemon.rss_mb()
        finally:
            await daemon.stop(15)
            log.close()
            os.unlink(token_file)

    def rps(key: str) -> float:
        part = figures[key]
        return float(part["statuses"].get("200", 0)) / part["wall_s"] if part["wall_s"] > 0 else 0.0

    def pct(key: str, fraction: float) -> float:
        return percentile([latency * 1000 for latency in figures[key]["latencies"]], fraction)

    forward_rps, direct_rps = rps("closed_forward"), rps("closed_direct")
    return {
        "rps": rounded(forward_rps),
        "direct_rps": rounded(direct_rps),
        "ratio_vs_direct": rounded(forward_rps / direct_rps, 2) if direct_rps else None,
        "p50_added_ms": rounded(pct("open_forward", 0.5) - pct("open_direct", 0.5), 2),
        "p99_added_ms": rounded(pct("open_forward", 0.99) - pct("open_direct", 0.99), 2),
        "open_direct_p50_ms": rounded(pct("open_direct", 0.5), 2),
        "open_direct_p99_ms": rounded(pct("open_direct", 0.99), 2),
        "open_forward_p50_ms": rounded(pct("open_forward", 0.5), 2),
        "open_forward_p99_ms": rounded(pct("open_forward", 0.99), 2),
        "offered_rps": rate,
        "cpu_ms_per_1k": rounded(figures["closed_forward"]["daemon_cpu_s"] * 1e6 / max(1, closed_count)),
        "statuses": {key: part["statuses"] for key, part in figures.items()},
        "concurrency": CONCURRENCY,
        "daemon_rss_mb": rounded(rss),
    }


def _free_port() -> int:
    from bench.common import free_port

    return free_port()


def main() -> None:
    """`python -m bench.forward`: the forwarder's figures alone (or the load generator child)."""
    parser = argparse.ArgumentParser(prog="python -m bench.forward", description="the forwarder's figures")
    parser.add_argument("--quick", action="store_true", help="fewer requests")
    parser.add_argument("--rate", type=float, default=RATE, help="open-loop offered rate, requests/s")
    parser.add_argument("--loadgen", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["closed", "open"], default="closed", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=1000, help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY, help=argparse.SUPPRESS)
    parser.add_argument("--token-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--ca", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loadgen:
        if args.out is None:
            parser.error("--loadgen needs --out")
        anyio.run(loadgen, args.loadgen, args.mode, args.count, args.concurrency, args.rate, args.token_file,
                  args.ca, args.out)  # fmt: skip
        return

    async def alone() -> Section:
        with tempfile.TemporaryDirectory(prefix="senderd-bench-forward-") as scratch:
            return await measure(Mode(quick=args.quick), Path(scratch), rate=args.rate)

    section = anyio.run(alone)
    print(json.dumps(section, indent=2))


if __name__ == "__main__":
    main()
