"""Service keys: every accepted layout, and every rejection with its exact one-line message."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from senderd.auth import servicekey
from senderd.auth.servicekey import ServiceKey, load_service_key, load_set, load_set_ahead, parse_service_key
from senderd.config import CredentialsConfig
from senderd.emulator.pki import IssuedCert, Pki
from senderd.emulator.servicekey import service_key_dict
from senderd.errors import CredentialsError

TOKEN_URL = "https://sub.authentication.cert.eu10.hana.ondemand.com/oauth/token"
RUNTIME_URL = "https://tenant.it-cpi018-rt.cfapps.eu10.hana.ondemand.com"
CLIENT_ID = "sb-1234!b5|it-rt-tenant!b6"


@pytest.fixture(scope="module")
def client(pki: Pki) -> IssuedCert:
    return pki.issue_client("test-client")


def key_dict(pki: Pki, client: IssuedCert | None, **kw: Any) -> dict[str, Any]:
    kw.setdefault("chain", [pki.intermediate.cert])
    return service_key_dict(
        client_id=CLIENT_ID, token_url=kw.pop("token_url", TOKEN_URL), runtime_url=RUNTIME_URL, client=client, **kw
    )


def parse(data: dict[str, Any] | str, **kw: Any) -> ServiceKey:
    text = data if isinstance(data, str) else json.dumps(data)
    return parse_service_key(text, source="key.json", **kw)


def test_cockpit_layout_nested_pkcs1(pki: Pki, client: IssuedCert) -> None:
    data = key_dict(pki, client)
    assert "BEGIN RSA PRIVATE KEY" in data["oauth"]["key"]
    key = parse(data)
    assert key.key_type == "certificate"
    assert key.client_id == CLIENT_ID
    assert key.token_url == TOKEN_URL
    assert key.runtime_url == RUNTIME_URL
    assert key.chain == (client.cert, pki.intermediate.cert)
    assert key.uses_certificate
    assert key.notes == ()


def test_flat_layout_and_certurl_base(pki: Pki, client: IssuedCert) -> None:
    data = key_dict(pki, client, layout="flat")
    data["certurl"] = data.pop("tokenurl").removesuffix("/oauth/token")
    key = parse(data)
    assert key.token_url == TOKEN_URL


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda s: s.replace("\n", "\\n"), id="literal-backslash-n"),
        pytest.param(lambda s: s.replace("\n", "\r\n"), id="crlf"),
        pytest.param(lambda s: "  " + s.replace("\n", "\n   ") + "  ", id="indented"),
        pytest.param(lambda s: s.replace("\n", " "), id="one-line-with-spaces"),
    ],
)
def test_pem_as_pasted(pki: Pki, client: IssuedCert, mangle: Any) -> None:
    data = key_dict(pki, client)
    data["oauth"]["certificate"] = mangle(data["oauth"]["certificate"])
    data["oauth"]["key"] = mangle(data["oauth"]["key"])
    key = parse(data)
    assert key.chain[0] == client.cert


def test_reversed_chain_puts_leaf_first(pki: Pki, client: IssuedCert) -> None:
    data = key_dict(pki, client, chain=[pki.root.cert, pki.intermediate.cert], chain_order="leaf-last")
    assert data["oauth"]["certificate"].index(client.cert_pem().splitlines()[1]) > 0
    key = parse(data)
    assert key.chain == (client.cert, pki.intermediate.cert, pki.root.cert)


def test_ec_key_in_pkcs8(pki: Pki) -> None:
    ec_client = pki.issue_client("ec-client", key_type="ec")
    data = key_dict(pki, ec_client, key_format="pkcs8")
    assert "BEGIN PRIVATE KEY" in data["oauth"]["key"]
    key = parse(data)
    assert isinstance(key.private_key, ec.EllipticCurvePrivateKey)


def test_client_secret_key(pki: Pki) -> None:
    key = parse(key_dict(pki, None, client_secret="s3cr3t-value-xyz"))
    assert key.key_type == "clientsecret"
    assert key.client_secret is not None and key.client_secret.reveal() == "s3cr3t-value-xyz"
    assert not key.uses_certificate
    assert "s3cr3t" not in repr(key) and "s3cr3t" not in str(key) and "s3cr3t" not in repr(key.client_secret)


def test_external_certificate_with_encrypted_pem(pki: Pki, client: IssuedCert) -> None:
    data = key_dict(pki, client, include_key=False)
    pem = client.key_pem_pkcs8(passphrase=b"open sesame").encode()
    key = parse(data, key_file_data=pem, key_file_name="client.key", key_passphrase="open sesame")
    assert key.key_type == "external-certificate"
    assert key.chain[0] == client.cert


def test_external_certificate_with_pkcs12(pki: Pki, client: IssuedCert) -> None:
    data = key_dict(pki, client, include_key=False, chain=[])
    p12 = client.pkcs12([pki.intermediate.cert], b"pw123456")
    key = parse(data, key_file_data=p12, key_file_name="client.p12", key_passphrase="pw123456")
    assert key.chain[0] == client.cert
    assert pki.intermediate.cert in key.chain


def test_non_cert_host_is_derived_and_said(pki: Pki, client: IssuedCert) -> None:
    data = key_dict(pki, client, token_url="https://sub.authentication.eu10.hana.ondemand.com/oauth/token")
    key = parse(data)
    assert key.token_url == TOKEN_URL
    assert len(key.notes) == 1
    assert "is not the mTLS '.cert.' host; using https://sub.authentication.cert.eu10" in key.notes[0]


def test_expiry_within_30_days_warns(pki: Pki) -> None:
    soon = pki.issue_client("soon", not_after=dt.datetime.now(dt.UTC) + dt.timedelta(days=10, hours=1))
    key = parse(key_dict(pki, soon))
    assert any("expires in 10 days" in note for note in key.notes)


def test_repr_shows_no_key_material(pki: Pki, client: IssuedCert) -> None:
    key = parse(key_dict(pki, client))
    for text in (repr(key), str(key), f"{key}"):
        assert "PRIVATE" not in text and "BEGIN" not in text
        assert "ServiceKey(" in text


def test_from_env_and_file(pki: Pki, client: IssuedCert, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = json.dumps(key_dict(pki, client))
    monkeypatch.setenv("SERVICE_KEY_JSON", text)
    assert load_service_key(env="SERVICE_KEY_JSON").source == "$SERVICE_KEY_JSON"
    path = tmp_path / "key.json"
    path.write_text(text)
    assert load_service_key(path).client_id == CLIENT_ID


# --- rejections: each with its exact message ----------------------------------------------------------


def _without(data: dict[str, Any], name: str) -> dict[str, Any]:
    del data["oauth"][name]
    return data


def _expired(pki: Pki) -> dict[str, Any]:
    now = dt.datetime.now(dt.UTC)
    old = pki.issue_client("old", not_before=now - dt.timedelta(days=400), not_after=now - dt.timedelta(days=1))
    return key_dict(pki, old)


def _future(pki: Pki) -> dict[str, Any]:
    now = dt.datetime.now(dt.UTC)
    new = pki.issue_client("new", not_before=now + dt.timedelta(days=1), not_after=now + dt.timedelta(days=30))
    return key_dict(pki, new)


def _mismatch(pki: Pki, client: IssuedCert) -> dict[str, Any]:
    data = key_dict(pki, client)
    data["oauth"]["key"] = pki.issue_client("other").key_pem_pkcs1()
    return data


REJECTIONS: list[tuple[str, Any, str]] = [
    (
        "malformed-json",
        lambda pki, c: '{"oauth": {"clientid": "x",}}',
        "key.json: not valid JSON at line 1 column 28 (Expecting property name enclosed in double quotes): "
        "paste the service key exactly as the cockpit shows it",
    ),
    ("not-an-object", lambda pki, c: "[1, 2]", "key.json: a service key is a JSON object, found list"),
    (
        "no-clientid",
        lambda pki, c: _without(key_dict(pki, c), "clientid"),
        "key.json: field 'oauth.clientid' is missing: download the service key again from the BTP cockpit "
        "(Process Integration Runtime, plan integration-flow)",
    ),
    (
        "no-tokenurl",
        lambda pki, c: _without(key_dict(pki, c), "tokenurl"),
        "key.json: field 'oauth.tokenurl' is missing: the service key must name its token URL",
    ),
    (
        "http-tokenurl",
        lambda pki, c: key_dict(pki, c, token_url="http://x.example/oauth/token"),
        "key.json: field 'oauth.tokenurl' must be an https:// URL, found 'http://x.example/oauth/token'",
    ),
    (
        "neither",
        lambda pki, c: _without(_without(key_dict(pki, c), "certificate"), "key"),
        "key.json: neither 'oauth.clientsecret' nor 'oauth.certificate' is present: create the service key "
        "with key type ClientId/Secret, Certificate or External Certificate",
    ),
    (
        "mismatch",
        _mismatch,
        "key.json: field 'oauth.certificate': no certificate matches the private key: "
        "use the certificate and key of the same service key",
    ),
    (
        "expired",
        lambda pki, c: _expired(pki),
        "key.json: field 'oauth.certificate': the client certificate expired on .*: "
        "create a new service key in the BTP cockpit",
    ),
    (
        "not-yet-valid",
        lambda pki, c: _future(pki),
        "key.json: field 'oauth.certificate': the client certificate is not valid before .*: "
        "check the system clock or wait",
    ),
    (
        "external-without-key",
        lambda pki, c: key_dict(pki, c, include_key=False),
        "key.json: field 'oauth.key' is missing (External Certificate key): give the private key file with "
        "credentials.key_file or --key-file",
    ),
    (
        "garbage-certificate",
        lambda pki, c: {"clientid": "x", "tokenurl": TOKEN_URL, "certificate": "abc", "key": "def"},
        "key.json: field 'certificate' holds no PEM certificate: copy it from the service key unchanged",
    ),
    (
        "garbage-key",
        lambda pki, c: {
            **key_dict(pki, c, layout="flat"),
            "key": "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----",
        },
        "key.json: field 'key' is not a readable PEM private key (PKCS#1 or PKCS#8): "
        "copy it from the service key unchanged",
    ),
]


@pytest.mark.parametrize(("case", "make", "message"), REJECTIONS, ids=[r[0] for r in REJECTIONS])
def test_rejections(pki: Pki, client: IssuedCert, case: str, make: Any, message: str) -> None:
    with pytest.raises(CredentialsError) as info:
        parse(make(pki, client))
    text = str(info.value)
    assert "\n" not in text
    assert re.fullmatch(message if ".*" in message else re.escape(message), text), text


def test_encrypted_key_without_passphrase(pki: Pki, client: IssuedCert) -> None:
    data = key_dict(pki, client, include_key=False)
    pem = client.key_pem_pkcs8(passphrase=b"pw").encode()
    with pytest.raises(CredentialsError) as info:
        parse(data, key_file_data=pem, key_file_name="client.key")
    assert str(info.value) == (
        "client.key: field 'private key' is an encrypted private key: set "
        "credentials.key_passphrase_env to the variable holding its passphrase"
    )
    with pytest.raises(CredentialsError) as info:
        parse(data, key_file_data=pem, key_file_name="client.key", key_passphrase="wrong")
    assert str(info.value) == "client.key: field 'private key': cannot decrypt the private key: check the passphrase"


def test_missing_file_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(CredentialsError, match=r"missing\.json: service key file not found: check the path"):
        load_service_key(tmp_path / "missing.json")
    monkeypatch.delenv("NOPE_KEY", raising=False)
    with pytest.raises(CredentialsError) as info:
        load_service_key(env="NOPE_KEY")
    assert str(info.value) == "$NOPE_KEY: environment variable is not set or empty: put the service key JSON in it"


def _self_signed(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "weak")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=90))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: rsa.generate_private_key(65537, 1024), "an RSA key of 1024 bits is too weak (at least 2048)"),  # noqa: S505
        (lambda: ec.generate_private_key(ec.SECP256K1()), "EC curve secp256k1 is not supported"),
    ],
    ids=["rsa-1024", "secp256k1"],
)
def test_weak_or_odd_keys_are_refused(make: Any, message: str) -> None:
    key = make()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    data = {"clientid": CLIENT_ID, "certificate": _self_signed(key), "key": pem.decode(), "tokenurl": TOKEN_URL}
    with pytest.raises(CredentialsError, match=re.escape(f"key.json: field 'key': {message}")):
        parse(data)


def test_a_huge_client_id_is_refused_without_echoing_it(tmp_path: Path) -> None:
    huge = "x" * (5 * 1024 * 1024)
    data = {"clientid": huge, "clientsecret": "s3cr3t", "tokenurl": TOKEN_URL}
    with pytest.raises(CredentialsError) as caught:
        parse(data)
    assert str(caught.value).startswith("key.json: field 'clientid' is 5242880 characters long")
    assert len(str(caught.value)) < 300
    path = tmp_path / "huge.json"
    path.write_text(json.dumps(data))  # as a file it is refused before it is read whole
    with pytest.raises(CredentialsError, match="larger than 1024 KiB, too large for a service key"):
        load_service_key(path)


def test_an_external_key_file_with_its_chain_completes_the_certificate_chain(pki: Pki, client: IssuedCert) -> None:
    data = key_dict(pki, client, include_key=False, chain=[])  # the key holds the leaf alone, as SAP writes it
    key_file = (client.key_pem_pkcs8() + pki.intermediate.cert_pem()).encode()
    key = parse(data, key_file_data=key_file, key_file_name="client.pem")
    assert [c.subject for c in key.chain] == [client.cert.subject, pki.intermediate.cert.subject]


@pytest.mark.parametrize(
    ("written", "noted"),
    [
        ("0x{:X}", False),  # as SAP writes it
        ("0x{:x}", False),
        ("{:X}", False),  # plain hex, as other tools write it
        ("{:d}", False),  # decimal
        ("0x1234", True),  # another certificate's
        ("not a serial", True),
    ],
)
def test_certificatedetails_serialnumber_in_any_form_is_accepted(
    pki: Pki, client: IssuedCert, written: str, noted: bool
) -> None:
    data = key_dict(pki, client)
    data["oauth"]["certificatedetails"]["serialnumber"] = written.format(client.cert.serial_number)
    key = parse(data)  # never refused: the details are informative
    assert key.chain[0] == client.cert
    notes = [n for n in key.notes if "serialnumber" in n]
    assert bool(notes) is noted
    if noted:
        assert notes[0].startswith("key.json: field 'oauth.certificatedetails.serialnumber' (")
        assert f"(0x{client.cert.serial_number:X})" in notes[0]


def test_an_external_certificate_key_of_one_certificate_without_its_chain(pki: Pki, client: IssuedCert) -> None:
    data = key_dict(pki, client, chain=[], include_key=False)
    key = parse(data, key_file_data=client.key_pem_pkcs8().encode(), key_file_name="client.pem")
    assert key.key_type == "external-certificate"
    assert key.chain == (client.cert,)
    assert key.notes == ()


def test_a_key_loaded_ahead_is_what_the_next_load_of_the_same_set_gives(
    pki: Pki, client: IssuedCert, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "key.json"
    path.write_text(json.dumps(key_dict(pki, client)))
    creds = CredentialsConfig(service_key=path)
    loads: list[str] = []
    real_load = servicekey._load_set

    def counted(config: CredentialsConfig, **kw: Any) -> Any:
        loads.append(kw["where"])
        return real_load(config, **kw)

    monkeypatch.setattr(servicekey, "_load_set", counted)
    load_set_ahead(creds, source="senderd.toml", where="credentials.a", purpose="send")
    key, source = load_set(creds, source="senderd.toml", where="credentials.a", purpose="send")
    assert key.client_id == CLIENT_ID and source.source == str(path)
    assert loads == ["credentials.a"]  # done once, in the thread
    load_set(creds, source="senderd.toml", where="credentials.a", purpose="send")  # taken once: loaded again
    load_set_ahead(creds, source="senderd.toml", where="credentials.b", purpose="send")
    load_set(CredentialsConfig(service_key=path), source="senderd.toml", where="credentials.b", purpose="send")
    load_set(creds, source="senderd.toml", where="credentials.b", purpose="send")
    assert loads == ["credentials.a"] * 2 + ["credentials.b"] * 2  # another config object is another set


def test_the_error_of_a_load_ahead_is_raised_by_the_load_that_takes_it(tmp_path: Path) -> None:
    path = tmp_path / "key.json"
    path.write_text("not json")
    creds = CredentialsConfig(service_key=path)
    with pytest.raises(CredentialsError) as direct:
        load_set(creds, where="credentials")
    load_set_ahead(creds, where="credentials")
    with pytest.raises(CredentialsError) as ahead:
        load_set(creds, where="credentials")
    assert str(ahead.value) == str(direct.value)
