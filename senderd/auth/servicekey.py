"""BTP service keys for plan `integration-flow`, read exactly as the cockpit gives them.

Accepts the nested (`"oauth": {...}`) and flat layouts, `tokenurl` or `certurl`, key types Certificate,
ClientSecret and External Certificate (private key from a separate PEM or PKCS#12 file), PEM text with
literal `\\n` escapes, CRLF or stray whitespace, PKCS#1/PKCS#8, RSA/EC keys and chains in any order.
Everything wrong is a `CredentialsError` whose one line names the source, the field and the fix.
No network here; key material never appears in a repr, str or message. `load_credentials` reads the key
that a `[credentials]` table names.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12

from senderd.auth.sources import KeySource, Purpose, read_key_source, read_small_file
from senderd.config import CredentialsConfig
from senderd.errors import ConfigError, CredentialsError
from senderd.logs import register_secret

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
KeyType = Literal["certificate", "clientsecret", "external-certificate"]

EXPIRY_WARNING_DAYS = 30
MAX_TEXT_CHARS = 64 * 1024
"""Longest PEM field (certificate chain, private key) accepted."""
MAX_FIELD_CHARS = {"clientid": 512, "clientsecret": 512, "tokenurl": 2048, "certurl": 2048, "url": 2048}
_SINGLE_LINE_FIELDS = frozenset(MAX_FIELD_CHARS)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MIN_RSA_BITS = 2048
ACCEPTED_CURVES = frozenset({"secp256r1", "secp384r1", "secp521r1"})
"""The NIST curves that TLS libraries and SAP's certificate service agree on."""
_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.DOTALL)


class Secret:
    """A string that never shows itself in repr, str or logs; `reveal()` gives the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret value, for the one place that must send it."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, repr=False)
class ServiceKey:
    """A validated service key: who we are, where tokens come from, and how we prove it."""

    source: str
    client_id: str
    token_url: str
    runtime_url: str | None
    key_type: KeyType
    client_secret: Secret | None = None
    chain: tuple[x509.Certificate, ...] = ()
    private_key: PrivateKey | None = field(default=None, compare=False)
    notes: tuple[str, ...] = ()

    @property
    def uses_certificate(self) -> bool:
        """True when the token server authenticates us by TLS client certificate."""
        return self.private_key is not None

    @property
    def certificate(self) -> x509.Certificate | None:
        """The client (leaf) certificate, if any."""
        return self.chain[0] if self.chain else None

    @property
    def certificate_not_after(self) -> dt.datetime | None:
        """When the client certificate expires (UTC), if there is one."""
        cert = self.certificate
        return cert.not_valid_after_utc if cert is not None else None

    def chain_pem(self) -> bytes:
        """The certificate chain as PEM, leaf first (public material)."""
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain)

    def private_key_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM: only for loading into TLS or an explicit export."""
        if self.private_key is None:
            raise CredentialsError(f"{self.source}: this service key has no private key")
        return self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def __repr__(self) -> str:
        expiry = self.certificate_not_after
        return (
            f"ServiceKey(source={self.source!r}, client_id={self.client_id!r}, key_type={self.key_type!r}, "
            f"token_url={self.token_url!r}, certificate_expires={expiry.isoformat() if expiry else None})"
        )

    __str__ = __repr__


def load_credentials(
    config: CredentialsConfig,
    *,
    now: dt.datetime | None = None,
    source: str | None = None,
    where: str = "credentials",
    purpose: Purpose | None = None,
) -> ServiceKey:
    """The service key that a credentials set names, validated; its secret is registered for redaction.

    `source` (the config file) prefixes errors about the configuration itself; `where` names the set's table.
    """
    return load_set(config, now=now, source=source, where=where, purpose=purpose)[0]


def load_set(
    config: CredentialsConfig,
    *,
    now: dt.datetime | None = None,
    source: str | None = None,
    where: str = "credentials",
    purpose: Purpose | None = None,
) -> tuple[ServiceKey, KeySource]:
    """`load_credentials`, and the source the key came from (what a watcher fingerprints)."""
    ahead = _AHEAD.take(config, (source, where, purpose)) if now is None else None
    if ahead is not None:
        return ahead()
    return _load_set(config, now=now, source=source, where=where, purpose=purpose)


