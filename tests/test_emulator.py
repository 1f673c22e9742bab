"""The BTP emulator over real TLS sockets on 127.0.0.1: token server, runtime, PKI and service keys."""

from __future__ import annotations

import base64
import json
import re
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs12

from senderd.emulator import (
    FlowSpec,
    IssuedCert,
    Pki,
    RevokedTokenError,
    Runtime,
    TokenServer,
    client_id_for,
    service_key_dict,
)

pytestmark = pytest.mark.anyio

TENANT = "acme"
SEND_SCOPE = f"it-rt-{TENANT}!b7.ESBMessaging.send"
FORM = "application/x-www-form-urlencoded"


@pytest.fixture(scope="module")
def client(pki: Pki) -> IssuedCert:
    """An RSA client certificate, as SAP issues it."""
    return pki.issue_client("senderd-test")


@pytest.fixture(scope="module")
def client_id() -> str:
    return client_id_for(TENANT)


@pytest.fixture
async def token_server(pki: Pki, client: IssuedCert, client_id: str) -> AsyncIterator[TokenServer]:
    server = TokenServer(pki, subdomain=TENANT)
    server.add_certificate_client(client_id, client.cert, [SEND_SCOPE])
    server.add_secret_client("secret-client", "s3cr3t", [SEND_SCOPE])
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def runtime(pki: Pki, token_server: TokenServer) -> AsyncIterator[Runtime]:
    rt = Runtime(pki, token_server)
    await rt.start()
    yield rt
    await rt.stop()


def client_context(pki: Pki, directory: Path, client: IssuedCert | None = None) -> ssl.SSLContext:
    """Trust the emulator's root; present `client` with its intermediate when given."""
    ctx = ssl.create_default_context(cadata=pki.ca_pem())
    if client is not None:
        path = directory / f"client-{client.cert.serial_number:x}.pem"
        path.write_text(client.key_pem_pkcs1() + client.cert_pem() + pki.intermediate.cert_pem())
        ctx.load_cert_chain(path)
    return ctx


@asynccontextmanager
async def session(ctx: ssl.SSLContext) -> AsyncIterator[aiohttp.ClientSession]:
    # unsafe=True: aiohttp's cookie jar drops cookies from IP-address hosts otherwise.
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx), cookie_jar=jar) as s:
        yield s


async def fetch_token(s: aiohttp.ClientSession, server: TokenServer, client_id: str) -> aiohttp.ClientResponse:
    """POST a client_credentials request the way SAP documents it; the body is read before returning."""
    form = {"grant_type": "client_credentials", "client_id": client_id}
    response = await s.post(server.token_url, data=form, headers={"Accept": "application/json"})
    await response.read()
    return response


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# -- PKI and service keys --------------------------------------------------------------------------


def test_issued_cert_formats_and_repr(pki: Pki, client: IssuedCert) -> None:
    assert "PRIVATE" not in repr(client)
    assert "senderd-test" in repr(client)
    assert "BEGIN RSA PRIVATE KEY" in client.key_pem_pkcs1()
    assert "BEGIN PRIVATE KEY" in client.key_pem_pkcs8()
    assert "BEGIN ENCRYPTED PRIVATE KEY" in client.key_pem_pkcs8(b"pw")
    assert client.key.key_size == 2048
    assert "BEGIN EC PRIVATE KEY" in pki.issue_client("ec", key_type="ec").key_pem_pkcs1()
    key, cert, extra = pkcs12.load_key_and_certificates(client.pkcs12([pki.intermediate.cert], b"pw"), b"pw")
    assert cert == client.cert
    assert extra == [pki.intermediate.cert]
    assert key is not None
    subject = client.cert.subject.rfc4514_string()
    assert subject.startswith("CN=senderd-test,L=")
    assert subject.endswith("O=SAP SE,C=DE")
    assert client.cert.issuer == pki.intermediate.cert.subject
    assert pki.intermediate.cert.issuer == pki.root.cert.subject
    san = pki.server.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)


