"""A throw-away PKI shaped like SAP's: root CA -> intermediate CA -> server and client certificates.

CA and server keys are EC P-256 (fast to make); client keys are RSA 2048 by default, as SAP issues them.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

_DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True, repr=False)
class IssuedCert:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: PrivateKey

    def __repr__(self) -> str:
        subject = self.cert.subject.rfc4514_string()
        return f"IssuedCert(subject={subject!r}, serial={self.cert.serial_number:x})"

    def cert_pem(self) -> str:
        """The certificate as PEM."""
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    def key_pem_pkcs1(self) -> str:
        """The key in the traditional format ("BEGIN RSA PRIVATE KEY" / "BEGIN EC PRIVATE KEY")."""
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        ).decode()

    def key_pem_pkcs8(self, passphrase: bytes | None = None) -> str:
        """The key as PKCS#8 PEM, encrypted when a passphrase is given."""
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
        )
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        ).decode()

    def pkcs12(self, chain: Sequence[x509.Certificate], passphrase: bytes | None) -> bytes:
        """A PKCS#12 bundle of key, certificate and chain (encrypted when a passphrase is given)."""
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
        )
        return pkcs12.serialize_key_and_certificates(b"client", self.key, self.cert, list(chain), encryption)


def _name(*parts: tuple[x509.ObjectIdentifier, str]) -> x509.Name:
    # RFC 4514 prints RDNs in reverse, so build from the country up.
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in reversed(parts)])