def _load_set(
    config: CredentialsConfig,
    *,
    now: dt.datetime | None,
    source: str | None,
    where: str,
    purpose: Purpose | None,
) -> tuple[ServiceKey, KeySource]:
    prefix = f"{source}: " if source and source != "<defaults>" else ""
    try:
        passphrase = config.key_passphrase()
        key_source = read_key_source(config, where=where, purpose=purpose)
    except ConfigError as exc:
        raise ConfigError(f"{prefix}{exc}") from None
    key = _parse_with_key_file(key_source.text, key_source.source, config.key_file, passphrase, now)
    if key.client_secret is not None:
        register_secret(key.client_secret.reveal())
    return key, key_source


Loaded = tuple[ServiceKey, KeySource]


class _Ahead:
    """Keys loaded ahead in threads (`load_set_ahead`), each taken by the first `load_set` of the same
    arguments: with its result, or raising its error there, as if that call had done the work."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loads: list[tuple[CredentialsConfig, tuple[object, ...], threading.Thread, list[Any]]] = []

    def start(self, config: CredentialsConfig, args: tuple[str | None, str, Purpose | None]) -> None:
        outcome: list[Any] = []

        def load() -> None:
            source, where, purpose = args
            try:
                outcome.append(_load_set(config, now=None, source=source, where=where, purpose=purpose))
            except Exception as exc:  # raised again by the call that takes it
                outcome.append(exc)

        thread = threading.Thread(target=load, name="senderd-key", daemon=True)
        with self._lock:
            self._loads.append((config, args, thread, outcome))
        thread.start()

    def take(self, config: CredentialsConfig, args: tuple[object, ...]) -> Callable[[], Loaded] | None:
        """The result of the load ahead for these arguments, if one was started (waiting for it)."""
        with self._lock:
            found = next((load for load in self._loads if load[0] is config and load[1] == args), None)
            if found is None:
                return None
            self._loads.remove(found)
        _, _, thread, outcome = found

        def result() -> Loaded:
            thread.join()
            if isinstance(outcome[0], Exception):
                raise outcome[0]
            loaded: Loaded = outcome[0]
            return loaded

        return result


_AHEAD = _Ahead()


def load_set_ahead(
    config: CredentialsConfig, *, source: str | None = None, where: str = "credentials", purpose: Purpose | None = None
) -> None:
    """Start `load_set(config, ...)` in a thread, for the next call with the same arguments (the very same
    `config` object) to take: `senderd once` overlaps the key's parsing (an RSA key's check is a tenth of its
    start, holding the GIL) with the TLS trust stores that its imports load without the GIL."""
    _AHEAD.start(config, (source, where, purpose))


def load_service_key(
    path: Path | None = None,
    *,
    env: str | None = None,
    key_file: Path | None = None,
    key_passphrase: str | None = None,
    now: dt.datetime | None = None,
) -> ServiceKey:
    """Read a service key from a file or an environment variable holding its JSON, and validate it."""
    if path is None and env is None:
        raise CredentialsError("no service key given: set credentials.service_key or --service-key")
    key_source = read_key_source(CredentialsConfig(service_key=path, service_key_env=None if path else env))
    return _parse_with_key_file(key_source.text, key_source.source, key_file, key_passphrase, now)


def _parse_with_key_file(
    text: str, source: str, key_file: Path | None, passphrase: str | None, now: dt.datetime | None
) -> ServiceKey:
    key_bytes = _read_key_file(key_file) if key_file is not None else None
    return parse_service_key(
        text,
        source=source,
        key_file_data=key_bytes,
        key_file_name=str(key_file) if key_file else None,
        key_passphrase=passphrase,
        now=now,
    )


def parse_service_key(
    text: str,
    *,
    source: str,
    key_file_data: bytes | None = None,
    key_file_name: str | None = None,
    key_passphrase: str | None = None,
    now: dt.datetime | None = None,
) -> ServiceKey:
    """Validate the JSON text of a service key; see the module docstring for what is accepted."""
    data = _parse_json(text, source)
    fields = _fields(data, source)
    where = "oauth." if isinstance(data.get("oauth"), Mapping) else ""

    def get(name: str) -> str | None:
        value = fields.get(name)
        if value is None:
            return None
        if not isinstance(value, str):
            raise CredentialsError(f"{source}: field '{where}{name}' must be a string")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise CredentialsError(
                f"{source}: field '{where}{name}' is not valid Unicode (an unpaired surrogate escape): "
                "copy it from the service key unchanged"
            ) from None
        value = value.strip()
        if len(value) > MAX_FIELD_CHARS.get(name, MAX_TEXT_CHARS):
            raise CredentialsError(
                f"{source}: field '{where}{name}' is {len(value)} characters long, far more than a service key "
                "holds: copy it from the service key unchanged"
            )
        if name in _SINGLE_LINE_FIELDS and _CONTROL.search(value):
            raise CredentialsError(
                f"{source}: field '{where}{name}' contains a control character (a line break or NUL): "
                "copy it from the service key unchanged"
            )
        return value or None

    client_id = get("clientid")
    if client_id is None:
        raise CredentialsError(
            f"{source}: field '{where}clientid' is missing: download the service key again "
            "from the BTP cockpit (Process Integration Runtime, plan integration-flow)"
        )
    token_url_raw = get("tokenurl") or get("certurl")
    if token_url_raw is None:
        raise CredentialsError(f"{source}: field '{where}tokenurl' is missing: the service key must name its token URL")
    token_url = _token_url(token_url_raw, source, where + ("tokenurl" if get("tokenurl") else "certurl"))
    runtime_url = get("url")
    if runtime_url is not None:
        _check_https(runtime_url, source, where + "url")
    secret = get("clientsecret")
    certificate_text = get("certificate")
    key_text = get("key")
    notes: list[str] = []

    if certificate_text is None:
        if secret is None:
            raise CredentialsError(
                f"{source}: neither '{where}clientsecret' nor '{where}certificate' is present: "
                "create the service key with key type ClientId/Secret, Certificate or External Certificate"
            )
        return ServiceKey(
            source=source,
            client_id=client_id,
            token_url=token_url,
            runtime_url=runtime_url,
            key_type="clientsecret",
            client_secret=Secret(secret),
        )

    certs = _parse_certificates(certificate_text, source, where + "certificate")
    if key_text is not None:
        key_type: KeyType = "certificate"
        private_key = _parse_private_key(
            _normalise_pem(key_text).encode(), source=source, field=where + "key", passphrase=key_passphrase
        )
    elif key_file_data is not None:
        key_type = "external-certificate"
        key_source = key_file_name or "key file"
        private_key, extra = _parse_key_file(key_file_data, key_source, key_passphrase)
        certs = certs + [c for c in extra if c not in certs]
    else:
        raise CredentialsError(
            f"{source}: field '{where}key' is missing (External Certificate key): "
            "give the private key file with credentials.key_file or --key-file"
        )
    chain = _order_chain(certs, private_key, source, where + "certificate")
    _check_validity(chain[0], source, where + "certificate", now, notes)
    _check_details(fields.get("certificatedetails"), chain[0], source, where + "certificatedetails", notes)
    cert_url = _derive_cert_host(token_url)
    if cert_url != token_url:
        notes.append(
            f"{source}: token URL {token_url} is not the mTLS '.cert.' host; using {cert_url} "
            "(XSUAA only authenticates client certificates there)"
        )
        token_url = cert_url
    return ServiceKey(
        source=source,
        client_id=client_id,
        token_url=token_url,
        runtime_url=runtime_url,
        key_type=key_type,
        client_secret=Secret(secret) if secret else None,
        chain=tuple(chain),
        private_key=private_key,
        notes=tuple(notes),
    )


def _os_reason(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__


def _read_key_file(path: Path) -> bytes:
    return read_small_file(path, what="private key", hint="check credentials.key_file")


def _parse_json(text: str, source: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CredentialsError(
            f"{source}: not valid JSON at line {exc.lineno} column {exc.colno} ({exc.msg}): "
            "paste the service key exactly as the cockpit shows it"
        ) from None
    except ValueError:  # int() refuses more digits than sys.get_int_max_str_digits()
        raise CredentialsError(
            f"{source}: not valid JSON (a number is too long): paste the service key exactly as the cockpit shows it"
        ) from None
    except RecursionError:
        raise CredentialsError(
            f"{source}: not valid JSON (nested too deeply): paste the service key exactly as the cockpit shows it"
        ) from None
    if not isinstance(data, dict):
        raise CredentialsError(f"{source}: a service key is a JSON object, found {type(data).__name__}")
    return data


def _fields(data: Mapping[str, Any], source: str) -> Mapping[str, Any]:
    nested = data.get("oauth")
    if nested is None:
        return data
    if not isinstance(nested, Mapping):
        raise CredentialsError(f"{source}: field 'oauth' must be an object")
    return nested


def _check_https(url: str, source: str, field_name: str) -> None:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError when out of range)
    except ValueError:
        parts = urlsplit("")
    if "@" in parts.netloc:  # never echoed: it may hold a password
        raise CredentialsError(
            f"{source}: field '{field_name}' holds a user name or password (user:password@host): "
            "use the URL from the service key unchanged"
        )
    if parts.scheme != "https" or not parts.hostname:
        raise CredentialsError(f"{source}: field '{field_name}' must be an https:// URL, found {url[:200]!r}")


def _token_url(raw: str, source: str, field_name: str) -> str:
    _check_https(raw, source, field_name)
    parts = urlsplit(raw)
    path = parts.path.rstrip("/")
    if not path.endswith("/oauth/token"):
        path += "/oauth/token"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def _derive_cert_host(token_url: str) -> str:
    """XSUAA authenticates certificates only on `<sub>.authentication.cert.<landscape>`."""
    parts = urlsplit(token_url)
    host = parts.hostname or ""
    if ".authentication." in host and ".authentication.cert." not in host:
        netloc = parts.netloc.replace(".authentication.", ".authentication.cert.", 1)
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))
    return token_url


def _normalise_pem(text: str) -> str:
    """Undo what copying does to PEM: literal `\\n` escapes, CRLF, indentation, spaces in base64."""
    text = text.replace("\\r", "").replace("\\n", "\n").replace("\r\n", "\n").replace("\r", "\n")
    blocks = []
    for label, body in _PEM_BLOCK.findall(text):
        lines = [line.strip() for line in body.split("\n")]
        headers = [line for line in lines if ":" in line]
        b64 = "".join(line.replace(" ", "") for line in lines if line and ":" not in line)
        wrapped = "\n".join(b64[i : i + 64] for i in range(0, len(b64), 64))
        head = "\n".join(headers) + "\n\n" if headers else ""
        blocks.append(f"-----BEGIN {label}-----\n{head}{wrapped}\n-----END {label}-----\n")
    return "".join(blocks) if blocks else text


def _parse_certificates(text: str, source: str, field_name: str) -> list[x509.Certificate]:
    pem = _normalise_pem(text)
    if "-----BEGIN CERTIFICATE-----" not in pem:
        raise CredentialsError(
            f"{source}: field '{field_name}' holds no PEM certificate: copy it from the service key unchanged"
        )
    try:
        certs = list(x509.load_pem_x509_certificates(pem.encode()))
        for cert in certs:
            cert.public_key()  # parsed lazily: a damaged key inside a well-formed certificate fails here
    except (ValueError, UnsupportedAlgorithm):
        raise CredentialsError(
            f"{source}: field '{field_name}' is not a readable PEM certificate chain: "
            "copy it from the service key unchanged"
        ) from None
    return certs


def _parse_private_key(data: bytes, *, source: str, field: str, passphrase: str | None) -> PrivateKey:
    password = passphrase.encode() if passphrase else None
    try:
        key = serialization.load_pem_private_key(data, password=password)
    except TypeError:
        if password is None:
            raise CredentialsError(
                f"{source}: field '{field}' is an encrypted private key: "
                "set credentials.key_passphrase_env to the variable holding its passphrase"
            ) from None
        raise CredentialsError(
            f"{source}: field '{field}' is not encrypted but a passphrase was given: "
            "remove credentials.key_passphrase_env"
        ) from None
    except ValueError:
        if password is not None:
            raise CredentialsError(
                f"{source}: field '{field}': cannot decrypt the private key: check the passphrase"
            ) from None
        raise CredentialsError(
            f"{source}: field '{field}' is not a readable PEM private key (PKCS#1 or PKCS#8): "
            "copy it from the service key unchanged"
        ) from None
    except Exception:  # cryptography raises assorted errors for garbage input
        raise CredentialsError(
            f"{source}: field '{field}' is not a readable PEM private key: copy it unchanged"
        ) from None
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise CredentialsError(f"{source}: field '{field}': only RSA and EC private keys are supported")
    return _strong_enough(key, source, f"field '{field}'")


def _strong_enough(key: PrivateKey, source: str, what: str) -> PrivateKey:
    """Refuse keys that TLS peers refuse or that are too weak to trust: RSA under 2048 bits, odd curves."""
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size < MIN_RSA_BITS:
        raise CredentialsError(
            f"{source}: {what}: an RSA key of {key.key_size} bits is too weak (at least {MIN_RSA_BITS}): "
            "create a new service key"
        )
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name not in ACCEPTED_CURVES:
        raise CredentialsError(
            f"{source}: {what}: EC curve {key.curve.name} is not supported (use P-256, P-384 or P-521): "
            "create a new service key"
        )
    return key


def _parse_key_file(data: bytes, source: str, passphrase: str | None) -> tuple[PrivateKey, list[x509.Certificate]]:
    """An external certificate's private key: PEM (maybe encrypted) or PKCS#12 (.p12/.pfx)."""
    if b"-----BEGIN" in data:
        text = _normalise_pem(data.decode("utf-8", errors="replace"))
        pem_key = _parse_private_key(text.encode(), source=source, field="private key", passphrase=passphrase)
        # a PEM key file may carry the certificate and its intermediates too: they complete the chain
        certs = _parse_certificates(text, source, "certificates") if "-----BEGIN CERTIFICATE-----" in text else []
        return pem_key, certs
    password = passphrase.encode() if passphrase else None
    try:
        key, cert, extra = pkcs12.load_key_and_certificates(data, password)
    except ValueError:
        hint = "check the passphrase" if password else "set credentials.key_passphrase_env if it has one"
        raise CredentialsError(
            f"{source}: not a readable PEM key or PKCS#12 file (wrong or missing passphrase?): {hint}"
        ) from None
    if key is None or not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise CredentialsError(f"{source}: the PKCS#12 file holds no RSA or EC private key")
    certs = ([cert] if cert is not None else []) + list(extra)
    return _strong_enough(key, source, "the private key"), certs


