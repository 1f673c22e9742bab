"""`senderd token` against an independent OAuth server behind nginx, a standard TLS terminator that demands
the client certificate, with the key exactly as the cockpit gives it.

Nothing of the emulator's token server is involved: nginx does the mTLS handshake and forwards the
verification result; a small plain-HTTP OAuth server behind it issues opaque, short-lived tokens.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from aiohttp import web

from senderd.emulator.pki import Pki
from senderd.emulator.servicekey import client_id_for, service_key_dict
from tests.tools import free_port, require_tool, wait_for_port

pytestmark = pytest.mark.anyio
class OAuthBackend:
    """An independent client-credentials server that trusts nginx's verdict on the client certificate."""

    def __init__(self, client_id: str, subject: str) -> None:
        self.client_id = client_id
        self.subject = subject
        self.seen: list[dict[str, str]] = []

    async def token(self, request: web.Request) -> web.Response:
        form = await request.post()
        self.seen.append({"verify": request.headers.get("X-SSL-Client-Verify", ""),
                          "dn": request.headers.get("X-SSL-Client-S-DN", ""),
                          "client_id": str(form.get("client_id", "")),
                          "grant_type": str(form.get("grant_type", "")),
                          "content_type": request.content_type})
        if (request.headers.get("X-SSL-Client-Verify") != "SUCCESS" or form.get("client_id") != self.client_id
                or form.get("grant_type") != "client_credentials"):
            return web.json_response({"error": "unauthorized", "error_description": "Bad credentials"},
                                     status=401)
        return web.json_response({"access_token": "opaque-" + os.urandom(8).hex(), "token_type": "bearer",
                                  "expires_in": 5, "scope": "it-rt-x!b1.ESBMessaging.send"})


@pytest.fixture
async def nginx_oauth(pki: Pki, tmp_path: Path) -> AsyncIterator[tuple[int, OAuthBackend, Path]]:
    nginx = require_tool("nginx")
    client = pki.issue_client("nginx-client")
    backend = OAuthBackend(client_id_for("nginx"), client.cert.subject.rfc4514_string())
    app = web.Application()
    app.router.add_post("/oauth/token", backend.token)
    runner = web.AppRunner(app)
    await runner.setup()
    backend_port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", backend_port)
    await site.start()
    (tmp_path / "server.pem").write_text(pki.server.cert_pem() + pki.intermediate.cert_pem())
    (tmp_path / "server.key").write_text(pki.server.key_pem_pkcs8())
    (tmp_path / "ca.pem").write_text(pki.ca_pem())
    port = free_port()
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
}}
""")
    key = service_key_dict(client_id=backend.client_id, token_url=f"https://localhost:{port}/oauth/token",
                           runtime_url="https://localhost:1", client=client, chain=[pki.intermediate.cert])
    key_path = tmp_path / "service-key.json"
    key_path.write_text(json.dumps(key, indent=2))
    process = await anyio.open_process([nginx, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")])
    try:
        await wait_for_port(port)
        yield port, backend, key_path
    finally:
        process.terminate()
        await process.wait()
        await process.aclose()
        await runner.cleanup()


async def test_token_through_nginx_mtls_terminator(nginx_oauth: tuple[int, OAuthBackend, Path],
                                                    tmp_path: Path) -> None:
    _, backend, key_path = nginx_oauth
    result = await anyio.run_process(
        [sys.executable, "-m", "senderd", "token", "--service-key", str(key_path),
         "--ca-file", str(tmp_path / "ca.pem")], check=False)
    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout.decode()
    assert "lifetime:   5s" in out
    assert backend.seen == [{"verify": "SUCCESS", "dn": backend.seen[0]["dn"], "client_id": backend.client_id,
                             "grant_type": "client_credentials",
                             "content_type": "application/x-www-form-urlencoded"}]
    assert "CN=nginx-client" in backend.seen[0]["dn"]


async def test_nginx_refuses_a_handshake_without_certificate(nginx_oauth: tuple[int, OAuthBackend, Path],
                                                             tmp_path: Path) -> None:
    port, backend, _ = nginx_oauth
    secret_key = tmp_path / "secret-key.json"
    secret_key.write_text(json.dumps({"clientid": backend.client_id, "clientsecret": "not-a-cert-secret",
                                      "tokenurl": f"https://localhost:{port}/oauth/token",
                                      "url": "https://localhost:1"}))
    result = await anyio.run_process(
        [sys.executable, "-m", "senderd", "token", "--service-key", str(secret_key),
         "--ca-file", str(tmp_path / "ca.pem")], check=False)
    assert result.returncode == 1
    err = result.stderr.decode()
    # nginx answers 400 "No required SSL certificate was sent" over HTTP rather than failing the handshake
    assert "token server localhost:" in err
    assert backend.seen == []