def _sign(
    subject: x509.Name,
    public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
    issuer: IssuedCert | None,
    issuer_key: PrivateKey,
    *,
    ca: bool,
    not_before: datetime,
    not_after: datetime,
    eku: x509.ObjectIdentifier | None = None,
    san: Sequence[x509.GeneralName] = (),
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    if ca:
        usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
    else:
        usage = x509.KeyUsage(
            True,
            False,
            isinstance(public_key, rsa.RSAPublicKey),
            False,
            isinstance(public_key, ec.EllipticCurvePublicKey),
            False,
            False,
            False,
            False,
        )
    builder = builder.add_extension(usage, critical=True)
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False
        )
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(san)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _host_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _load_chain_privately(ctx: ssl.SSLContext, pem: str) -> None:
    """load_cert_chain takes paths only: a 0600 temporary file, removed at once. (The emulator's own way,
    not senderd's: a test double must not share the code it tests.)"""
    with tempfile.TemporaryDirectory(prefix="senderd-emulator-") as folder:
        path = os.path.join(folder, "server.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(pem)
        ctx.load_cert_chain(path)


@dataclass(frozen=True)
class Pki:
    """Root, intermediate and TLS server certificate; issues client certificates."""

    root: IssuedCert
    intermediate: IssuedCert
    server: IssuedCert

    def ca_pem(self) -> str:
        """The root certificate as PEM: what clients trust."""
        return self.root.cert_pem()

    def server_ssl_context(
        self,
        *,
        client_ca: bool = True,
        require_client_cert: bool = False,
        extra_client_cas: Sequence[x509.Certificate] = (),
        trust_intermediate: bool = False,
    ) -> ssl.SSLContext:
        """A TLS server context presenting leaf + intermediate; optionally asking for client certificates.

        Client certificates must chain to the root (or to one of `extra_client_cas`, e.g. a customer's CA for
        External Certificate keys). With `trust_intermediate` the intermediate is trusted as well, so that a
        client sending its leaf alone still completes the handshake and the application can see (and drop)
        the incomplete chain, as SAP's load balancer does."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        key_pem = self.server.key_pem_pkcs1()
        _load_chain_privately(ctx, key_pem + self.server.cert_pem() + self.intermediate.cert_pem())
        if client_ca or require_client_cert:
            trusted = [self.root.cert, *extra_client_cas, *([self.intermediate.cert] if trust_intermediate else [])]
            ctx.load_verify_locations(
                cadata="".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in trusted)
            )
            ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
        return ctx

    def issue_client(
        self,
        common_name: str,
        *,
        key_type: Literal["rsa", "ec"] = "rsa",
        not_before: datetime | None = None,
        not_after: datetime | None = None,
        issuer: IssuedCert | None = None,
        subject: x509.Name | None = None,
    ) -> IssuedCert:
        """A client certificate (EKU clientAuth) signed by the intermediate, with an SAP-like subject.

        `issuer` signs instead of the intermediate (e.g. a customer CA from `create_root_ca`); `subject`
        replaces the generated subject (a renewal of a certificate keeps its subject)."""
        now = datetime.now(UTC)
        not_after = not_after or now + timedelta(days=365)
        not_before = not_before or min(now - timedelta(hours=1), not_after - timedelta(days=1))
        key: PrivateKey = (
            rsa.generate_private_key(public_exponent=65537, key_size=2048) if key_type == "rsa" else _ec_key()
        )
        signer = issuer or self.intermediate
        subject = subject or _name(
            (NameOID.COMMON_NAME, common_name),
            (NameOID.LOCALITY_NAME, str(uuid.uuid4())),
            (NameOID.ORGANIZATIONAL_UNIT_NAME, "SAP Cloud Platform Clients"),
            (NameOID.ORGANIZATIONAL_UNIT_NAME, "Canary"),
            (NameOID.ORGANIZATIONAL_UNIT_NAME, str(uuid.uuid4())),
            (NameOID.ORGANIZATION_NAME, "SAP SE"),
            (NameOID.COUNTRY_NAME, "DE"),
        )
        cert = _sign(
            subject,
            key.public_key(),
            signer,
            signer.key,
            ca=False,
            not_before=not_before,
            not_after=not_after,
            eku=ExtendedKeyUsageOID.CLIENT_AUTH,
        )
        return IssuedCert(cert, key)

    def issue_server(self, hosts: Sequence[str], *, not_after: datetime | None = None) -> IssuedCert:
        """A TLS server certificate for `hosts` (e.g. an expired one: pass a past `not_after`)."""
        now = datetime.now(UTC)
        not_after = not_after or now + timedelta(days=30)
        not_before = min(now - timedelta(hours=1), not_after - timedelta(days=1))
        key = _ec_key()
        subject = _name(
            (NameOID.COMMON_NAME, hosts[0] if hosts else "localhost"),
            (NameOID.ORGANIZATION_NAME, "SAP SE"),
            (NameOID.COUNTRY_NAME, "DE"),
        )
        cert = _sign(
            subject,
            key.public_key(),
            self.intermediate,
            self.intermediate.key,
            ca=False,
            not_before=not_before,
            not_after=not_after,
            eku=ExtendedKeyUsageOID.SERVER_AUTH,
            san=_host_names(hosts),
        )
        return IssuedCert(cert, key)


def create_root_ca(common_name: str, organization: str = "ACME Corp") -> IssuedCert:
    """A self-signed root CA of someone else's (a customer's CA, which signs External Certificates)."""
    now = datetime.now(UTC)
    key = _ec_key()
    subject = _name(
        (NameOID.COMMON_NAME, common_name),
        (NameOID.ORGANIZATION_NAME, organization),
        (NameOID.COUNTRY_NAME, "DE"),
    )
    cert = _sign(
        subject,
        key.public_key(),
        None,
        key,
        ca=True,
        not_before=now - timedelta(days=1),
        not_after=now + timedelta(days=3650),
    )
    return IssuedCert(cert, key)


def create_pki(extra_hosts: Sequence[str] = ()) -> Pki:
    """A fresh PKI; the server certificate covers localhost, 127.0.0.1, ::1 and `extra_hosts`."""
    now = datetime.now(UTC)
    root_key = _ec_key()
    root_subject = _name(
        (NameOID.COMMON_NAME, "SAP Global Root CA (senderd emulator)"),
        (NameOID.ORGANIZATION_NAME, "SAP SE"),
        (NameOID.COUNTRY_NAME, "DE"),
    )
    root_cert = _sign(
        root_subject,
        root_key.public_key(),
        None,
        root_key,
        ca=True,
        not_before=now - timedelta(days=1),
        not_after=now + timedelta(days=3650),
    )
    root = IssuedCert(root_cert, root_key)
    inter_key = _ec_key()
    inter_subject = _name(
        (NameOID.COMMON_NAME, "SAP Cloud Platform Client CA (senderd emulator)"),
        (NameOID.ORGANIZATIONAL_UNIT_NAME, "SAP Cloud Platform Clients"),
        (NameOID.ORGANIZATION_NAME, "SAP SE"),
        (NameOID.LOCALITY_NAME, "EU10-Canary"),
        (NameOID.COUNTRY_NAME, "DE"),
    )
    inter_cert = _sign(
        inter_subject,
        inter_key.public_key(),
        root,
        root_key,
        ca=True,
        not_before=now - timedelta(days=1),
        not_after=now + timedelta(days=1825),
    )
    intermediate = IssuedCert(inter_cert, inter_key)
    placeholder = Pki(root, intermediate, intermediate)
    server = placeholder.issue_server([*_DEFAULT_HOSTS, *extra_hosts])
    return Pki(root, intermediate, server)
