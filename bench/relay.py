"""Relay: 1 KiB messages accepted per second, and the latency of the durable acknowledgement at a fixed rate.

The daemon (`senderd run` with `[relay]`, spool in a temp folder on disk, SQLite `synchronous=FULL`) runs
as a subprocess; the emulator receives the deliveries; a load generator (another subprocess) posts
`POST /v1/flows/{flow}/messages`. A 202 means the message is committed. Two kinds of load:
- closed-loop, the maximum: 64 clients always waiting, for a fixed count (`accept_rps`; its latencies say
  more about the load generator than about senderd: by Little's law they are 64 / rate);
- open-loop, the latency: messages offered at a fixed rate (half the maximum, then 1,000/s) for a fixed
  time, each latency measured from its scheduled send time, so that a stalled answer counts for every
  message it held up (no coordinated omission): `open_loop_rate`, `open_loop_p50_ack_ms`,
  `open_loop_p99_ack_ms`, and the same at 1,000/s as `open_loop_1000_*`.

Runnable alone, as the relay's own issue needs it:
    python -m bench.relay [--quick] [--count N] [--concurrency C]
Child role (the load generator): python -m bench.relay --loadgen URL --count N --concurrency C [--rate R] --out FILE
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import anyio
import anyio.abc

from bench.common import (
    LOOPBACK,
    Mode,
    Section,
    child_env,
    flow_toml,
    free_port,
    percentile,
    poll_until,
    rounded,
    say,
    wait_for_port,
)
from bench.peers import find_tool
from bench.proc import Child, python_argv, senderd_argv

CONCURRENCY = 64
MESSAGE_BYTES = 1024
TARGET_RPS = 3000.0
TARGET_OPEN_LOOP_P99_MS = 10.0
"""At half the maximum rate."""
OPEN_LOOP_RATE = 1000.0
"""The second fixed rate (messages/s)."""


# --- the load generator (child) ----------------------------------------------------------------------------


class _Connection:
    """One keep-alive HTTP/1.1 connection that posts a fixed request: a load generator light enough not to
    take the CPU the daemon needs (aiohttp's client costs several times more per request)."""

    def __init__(self, stream: anyio.abc.ByteStream, request: bytes) -> None:
        self.stream = stream
        self.request = request
        self.buffer = b""

    async def post(self) -> int:
        """Send the request, read the whole answer; its status."""
        await self.stream.send(self.request)
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += await self.stream.receive()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(self.buffer) < length:
            self.buffer += await self.stream.receive()
        self.buffer = self.buffer[length:]
        return int(lines[0].split()[1])


def message_request(url: str) -> bytes:
    """The raw HTTP/1.1 request that posts one 1 KiB XML message to `url` (sent as is, again and again)."""
    parts = urlsplit(url)
    body = (b"<Message>" + b"x" * MESSAGE_BYTES)[: MESSAGE_BYTES - len(b"</Message>")] + b"</Message>"
    head = (
        f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def loadgen(
    url: str, count: int, warmup: int, concurrency: int, max_s: float, out: Path, rate: float | None = None
) -> None:
    """`concurrency` clients post `warmup` then `count` 1 KiB messages (closed-loop), or `count` messages at
    `rate` per second over up to `concurrency` connections (open-loop); latencies of the timed ones to `out`."""
    parts = urlsplit(url)
    request = message_request(url)
    connections = [
        _Connection(await anyio.connect_tcp(parts.hostname or LOOPBACK, parts.port or 80), request)
        for _ in range(concurrency)
    ]

    async def burst(n: int) -> tuple[list[float], Counter[int], float]:
        left = n
        latencies: list[float] = []
        statuses: Counter[int] = Counter()

        async def client(connection: _Connection) -> None:
            nonlocal left
            while left > 0:
                left -= 1
                started = time.perf_counter()
                try:
                    status = await connection.post()
                except (OSError, anyio.EndOfStream, anyio.BrokenResourceError, ValueError, IndexError):
                    status = 0
                latencies.append(time.perf_counter() - started)
                statuses[status] += 1
                if status == 0:
                    return

        started = time.perf_counter()
        with anyio.move_on_after(max_s):
            async with anyio.create_task_group() as group:
                for connection in connections:
                    group.start_soon(client, connection)
        return latencies, statuses, time.perf_counter() - started

    async def offered(n: int, rate: float) -> tuple[list[float], Counter[int], float]:
        free = list(connections)
        freed = anyio.Event()
        latencies: list[float] = []
        statuses: Counter[int] = Counter()

        async def one(connection: _Connection, due: float) -> None:
            nonlocal freed
            try:
                status = await connection.post()
            except (OSError, anyio.EndOfStream, anyio.BrokenResourceError, ValueError, IndexError):
                status = 0
            latencies.append(time.perf_counter() - due)  # from the scheduled time, not from the send
            statuses[status] += 1
            if status != 0:
                free.append(connection)
                freed.set()

        started = time.perf_counter()
        with anyio.move_on_after(max_s):
            async with anyio.create_task_group() as group:
                for index in range(n):
                    due = started + index / rate
                    wait = due - time.perf_counter()
                    if wait > 0:
                        await anyio.sleep(wait)
                    while not free:  # every connection busy: this message waits, and its latency counts it
                        freed = anyio.Event()
                        await freed.wait()
                    group.start_soon(one, free.pop(), due)
        return latencies, statuses, time.perf_counter() - started

    try:
        await burst(warmup)
        latencies, statuses, wall = await (burst(count) if rate is None else offered(count, rate))
    finally:
        for connection in connections:
            await connection.stream.aclose()
    await anyio.Path(out).write_text(
        json.dumps({"latencies": latencies, "wall_s": wall, "statuses": {str(k): v for k, v in statuses.items()}})
    )


# --- the parent --------------------------------------------------------------------------------------------


WRK_SCRIPT = """\
wrk.method = "POST"
wrk.body = string.rep("x", {size})
wrk.headers["Content-Type"] = "application/xml"
"""


def _parse_wrk(text: str) -> tuple[float, float] | None:
    """(requests/s, p99 ms) from `wrk --latency` output."""
    rate = re.search(r"Requests/sec:\s*([0-9.]+)", text)
    p99 = re.search(r"^\s*99%\s+([0-9.]+)(us|ms|s)\s*$", text, re.MULTILINE)
    if rate is None or p99 is None:
        return None
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    return float(rate.group(1)), float(p99.group(1)) * scale


async def _with_wrk(mode: Mode, workdir: Path, url: str, concurrency: int) -> Section:
    """The same posts from wrk, a client that needs almost no CPU: what the daemon does when the load
    generator does not compete with it for this machine's cores (a diagnostic beside the main figure)."""
    wrk = find_tool("wrk", needed_for="relay.wrk_accept_rps (a diagnostic)")
    if wrk is None:
        return {"wrk_accept_rps": None, "wrk_p99_ack_ms": None}
    script = workdir / "post.lua"
    await anyio.Path(script).write_text(WRK_SCRIPT.format(size=MESSAGE_BYTES))
    seconds = mode.pick(3, 8)
    say(f"relay: wrk -c{concurrency} posting for {seconds:g}s")
    result = await anyio.run_process(
        [wrk, "-t1", f"-c{concurrency}", f"-d{seconds:g}s", "--latency", "-s", str(script), url], check=False
    )
    parsed = _parse_wrk(result.stdout.decode(errors="replace"))
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", result.stdout.decode(errors="replace"))
    if parsed is None or non_2xx is not None:
        say(f"relay: wrk gave no usable figures (exit {result.returncode})")
        return {"wrk_accept_rps": None, "wrk_p99_ack_ms": None}
    return {"wrk_accept_rps": rounded(parsed[0]), "wrk_p99_ack_ms": rounded(parsed[1], 2)}


async def measure(mode: Mode, workdir: Path, *, count: int | None = None, concurrency: int = CONCURRENCY) -> Section:
    """relay.accept_rps (closed-loop), relay.open_loop_rate, open_loop_p50_ack_ms, open_loop_p99_ack_ms, ..."""
    from senderd.emulator.runtime import FlowSpec
    from senderd.emulator.stack import EmulatorStack

    count = count or mode.count(5000, 20000)
    warmup = mode.count(300, 1000)
    port = free_port()
    spool = workdir / "spool"
    relay = f'[relay]\nlisten = "{LOOPBACK}:{port}"\nspool_dir = "{spool}"\n'
    flows = flow_toml("ingest", "/http/Ingest", method="POST", csrf=False)
    async with EmulatorStack.started(
        workdir / "emulator",
        config_extra=relay + flows,
        flows=[FlowSpec("/Ingest", methods=frozenset({"POST"}), body="ok")],
    ) as stack:
        log = (workdir / "relay-daemon.log").open("wb")
        daemon = Child(
            senderd_argv("run", "-c", str(stack.config_path), "--log-level", "info"),
            env=child_env(),
            stdout=log,
            stderr=log,
        )
        url = f"http://{LOOPBACK}:{port}/v1/flows/ingest/messages"
        try:
            await wait_for_port(port, 20, alive=lambda: daemon.running)
            say(f"relay: {concurrency} clients post {count} messages of {MESSAGE_BYTES} bytes (after {warmup})")
            cpu_before = daemon.cpu_s()
            figures = await _generate(mode, workdir, url, log, count, warmup, concurrency)
            cpu_during = daemon.cpu_s() - cpu_before
            delivered_at_end = len(stack.runtime.stats.messages)
            posted = warmup + count
            await poll_until(lambda: len(stack.runtime.stats.messages) >= posted, mode.pick(10, 30), 0.1)
            delivered = len(stack.runtime.stats.messages)
            rss = daemon.rss_mb()
            accepted = int(figures["statuses"].get("202", 0))
            accept_rps = accepted / figures["wall_s"] if figures["wall_s"] > 0 else 0.0
            open_loop: Section = {}
            seconds = mode.pick(3, 10)
            for name, rate in (("open_loop", accept_rps / 2), ("open_loop_1000", OPEN_LOOP_RATE)):
                if rate <= 0:
                    continue
                offered = max(1, round(rate * seconds))
                say(f"relay: open loop, {offered} messages offered at {rate:.0f}/s")
                fixed = await _generate(mode, workdir, url, log, offered, 0, concurrency, rate=rate)
                open_loop.update(_open_loop_figures(name, rate, offered, fixed))
            wrk_figures = await _with_wrk(mode, workdir, url, concurrency)
        finally:
            await daemon.stop(45)  # a stop delivers what is due first (pool.drain_timeout, 30 s)
            log.close()
    latencies_ms = [latency * 1000 for latency in figures["latencies"]]
    return {
        "accept_rps": rounded(accept_rps) if figures["wall_s"] > 0 else None,
        "p99_ack_ms": rounded(percentile(latencies_ms, 0.99), 2),
        "p50_ack_ms": rounded(percentile(latencies_ms, 0.50), 2),
        "max_ack_ms": rounded(max(latencies_ms), 2) if latencies_ms else None,
        **open_loop,
        "messages": count,
        "accepted": accepted,
        "statuses": figures["statuses"],
        "concurrency": concurrency,
        "delivered_during_ingest": delivered_at_end,
        "delivered_after_drain": delivered,
        "daemon_cpu_ms_per_1k": rounded(cpu_during * 1e6 / max(1, count)),
        "daemon_rss_mb": rounded(rss),
        **wrk_figures,
    }


async def _generate(
    mode: Mode,
    workdir: Path,
    url: str,
    log: BinaryIO,
    count: int,
    warmup: int,
    concurrency: int,
    *,
    rate: float | None = None,
) -> dict[str, Any]:
    """Run the load generator child (closed-loop, or open-loop at `rate`); its figures."""
    out = workdir / "loadgen.json"
    await anyio.Path(out).unlink(missing_ok=True)
    argv = ["--loadgen", url, "--count", str(count), "--warmup", str(warmup), "--concurrency", str(concurrency)]
    if rate is not None:
        argv += ["--rate", f"{rate:.3f}"]
    generator = Child(
        python_argv("-m", "bench.relay", *argv, "--out", str(out)), env=child_env(), stdout=log, stderr=log
    )
    usage = await generator.wait_async(mode.pick(90, 240))
    if usage.returncode != 0 or not await anyio.Path(out).exists():
        raise RuntimeError(f"relay load generator failed (exit {usage.returncode})")
    figures: dict[str, Any] = json.loads(await anyio.Path(out).read_text())
    return figures


def _open_loop_figures(name: str, rate: float, offered: int, figures: dict[str, Any]) -> Section:
    """`{name}_rate`, `{name}_p50_ack_ms`, `{name}_p99_ack_ms`, ... of one open-loop run."""
    latencies_ms = [latency * 1000 for latency in figures["latencies"]]
    accepted = int(figures["statuses"].get("202", 0))
    return {
        f"{name}_rate": rounded(rate),
        f"{name}_p50_ack_ms": rounded(percentile(latencies_ms, 0.50), 2),
        f"{name}_p99_ack_ms": rounded(percentile(latencies_ms, 0.99), 2),
        f"{name}_max_ack_ms": rounded(max(latencies_ms), 2) if latencies_ms else None,
        f"{name}_achieved_rate": rounded(accepted / figures["wall_s"]) if figures["wall_s"] > 0 else None,
        f"{name}_unanswered": offered - accepted,
    }


def main() -> None:
    """`python -m bench.relay`: the relay figure alone (or the load generator child with --loadgen)."""
    parser = argparse.ArgumentParser(prog="python -m bench.relay", description="the relay's ingest figure")
    parser.add_argument("--quick", action="store_true", help="5,000 messages instead of 20,000")
    parser.add_argument("--count", type=int, help="messages to post (timed)")
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY, help="clients posting at once")
    parser.add_argument(
        "--store", choices=("sqlite", "postgresql"), default="sqlite", help="the relay's store (relay_pg.* figures)"
    )
    parser.add_argument("--loadgen", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=300, help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loadgen:
        if args.out is None:
            parser.error("--loadgen needs --out")
        anyio.run(loadgen, args.loadgen, args.count or 5000, args.warmup, args.concurrency, 120.0, args.out, args.rate)
        return

    async def alone() -> Section:
        with tempfile.TemporaryDirectory(prefix="senderd-bench-relay-") as scratch:
            return await measure(Mode(quick=args.quick), Path(scratch), count=args.count, concurrency=args.concurrency)

    if args.store == "postgresql":
        from bench import relay_pg

        async def on_postgresql() -> Section:
            with tempfile.TemporaryDirectory(prefix="senderd-bench-relay-pg-") as scratch:
                return await relay_pg.measure(Mode(quick=args.quick), Path(scratch))

        print(json.dumps({"relay_pg": anyio.run(on_postgresql)}, indent=2))
        return
    section = anyio.run(alone)
    rps, p99 = section["accept_rps"], section.get("open_loop_p99_ack_ms")
    verdict = "met" if rps >= TARGET_RPS and p99 is not None and p99 <= TARGET_OPEN_LOOP_P99_MS else "MISSED"
    print(json.dumps(section, indent=2))
    print(
        f"relay: {rps:.0f} msgs/s accepted (closed loop); p99 ack {p99} ms offered half that rate "
        f"(targets: >= {TARGET_RPS:.0f} msg/s, <= {TARGET_OPEN_LOOP_P99_MS:.0f} ms: {verdict})"
    )


if __name__ == "__main__":
    main()
