"""Soak: `senderd run` at a steady send rate (plus relay posts) against the emulator for N minutes,
sampling its RSS, open file descriptors and spool file size; all must stay flat.

    .venv/bin/python scripts/soak.py --minutes 10

Prints one line per sample and a verdict; exits 1 if RSS grew more than --max-rss-growth-mb between the
end of the warm-up and the end, if the fd count grew at all beyond a small slack, or if the spool file grew
by more than half (retention is 1 minute, and a delivered message's body is dropped at once).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import anyio

from senderd.emulator.stack import EmulatorStack

FLOWS = """
[token]
startup_jitter = "0s"

[pool]
workers = 8

[[flows]]
name = "timestamp"
path = "/http/GetTimestamp"
every = "{every}"
start = "now"

[[flows]]
name = "orders"
path = "/http/Orders"
method = "POST"
csrf = true
body = "<Order><Id>42</Id></Order>"
content_type = "application/xml"
every = "{every}"

[relay]
listen = "127.0.0.1:0"
spool_dir = "{spool}"
retention = "1m"
"""


def rss_kb(pid: int) -> int:
    """Resident set size of `pid` in KiB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def spool_kb(folder: Path) -> int:
    """Size of the spool's files (database and WAL) in KiB."""
    return sum(path.stat().st_size for path in folder.glob("spool.db*")) // 1024


def fds(pid: int) -> int:
    """Open file descriptors of `pid`."""
    return len(os.listdir(f"/proc/{pid}/fd"))


async def soak(minutes: float, every: str, posts_per_s: float, max_growth_mb: float) -> int:
    with tempfile.TemporaryDirectory(prefix="senderd-soak-") as scratch:
        folder = Path(scratch)
        extra = FLOWS.format(every=every, spool=folder / "spool")
        async with EmulatorStack.started(folder / "emu", token_lifetime=60, config_extra=extra) as stack:
            command = [sys.executable, "-m", "senderd", "run", "-c", str(stack.config_path), "--log-level", "info"]
            log_path = folder / "senderd.log"
            with log_path.open("wb") as log:
                process = await anyio.open_process(command, stdout=log, stderr=log)
            relay_url = ""
            samples: list[tuple[float, int, int, int]] = []
            async with process:
                try:
                    relay_url = await _relay_url(stack, folder)
                    started = time.monotonic()
                    end = started + minutes * 60
                    next_sample = started
                    posted = 0
                    async with aiohttp.ClientSession() as session:
                        while time.monotonic() < end:
                            if time.monotonic() >= next_sample:
                                sample = (
                                    time.monotonic() - started,
                                    rss_kb(process.pid),
                                    fds(process.pid),
                                    spool_kb(folder / "spool"),
                                )
                                samples.append(sample)
                                print(
                                    f"t={sample[0]:6.0f}s  rss={sample[1] / 1024:6.1f} MB  fds={sample[2]:3d}  "
                                    f"spool={sample[3] / 1024:6.2f} MB  "
                                    f"sends={len(stack.runtime.stats.messages):6d}  posted={posted}",
                                    flush=True,
                                )
                                next_sample += max(5.0, minutes * 60 / 40)
                            async with session.post(
                                f"{relay_url}/v1/flows/orders/messages",
                                data=b"<o/>" * 256,
                                headers={"Content-Type": "application/xml"},
                            ) as response:
                                posted += response.status == 202
                            await anyio.sleep(1 / posts_per_s)
                finally:
                    process.terminate()
                    await process.wait()
        warm = samples[min(len(samples) - 1, max(1, len(samples) // 5))]
        last = samples[-1]
        growth_mb = (last[1] - warm[1]) / 1024
        fd_growth = last[2] - warm[2]
        spool_growth_mb = (last[3] - warm[3]) / 1024
        sends = len(stack.runtime.stats.messages)
        print(
            f"\nsoak {minutes:g} min: {sends} deliveries, {stack.runtime.stats.expired_tokens} expired tokens, "
            f"RSS {warm[1] / 1024:.1f} -> {last[1] / 1024:.1f} MB after warm-up ({growth_mb:+.1f} MB), "
            f"fds {warm[2]} -> {last[2]} ({fd_growth:+d}), spool {warm[3] / 1024:.2f} -> {last[3] / 1024:.2f} MB "
            f"({spool_growth_mb:+.2f} MB)"
        )
        print(
            json.dumps(
                {
                    "minutes": minutes,
                    "deliveries": sends,
                    "rss_warm_mb": round(warm[1] / 1024, 1),
                    "rss_end_mb": round(last[1] / 1024, 1),
                    "fds_warm": warm[2],
                    "fds_end": last[2],
                    "spool_warm_mb": round(warm[3] / 1024, 2),
                    "spool_end_mb": round(last[3] / 1024, 2),
                }
            )
        )
        ok = (
            growth_mb <= max_growth_mb
            and fd_growth <= 2
            and spool_growth_mb <= max(1.0, warm[3] / 1024 / 2)  # retention is 1 minute: the file stays put
            and stack.runtime.stats.expired_tokens == 0
        )
        print("verdict: flat" if ok else "verdict: GROWING")
        return 0 if ok else 1


async def _relay_url(stack: EmulatorStack, folder: Path) -> str:
    log = folder / "senderd.log"
    with anyio.fail_after(20):
        while True:
            for line in log.read_text(errors="replace").splitlines():
                if '"relay_listening"' in line:
                    return str(json.loads(line)["url"])
            await anyio.sleep(0.1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--every", default="200ms", help="interval of each of the two scheduled flows")
    parser.add_argument("--posts-per-s", type=float, default=20.0, help="relay posts per second")
    parser.add_argument("--max-rss-growth-mb", type=float, default=5.0)
    args = parser.parse_args()
    return anyio.run(soak, args.minutes, args.every, args.posts_per_s, args.max_rss_growth_mb)


if __name__ == "__main__":
    sys.exit(main())