def _public_numbers_match(cert: x509.Certificate, key: PrivateKey) -> bool:
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _order_chain(
    certs: Sequence[x509.Certificate], key: PrivateKey, source: str, field_name: str
) -> list[x509.Certificate]:
    """Leaf (the certificate matching the key) first, then each issuer in turn, then the rest."""
    leaves = [c for c in certs if _public_numbers_match(c, key)]
    if not leaves:
        raise CredentialsError(
            f"{source}: field '{field_name}': no certificate matches the private key: "
            "use the certificate and key of the same service key"
        )
    chain = [leaves[0]]
    rest = [c for c in certs if c is not leaves[0]]
    while rest:
        issuer = chain[-1].issuer
        nxt = next((c for c in rest if c.subject == issuer), None)
        if nxt is None:
            break
        chain.append(nxt)
        rest.remove(nxt)
    return chain + rest


def _serial(text: str) -> set[int]:
    """The serial numbers `text` can mean: SAP writes `0x` and hex ("0xABCD1234"); other tools write plain hex,
    hex with colons, or decimal."""
    value = text.strip().replace(":", "").replace(" ", "")
    readings: set[int] = set()
    for digits, base in ((value[2:], 16) if value.lower().startswith("0x") else (value, 16), (value, 10)):
        try:
            readings.add(int(digits, base))
        except ValueError:
            continue
    return readings