def test_service_key_layouts(pki: Pki, client: IssuedCert, client_id: str) -> None:
    common: dict[str, Any] = {"client_id": client_id, "token_url": "https://t/oauth/token", "runtime_url": "https://rt"}
    nested = service_key_dict(**common, client=client, chain=[pki.intermediate.cert])
    oauth = nested["oauth"]
    assert oauth["certificate"].count("BEGIN CERTIFICATE") == 2
    assert oauth["certificate"].startswith(client.cert_pem())
    assert oauth["key"].startswith("-----BEGIN RSA PRIVATE KEY")
    details = oauth["certificatedetails"]
    assert details["serialnumber"] == f"0x{client.cert.serial_number:X}"  # as SAP writes it
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", details["validuntil"])
    assert datetime.fromisoformat(details["validuntil"]) == client.cert.not_valid_after_utc
    assert {"clientid", "tokenurl", "url", "createdate"} <= oauth.keys()
    assert "|" in client_id
    assert "!" in client_id
    flat = service_key_dict(
        **common,
        client=client,
        chain=[pki.intermediate.cert],
        layout="flat",
        key_format="pkcs8",
        chain_order="leaf-last",
    )
    assert flat["certificate"].endswith(client.cert_pem())
    assert "BEGIN PRIVATE KEY" in flat["key"]
    external = service_key_dict(**common, client=client, include_key=False)
    assert "key" not in external["oauth"]
    assert "certificate" in external["oauth"]
    secret = service_key_dict(**common, client=None, client_secret="x")["oauth"]
    assert secret["clientsecret"] == "x"
    assert "certificate" not in secret
    assert "certificatedetails" not in secret
    json.dumps(nested)


# -- token server ----------------------------------------------------------------------------------


async def test_certificate_client_gets_a_verifiable_token(
    pki: Pki, client: IssuedCert, client_id: str, token_server: TokenServer, tmp_path: Path
) -> None:
    async with session(client_context(pki, tmp_path, client)) as s:
        response = await fetch_token(s, token_server, client_id)
        assert response.status == 200, await response.text()
        body = await response.json()
        jwks = await (await s.get(token_server.jwks_url)).json()
        oidc = await (await s.get(token_server.url + "/.well-known/openid-configuration")).json()
    assert body["token_type"] == "bearer"
    assert body["scope"] == SEND_SCOPE
    assert 3598 <= body["expires_in"] <= 3600
    header = jwt.get_unverified_header(body["access_token"])
    assert header["alg"] == "RS256"
    assert header["jku"] == token_server.jwks_url
    key = jwt.PyJWK(next(k for k in jwks["keys"] if k["kid"] == header["kid"]))
    claims = jwt.decode(body["access_token"], key, algorithms=["RS256"], options={"verify_aud": False})
    assert claims == token_server.verify(body["access_token"])
    assert claims["client_id"] == claims["cid"] == claims["sub"] == claims["azp"] == client_id
    assert claims["scope"] == [SEND_SCOPE]
    assert claims["grant_type"] == "client_credentials"
    assert claims["iss"] == token_server.token_url
    assert claims["jti"] == body["jti"]
    assert claims["ext_attr"]["enhancer"] == "XSUAA"
    assert claims["ext_attr"]["zdn"] == TENANT
    assert f"it-rt-{TENANT}!b7" in claims["aud"]
    assert oidc["mtls_endpoint_aliases"]["token_endpoint"] == token_server.token_url
    assert token_server.stats.issued == 1
    assert token_server.stats.statuses[200] == 1


async def test_wrong_or_missing_certificate_is_bad_credentials(
    pki: Pki, client_id: str, token_server: TokenServer, tmp_path: Path
) -> None:
    other = pki.issue_client("someone-else")
    for ctx in (client_context(pki, tmp_path, other), client_context(pki, tmp_path)):
        async with session(ctx) as s:
            response = await fetch_token(s, token_server, client_id)
            assert response.status == 401
            assert await response.json() == {"error": "unauthorized", "error_description": "Bad credentials"}
    assert token_server.stats.rejected == 2
    assert token_server.stats.issued == 0


