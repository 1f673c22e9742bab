"""Relay memory: the daemon's peak resident memory while 64 clients post 10 MiB messages at once.

Issue 11 (defect 10) measured 1.1 GB for this load before the relay bounded what it holds. The daemon
(`senderd run` with `[relay]`) runs as a subprocess; its peak comes from `VmHWM`. The emulator receives the
deliveries into a flow that reads bodies without keeping them. Figures:
- `relay_memory.peak_rss_mb`: the daemon's peak over the whole run (posts and their delivery);
- `relay_memory.idle_rss_mb`: before the posts, for scale;
- `relay_memory.accepted` / `refused`: 202s and 503s (the relay refuses what it cannot hold, with Retry-After);
- `relay_memory.delivered`: messages the runtime received by the end.

Runnable alone: python -m bench.relay_memory [--posts N] [--megabytes M]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path

import aiohttp
import anyio

from bench.common import (
    LOOPBACK,
    Mode,
    Section,
    child_env,
    flow_toml,
    free_port,
    poll_until,
    rounded,
    say,
    wait_for_port,
)
from bench.proc import Child, senderd_argv

POSTS = 64
MEGABYTES = 10
TARGET_PEAK_RSS_MB = 400.0
"""Idle (~65 MB) + relay.max_buffered_bytes (64 MiB) + the bodies being delivered, with room to spare."""


async def _post_all(url: str, posts: int, body: bytes) -> Counter[int]:
    statuses: Counter[int] = Counter()
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def one() -> None:
            try:
                async with session.post(url, data=body, headers={"Content-Type": "application/octet-stream"}) as answer:
                    await answer.read()
                    statuses[answer.status] += 1
            except aiohttp.ClientError:
                statuses[0] += 1

        async with anyio.create_task_group() as group:
            for _ in range(posts):
                group.start_soon(one)
    return statuses


async def measure(mode: Mode, workdir: Path, *, posts: int = POSTS, megabytes: int = MEGABYTES) -> Section:
    """relay_memory.peak_rss_mb and what the posts got."""
    from senderd.emulator.runtime import FlowSpec
    from senderd.emulator.stack import EmulatorStack

    port = free_port()
    relay = (
        f'[relay]\nlisten = "{LOOPBACK}:{port}"\nspool_dir = "{workdir / "spool"}"\n'
        f"max_message_bytes = {megabytes * 2 << 20}\nmax_spool_bytes = {posts * megabytes * 2 << 20}\n"
    )
    flows = flow_toml("bulk", "/http/Bulk", method="POST", csrf=False)
    async with EmulatorStack.started(
        workdir / "emulator", config_extra=relay + flows, flows=[FlowSpec("/Bulk", kind="count")]
    ) as stack:
        log = (workdir / "relay-memory-daemon.log").open("wb")
        daemon = Child(senderd_argv("run", "-c", str(stack.config_path)), env=child_env(), stdout=log, stderr=log)
        try:
            await wait_for_port(port, 20, alive=lambda: daemon.running)
            idle = daemon.rss_mb()
            say(f"relay memory: {posts} clients post {megabytes} MiB each at once")
            body = b"x" * (megabytes << 20)
            statuses = await _post_all(f"http://{LOOPBACK}:{port}/v1/flows/bulk/messages", posts, body)
            daemon.sample()
            accepted = statuses.get(202, 0)
            await poll_until(lambda: stack.runtime.stats.requests >= accepted, mode.pick(60, 120), 0.05)
            daemon.sample()
            peak = daemon.peak_kb / 1024
            delivered = stack.runtime.stats.requests
        finally:
            await daemon.stop(45)  # a stop delivers what is due first (pool.drain_timeout, 30 s)
            log.close()
    return {
        "peak_rss_mb": rounded(peak),
        "idle_rss_mb": rounded(idle),
        "posts": posts,
        "megabytes_each": megabytes,
        "accepted": accepted,
        "refused": sum(n for status, n in statuses.items() if status != 202),
        "statuses": {str(status): n for status, n in statuses.items()},
        "delivered": delivered,
    }


def main() -> None:
    """`python -m bench.relay_memory`: this figure alone."""
    parser = argparse.ArgumentParser(prog="python -m bench.relay_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--posts", type=int, default=POSTS)
    parser.add_argument("--megabytes", type=int, default=MEGABYTES)
    args = parser.parse_args()

    async def alone() -> Section:
        with tempfile.TemporaryDirectory(prefix="senderd-bench-relay-memory-") as scratch:
            return await measure(Mode(quick=False), Path(scratch), posts=args.posts, megabytes=args.megabytes)

    section = anyio.run(alone)
    print(json.dumps(section, indent=2))


if __name__ == "__main__":
    main()
