"""Relay on PostgreSQL: durable acknowledgements per second and their p99 at a fixed offered load
(open-loop), 1 → 2 → 3 replicas at full load (closed-loop), and the anchor: the same PostgreSQL doing
single-row durable inserts at the same concurrency (pgbench with a custom script).

The database is a throwaway cluster on this machine's disk with the durable defaults (fsync and
synchronous_commit on); the daemons are `senderd run` subprocesses with `[relay] store = "postgresql"`,
the emulator receives the deliveries. On 2 cores the load generator, the daemons and PostgreSQL share
the CPU: the replica figures say what the machine allows, not what replicas scale to.

    python -m bench.relay --store postgresql [--quick]
Child role (the open-loop generator): python -m bench.relay_pg --loadgen URL --rate R --seconds S --out FILE
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import anyio

from bench.common import LOOPBACK, Mode, Section, child_env, flow_toml, free_port, percentile, rounded, say
from bench.pgserver import PostgresServer, find_pg_tool, postgres_server
from bench.proc import Child, python_argv, senderd_argv
from bench.relay import CONCURRENCY, _Connection, message_request

OFFERED_RPS = 400.0
"""The fixed offered load of the latency figure (below what one replica sustains on 2 cores)."""


# --- the open-loop load generator (child) ------------------------------------------------------------------


async def openloop(url: str, rate: float, seconds: float, connections: int, out: Path) -> None:
    """Post 1 KiB messages at `rate` per second for `seconds`, each at its planned time whatever came before
    (a late answer does not delay the next post); latency counts from the planned time (no coordinated
    omission). Up to `connections` posts are open at once."""
    parts = urlsplit(url)
    request = message_request(url)
    pool = [
        _Connection(await anyio.connect_tcp(parts.hostname or LOOPBACK, parts.port or 80), request)
        for _ in range(connections)
    ]
    free = list(pool)
    available = anyio.Semaphore(connections)
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    total = int(rate * seconds)
    start = time.perf_counter() + 0.1

    async def one(planned: float) -> None:
        async with available:
            connection = free.pop()
            try:
                status = await connection.post()
            except (OSError, anyio.EndOfStream, anyio.BrokenResourceError, ValueError, IndexError):
                status = 0
            free.append(connection)
        latencies.append(time.perf_counter() - planned)
        statuses[status] += 1

    async with anyio.create_task_group() as group:
        for n in range(total):
            planned = start + n / rate
            await anyio.sleep(max(0.0, planned - time.perf_counter()))
            group.start_soon(one, planned)
    wall = time.perf_counter() - start
    for connection in pool:
        await connection.stream.aclose()
    await anyio.Path(out).write_text(
        json.dumps({"latencies": latencies, "wall_s": wall, "statuses": {str(k): v for k, v in statuses.items()}})
    )


# --- the parent --------------------------------------------------------------------------------------------


class _Replicas:
    """`count` senderd daemons on one database, each with its relay port."""

    def __init__(self, config: Path, dsn: str, ports: list[int], log: IO[bytes]) -> None:
        self.children = [
            Child(
                senderd_argv("run", "-c", str(config.with_name(f"replica-{port}.toml")), "--log-level", "warning"),
                env=child_env(SENDERD_POSTGRES_DSN=dsn),
                stdout=log,
                stderr=log,
            )
            for port in ports
        ]

    async def stop(self) -> None:
        for child in self.children:
            await child.stop(45)  # a stop delivers what is due first (pool.drain_timeout, 30 s)


def _replica_config(base: Path, port: int) -> Path:
    text = base.read_text().replace("@RELAY_PORT@", str(port))
    path = base.with_name(f"replica-{port}.toml")
    path.write_text(text)
    return path


async def _wait_ready(port: int, child: Child, timeout: float = 30) -> None:
    from bench.common import wait_for_port

    await wait_for_port(port, timeout, alive=lambda: child.running)


def pgbench_anchor(server: PostgresServer, workdir: Path, clients: int, seconds: float) -> Section:
    """The same server's single-row durable inserts of 1 KiB rows from `clients` connections: the ceiling
    the relay's acknowledgements are measured against."""
    pgbench = find_pg_tool("pgbench")
    if pgbench is None:
        say("pgbench not found, skipping the anchor (apt-get install postgresql)")
        return {"pgbench_insert_tps": None, "pgbench_latency_ms": None}
    server.psql("CREATE TABLE IF NOT EXISTS bench_insert (id bigserial PRIMARY KEY, body bytea NOT NULL)")
    script = workdir / "insert.sql"
    script.write_text("INSERT INTO bench_insert (body) VALUES (convert_to(repeat('x', 1024), 'UTF8'));\n")
    say(f"relay_pg: pgbench -c{clients} single-row inserts for {seconds:g}s")
    result = subprocess.run(
        [
            pgbench, "-h", "127.0.0.1", "-p", str(server.port), "-U", "senderd", "-n", "-M", "prepared",
            "-c", str(clients), "-j", "2", "-T", f"{seconds:g}", "-f", str(script), "senderd",
        ],
        check=True, capture_output=True, text=True, timeout=seconds + 60,
    )  # fmt: skip
    tps = re.search(r"tps = ([0-9.]+)", result.stdout)
    latency = re.search(r"latency average = ([0-9.]+) ms", result.stdout)
    return {
        "pgbench_insert_tps": rounded(float(tps.group(1))) if tps else None,
        "pgbench_latency_ms": rounded(float(latency.group(1)), 2) if latency else None,
        "pgbench_clients": clients,
    }


