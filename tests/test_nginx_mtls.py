"""senderd against an independent stack: nginx, a standard TLS terminator that demands the client
certificate for the token endpoint, in front of an independent OAuth server issuing short-lived opaque
tokens, and a runtime that checks token expiry strictly (GetTimestamp, a CSRF-protected POST, and a flow
answering 503 + Retry-After on two calls of three); the service key exactly as the cockpit gives it.

Nothing of senderd's emulator is involved: nginx does the TLS and mTLS handshakes and forwards the
verification result; the plain-HTTP servers behind it are written here, independently.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from aiohttp import web

from senderd.emulator.pki import Pki
from senderd.emulator.servicekey import client_id_for, service_key_dict
from tests.tools import free_port, require_tool, senderd, senderd_run, wait_for_port

pytestmark = pytest.mark.anyio
LIFETIME = 3


class OAuthBackend:
    """An independent client-credentials server that trusts nginx's verdict on the client certificate,
    and a runtime behind the same nginx that accepts only its unexpired tokens."""

    def __init__(self, client_id: str, subject: str) -> None:
        self.client_id = client_id
        self.subject = subject
        self.seen: list[dict[str, str]] = []
        self.tokens: dict[str, float] = {}  # token -> monotonic expiry
        self.expired_uses = 0
        self.unauthorized = 0
        self.calls: dict[str, int] = {}
        self.csrf: dict[str, str] = {}  # session cookie -> CSRF token
        self.csrf_fetches = 0
        self.received: list[tuple[str, bytes]] = []

    def _token_ok(self, request: web.Request) -> bool:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        expiry = self.tokens.get(token)
        if expiry is None:
            self.unauthorized += 1
            return False
        if time.monotonic() >= expiry:  # strictly: no leeway
            self.expired_uses += 1
            return False
        return True

    async def runtime(self, request: web.Request) -> web.Response:
        if not self._token_ok(request):
            return web.Response(status=401)
        address = request.match_info["address"].lower()
        if address == "gettimestamp":
            self.received.append((address, b""))
            return web.Response(
                text=f"Current time (UTC): {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())}",
                headers={"SAP_MessageProcessingLogID": os.urandom(6).hex()},
            )
        if address == "orders":
            session = request.cookies.get("JSESSIONID")
            if request.method in ("GET", "HEAD") and request.headers.get("X-CSRF-Token", "").lower() == "fetch":
                self.csrf_fetches += 1
                response = web.Response(status=200)
                if session not in self.csrf:
                    session = os.urandom(8).hex()
                    self.csrf[session] = os.urandom(8).hex()
                    response.set_cookie("JSESSIONID", session, secure=True, httponly=True)
                response.headers["X-CSRF-Token"] = self.csrf[session]
                return response
            if session is None or self.csrf.get(session) != request.headers.get("X-CSRF-Token"):
                return web.Response(status=403, headers={"X-CSRF-Token": "Required"})
            self.received.append((address, await request.read()))
            return web.Response(status=201, text="created")
        if address == "flaky":
            self.calls[address] = self.calls.get(address, 0) + 1
            if self.calls[address] % 3 != 0:
                return web.Response(status=503, headers={"Retry-After": "1"})
            self.received.append((address, b""))
            return web.Response(text="ok")
        return web.Response(status=404, text="<html>Not Found</html>", content_type="text/html")

    async def token(self, request: web.Request) -> web.Response:
        form = await request.post()
        self.seen.append(
            {
                "verify": request.headers.get("X-SSL-Client-Verify", ""),
                "dn": request.headers.get("X-SSL-Client-S-DN", ""),
                "client_id": str(form.get("client_id", "")),
                "grant_type": str(form.get("grant_type", "")),
                "content_type": request.content_type,
            }
        )
        if (
            request.headers.get("X-SSL-Client-Verify") != "SUCCESS"
            or form.get("client_id") != self.client_id
            or form.get("grant_type") != "client_credentials"
        ):
            return web.json_response({"error": "unauthorized", "error_description": "Bad credentials"}, status=401)
        token = "opaque-" + os.urandom(8).hex()
        self.tokens[token] = time.monotonic() + LIFETIME
        return web.json_response(
            {
                "access_token": token,
                "token_type": "bearer",
                "expires_in": LIFETIME,
                "scope": "it-rt-x!b1.ESBMessaging.send",
            }
        )


@pytest.fixture
async def nginx_oauth(pki: Pki, tmp_path: Path) -> AsyncIterator[tuple[int, OAuthBackend, Path]]:
    """nginx on two ports: the token endpoint (client certificate required) and the runtime."""
    nginx = require_tool("nginx")
    client = pki.issue_client("nginx-client")
    backend = OAuthBackend(client_id_for("nginx"), client.cert.subject.rfc4514_string())
    app = web.Application()
    app.router.add_post("/oauth/token", backend.token)
    app.router.add_route("*", "/http/{address}", backend.runtime)
    runner = web.AppRunner(app)
    await runner.setup()
    backend_port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", backend_port)
    await site.start()
    (tmp_path / "server.pem").write_text(pki.server.cert_pem() + pki.intermediate.cert_pem())
    (tmp_path / "server.key").write_text(pki.server.key_pem_pkcs8())
    (tmp_path / "ca.pem").write_text(pki.ca_pem())
    port, runtime_port = free_port(), free_port()
    (tmp_path / "nginx.conf").write_text(f"""