async def test_secret_client_basic_and_body(pki: Pki, token_server: TokenServer, tmp_path: Path) -> None:
    basic = base64.b64encode(b"secret-client:s3cr3t").decode()
    wrong = base64.b64encode(b"secret-client:nope").decode()
    async with session(client_context(pki, tmp_path)) as s:
        ok = await s.post(
            token_server.token_url,
            data={"grant_type": "client_credentials"},
            headers={"Authorization": f"Basic {basic}"},
        )
        assert ok.status == 200
        assert (await ok.json())["access_token"]
        form = {"grant_type": "client_credentials", "client_id": "secret-client", "client_secret": "s3cr3t"}
        body = await s.post(token_server.token_url, data=form)
        assert body.status == 200
        both = await s.post(token_server.token_url, data=form, headers={"Authorization": f"Basic {basic}"})
        assert both.status == 400  # RFC 6749 5.2: one authentication method per request
        assert (await both.json())["error"] == "invalid_request"
        assert token_server.stats.authentications == [
            ("secret-client", "client_secret_basic"),
            ("secret-client", "client_secret_post"),
        ]
        bad = await s.post(
            token_server.token_url,
            data={"grant_type": "client_credentials"},
            headers={"Authorization": f"Basic {wrong}"},
        )
        assert bad.status == 401
        grant = await s.post(
            token_server.token_url, data={"grant_type": "password"}, headers={"Authorization": f"Basic {basic}"}
        )
        assert grant.status == 400
        assert (await grant.json())["error"] == "unsupported_grant_type"
        as_json = await s.post(
            token_server.token_url,
            json={"grant_type": "client_credentials"},
            headers={"Authorization": f"Basic {basic}"},
        )
        assert as_json.status == 400
        assert (await as_json.json())["error"] == "invalid_request"


async def test_rate_limit_down_and_lifetime(
    pki: Pki, client: IssuedCert, client_id: str, token_server: TokenServer, tmp_path: Path
) -> None:
    token_server.faults.rate_limited = 1
    token_server.faults.retry_after = 2.5
    async with session(client_context(pki, tmp_path, client)) as s:
        limited = await fetch_token(s, token_server, client_id)
        assert limited.status == 429
        assert limited.headers["Retry-After"] == "3"
        token_server.faults.down = True
        assert (await fetch_token(s, token_server, client_id)).status == 503
        token_server.faults.down = False
        token_server.token_lifetime = 3
        short = await fetch_token(s, token_server, client_id)
        assert short.status == 200
        body = await short.json()
    claims = token_server.verify(body["access_token"])
    assert body["expires_in"] in (2, 3)
    assert 2 <= claims["exp"] - claims["iat"] <= 3
    assert token_server.stats.statuses == {429: 1, 503: 1, 200: 1}
    assert token_server.stats.requests == 3
    assert len(token_server.stats.issued_at) == 1


async def test_require_client_cert_fails_the_handshake(
    pki: Pki, client: IssuedCert, client_id: str, tmp_path: Path
) -> None:
    server = TokenServer(pki, require_client_cert=True)
    server.add_certificate_client(client_id, client.cert, [SEND_SCOPE])
    await server.start()
    try:
        async with session(client_context(pki, tmp_path)) as s:
            with pytest.raises(aiohttp.ClientError):
                await fetch_token(s, server, client_id)
        async with session(client_context(pki, tmp_path, client)) as s:
            assert (await fetch_token(s, server, client_id)).status == 200
    finally:
        await server.stop()


async def test_expired_server_certificate_is_refused(pki: Pki, tmp_path: Path) -> None:
    yesterday = datetime.now(UTC) - timedelta(days=1)
    expired = replace(pki, server=pki.issue_server(["127.0.0.1"], not_after=yesterday))
    server = TokenServer(expired)
    await server.start()
    try:
        async with session(client_context(pki, tmp_path)) as s:
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await s.get(server.jwks_url)
    finally:
        await server.stop()


