"""Several emulated tenants side by side, every key type SAP issues, every way a sender authenticates.

All over real TLS sockets on 127.0.0.1, with clients written here (aiohttp and ssl), not senderd's code.
"""

from __future__ import annotations

import base64
import json
import re
import ssl
import stat
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from senderd.emulator import KEY_TYPES, EmulatorStack, Tenant, TenantSpec

pytestmark = pytest.mark.anyio

FORM = "application/x-www-form-urlencoded"
PEM_CERT = re.compile(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----\n?", re.DOTALL)


@pytest.fixture
async def two(tmp_path: Path) -> AsyncIterator[EmulatorStack]:
    """Tenants dev and prod (prod: 2 h tokens, a trial-like runtime without client certificate auth)."""
    specs = ("dev", TenantSpec("prod", token_lifetime=7200, client_cert_auth=False))
    async with EmulatorStack.started(tmp_path / "emu", tenants=specs) as stack:
        yield stack


def oauth(path: Path) -> dict[str, Any]:
    """The `oauth` object of a key file, read as a user's program would."""
    data: dict[str, Any] = json.loads(path.read_text())
    oauth: dict[str, Any] = data.get("oauth", data)
    return oauth


def context(tenant: Tenant, folder: Path, *, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """Trust the tenant's CA (from its ca.pem); present `cert` (PEM, leaf first) with `key` when given."""
    ctx = ssl.create_default_context(cafile=str(tenant.ca_path))
    if cert is not None:
        assert key is not None
        folder.mkdir(parents=True, exist_ok=True)
        number = len(list(folder.iterdir()))
        cert_file, key_file = folder / f"cert-{number}.pem", folder / f"key-{number}.pem"
        cert_file.write_text(cert)
        key_file.write_text(key)
        ctx.load_cert_chain(cert_file, key_file)
    return ctx


def certificate_context(tenant: Tenant, folder: Path, *, leaf_only: bool = False) -> ssl.SSLContext:
    """mTLS with the tenant's Certificate key as written (its `certificate` chain and `key`)."""
    fields = oauth(tenant.key_path("certificate"))
    certs = PEM_CERT.findall(fields["certificate"])
    return context(tenant, folder, cert="".join(certs[:1] if leaf_only else certs), key=fields["key"])


def external_context(tenant: Tenant, folder: Path) -> ssl.SSLContext:
    """mTLS with the External Certificate key's one certificate and the separate PEM private key file."""
    fields = oauth(tenant.key_path("external-certificate"))
    return context(tenant, folder, cert=fields["certificate"], key=tenant.external_key_path("pem").read_text())


@asynccontextmanager
async def session(ctx: ssl.SSLContext) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        yield s


async def post_token(
    s: aiohttp.ClientSession, url: str, data: Any, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    response = await s.post(url, data=data, headers={"Accept": "application/json", **(headers or {})})
    return response.status, await response.json()


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# -- the files --------------------------------------------------------------------------------------


async def test_every_key_type_is_written_for_each_tenant(two: EmulatorStack) -> None:
    dev, prod = two["dev"], two["prod"]
    assert list(two.tenants) == ["dev", "prod"]
    assert two.tenant is dev
    assert two.service_key_path == dev.key_path("certificate") == two.directory / "dev" / "service-key.json"
    assert {p.name for p in dev.directory.iterdir()} == {
        "service-key.json",
        "clientsecret-key.json",
        "external-certificate-key.json",
        "external-certificate.key.pem",
        "external-certificate.p12",
        "api-key.json",
        "ca.pem",
        "senderd.toml",
    }
    for tenant in (dev, prod):
        for secret_file in [*(tenant.key_path(k) for k in KEY_TYPES), *tenant.directory.glob("external-*")]:
            assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600, secret_file
        assert stat.S_IMODE(two.vcap_services_path.stat().st_mode) == 0o600
        ca = x509.load_pem_x509_certificate(tenant.ca_path.read_bytes())

        cert_key = oauth(tenant.key_path("certificate"))
        chain = [x509.load_pem_x509_certificate(c.encode()) for c in PEM_CERT.findall(cert_key["certificate"])]
        assert len(chain) == 2  # leaf, then the intermediate
        assert chain[0].issuer == chain[1].subject
        assert chain[1].issuer == ca.subject
        assert cert_key["key"].startswith("-----BEGIN RSA PRIVATE KEY-----")  # PKCS#1
        details = cert_key["certificatedetails"]
        assert details["serialnumber"] == f"0x{chain[0].serial_number:X}"
        assert re.fullmatch(r"0x[0-9A-F]+", details["serialnumber"])
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.000Z", details["validuntil"])
        assert details["subjectdn"] == chain[0].subject.rfc4514_string()
        assert details["issuerdn"] == chain[0].issuer.rfc4514_string()
        assert re.fullmatch(rf"sb-[0-9a-f-]{{36}}!b\d+\|it-rt-{tenant.name}!b\d+", cert_key["clientid"])
        assert cert_key["url"] == tenant.runtime.url
        assert cert_key["tokenurl"] == tenant.token_server.token_url

        secret_key = oauth(tenant.key_path("clientsecret"))
        assert set("+/$=") <= set(secret_key["clientsecret"])
        assert "certificate" not in secret_key
        assert secret_key["clientid"] != cert_key["clientid"]
        assert secret_key["clientid"].split("|")[1] == cert_key["clientid"].split("|")[1]  # one xsappname

        external = oauth(tenant.key_path("external-certificate"))
        assert "key" not in external
        assert len(PEM_CERT.findall(external["certificate"])) == 1  # one certificate, no chain
        leaf = x509.load_pem_x509_certificate(external["certificate"].encode())
        assert leaf.issuer == tenant.customer_ca.cert.subject  # the customer's CA, not SAP's
        pem_key = serialization.load_pem_private_key(tenant.external_key_path("pem").read_bytes(), None)
        assert tenant.external_key_path("pem").read_text().startswith("-----BEGIN PRIVATE KEY-----")
        p12_key, p12_cert, _ = pkcs12.load_key_and_certificates(
            tenant.external_key_path("p12").read_bytes(), tenant.p12_passphrase.encode()
        )
        assert p12_cert == leaf
        assert p12_key is not None
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        der = serialization.Encoding.DER
        assert pem_key.public_key().public_bytes(der, spki) == leaf.public_key().public_bytes(der, spki)
        assert p12_key.public_key().public_bytes(der, spki) == leaf.public_key().public_bytes(der, spki)

        api = oauth(tenant.key_path("api"))
        assert re.fullmatch(r"sb-[0-9a-f-]{36}!b\d+\|it!b\d+", api["clientid"])
        assert api["url"] == tenant.api_url != tenant.runtime.url
        assert "-rt" not in api["url"]
        assert urllib.parse.urlsplit(api["url"]).port == tenant.mpl_api.port  # the API host: a listener of its own
        assert set("+/$=") <= set(api["clientsecret"])
    assert dev.ca_path.read_text() != prod.ca_path.read_text()
    assert dev.token_server.token_url != prod.token_server.token_url
    assert dev.runtime.url != prod.runtime.url
    assert (dev.directory / "senderd.toml").read_text().startswith('[credentials]\nservice_key = "service-key.json"')


async def test_one_tenant_stack_keeps_its_folder_and_names(tmp_path: Path) -> None:
    async with EmulatorStack.started(tmp_path / "emu") as stack:
        assert list(stack.tenants) == ["emulator"]
        assert stack.service_key_path == tmp_path / "emu" / "service-key.json"
        assert stack.ca_path == tmp_path / "emu" / "ca.pem"
        assert (tmp_path / "emu" / "clientsecret-key.json").exists()
        assert stack.binding_root == tmp_path / "emu" / "bindings"
        assert stack.scopes == [f"{stack.client_id.split('|')[-1]}.ESBMessaging.send"]
        assert json.loads(stack.service_key_path.read_text())["oauth"]["clientid"] == stack.client_id


async def test_tenants_need_distinct_names_and_their_own_ports(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="distinct names"):
        async with EmulatorStack.started(tmp_path, tenants=("a", "a")):
            pass
    with pytest.raises(ValueError, match="ports in a TenantSpec"):
        async with EmulatorStack.started(tmp_path, tenants=("a", "b"), token_port=1):
            pass


# -- the token servers ------------------------------------------------------------------------------


async def test_each_key_type_gets_a_token_from_its_tenant(two: EmulatorStack, tmp_path: Path) -> None:
    dev = two["dev"]
    token_url = dev.token_server.token_url
    grant = {"grant_type": "client_credentials"}
    async with session(certificate_context(dev, tmp_path / "c")) as s:
        cert_key = oauth(dev.key_path("certificate"))
        status, body = await post_token(s, token_url, {**grant, "client_id": cert_key["clientid"]})
        assert status == 200, body
        assert dev.token_server.verify(body["access_token"])["client_id"] == cert_key["clientid"]
    async with session(external_context(dev, tmp_path / "e")) as s:
        external = oauth(dev.key_path("external-certificate"))
        status, body = await post_token(s, token_url, {**grant, "client_id": external["clientid"]})
        assert status == 200, body
    p12_key, p12_cert, _ = pkcs12.load_key_and_certificates(
        dev.external_key_path("p12").read_bytes(), dev.p12_passphrase.encode()
    )
    assert p12_key is not None and p12_cert is not None
    key_pem = p12_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    cert_pem = p12_cert.public_bytes(serialization.Encoding.PEM).decode()
    async with session(context(dev, tmp_path / "p", cert=cert_pem, key=key_pem)) as s:
        status, _ = await post_token(s, token_url, {**grant, "client_id": external["clientid"]})
        assert status == 200
    secret_key = oauth(dev.key_path("clientsecret"))
    client_id, secret = secret_key["clientid"], secret_key["clientsecret"]
    async with session(context(dev, tmp_path)) as s:
        status, body = await post_token(s, token_url, {**grant, "client_id": client_id, "client_secret": secret})
        assert status == 200, body  # aiohttp form-encodes the "+" as %2B
        assert body["expires_in"] in (3599, 3600)
        status, body = await post_token(s, token_url, grant, basic(client_id, secret))
        assert status == 200, body
        encoded = basic(urllib.parse.quote_plus(client_id), urllib.parse.quote_plus(secret))
        status, _ = await post_token(s, token_url, grant, {**encoded, "X-CF-ENCODED-CREDENTIALS": "true"})
        assert status == 200  # RFC 6749 2.3.1 encoding, undone as UAA does when told so
        status, _ = await post_token(s, token_url, grant, encoded)
        assert status == 401
        dev.token_server.faults.basic_plus_as_space = True  # SAP's note: "+" breaks Basic
        status, _ = await post_token(s, token_url, grant, basic(client_id, secret))
        assert status == 401
        status, _ = await post_token(s, token_url, grant, {**encoded, "X-CF-ENCODED-CREDENTIALS": "true"})
        assert status == 200
        status, _ = await post_token(s, token_url, {**grant, "client_id": client_id, "client_secret": secret})
        assert status == 200
        dev.token_server.faults.basic_plus_as_space = False
        raw = f"grant_type=client_credentials&client_id={urllib.parse.quote(client_id)}&client_secret={secret}"
        status, body = await post_token(s, token_url, raw, {"Content-Type": FORM})
        assert (status, body["error"]) == (401, "unauthorized")  # an unencoded "+" arrives as a space
        both = {**grant, "client_id": client_id, "client_secret": secret}
        status, body = await post_token(s, token_url, both, basic(client_id, secret))
        assert (status, body["error"]) == (400, "invalid_request")
        api = oauth(dev.key_path("api"))
        form = {**grant, "client_id": api["clientid"], "client_secret": api["clientsecret"]}
        status, body = await post_token(s, token_url, form)
        assert status == 200, body
        assert body["expires_in"] in (43199, 43200)  # plan api: 12 h
        assert body["scope"].endswith(".MonitoringDataRead")
    assert [method for _, method in dev.token_server.stats.authentications] == [
        "tls_client_auth",
        "tls_client_auth",
        "tls_client_auth",
        "client_secret_post",
        "client_secret_basic",
        "client_secret_basic",
        "client_secret_basic",
        "client_secret_post",
        "client_secret_post",
    ]


async def test_a_certificate_client_without_its_intermediate_fails_the_token_handshake(
    two: EmulatorStack, tmp_path: Path
) -> None:
    dev = two["dev"]
    async with session(certificate_context(dev, tmp_path, leaf_only=True)) as s:
        with pytest.raises(aiohttp.ClientError):
            await post_token(s, dev.token_server.token_url, {"grant_type": "client_credentials", "client_id": "x"})


# -- the runtimes -----------------------------------------------------------------------------------


async def test_runtime_takes_token_certificate_and_basic(two: EmulatorStack, tmp_path: Path) -> None:
    dev = two["dev"]
    url = dev.runtime.url + "/http/GetTimestamp"
    cert_id = oauth(dev.key_path("certificate"))["clientid"]
    external_id = oauth(dev.key_path("external-certificate"))["clientid"]
    secret_key = oauth(dev.key_path("clientsecret"))
    async with session(certificate_context(dev, tmp_path / "c")) as s:
        token = dev.token_server.mint(cert_id, lifetime=60)
        assert (await s.get(url, headers=bearer(token))).status == 200
        assert (await s.get(url)).status == 200  # the certificate alone
    async with session(external_context(dev, tmp_path / "e")) as s:
        assert (await s.get(url)).status == 200
    async with session(context(dev, tmp_path)) as s:
        ok = await s.get(url, headers=basic(secret_key["clientid"], secret_key["clientsecret"]))
        assert ok.status == 200
        assert (await ok.text()).startswith("Current time")
        wrong = await s.get(url, headers=basic(secret_key["clientid"], secret_key["clientsecret"] + "x"))
        assert wrong.status == 401
        assert (await s.get(url)).status == 401  # nothing at all
    stats = dev.runtime.stats
    assert [(m.auth, m.client_id) for m in stats.messages] == [
        ("bearer", cert_id),
        ("client_certificate", cert_id),
        ("client_certificate", external_id),
        ("basic", secret_key["clientid"]),
    ]
    assert stats.auth_modes == {"bearer": 1, "client_certificate": 2, "basic": 1}
    assert stats.refused_modes == {"basic": 1, "none": 1}
    assert stats.missing_tokens == 1


async def test_runtime_refuses_the_wrong_credentials(two: EmulatorStack, tmp_path: Path) -> None:
    dev = two["dev"]
    url = dev.runtime.url + "/http/GetTimestamp"
    async with session(certificate_context(dev, tmp_path / "leaf", leaf_only=True)) as s:
        assert (await s.get(url)).status == 401  # the load balancer drops a leaf without its intermediate
    stranger = dev.pki.issue_client("not-a-registered-client")
    chain = stranger.cert_pem() + dev.pki.intermediate.cert_pem()
    async with session(context(dev, tmp_path / "s", cert=chain, key=stranger.key_pem_pkcs1())) as s:
        assert (await s.get(url)).status == 401
    async with session(context(dev, tmp_path)) as s:
        api = oauth(dev.key_path("api"))
        no_role = await s.get(url, headers=basic(api["clientid"], api["clientsecret"]))
        assert no_role.status == 403  # an api key has no ESBMessaging.send
        api_token = dev.token_server.mint(api["clientid"], lifetime=60)
        assert (await s.get(url, headers=bearer(api_token))).status == 403
        cert_key = oauth(dev.key_path("certificate"))
        assert (await s.get(url, headers=basic(cert_key["clientid"], "anything"))).status == 401
    dev.runtime.basic_auth = False
    secret_key = oauth(dev.key_path("clientsecret"))
    async with session(context(dev, tmp_path)) as s:
        assert (await s.get(url, headers=basic(secret_key["clientid"], secret_key["clientsecret"]))).status == 401
    stats = dev.runtime.stats
    assert stats.auth_modes == {"basic": 1, "bearer": 1}  # the two without the role
    assert stats.incomplete_chains == 1
    assert stats.refused_modes == {"none": 1, "client_certificate": 1, "basic": 2}
    assert stats.by_status == {401: 4, 403: 2}
    assert not stats.messages


async def test_a_trial_tenant_ignores_client_certificates(two: EmulatorStack, tmp_path: Path) -> None:
    prod = two["prod"]
    url = prod.runtime.url + "/http/GetTimestamp"
    async with session(certificate_context(prod, tmp_path)) as s:
        assert (await s.get(url)).status == 401
        token = prod.token_server.mint(prod.client_id, lifetime=60)
        assert (await s.get(url, headers=bearer(token))).status == 200
    prod.runtime.client_cert_auth = True  # a switch, also at run time
    async with session(certificate_context(prod, tmp_path)) as s:
        assert (await s.get(url)).status == 200
    assert prod.runtime.stats.auth_modes == {"bearer": 1, "client_certificate": 1}
    assert prod.runtime.stats.missing_tokens == 1


async def test_a_revoked_key_is_refused_everywhere(two: EmulatorStack, tmp_path: Path) -> None:
    dev = two["dev"]
    assert dev.revoke(dev.credentials["certificate"])
    assert not dev.revoke(dev.credentials["certificate"])
    async with session(certificate_context(dev, tmp_path)) as s:
        form = {"grant_type": "client_credentials", "client_id": dev.client_id}
        assert (await post_token(s, dev.token_server.token_url, form))[0] == 401
        assert (await s.get(dev.runtime.url + "/http/GetTimestamp")).status == 401


async def test_a_rotated_key_file_holds_a_new_client_and_the_old_one_works_until_revoked(
    two: EmulatorStack, tmp_path: Path
) -> None:
    dev = two["dev"]
    old = oauth(dev.key_path("clientsecret"))
    old_credentials = dev.credentials["clientsecret"]
    new_credentials = dev.rotate_key("clientsecret")
    new = oauth(dev.key_path("clientsecret"))
    assert new["clientid"] == new_credentials.client_id != old["clientid"]
    assert stat.S_IMODE(dev.key_path("clientsecret").stat().st_mode) == 0o600
    grant = {"grant_type": "client_credentials"}
    async with session(context(dev, tmp_path)) as s:
        for fields in (old, new):
            form = {**grant, "client_id": fields["clientid"], "client_secret": fields["clientsecret"]}
            assert (await post_token(s, dev.token_server.token_url, form))[0] == 200
        assert dev.token_server.has_client(old["clientid"])
        assert dev.revoke(old_credentials)
        assert not dev.token_server.has_client(old["clientid"])
        form = {**grant, "client_id": old["clientid"], "client_secret": old["clientsecret"]}
        assert (await post_token(s, dev.token_server.token_url, form))[0] == 401


async def test_external_certificate_pin_off_takes_a_renewal_and_then_only_it(tmp_path: Path) -> None:
    specs = (TenantSpec("pinned"), TenantSpec("unpinned", pin_external_certificate=False))
    async with EmulatorStack.started(tmp_path / "emu", tenants=specs) as stack:
        for tenant in stack.tenants.values():
            before = external_context(tenant, tmp_path / tenant.name / "old")
            old = tenant.credentials["external-certificate"]
            renewed = tenant.renew_certificate()
            assert renewed.client_id == old.client_id
            assert renewed.client is not None and old.client is not None
            assert renewed.client.cert.subject == old.client.cert.subject
            tenant.write_key_files()
            after = external_context(tenant, tmp_path / tenant.name / "new")
            form = {"grant_type": "client_credentials", "client_id": old.client_id}
            url = tenant.token_server.token_url
            statuses = []
            for ctx in (before, after, before):
                async with session(ctx) as s:
                    statuses.append((await post_token(s, url, form))[0])
            # pinned: only the certificate of the key; unpinned: the renewal, then never the older one again
            assert statuses == ([200, 401, 200] if tenant.name == "pinned" else [200, 200, 401])


# -- isolation --------------------------------------------------------------------------------------


async def test_two_tenants_are_isolated(two: EmulatorStack, tmp_path: Path) -> None:
    dev, prod = two["dev"], two["prod"]
    dev_token = dev.token_server.mint(dev.client_id, lifetime=60)
    prod_token = prod.token_server.mint(prod.client_id, lifetime=60)
    assert (
        jwt.decode(dev_token, options={"verify_signature": False})["zid"]
        != jwt.decode(prod_token, options={"verify_signature": False})["zid"]
    )
    async with session(context(prod, tmp_path)) as s:
        assert (await s.get(prod.runtime.url + "/http/GetTimestamp", headers=bearer(dev_token))).status == 401
        assert (await s.get(prod.runtime.url + "/http/GetTimestamp", headers=bearer(prod_token))).status == 200
        dev_secret = oauth(dev.key_path("clientsecret"))
        dev_basic = basic(dev_secret["clientid"], dev_secret["clientsecret"])
        assert (await s.get(prod.runtime.url + "/http/GetTimestamp", headers=dev_basic)).status == 401
    async with session(certificate_context(dev, tmp_path / "dev")) as s:
        with pytest.raises(aiohttp.ClientError):  # prod does not trust dev's CA: not even a handshake
            await s.get(prod.runtime.url + "/http/GetTimestamp")
    dev.runtime.flows["/gettimestamp"].unavailable = 1  # each tenant has its own flows
    async with session(context(prod, tmp_path)) as s:
        assert (await s.get(prod.runtime.url + "/http/GetTimestamp", headers=bearer(prod_token))).status == 200
    assert prod.runtime.stats.refused_modes == {"bearer": 1, "basic": 1}
    assert dev.runtime.stats.requests == 0


async def test_one_tenant_token_server_down_leaves_the_other_serving(two: EmulatorStack, tmp_path: Path) -> None:
    dev, prod = two["dev"], two["prod"]
    grant = {"grant_type": "client_credentials"}
    dev_form = {**grant, "client_id": dev.client_id}
    prod_form = {**grant, "client_id": prod.client_id}
    dev.token_server.faults.down = True
    async with session(certificate_context(dev, tmp_path / "dev")) as s:
        response = await s.post(dev.token_server.token_url, data=dev_form)
        assert response.status == 503
    async with session(certificate_context(prod, tmp_path / "prod")) as s:
        status, body = await post_token(s, prod.token_server.token_url, prod_form)
        assert status == 200
        assert body["expires_in"] in (7199, 7200)  # prod's own lifetime
        claims = prod.token_server.verify(body["access_token"])
        assert claims["ext_attr"]["zdn"] == "prod"
    await dev.token_server.stop()  # gone altogether
    async with session(certificate_context(dev, tmp_path / "dev")) as s:
        with pytest.raises(aiohttp.ClientConnectorError):
            await s.post(dev.token_server.token_url, data=dev_form)
    async with session(certificate_context(prod, tmp_path / "prod")) as s:
        assert (await post_token(s, prod.token_server.token_url, prod_form))[0] == 200
    assert prod.token_server.stats.statuses == {200: 2}
    assert dev.token_server.stats.statuses == {503: 1}