daemon off;
master_process off;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log {tmp_path}/access.log;
    client_body_temp_path {tmp_path}/body; proxy_temp_path {tmp_path}/proxy;
    fastcgi_temp_path {tmp_path}/fcgi; uwsgi_temp_path {tmp_path}/uwsgi; scgi_temp_path {tmp_path}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        server_name localhost;
        ssl_certificate {tmp_path}/server.pem;
        ssl_certificate_key {tmp_path}/server.key;
        ssl_client_certificate {tmp_path}/ca.pem;
        ssl_verify_client on;
        ssl_verify_depth 3;
        location /oauth/token {{
            proxy_pass http://127.0.0.1:{backend_port};
            proxy_set_header X-SSL-Client-Verify $ssl_client_verify;
            proxy_set_header X-SSL-Client-S-DN $ssl_client_s_dn;
        }}
    }}
    server {{
        listen 127.0.0.1:{runtime_port} ssl;
        server_name localhost;
        ssl_certificate {tmp_path}/server.pem;
        ssl_certificate_key {tmp_path}/server.key;
        location /http/ {{ proxy_pass http://127.0.0.1:{backend_port}; }}
    }}
}}
""")
    key = service_key_dict(
        client_id=backend.client_id,
        token_url=f"https://localhost:{port}/oauth/token",
        runtime_url=f"https://localhost:{runtime_port}",
        client=client,
        chain=[pki.intermediate.cert],
    )
    key_path = tmp_path / "service-key.json"
    key_path.write_text(json.dumps(key, indent=2))
    process = await anyio.open_process([nginx, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")])
    try:
        await wait_for_port(port)
        await wait_for_port(runtime_port)
        yield port, backend, key_path
    finally:
        process.terminate()
        await process.wait()
        await process.aclose()
        await runner.cleanup()


async def test_token_through_nginx_mtls_terminator(nginx_oauth: tuple[int, OAuthBackend, Path], tmp_path: Path) -> None:
    _, backend, key_path = nginx_oauth
    code, out, err = await senderd("token", "--service-key", str(key_path), "--ca-file", str(tmp_path / "ca.pem"))
    assert code == 0, err
    assert f"lifetime:   {LIFETIME}s" in out
    assert backend.seen == [
        {
            "verify": "SUCCESS",
            "dn": backend.seen[0]["dn"],
            "client_id": backend.client_id,
            "grant_type": "client_credentials",
            "content_type": "application/x-www-form-urlencoded",
        }
    ]
    assert "CN=nginx-client" in backend.seen[0]["dn"]


async def test_nginx_refuses_a_handshake_without_certificate(
    nginx_oauth: tuple[int, OAuthBackend, Path], tmp_path: Path
) -> None:
    port, backend, _ = nginx_oauth
    secret_key = tmp_path / "secret-key.json"
    secret_key.write_text(
        json.dumps(
            {
                "clientid": backend.client_id,
                "clientsecret": "not-a-cert-secret",
                "tokenurl": f"https://localhost:{port}/oauth/token",
                "url": "https://localhost:1",
            }
        )
    )
    code, _, err = await senderd("token", "--service-key", str(secret_key), "--ca-file", str(tmp_path / "ca.pem"))
    assert code == 1
    # nginx answers 400 "No required SSL certificate was sent" over HTTP rather than failing the handshake
    assert "token server localhost:" in err
    assert backend.seen == []


async def test_the_daemon_against_the_independent_stack(
    nginx_oauth: tuple[int, OAuthBackend, Path], tmp_path: Path
) -> None:
    _, backend, key_path = nginx_oauth
    config = tmp_path / "senderd.toml"
    config.write_text(f"""
[credentials]
service_key = "{key_path}"
ca_file = "{tmp_path / "ca.pem"}"
[server]
listen = "127.0.0.1:0"
[[flows]]
name = "timestamp"
path = "/http/GetTimestamp"
every = "250ms"
start = "now"
expect_body = "Current time \\\\(UTC\\\\)"
[[flows]]
name = "orders"
path = "/http/Orders"
method = "POST"
csrf = true
body = "<Order/>"
content_type = "application/xml"
every = "500ms"
start = "now"
expect_status = [201]
[[flows]]
name = "flaky"
path = "/http/Flaky"
every = "1s"
start = "now"
retries = 3
""")
    async with senderd_run("-c", str(config)) as daemon:
        await daemon.wait_for("started")
        await anyio.sleep(3 * LIFETIME + 1)  # the span under test: several token lifetimes of sends
        daemon.send_signal(signal.SIGTERM)
        code = await daemon.wait()
    stop = next(i for i, e in enumerate(daemon.events) if e.get("event") == "stopping")
    sends = [e for e in daemon.events[:stop] if e.get("event") == "send_finished"]  # at the stop, retries end early
    by_flow = {name: [e for e in sends if e["flow"] == name] for name in ("timestamp", "orders", "flaky")}
    print(
        f"\nindependent stack, {3 * LIFETIME + 1}s: {len(sends)} sends, {len(backend.tokens)} tokens, "
        f"{backend.expired_uses} expired-token uses, {backend.unauthorized} unknown tokens, "
        f"{backend.csrf_fetches} CSRF fetches"
    )
    assert code == 0
    assert backend.expired_uses == 0
    assert backend.unauthorized == 0
    assert len(backend.tokens) >= 3  # refreshed ahead, several lifetimes
    assert len(by_flow["timestamp"]) >= 25
    assert all(e["outcome"] == "success" for e in sends), [e for e in sends if e["outcome"] != "success"]
    assert len(by_flow["orders"]) >= 10 and backend.csrf_fetches == 1  # one session, one CSRF token
    assert by_flow["flaky"] and all(e["attempts"] == 3 for e in by_flow["flaky"])  # 503, 503, 200
