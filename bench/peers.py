"""The programs senderd is compared with: finding them, and starting nginx as a TLS target.

A missing peer is not an error: the bench says how to install it and reports its figure as null.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio

from bench.common import LOOPBACK, free_port, say, wait_for_port
from bench.proc import Child
from senderd.emulator.pki import Pki

INSTALL = {
    "nginx": "apt-get install -y nginx-light",
    "wrk": "apt-get install -y wrk",
    "prometheus-blackbox-exporter": "apt-get install -y prometheus-blackbox-exporter",
    "newman": "npm install -g newman",
    "valgrind": "apt-get install -y valgrind",
}
"""How each peer is installed (Debian packages after `apt-get update`; newman from npm)."""

_SEARCH_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def find_tool(name: str, *, needed_for: str | None = None) -> str | None:
    """The path of `name`, or None; when `needed_for` is given, a missing tool is reported with the figure
    that is skipped and how to install the tool."""
    found = shutil.which(name) or shutil.which(name, path=_SEARCH_PATH)
    if found is None and needed_for is not None:
        hint = INSTALL.get(name, "")
        say(f"{name} not found, skipping {needed_for} (null in the JSON)" + (f"; install it: {hint}" if hint else ""))
    return found


def tool_version(argv: list[str]) -> str:
    """The first line a tool prints for its version flag (stdout or stderr), '' if it fails."""
    try:
        result = subprocess.run(argv, capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    text = (result.stdout or result.stderr).decode(errors="replace").strip()
    return text.splitlines()[0] if text else ""


@dataclass(frozen=True)
class Nginx:
    """A running nginx: its process and the base https URL."""

    child: Child
    url: str
    prefix: Path


NGINX_CONF = """\
daemon off;
master_process off;
worker_rlimit_nofile 4096;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 2048; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    client_body_temp_path {prefix}/body; proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fcgi; uwsgi_temp_path {prefix}/uwsgi; scgi_temp_path {prefix}/scgi;
    server {{
        listen {host}:{port} ssl;
        server_name localhost;
        ssl_certificate {prefix}/server.pem;
        ssl_certificate_key {prefix}/server.key;
        default_type text/plain;
        location /http/ {{ return 200 "ok"; }}
    }}
}}
"""


def write_nginx_files(prefix: Path, pki: Pki, port: int) -> Path:
    """Certificate chain, key (0600) and nginx.conf under `prefix`; returns the config's path."""
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / "error.log").touch()
    (prefix / "server.pem").write_text(pki.server.cert_pem() + pki.intermediate.cert_pem())
    key = prefix / "server.key"
    key.touch(mode=0o600)
    key.write_text(pki.server.key_pem_pkcs8())
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=prefix, host=LOOPBACK, port=port))
    return conf


@asynccontextmanager
async def started_nginx(nginx: str, pki: Pki, prefix: Path) -> AsyncIterator[Nginx]:
    """nginx in the foreground (one process, no master) on a free port with the emulator PKI's server
    certificate, answering `200 ok` under /http/ with keep-alive; stopped on exit."""
    port = free_port()
    conf = write_nginx_files(prefix, pki, port)
    log = (prefix / "stderr.log").open("wb")
    child = Child([nginx, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf)], stdout=log, stderr=log)
    try:
        try:
            await wait_for_port(port, 10, alive=lambda: child.running)
        except TimeoutError:
            detail = await anyio.Path(prefix / "error.log").read_text(errors="replace")
            raise RuntimeError(f"nginx did not start: {detail[-500:].strip()}") from None
        yield Nginx(child=child, url=f"https://{LOOPBACK}:{port}", prefix=prefix)
    finally:
        await child.stop(5)
        log.close()
