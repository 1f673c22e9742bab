"""Throughput and overhead: senderd sending as fast as its pool allows, against a bare aiohttp loop and wrk.

The target is nginx over TLS with keep-alive (`location /http/ { return 200 "ok"; }`, the emulator PKI's
server certificate). senderd runs as it does in the daemon: `Engine` + `WorkerPool` (32 workers), metrics
on, info logs to /dev/null, retry policy on, its token from the emulator's token server (nginx ignores the
Authorization header). The bare loop uses the same TLS context, 32 concurrent requests and a Bearer header.
Each loop runs in a subprocess of its own, so its CPU time is measured apart from nginx and the emulator.

Child roles (used by the parent; runnable by hand, e.g. under py-spy):
    python -m bench.throughput senderd CONFIG --count N --out FILE
    python -m bench.throughput aiohttp URL --ca CA --token-file FILE --count N --out FILE
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import anyio
import anyio.to_thread

from bench.common import Mode, Section, child_env, flow_toml, rounded, say
from bench.peers import find_tool, started_nginx
from bench.proc import Child, python_argv

CONCURRENCY = 32
TARGET_RATIO = 0.85
TARGET_INSTRUCTIONS_RATIO = 1.4
"""The first target (the ranked fixes reach it); the next is 1.2."""


# --- the children ------------------------------------------------------------------------------------------


async def _report(out: Path, sends: int, ok: int, wall_s: float, cpu_s: float) -> None:
    await anyio.Path(out).write_text(json.dumps({"sends": sends, "ok": ok, "wall_s": wall_s, "cpu_s": cpu_s}))


async def senderd_child(config_path: Path, count: int, warmup: int, max_s: float, log: TextIO, out: Path) -> None:
    """`count` sends through Engine + WorkerPool after `warmup` untimed ones (info logs to `log`); writes the
    figures to `out`."""
    from senderd.config import FlowConfig, load_config
    from senderd.engine import Engine
    from senderd.logs import configure_logging
    from senderd.pool import WorkerPool

    configure_logging("info", "json", stream=log)
    config = load_config(config_path)
    flow = config.flows[0]
    async with Engine.open(config) as engine:

        async def burst(n: int) -> tuple[int, int]:
            sent = ok = 0

            async def job(flow: FlowConfig = flow) -> None:
                nonlocal sent, ok
                result = await engine.send(flow)
                sent += 1
                ok += result.ok

            pool = WorkerPool(config.pool.workers, config.pool.workers * 2)
            with anyio.move_on_after(max_s):
                async with anyio.create_task_group() as work:
                    await work.start(pool.run)
                    for index in range(n):
                        await pool.put(str(index), job)
                    pool.close()
            return sent, ok

        await burst(warmup)
        wall, cpu = time.perf_counter(), time.process_time()
        sent, ok = await burst(count)
        await _report(out, sent, ok, time.perf_counter() - wall, time.process_time() - cpu)


async def aiohttp_child(url: str, ca: Path, token: str, count: int, warmup: int, max_s: float, out: Path) -> None:
    """The bare loop: `CONCURRENCY` tasks GET `url` with a Bearer header on one keep-alive session."""
    from senderd.auth.tls import trust_context

    connector = aiohttp.TCPConnector(ssl=trust_context(ca), limit=CONCURRENCY * 2)
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(connector=connector) as session:

        async def burst(n: int) -> tuple[int, int]:
            left, sent, ok = n, 0, 0

            async def worker() -> None:
                nonlocal left, sent, ok
                while left > 0:
                    left -= 1
                    async with session.get(url, headers=headers) as response:
                        await response.read()
                        sent += 1
                        ok += response.status == 200

            with anyio.move_on_after(max_s):
                async with anyio.create_task_group() as group:
                    for _ in range(CONCURRENCY):
                        group.start_soon(worker)
            return sent, ok

        await burst(warmup)
        wall, cpu = time.perf_counter(), time.process_time()
        sent, ok = await burst(count)
        await _report(out, sent, ok, time.perf_counter() - wall, time.process_time() - cpu)


# --- the parent --------------------------------------------------------------------------------------------


async def _run_child(argv: list[str], out: Path, timeout: float) -> dict[str, Any]:
    result = anyio.Path(out)
    await result.unlink(missing_ok=True)
    log = out.with_suffix(".log").open("wb")
    try:
        child = Child(argv, env=child_env(), stdout=log, stderr=log)
        usage = await child.wait_async(timeout)
    finally:
        log.close()
    if usage.returncode != 0 or not await result.exists():
        tail = await anyio.Path(out.with_suffix(".log")).read_text(errors="replace")
        raise RuntimeError(f"{argv[2]} loop failed (exit {usage.returncode}): {tail[-800:]}")
    figures: dict[str, Any] = json.loads(await result.read_text())
    return figures


def _rps(figures: dict[str, Any]) -> float:
    return float(figures["ok"]) / float(figures["wall_s"]) if figures["wall_s"] > 0 else 0.0


def _wrk(wrk: str, url: str, token: str, seconds: float) -> float | None:
    argv = [
        wrk,
        "-t2",
        f"-c{CONCURRENCY}",
        f"-d{seconds:g}s",
        "--timeout",
        "5s",
        "-H",
        f"Authorization: Bearer {token}",
        url,
    ]
    result = subprocess.run(argv, capture_output=True, timeout=seconds + 30, check=False)
    text = result.stdout.decode(errors="replace")
    found = re.search(r"Requests/sec:\s*([0-9.]+)", text)
    if result.returncode != 0 or found is None:
        say(f"wrk failed (exit {result.returncode}): {text[-300:]} {result.stderr.decode(errors='replace')[-300:]}")
        return None
    errors = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", text)
    if errors is not None:
        say(f"wrk saw {errors.group(1)} non-2xx answers")
    return float(found.group(1))


async def measure(mode: Mode, workdir: Path) -> Section:
    """throughput.senderd_rps, aiohttp_rps, wrk_rps, ratio_vs_aiohttp, senderd_cpu_ms_per_1k, ..."""
    from senderd.emulator.stack import EmulatorStack

    section: Section = {
        "senderd_rps": None,
        "aiohttp_rps": None,
        "wrk_rps": None,
        "ratio_vs_aiohttp": None,
        "senderd_cpu_ms_per_1k": None,
        "concurrency": CONCURRENCY,
    }
    nginx = find_tool("nginx", needed_for="throughput (all of it: nginx is the target)")
    if nginx is None:
        return section
    count = mode.count(3000, 20000)
    warmup = mode.count(300, 1000)
    rounds = mode.count(1, 2)
    max_s = mode.pick(30, 90)
    async with (
        EmulatorStack.started(workdir / "emulator") as stack,
        started_nginx(nginx, stack.pki, workdir / "nginx") as server,
    ):
        url = f"{server.url}/http/bench"
        stack.write_files(
            f'[runtime]\nurl = "{server.url}"\n[pool]\nworkers = {CONCURRENCY}\nqueue = {CONCURRENCY * 2}\n'
            + flow_toml("bench", "/http/bench")
        )
        token = stack.token_server.mint(stack.client_id, lifetime=3600)
        token_file = workdir / "token.txt"
        token_file.touch(mode=0o600)
        token_file.write_text(token)
        common = ["--count", str(count), "--warmup", str(warmup), "--max-s", str(max_s)]
        best: dict[str, dict[str, Any]] = {}
        for index in range(rounds):
            say(f"throughput: round {index + 1}/{rounds}: bare aiohttp, {count} requests")
            bare = await _run_child(
                python_argv(
                    "-m",
                    "bench.throughput",
                    "aiohttp",
                    url,
                    "--ca",
                    str(stack.ca_path),
                    "--token-file",
                    str(token_file),
                    *common,
                    "--out",
                    str(workdir / "aiohttp.json"),
                ),
                workdir / "aiohttp.json",
                max_s * 2 + 30,
            )
            say(f"throughput: round {index + 1}/{rounds}: senderd Engine + WorkerPool, {count} sends")
            ours = await _run_child(
                python_argv(
                    "-m",
                    "bench.throughput",
                    "senderd",
                    str(stack.config_path),
                    *common,
                    "--out",
                    str(workdir / "senderd.json"),
                ),
                workdir / "senderd.json",
                max_s * 2 + 30,
            )
            for name, figures in (("aiohttp", bare), ("senderd", ours)):
                if name not in best or _rps(figures) > _rps(best[name]):
                    best[name] = figures
        wrk = find_tool("wrk", needed_for="throughput.wrk_rps")
        wrk_rps = None
        if wrk is not None:
            seconds = mode.pick(4, 10)
            say(f"throughput: wrk -c{CONCURRENCY} for {seconds:g}s")
            wrk_rps = await anyio.to_thread.run_sync(_wrk, wrk, url, token, seconds)
        nginx_rss = server.child.rss_mb()
        counts = await _instructions(mode, workdir, stack.config_path, url, stack.ca_path, token_file)
    ours, bare = best["senderd"], best["aiohttp"]
    section.update(counts)
    senderd_rps, aiohttp_rps = _rps(ours), _rps(bare)
    section.update(
        {
            "senderd_rps": rounded(senderd_rps),
            "aiohttp_rps": rounded(aiohttp_rps),
            "wrk_rps": rounded(wrk_rps),
            "ratio_vs_aiohttp": rounded(senderd_rps / aiohttp_rps, 3) if aiohttp_rps else None,
            "senderd_cpu_ms_per_1k": rounded(ours["cpu_s"] * 1e6 / max(1, ours["sends"])),
            "aiohttp_cpu_ms_per_1k": rounded(bare["cpu_s"] * 1e6 / max(1, bare["sends"])),
            "sends": ours["sends"],
            "senderd_failed": ours["sends"] - ours["ok"],
            "aiohttp_failed": bare["sends"] - bare["ok"],
            "nginx_rss_mb": rounded(nginx_rss),
        }
    )
    return section


# --- instruction counts (callgrind) ------------------------------------------------------------------------

_SUMMARY = re.compile(rb"^(?:summary|totals):\s*(\d+)", re.MULTILINE)


async def _callgrind(argv: list[str], workdir: Path, name: str, timeout: float) -> int | None:
    """Instructions `argv` executed in all, counted by valgrind's callgrind (the same count run after run,
    whatever else the machine does)."""
    valgrind = find_tool("valgrind", needed_for="throughput.instructions_per_send")
    if valgrind is None:
        return None
    out = workdir / f"callgrind.{name}.out"
    out.unlink(missing_ok=True)
    command = [valgrind, "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no", *argv]
    log = workdir / f"callgrind.{name}.log"
    with log.open("wb") as sink:
        child = Child(command, env=child_env(), stdout=sink, stderr=sink)
        usage = await child.wait_async(timeout)
    found = _SUMMARY.search(out.read_bytes()) if out.exists() else None
    if usage.returncode != 0 or found is None:
        say(f"callgrind {name} failed (exit {usage.returncode}): {log.read_text(errors='replace')[-400:]}")
        return None
    return int(found.group(1))


async def _instructions(
    mode: Mode, workdir: Path, config: Path, url: str, ca: Path, token_file: Path
) -> dict[str, Any]:
    """Instructions per send of senderd's engine and of the bare aiohttp loop, both under callgrind in this
    run: each loop runs twice, with N1 and N2 sends after the same warm-up, and the difference over N2 - N1
    is the cost of one send without start-up and warm-up."""
    small, large = mode.count(200, 500), mode.count(600, 2000)
    figures: dict[str, Any] = {
        "instructions_per_send": None, "aiohttp_instructions_per_send": None, "instructions_ratio": None,
    }  # fmt: skip
    per_send: dict[str, float] = {}
    for role, target, extra in (
        ("senderd", str(config), []),
        ("aiohttp", url, ["--ca", str(ca), "--token-file", str(token_file)]),
    ):
        totals = []
        for count in (small, large):
            say(f"throughput: callgrind, {role} with {count} sends")
            argv = python_argv(
                "-m", "bench.throughput", role, target, *extra, "--count", str(count), "--warmup", "100",
                "--max-s", "900", "--out", str(workdir / f"callgrind-{role}.json"),
            )  # fmt: skip
            totals.append(await _callgrind(argv, workdir, f"{role}-{count}", timeout=1800))
        if None in totals:
            return figures
        assert totals[0] is not None and totals[1] is not None
        per_send[role] = (totals[1] - totals[0]) / (large - small)
    figures["instructions_per_send"] = round(per_send["senderd"])
    figures["aiohttp_instructions_per_send"] = round(per_send["aiohttp"])
    figures["instructions_ratio"] = rounded(per_send["senderd"] / per_send["aiohttp"], 3)
    return figures


def main() -> None:
    """The child roles (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m bench.throughput")
    parser.add_argument("role", choices=("senderd", "aiohttp"))
    parser.add_argument("target", help="senderd: the config file; aiohttp: the URL")
    parser.add_argument("--ca", type=Path)
    parser.add_argument("--token-file", type=Path)
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--max-s", type=float, default=60.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.role == "senderd":
        with open(os.devnull, "w", encoding="utf-8") as devnull:
            anyio.run(senderd_child, Path(args.target), args.count, args.warmup, args.max_s, devnull, args.out)
    else:
        if args.ca is None or args.token_file is None:
            parser.error("aiohttp needs --ca and --token-file")
        token = args.token_file.read_text().strip()
        anyio.run(aiohttp_child, args.target, args.ca, token, args.count, args.warmup, args.max_s, args.out)


if __name__ == "__main__":
    main()