# -- runtime ---------------------------------------------------------------------------------------


async def test_end_to_end_get_timestamp(
    pki: Pki, client: IssuedCert, client_id: str, token_server: TokenServer, runtime: Runtime, tmp_path: Path
) -> None:
    async with session(client_context(pki, tmp_path, client)) as s:
        token = (await (await fetch_token(s, token_server, client_id)).json())["access_token"]
        response = await s.get(runtime.url + "/http/gettimestamp?x=1", headers=bearer(token))
        text = await response.text()
    assert response.status == 200
    assert re.fullmatch(r"Current time \(UTC\): \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", text)
    assert len(response.headers["SAP_MessageProcessingLogID"]) == 28
    assert "SAP_MplCorrelationId" in response.headers
    [message] = runtime.stats.messages
    assert message.address == "/gettimestamp"
    assert message.query == {"x": "1"}
    assert message.mpl_id == response.headers["SAP_MessageProcessingLogID"]
    assert message.headers["authorization"] == "Bearer [redacted]"
    assert message.token_jti == jwt.decode(token, options={"verify_signature": False})["jti"]
    assert runtime.stats.expired_tokens == runtime.stats.invalid_tokens == runtime.stats.missing_tokens == 0


async def test_runtime_rejects_bad_tokens(
    pki: Pki, client_id: str, token_server: TokenServer, runtime: Runtime, tmp_path: Path
) -> None:
    stranger = TokenServer(pki)
    url = runtime.url + "/http/GetTimestamp"
    async with session(client_context(pki, tmp_path)) as s:
        assert (await s.get(url)).status == 401
        expired = token_server.mint(client_id, lifetime=-10)
        assert (await s.get(url, headers=bearer(expired))).status == 401
        assert (await s.get(url, headers=bearer("garbage"))).status == 401
        assert (await s.get(url, headers=bearer(stranger.mint(client_id, lifetime=60)))).status == 401
        basic = base64.b64encode(b"u:p").decode()
        assert (await s.get(url, headers={"Authorization": f"Basic {basic}"})).status == 401
        no_role = await s.get(url, headers=bearer(token_server.mint(client_id, lifetime=60, scopes=["uaa.resource"])))
        assert no_role.status == 403
        assert "X-CSRF-Token" not in no_role.headers
    stats = runtime.stats
    assert (stats.missing_tokens, stats.expired_tokens, stats.invalid_tokens) == (1, 1, 3)
    assert stats.by_status == {401: 5, 403: 1}
    assert not stats.messages


@pytest.mark.parametrize("required_header", [False, True], ids=["no-header", "X-CSRF-Token-Required"])
async def test_csrf_fetch_post_and_expiry(
    pki: Pki, client_id: str, token_server: TokenServer, runtime: Runtime, tmp_path: Path, required_header: bool
) -> None:
    runtime.csrf_required_header = required_header  # unconfirmed for Cloud Integration: both are served
    auth = bearer(token_server.mint(client_id, lifetime=60))
    url = runtime.url + "/http/Orders"
    async with session(client_context(pki, tmp_path)) as s:
        refused = await s.post(url, data=b"<order/>", headers=auth)
        assert refused.status == 403
        assert refused.headers.get("X-CSRF-Token") == ("Required" if required_header else None)
        fetched = await s.get(url, headers={**auth, "X-CSRF-Token": "Fetch"})
        csrf = fetched.headers["X-CSRF-Token"]
        assert fetched.status == 200
        assert csrf not in ("", "Required")
        assert {"JSESSIONID", "__VCAP_ID__"} <= {c.key for c in s.cookie_jar}
        posted = await s.post(
            url, data=b"<order/>", headers={**auth, "X-CSRF-Token": csrf, "Content-Type": "application/xml"}
        )
        assert posted.status == 200
        assert await posted.read() == b"<order/>"
        assert posted.headers["Content-Type"] == "application/xml"
        runtime.expire_csrf_tokens()
        stale = await s.post(url, data=b"<order/>", headers={**auth, "X-CSRF-Token": csrf})
        assert stale.status == 403
        assert ("X-CSRF-Token" in stale.headers) is required_header
        refetched = await s.head(url, headers={**auth, "X-CSRF-Token": "fetch"})
        fresh = refetched.headers["X-CSRF-Token"]
        again = await s.post(url, data=b"2", headers={**auth, "X-CSRF-Token": fresh})
        assert again.status == 200
    async with session(client_context(pki, tmp_path)) as other:  # a token without its session cookies
        foreign = await other.post(url, data=b"3", headers={**auth, "X-CSRF-Token": csrf})
        assert foreign.status == 403
    assert runtime.stats.csrf_fetches == 2
    assert runtime.stats.csrf_rejections == 3
    assert [m.body for m in runtime.stats.messages] == [b"<order/>", b"2"]


