"""`python -m bench [--quick] [--only NAME ...]`: run the measurements, write bench/results/latest.json and
print a markdown table of the figures against their targets.

Run it from the project root with the project's venv; it installs nothing. Peers (nginx, wrk,
blackbox_exporter, newman) that are missing are named with their install command and their figures are
null. All traffic stays on 127.0.0.1; every loop is bounded in count and in time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio

from bench import footprint, forward, newman, relay, relay_memory, relay_pg, schedule, throughput, tokens
from bench.common import Mode, Section, machine, say, write_json
from bench.peers import INSTALL, find_tool, tool_version

Measure = Callable[[Mode, Path], Awaitable[Section]]

MEASUREMENTS: dict[str, tuple[str, Measure]] = {
    # name: (JSON section, measure)
    "throughput": ("throughput", throughput.measure),
    "token": ("token", tokens.measure),
    "schedule": ("schedule", schedule.measure),
    "footprint": ("footprint", footprint.measure),
    "newman": ("newman", newman.measure),
    "relay": ("relay", relay.measure),
    "relay_memory": ("relay_memory", relay_memory.measure),
    "forward": ("forward", forward.measure),
    "relay_pg": ("relay_pg", relay_pg.measure),
}

RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"


@dataclass(frozen=True)
class Target:
    """A figure's goal: `at_most` or `at_least` a bound."""

    key: str
    bound: float
    at_most: bool

    def text(self) -> str:
        return f"{'≤' if self.at_most else '≥'} {self.bound:g}"

    def met(self, value: Any) -> bool | None:
        if not isinstance(value, int | float):
            return None
        return value <= self.bound if self.at_most else value >= self.bound


TARGETS = {
    target.key: target
    for target in (
        Target("throughput.ratio_vs_aiohttp", throughput.TARGET_RATIO, at_most=False),
        Target("token.fetches_per_lifetime", tokens.TARGET_FETCHES_PER_LIFETIME, at_most=True),
        Target("token.extra_fetches", 0, at_most=True),
        Target("throughput.instructions_ratio", throughput.TARGET_INSTRUCTIONS_RATIO, at_most=True),
        Target("token.expired_sends", 0, at_most=True),
        Target("schedule.p99_lateness_ms", schedule.TARGET_P99_MS, at_most=True),
        Target("schedule.missed_ticks", 0, at_most=True),
        Target("footprint.idle_rss_mb", footprint.TARGET_IDLE_RSS_MB, at_most=True),
        Target("footprint.once_first_send_s", footprint.TARGET_FIRST_SEND_S, at_most=True),
        Target("relay.accept_rps", relay.TARGET_RPS, at_most=False),
        Target("relay.open_loop_p99_ack_ms", relay.TARGET_OPEN_LOOP_P99_MS, at_most=True),
        Target("relay_memory.peak_rss_mb", relay_memory.TARGET_PEAK_RSS_MB, at_most=True),
        Target("forward.ratio_vs_direct", forward.TARGET_RATIO, at_most=False),
        Target("forward.p99_added_ms", forward.TARGET_P99_ADDED_MS, at_most=True),
    )
}

