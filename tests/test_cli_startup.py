"""How `senderd once` starts: the garbage collector paused while it loads, and the modules it loads."""

from __future__ import annotations

import gc
import json
import subprocess
import sys

import anyio.to_thread
import pytest

from senderd.cli import StartupCollection
from senderd.emulator.stack import EmulatorStack

# What `senderd once` has no use for: the relay and its stores, the forwarder, the daemon and its HTTP server,
# schedules' cron maths, the emulator, JWT decoding (`token` only) and the Pushgateway client (`--push-gateway`).
NOT_FOR_ONCE = (
    "sqlite3",
    "psycopg",
    "psycopg_pool",
    "croniter",
    "jwt",
    "aiohttp.web",
    "senderd.relay",
    "senderd.forward",
    "senderd.daemon",
    "senderd.server",
    "senderd.scheduler",
    "senderd.cluster",
    "senderd.emulator",
    "senderd.demo",
    "senderd.push",
)
_LOADED_BY = """
import json, sys
before = set(sys.modules)  # the interpreter's, and under pytest-cov coverage's (sqlite3 among them)
from senderd.cli import main
cli = set(sys.modules) - before
code = main(sys.argv[1:]) if sys.argv[1:] else 0
print(json.dumps({"code": code, "cli": sorted(cli), "all": sorted(set(sys.modules) - before)}), file=sys.__stderr__)
"""


def _loaded_by(*args: str) -> tuple[int, set[str], set[str]]:
    """Exit code, the modules that importing senderd.cli loaded, and those loaded once `senderd ARGS` is done
    (both without what the interpreter had loaded before)."""
    result = subprocess.run([sys.executable, "-c", _LOADED_BY, *args], capture_output=True, text=True, timeout=60)
    found = json.loads(result.stderr.strip().splitlines()[-1])
    return found["code"], set(found["cli"]), set(found["all"])


def _of(names: set[str], packages: tuple[str, ...]) -> list[str]:
    return sorted(name for name in names if any(name == p or name.startswith(f"{p}.") for p in packages))


@pytest.mark.parametrize("started", [False, True])
def test_the_collector_runs_again_after_a_paused_start(started: bool) -> None:
    startup = StartupCollection()
    frozen = gc.get_freeze_count()  # a Daemon started in this process froze what it had
    assert gc.isenabled()
    with startup.paused():
        assert not gc.isenabled()
        if started:
            startup.started()
            assert gc.isenabled()
            assert gc.get_freeze_count() > frozen
            startup.started()  # a second call changes nothing
    assert gc.isenabled()
    if not started:
        assert gc.get_freeze_count() <= frozen  # nothing frozen (frozen objects may be freed meanwhile)


def test_a_command_that_does_not_pause_leaves_the_collector_alone() -> None:
    startup = StartupCollection()
    frozen = gc.get_freeze_count()
    with startup.paused(False):
        assert gc.isenabled()
        startup.started()
        assert gc.get_freeze_count() <= frozen
    assert gc.isenabled()


def test_a_collector_disabled_by_the_caller_stays_disabled() -> None:
    startup = StartupCollection()
    frozen = gc.get_freeze_count()
    gc.disable()
    try:
        with startup.paused():
            startup.started()
            assert not gc.isenabled() and gc.get_freeze_count() <= frozen
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_an_error_during_the_start_lets_the_collector_run_again() -> None:
    startup = StartupCollection()

    def failing_start() -> None:
        with startup.paused():
            raise RuntimeError("start failed")

    with pytest.raises(RuntimeError):
        failing_start()
    assert gc.isenabled()


def test_importing_the_cli_loads_neither_config_nor_logging() -> None:
    """They load inside `main`, after the collector is paused for `once`."""
    _, cli, _ = _loaded_by()
    assert _of(cli, ("pydantic", "structlog", "aiohttp", "cryptography", "senderd.config", "senderd.logs")) == []


@pytest.mark.anyio
async def test_once_loads_nothing_it_does_not_use(stack: EmulatorStack) -> None:
    code, _, loaded = await anyio.to_thread.run_sync(_loaded_by, "once", "-c", str(stack.config_path))
    assert code == 0
    assert _of(loaded, NOT_FOR_ONCE) == []