def _check_details(details: Any, cert: x509.Certificate, source: str, field_name: str, notes: list[str]) -> None:
    """`certificatedetails` is informative: a serial number that is not the certificate's is noted (the key
    was put together from two downloads, or edited), never refused."""
    if not isinstance(details, Mapping):
        return
    serial = details.get("serialnumber")
    if isinstance(serial, str) and serial.strip() and cert.serial_number not in _serial(serial[:200]):
        notes.append(
            f"{source}: field '{field_name}.serialnumber' ({serial[:70]}) is not the serial number of the key's "
            f"certificate (0x{cert.serial_number:X}): was the certificate replaced without its details?"
        )


def _check_validity(
    cert: x509.Certificate, source: str, field_name: str, now: dt.datetime | None, notes: list[str]
) -> None:
    now = now or dt.datetime.now(dt.UTC)
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < start:
        raise CredentialsError(
            f"{source}: field '{field_name}': the client certificate is not valid before "
            f"{start.isoformat()}: check the system clock or wait"
        )
    if now >= end:
        raise CredentialsError(
            f"{source}: field '{field_name}': the client certificate expired on {end.isoformat()}: "
            "create a new service key in the BTP cockpit"
        )
    left = end - now
    if left < dt.timedelta(days=EXPIRY_WARNING_DAYS):
        notes.append(
            f"{source}: the client certificate expires in {left.days} days ({end.isoformat()}): "
            "create a new service key before then"
        )
