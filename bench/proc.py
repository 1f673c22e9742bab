"""Child processes measured from outside: wall time, CPU time and resident memory, without psutil.

Memory comes from `/proc/PID/status` (`VmRSS` now, `VmHWM` the peak so far); CPU from `/proc/PID/stat`
while the child runs and from `os.wait4`'s resource usage once it has exited. `Child` reaps its process
itself with `wait4`, so the peak RSS (`ru_maxrss`) and CPU of exactly that child are known after exit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import anyio

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_POLL_S = 0.01


def proc_status_kb(pid: int) -> dict[str, int]:
    """The `Vm*` lines of /proc/PID/status in kB ({} once the process is gone)."""
    values: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Vm"):
                    name, _, rest = line.partition(":")
                    number = rest.split()[0] if rest.split() else "0"
                    values[name] = int(number)
    except (FileNotFoundError, ProcessLookupError):
        return {}
    return values


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a running process (0.0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    # after the ")" that closes comm: state is field 3, utime 14 and stime 15 (1-based, man 5 proc)
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def self_rss_mb() -> float:
    """This process's resident memory now, in MB."""
    return proc_status_kb(os.getpid()).get("VmRSS", 0) / 1024


@dataclass(frozen=True)
class Usage:
    """How a finished child ran."""

    returncode: int
    wall_s: float
    cpu_s: float
    peak_rss_mb: float


class ChildTimeout(Exception):
    """A child did not finish in the time it was given (it has been killed)."""


class Child:
    """A subprocess whose memory and CPU are watched; reaped with `wait4` to get its own peak RSS."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        stdout: IO[bytes] | int | None = subprocess.DEVNULL,
        stderr: IO[bytes] | int | None = subprocess.DEVNULL,
    ) -> None:
        self.argv = list(argv)
        self.started = time.perf_counter()
        self._popen = subprocess.Popen(
            self.argv,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
        )
        self.pid = self._popen.pid
        self.peak_kb = 0
        self.usage: Usage | None = None

    def sample(self) -> dict[str, int]:
        """Read /proc/PID/status now and remember the highest peak seen."""
        values = proc_status_kb(self.pid)
        self.peak_kb = max(self.peak_kb, values.get("VmHWM", 0), values.get("VmRSS", 0))
        return values

    def rss_mb(self) -> float:
        """Resident memory now, in MB."""
        return self.sample().get("VmRSS", 0) / 1024

    def cpu_s(self) -> float:
        """CPU seconds used so far (the final figure is in `usage` after exit)."""
        if self.usage is not None:
            return self.usage.cpu_s
        return proc_cpu_s(self.pid)

    def poll(self) -> Usage | None:
        """The usage if the child has exited (reaping it), else None."""
        if self.usage is not None:
            return self.usage
        self.sample()
        pid, status, rusage = os.wait4(self.pid, os.WNOHANG)
        if pid == 0:
            return None
        code = os.waitstatus_to_exitcode(status)
        self._popen.returncode = code  # reaped here: keep Popen from waiting for it again
        peak_kb = max(self.peak_kb, int(rusage.ru_maxrss))  # kB on Linux
        self.usage = Usage(
            returncode=code,
            wall_s=time.perf_counter() - self.started,
            cpu_s=rusage.ru_utime + rusage.ru_stime,
            peak_rss_mb=peak_kb / 1024,
        )
        return self.usage

    @property
    def running(self) -> bool:
        """True until the child has exited."""
        return self.poll() is None

    def send_signal(self, signum: int) -> None:
        """Send `signum` if the child still runs."""
        if self.poll() is None:
            os.kill(self.pid, signum)

    def wait(self, timeout: float) -> Usage:
        """Block until exit (sampling memory); kill it and raise ChildTimeout after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while (usage := self.poll()) is None:
            if time.monotonic() > deadline:
                self.kill()
                raise ChildTimeout(f"{self.argv[0]} did not finish within {timeout:g}s")
            time.sleep(_POLL_S)
        return usage

    async def wait_async(self, timeout: float) -> Usage:
        """`wait` for async callers: polls without blocking the event loop."""
        deadline = time.monotonic() + timeout
        while (usage := self.poll()) is None:
            if time.monotonic() > deadline:
                self.kill()
                raise ChildTimeout(f"{self.argv[0]} did not finish within {timeout:g}s")
            await anyio.sleep(_POLL_S)
        return usage

    async def stop(self, timeout: float = 10.0) -> Usage:
        """SIGTERM, then wait for exit (SIGKILL after `timeout`)."""
        self.send_signal(signal.SIGTERM)
        return await self.wait_async(timeout)

    def kill(self) -> None:
        """SIGKILL and reap (used on timeouts and errors)."""
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            while self.poll() is None:
                time.sleep(_POLL_S)

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.kill()


def python_argv(*arguments: str) -> list[str]:
    """This interpreter with `arguments` (children run in the same venv)."""
    return [sys.executable, *arguments]


def senderd_argv(*arguments: str) -> list[str]:
    """The `senderd` command of this venv (the console script next to this interpreter, else -m senderd)."""
    script = Path(sys.executable).with_name("senderd")
    return [str(script), *arguments] if script.exists() else [sys.executable, "-m", "senderd", *arguments]