async def test_csrf_fetch_switches_and_a_flow_role(
    pki: Pki, client_id: str, token_server: TokenServer, runtime: Runtime, tmp_path: Path
) -> None:
    """HEAD refused (a client must GET), a token handed out with an error status, and a flow's own User Role
    that a token lacks: refused after CSRF, so a fresh token does not help."""
    auth = bearer(token_server.mint(client_id, lifetime=60))
    url = runtime.url + "/http/Orders"
    runtime.csrf_head_fetch = False
    runtime.csrf_fetch_status = 405
    async with session(client_context(pki, tmp_path)) as s:
        head = await s.head(url, headers={**auth, "X-CSRF-Token": "Fetch"})
        assert head.status == 405
        assert "X-CSRF-Token" not in head.headers
        get = await s.get(url, headers={**auth, "X-CSRF-Token": "Fetch"})
        assert get.status == 405
        token = get.headers["X-CSRF-Token"]
        assert (await s.post(url, data=b"1", headers={**auth, "X-CSRF-Token": token})).status == 200
        runtime.flows["/orders"].user_role = "OrdersSender"
        assert (await s.post(url, data=b"2", headers={**auth, "X-CSRF-Token": token})).status == 403
        role = bearer(token_server.mint(client_id, lifetime=60, scopes=[SEND_SCOPE, "it-rt-acme!b7.OrdersSender"]))
        assert (await s.post(url, data=b"3", headers={**role, "X-CSRF-Token": token})).status == 200
    assert [m.body for m in runtime.stats.messages] == [b"1", b"3"]


async def test_fetch_header_on_unprotected_flow_runs_it(
    pki: Pki, client_id: str, token_server: TokenServer, runtime: Runtime, tmp_path: Path
) -> None:
    auth = bearer(token_server.mint(client_id, lifetime=60))
    async with session(client_context(pki, tmp_path)) as s:
        response = await s.get(runtime.url + "/http/GetTimestamp", headers={**auth, "X-CSRF-Token": "Fetch"})
        assert response.status == 200
        assert (await response.text()).startswith("Current time")
    assert runtime.stats.csrf_fetches == 0
    assert len(runtime.stats.messages) == 1


