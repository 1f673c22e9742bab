"""Footprint: resident memory of the daemon idle with one flow and with 1,000 flows, beside the floor of
importing its dependencies alone; the time from `senderd once` starting to its first successful send; and
the time to import senderd's daemon path.

Every figure comes from a fresh subprocess: `senderd run` / `senderd once` as users start them, and small
`python -c` programs for the import figures (so nothing the bench itself imported is counted).
"""

from __future__ import annotations

import compileall
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from bench.common import Mode, Section, child_env, flow_toml, median, poll_until, rounded, say
from bench.proc import Child, senderd_argv

TARGET_IDLE_RSS_MB = 66.0
"""A budget, not a race (issue 17): today's level; what each dependency costs is reported beside it."""
TARGET_FIRST_SEND_S = 1.0

# What `senderd run` loads from its dependencies (the floor under any senderd code).
DEPENDENCIES = (
    "ssl",
    "sqlite3",
    "aiohttp",
    "aiohttp.web",
    "anyio",
    "cryptography.x509",
    "cryptography.hazmat.primitives.serialization",
    "structlog",
    "prometheus_client",
    "pydantic",
    "pydantic.main",
    "croniter",
    "multidict",
    "yarl",
)
SENDERD_MODULES = ("senderd.cli", "senderd.daemon", "senderd.engine", "senderd.config")

_MEASURE_IMPORT = """
import json, time
started = time.perf_counter()
for name in {modules!r}:
    __import__(name)
seconds = time.perf_counter() - started
rss = [int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS")][0]
print(json.dumps({{"seconds": seconds, "rss_kb": rss}}))
"""


def _import_figures(modules: tuple[str, ...]) -> dict[str, float]:
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE_IMPORT.format(modules=modules)],
        capture_output=True,
        timeout=60,
        check=True,
        env=child_env(),
    )
    figures: dict[str, float] = json.loads(result.stdout)
    return figures


async def _idle_rss(
    config: Path, runtime_messages: Any, wait_sends: int, settle_s: float, log: Path
) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MB of `senderd run` after `wait_sends` sends reached the runtime and `settle_s` more."""
    with log.open("wb") as output:
        child = Child(
            senderd_argv("run", "-c", str(config), "--log-level", "info"), env=child_env(), stdout=output, stderr=output
        )
        try:
            await poll_until(lambda: len(runtime_messages) >= wait_sends or not child.running, 30)
            if not child.running or len(runtime_messages) < wait_sends:
                raise RuntimeError(f"senderd run did not send (see {log})")
            await anyio.sleep(settle_s)
            rss, hwm = child.rss_mb(), child.sample().get("VmHWM", 0) / 1024
        finally:
            await child.stop(10)
    return rss, hwm


async def _first_send(config: Path, runtime_messages: list[Any], log: Path) -> tuple[float, float]:
    """(seconds from spawning `senderd once` to the runtime receiving its send, seconds until it exited)."""
    seen = len(runtime_messages)
    with log.open("wb") as output:
        started = time.time()
        child = Child(senderd_argv("once", "-c", str(config)), env=child_env(), stdout=output, stderr=output)
        usage = await child.wait_async(30)
    if usage.returncode != 0 or len(runtime_messages) <= seen:
        raise RuntimeError(f"senderd once failed (exit {usage.returncode}, see {log})")
    return runtime_messages[seen].at - started, usage.wall_s


def _compile_senderd() -> None:
    """Compile senderd's bytecode, as installing the wheel does: from an editable install with
    PYTHONDONTWRITEBYTECODE set (as on this machine) every start compiled senderd again, about 0.1 s
    that no installed senderd spends."""
    import senderd

    compileall.compile_dir(Path(senderd.__file__).parent, quiet=1)


async def measure(mode: Mode, workdir: Path) -> Section:
    """footprint.idle_rss_mb, import_floor_mb, rss_1000_flows_mb, once_first_send_s, import_s, ..."""
    from senderd.emulator.stack import EmulatorStack

    repeats = mode.count(3, 5)
    _compile_senderd()
    say("footprint: import floor and import time")
    bare = await anyio.to_thread.run_sync(_import_figures, ())
    floor = await anyio.to_thread.run_sync(_import_figures, DEPENDENCIES)
    costs = await _dependency_costs(bare["rss_kb"])
    imports = [await anyio.to_thread.run_sync(_import_figures, SENDERD_MODULES) for _ in range(repeats)]
    one_flow = flow_toml("timestamp", "/http/GetTimestamp", every="1s", start="now", expect_body="Current time")
    async with EmulatorStack.started(workdir / "emulator", config_extra=one_flow) as stack:
        messages = stack.runtime.stats.messages
        say("footprint: senderd once, start to first send")
        firsts = [
            await _first_send(stack.config_path, messages, workdir / f"once-{index}.log") for index in range(repeats)
        ]
        say("footprint: senderd run, idle with one flow")
        idle_rss, idle_hwm = await _idle_rss(
            stack.config_path, messages, len(messages) + 2, mode.pick(3, 10), workdir / "run-one.log"
        )
        many = 1000
        every = 5
        stack.write_files(
            "".join(flow_toml(f"flow-{index:04d}", "/http/GetTimestamp", every=f"{every}s") for index in range(many))
        )
        say(f"footprint: senderd run with {many} flows every {every}s")
        many_rss, many_hwm = await _idle_rss(
            stack.config_path, messages, len(messages) + 1, every + 1.0, workdir / "run-many.log"
        )
    return {
        "idle_rss_mb": rounded(idle_rss),
        "idle_peak_rss_mb": rounded(idle_hwm),
        "import_floor_mb": rounded(floor["rss_kb"] / 1024),
        "python_floor_mb": rounded(bare["rss_kb"] / 1024),
        "rss_1000_flows_mb": rounded(many_rss),
        "peak_rss_1000_flows_mb": rounded(many_hwm),
        "once_first_send_s": rounded(median([first for first, _ in firsts]), 3),
        "once_exit_s": rounded(median([total for _, total in firsts]), 3),
        "import_s": rounded(median([figures["seconds"] for figures in imports]), 3),
        "import_deps_s": rounded(floor["seconds"], 3),
        "import_rss_mb": rounded(median([figures["rss_kb"] / 1024 for figures in imports])),
        "dependency_rss_mb": costs,
    }


# Each heavy dependency by itself, for the figure of what it costs (its own imports included).
COSTED = ("aiohttp", "cryptography.x509", "pydantic", "prometheus_client", "structlog", "anyio", "croniter", "ssl")


async def _dependency_costs(bare_kb: float) -> dict[str, float | None]:
    """MB of resident memory that importing each dependency alone adds to a bare interpreter."""
    costs: dict[str, float | None] = {}
    for name in COSTED:
        figures = await anyio.to_thread.run_sync(_import_figures, (name,))
        costs[name] = rounded((figures["rss_kb"] - bare_kb) / 1024)
    return costs