async def _run_loadgens(argvs: list[list[str]], log: IO[bytes], timeout: float) -> None:
    children = [Child(argv, env=child_env(), stdout=log, stderr=log) for argv in argvs]
    for child in children:
        usage = await child.wait_async(timeout)
        if usage.returncode != 0:
            raise RuntimeError(f"relay_pg load generator failed (exit {usage.returncode})")


def _figures(out: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(out.read_text())
    return result


async def measure(mode: Mode, workdir: Path) -> Section:
    """relay_pg.accept_rps, relay_pg.p99_ack_ms, relay_pg.replicas_rps, and the pgbench anchor."""
    from senderd.emulator.runtime import FlowSpec
    from senderd.emulator.stack import EmulatorStack

    seconds = mode.pick(4, 10)
    relay = (
        '[relay]\nlisten = "127.0.0.1:@RELAY_PORT@"\nstore = "postgresql"\ndsn_env = "SENDERD_POSTGRES_DSN"\n'
        "pool_size = 16\n"
    )
    flows = flow_toml("ingest", "/http/Ingest", method="POST", csrf=False)
    section: Section = {"offered_rps": OFFERED_RPS, "concurrency": CONCURRENCY}
    with postgres_server() as server:
        async with EmulatorStack.started(
            workdir / "emulator",
            config_extra=relay + flows,
            flows=[FlowSpec("/Ingest", methods=frozenset({"POST"}), body="ok")],
        ) as stack:
            with (workdir / "relay-pg.log").open("wb") as log:
                ports = [free_port() for _ in range(3)]
                for port in ports:
                    _replica_config(stack.config_path, port)
                replicas: list[_Replicas] = []
                try:
                    rates: list[float | None] = []
                    for count in (1, 2, 3):
                        started = _Replicas(stack.config_path, server.dsn, ports[len(replicas) : count], log)
                        replicas.append(started)
                        for port, child in zip(ports[len(replicas) - 1 : count], started.children, strict=True):
                            await _wait_ready(port, child)
                        if count == 1:  # the latency figure: one replica, fixed offered load
                            out = workdir / "openloop.json"
                            say(f"relay_pg: open loop, {OFFERED_RPS:g} posts/s for {seconds:g}s to 1 replica")
                            await _run_loadgens(
                                [
                                    python_argv(
                                        "-m",
                                        "bench.relay_pg",
                                        "--loadgen",
                                        f"http://{LOOPBACK}:{ports[0]}/v1/flows/ingest/messages",
                                        "--rate",
                                        str(OFFERED_RPS),
                                        "--seconds",
                                        str(seconds),
                                        "--out",
                                        str(out),
                                    )
                                ],
                                log,
                                seconds * 4 + 30,
                            )
                            figures = _figures(out)
                            latencies = [x * 1000 for x in figures["latencies"]]
                            accepted = int(figures["statuses"].get("202", 0))
                            section |= {
                                "accept_rps": rounded(accepted / figures["wall_s"]),
                                "p99_ack_ms": rounded(percentile(latencies, 0.99), 2),
                                "p50_ack_ms": rounded(percentile(latencies, 0.50), 2),
                                "statuses": figures["statuses"],
                            }
                        rates.append(await _closed_loop(mode, workdir, ports[:count], log))
                    section["replicas_rps"] = rates
                finally:
                    for started in replicas:
                        await started.stop()
        (workdir / "pgbench").mkdir()
        section |= pgbench_anchor(server, workdir / "pgbench", CONCURRENCY, seconds)
    return section


async def _closed_loop(mode: Mode, workdir: Path, ports: list[int], log: IO[bytes]) -> float | None:
    """Accepted posts/s with CONCURRENCY clients spread over the replicas' relays (as fast as they answer)."""
    count = mode.count(3000, 10000)
    each = CONCURRENCY // len(ports)
    say(f"relay_pg: closed loop, {CONCURRENCY} clients over {len(ports)} replica(s), {count} posts")
    outs = [workdir / f"closed-{len(ports)}-{n}.json" for n in range(len(ports))]
    await _run_loadgens(
        [
            python_argv(
                "-m",
                "bench.relay",
                "--loadgen",
                f"http://{LOOPBACK}:{port}/v1/flows/ingest/messages",
                "--count",
                str(count // len(ports)),
                "--warmup",
                "100",
                "--concurrency",
                str(each),
                "--out",
                str(out),
            )
            for port, out in zip(ports, outs, strict=True)
        ],
        log,
        mode.pick(90, 240),
    )
    results = [_figures(out) for out in outs]
    accepted = sum(int(r["statuses"].get("202", 0)) for r in results)
    wall = max(r["wall_s"] for r in results)
    return rounded(accepted / wall) if wall > 0 else None


def main() -> None:
    """The open-loop load generator child."""
    parser = argparse.ArgumentParser(prog="python -m bench.relay_pg")
    parser.add_argument("--loadgen", metavar="URL", required=True)
    parser.add_argument("--rate", type=float, default=OFFERED_RPS)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=CONCURRENCY)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    anyio.run(openloop, args.loadgen, args.rate, args.seconds, args.connections, args.out)


if __name__ == "__main__":
    main()