async def test_not_found_failing_flaky_down_and_wildcard(
    pki: Pki, client_id: str, token_server: TokenServer, runtime: Runtime, tmp_path: Path
) -> None:
    auth = bearer(token_server.mint(client_id, lifetime=60))
    runtime.add_flow(FlowSpec("/orders/v1/*", kind="echo"))
    async with session(client_context(pki, tmp_path)) as s:
        for path in ("/http/Nope", "/other"):
            missing = await s.get(runtime.url + path, headers=auth)
            assert missing.status == 404
            assert missing.content_type == "text/html"
            assert "HTTP Status 404" in await missing.text()
        failing = await s.post(runtime.url + "/http/Failing", data=b"x", headers=auth)
        assert failing.status == 500
        assert failing.content_type == "text/plain"
        mpl = failing.headers["SAP_MessageProcessingLogID"]
        assert await failing.text() == (  # SAP's documented text (handle-errors-in-successful-responses)
            f"An internal server error occured: The MPL ID for the failed message is : {mpl}\n"
            "For more details please check tail log."
        )
        statuses = [(await s.get(runtime.url + "/http/FLAKY", headers=auth)).status for _ in range(4)]
        assert statuses == [503, 503, 200, 503]
        wild = await s.put(runtime.url + "/http/Orders/V1/42", data=b"w", headers=auth)
        assert wild.status == 200
        assert await wild.read() == b"w"
        runtime.flows["/gettimestamp"].unavailable = 1
        runtime.flows["/gettimestamp"].retry_after = 4
        busy = await s.get(runtime.url + "/http/GetTimestamp", headers=auth)
        assert busy.status == 503
        assert busy.headers["Retry-After"] == "4"
        assert (await s.get(runtime.url + "/http/GetTimestamp", headers=auth)).status == 200
        runtime.down = True
        assert (await s.get(runtime.url + "/http/GetTimestamp", headers=auth)).status == 503
    assert runtime.stats.by_address["/orders/v1/*"] == 1
    assert runtime.stats.by_address["/flaky"] == 4
    assert runtime.stats.requests == sum(runtime.stats.by_status.values()) == 11


def test_verify_has_no_leeway(pki: Pki) -> None:
    server = TokenServer(pki)
    token = server.mint("c", lifetime=-1, scopes=[SEND_SCOPE])
    with pytest.raises(jwt.ExpiredSignatureError):
        server.verify(token)
    assert server.verify(token, leeway=30)["client_id"] == "c"


def test_revoked_tokens_fail_verification_and_later_ones_do_not(pki: Pki) -> None:
    server = TokenServer(pki)
    before = server.mint("c", lifetime=60, scopes=[SEND_SCOPE])
    assert server.revoke_issued() == 1
    after = server.mint("c", lifetime=60, scopes=[SEND_SCOPE])
    with pytest.raises(RevokedTokenError):
        server.verify(before)
    assert server.verify(after)["client_id"] == "c"


async def test_runtime_takes_a_client_certificate_with_its_chain_or_basic(
    pki: Pki, client: IssuedCert, client_id: str, token_server: TokenServer, runtime: Runtime, tmp_path: Path
) -> None:
    url = runtime.url + "/http/GetTimestamp"
    leaf_only = tmp_path / "leaf.pem"
    leaf_only.write_text(client.key_pem_pkcs1() + client.cert_pem())
    lone = ssl.create_default_context(cadata=pki.ca_pem())
    lone.load_cert_chain(leaf_only)
    async with session(client_context(pki, tmp_path, client)) as s:
        assert (await s.get(url)).status == 200  # no Authorization: the certificate authenticates
    async with session(lone) as s:
        assert (await s.get(url)).status == 401  # a leaf without its intermediate is dropped
    async with session(client_context(pki, tmp_path)) as s:
        assert (
            await s.get(url, headers={"Authorization": "Basic " + base64.b64encode(b"secret-client:s3cr3t").decode()})
        ).status == 200
    runtime.client_cert_auth = False
    async with session(client_context(pki, tmp_path, client)) as s:
        assert (await s.get(url)).status == 401
    token_server.remove_client(client_id)
    runtime.client_cert_auth = True
    async with session(client_context(pki, tmp_path, client)) as s:
        assert (await s.get(url)).status == 401
    stats = runtime.stats
    assert [(m.auth, m.client_id) for m in stats.messages] == [
        ("client_certificate", client_id),
        ("basic", "secret-client"),
    ]
    assert stats.auth_modes == {"client_certificate": 1, "basic": 1}
    assert stats.incomplete_chains == 1
    assert stats.refused_modes == {"none": 2, "client_certificate": 1}
    assert stats.missing_tokens == 2