# The rows of the table, in order (the JSON holds more).
TABLE = (
    ("throughput.senderd_rps", "sends/s"),
    ("throughput.aiohttp_rps", "req/s"),
    ("throughput.wrk_rps", "req/s"),
    ("throughput.ratio_vs_aiohttp", "×"),
    ("throughput.senderd_cpu_ms_per_1k", "CPU ms"),
    ("throughput.aiohttp_cpu_ms_per_1k", "CPU ms"),
    ("throughput.instructions_per_send", "instructions"),
    ("throughput.aiohttp_instructions_per_send", "instructions"),
    ("throughput.instructions_ratio", "×"),
    ("token.fetches", ""),
    ("token.planned_refreshes", ""),
    ("token.extra_fetches", ""),
    ("token.lifetimes", ""),
    ("token.fetches_per_lifetime", ""),
    ("token.expired_sends", ""),
    ("token.blackbox_fetches_per_1k_probes", ""),
    ("schedule.flows", ""),
    ("schedule.p50_lateness_ms", "ms"),
    ("schedule.p99_lateness_ms", "ms"),
    ("schedule.missed_ticks", ""),
    ("schedule.cpu_pct", "% of a core"),
    ("footprint.idle_rss_mb", "MB"),
    ("footprint.import_floor_mb", "MB"),
    ("footprint.rss_1000_flows_mb", "MB"),
    ("footprint.once_first_send_s", "s"),
    ("footprint.import_s", "s"),
    ("newman.senderd_s", "s"),
    ("newman.newman_s", "s"),
    ("newman.speedup", "×"),
    ("newman.rss_ratio", "×"),
    ("relay.accept_rps", "msgs/s"),
    ("relay.p99_ack_ms", "ms"),
    ("forward.rps", "req/s"),
    ("forward.ratio_vs_direct", "×"),
    ("forward.p50_added_ms", "ms"),
    ("forward.p99_added_ms", "ms"),
    ("forward.cpu_ms_per_1k", "CPU ms"),
    ("relay.open_loop_rate", "msgs/s"),
    ("relay.open_loop_p50_ack_ms", "ms"),
    ("relay.open_loop_p99_ack_ms", "ms"),
    ("relay.open_loop_1000_p50_ack_ms", "ms"),
    ("relay.open_loop_1000_p99_ack_ms", "ms"),
    ("relay_memory.peak_rss_mb", "MB"),
    ("relay_memory.accepted", ""),
)


def lookup(results: dict[str, Any], key: str) -> Any:
    """`results["a"]["b"]` for "a.b" (None when absent)."""
    section, _, name = key.partition(".")
    part = results.get(section)
    return part.get(name) if isinstance(part, dict) else None


def table(results: dict[str, Any]) -> str:
    """The markdown table of the main figures, their targets and whether each is met."""
    lines = ["| figure | value | unit | target | met |", "|---|---:|---|---|---|"]
    for key, unit in TABLE:
        value = lookup(results, key)
        target = TARGETS.get(key)
        met = target.met(value) if target is not None else None
        verdict = "" if target is None else {True: "yes", False: "**no**", None: "n/a"}[met]
        shown = "null" if value is None else f"{value:g}" if isinstance(value, float) else str(value)
        lines.append(f"| `{key}` | {shown} | {unit} | {target.text() if target else ''} | {verdict} |")
    return "\n".join(lines)


def peer_versions() -> dict[str, str | None]:
    """The peers' versions (None when missing), for the record."""
    commands = {"nginx": ["-v"], "wrk": ["-v"], "prometheus-blackbox-exporter": ["--version"], "newman": ["--version"]}
    versions: dict[str, str | None] = {}
    for name, flags in commands.items():
        path = find_tool(name)
        versions[name] = tool_version([path, *flags]) if path else None
    return versions


async def run(mode: Mode, names: list[str]) -> dict[str, Any]:
    """Run the chosen measurements in order; a failing one is reported and its section left empty."""
    results: dict[str, Any] = {
        "mode": mode.name,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "errors": {},
    }
    results["machine"]["peers"] = peer_versions()
    began = time.monotonic()
    for name in names:
        section, measure = MEASUREMENTS[name]
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=f"senderd-bench-{name}-") as scratch:
            try:
                results[section] = await measure(mode, Path(scratch))
            except Exception as exc:  # one broken measurement must not lose the others
                say(f"{name} failed: {exc}")
                traceback.print_exc(file=sys.stderr)
                results[section] = {}
                results["errors"][name] = f"{type(exc).__name__}: {exc}"
        say(f"{name} done in {time.monotonic() - started:.1f}s")
    results["duration_s"] = round(time.monotonic() - began, 1)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--quick", action="store_true", help="smaller sizes: under 2 minutes in all")
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted(MEASUREMENTS),
        metavar="NAME",
        help=f"run only this measurement (repeatable): {', '.join(MEASUREMENTS)}",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"where to write the JSON (default {RESULTS})")
    args = parser.parse_args()
    mode = Mode(quick=args.quick)
    names = args.only or list(MEASUREMENTS)
    say(
        f"{mode.name} run: {', '.join(names)}; peers install with: "
        + "; ".join(f"{command}" for command in dict.fromkeys(INSTALL.values()))
    )
    results = anyio.run(run, mode, names)
    write_json(args.out, results)
    print(table(results))
    print(f"\n{mode.name} run in {results['duration_s']:.0f}s; figures in {args.out}")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
