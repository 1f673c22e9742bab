"""Properties of the input parsers: whatever they are fed, they fail only with senderd's own one-line errors.

- `parse_service_key` on any text, and on JSON service keys with random fields (random URLs, PEM-looking
  text, real certificates and keys, mutated ones): a `ServiceKey` or a `CredentialsError`.
- `config_from_dict` on random TOML-like nested values shaped like the schema, and `load_config` on random
  text or bytes in a file: a `Config` or a `ConfigError`.

Durations and cron expressions have their own properties in test_durations.py and test_schedule.py.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import re
import string
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from senderd.auth.servicekey import ServiceKey, parse_service_key
from senderd.config import (
    Config,
    CredentialsConfig,
    FlowConfig,
    PoolConfig,
    PushConfig,
    RelayConfig,
    RuntimeConfig,
    SendSettings,
    ServerConfig,
    TokenConfig,
    config_from_dict,
    load_config,
)
from senderd.emulator.pki import create_pki
from senderd.errors import ConfigError, CredentialsError

PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SUPPORT = Path(__file__).parent / "data" / "bad" / "support"
"""Relative paths in random configs resolve here (it has a body.xml, so some body_files exist)."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _one_line(message: str) -> bool:
    return "\n" not in message and "\r" not in message


def _has_surrogate(text: str) -> bool:
    return any(0xD800 <= ord(char) <= 0xDFFF for char in text)


def _one_in(draw: st.DrawFn, n: int) -> bool:
    """True about once in `n` draws (in the middle of the range: Hypothesis favours its ends)."""
    return draw(st.integers(0, n - 1)) == n // 2


# --- service keys -------------------------------------------------------------------------------------


@functools.cache
def _material() -> dict[str, list[str]]:
    """Real PEM certificates and keys, made once: `pairs` alternate certificate, matching key (valid, RSA,
    expired, not yet valid, expiring soon; PKCS#1, PKCS#8, `\\n` escapes, CRLF, with the chain in either
    order); `certificate` and `key` add strays (CA certificates, an encrypted key, a CA's key)."""
    pki = create_pki()
    now = dt.datetime.now(dt.UTC)
    valid = pki.issue_client("prop", key_type="ec")
    rsa = pki.issue_client("prop-rsa", key_type="rsa")
    expired = pki.issue_client(
        "old", key_type="ec", not_before=now - dt.timedelta(days=20), not_after=now - dt.timedelta(days=10)
    )
    future = pki.issue_client(
        "new", key_type="ec", not_before=now + dt.timedelta(days=10), not_after=now + dt.timedelta(days=20)
    )
    soon = pki.issue_client("soon", key_type="ec", not_after=now + dt.timedelta(days=3))
    inter, root = pki.intermediate.cert_pem(), pki.root.cert_pem()
    pairs = [
        valid.cert_pem(),
        valid.key_pem_pkcs1(),
        valid.cert_pem() + inter + root,
        valid.key_pem_pkcs8(),
        root + inter + valid.cert_pem(),
        valid.key_pem_pkcs1().replace("\n", "\\n"),
        valid.cert_pem().replace("\n", "\r\n"),
        valid.key_pem_pkcs8().replace("\n", "\r\n  "),
        rsa.cert_pem() + inter,
        rsa.key_pem_pkcs1(),
        expired.cert_pem(),
        expired.key_pem_pkcs8(),
        future.cert_pem(),
        future.key_pem_pkcs8(),
        soon.cert_pem(),
        soon.key_pem_pkcs8(),
    ]
    return {
        "pairs": pairs,
        "certificate": [*pairs[0::2], inter, root + inter],
        "key": [*pairs[1::2], valid.key_pem_pkcs8(b"secret"), pki.root.key_pem_pkcs8()],
    }


def _mutate(text: str, position: int, replacement: str, cut: bool) -> str:
    """Replace one character (or cut the text there): a PEM that is almost right."""
    if not text:
        return replacement
    index = position % len(text)
    return text[:index] if cut else text[:index] + replacement + text[index + 1 :]


def _real(field: str) -> st.SearchStrategy[str]:
    return st.deferred(lambda: st.sampled_from(_material()[field]))


_TEXT = st.text(max_size=40)
_LONE_SURROGATE = st.builds(lambda a, c, b: a + c + b, _TEXT, st.integers(0xD800, 0xDFFF).map(chr), _TEXT)
"""Text with a lone surrogate: JSON writes it as an escape (`\\ud800`), which a service key may hold."""
_JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), _TEXT, _LONE_SURROGATE)
_JSON = st.recursive(
    _JSON_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4), max_leaves=10
)
_PEM_LABELS = st.sampled_from(
    [
        "CERTIFICATE",
        "PRIVATE KEY",
        "RSA PRIVATE KEY",
        "EC PRIVATE KEY",
        "ENCRYPTED PRIVATE KEY",
        "PUBLIC KEY",
        "X509 CRL",
        "A",
    ]
)
_BASE64ISH = st.text(alphabet=string.ascii_letters + string.digits + "+/=: \n\r\t\\", max_size=300)


@st.composite
def _pem_looking(draw: st.DrawFn) -> str:
    """One or more PEM-shaped blocks with random labels and bodies, maybe with `\\n` escapes or junk around."""
    blocks = []
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        label = draw(_PEM_LABELS)
        end = draw(_PEM_LABELS) if _one_in(draw, 10) else label
        blocks.append(f"-----BEGIN {label}-----\n{draw(_BASE64ISH)}\n-----END {end}-----\n")
    text = draw(_TEXT) + "".join(blocks) + draw(_TEXT)
    return text.replace("\n", "\\n") if draw(st.booleans()) else text


def _pem_field(field: str) -> st.SearchStrategy[Any]:
    real = _real(field)
    return st.one_of(
        real,
        st.builds(_mutate, real, st.integers(min_value=0), st.characters(), st.booleans()),
        st.builds(lambda a, b: a + b, real, _real("certificate" if field == "key" else "key")),
        _pem_looking(),
        _JSON,
    )


_GOOD_URLS = st.sampled_from(
    [
        "https://test.authentication.cert.eu10.hana.ondemand.com",
        "https://test.authentication.eu10.hana.ondemand.com/",
        "https://127.0.0.1:8443/oauth/token",
        " https://localhost/oauth/token/ ",
    ]
)
_HOSTS = st.one_of(
    st.sampled_from(
        [
            "test.authentication.eu10.hana.ondemand.com",
            "127.0.0.1",
            "localhost:8443",
            "[::1]:443",
            "host:99999",
            "host:-1",
            "host:x",
            "",
            "a b",
            "user:pw@host",
        ]
    ),
    st.text(max_size=20),
)
_URLS = st.one_of(
    _GOOD_URLS,
    st.builds(
        lambda scheme, host, path: scheme + host + path,
        st.sampled_from(["https://", "http://", "", "ftp://", "https:/", "https:", "HTTPS://", " https://"]),
        _HOSTS,
        st.sampled_from(["", "/", "/oauth/token", "/oauth/token/", "?x=1", "#frag"]) | _TEXT,
    ),
    _JSON,
)
_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "clientid": st.one_of(st.just("sb-x!b1|it-rt-test!b2"), _JSON),
    "clientsecret": st.one_of(st.just("s3cr3t"), _JSON),
    "tokenurl": _URLS,
    "certurl": _URLS,
    "url": _URLS,
    "certificate": _pem_field("certificate"),
    "key": _pem_field("key"),
}


class _KeyCase(NamedTuple):
    text: str
    fields: dict[str, Any]
    """The fields as generated, before layout and JSON (see `_key_trips_known_bug`)."""
    key_file: bytes
    """A key file for it: usually the private key matching its certificate, else a stray."""


@st.composite
def _service_key_json(draw: st.DrawFn, *, external: bool = False) -> _KeyCase:
    """A service key in a random layout: mostly the right fields, often a matching certificate and key,
    each field sometimes missing or replaced by junk, random extra fields, sometimes broken JSON.
    `external`: often without `key` (an External Certificate key, whose private key is a file)."""
    fields: dict[str, Any] = draw(st.dictionaries(_TEXT, _JSON, max_size=2))
    pairs = _material()["pairs"]
    pair = draw(st.integers(min_value=0, max_value=len(pairs) // 2 - 1)) * 2
    good = {
        "clientid": "sb-x!b1|it-rt-test!b2",
        "clientsecret": "s3cr3t",
        "tokenurl": draw(_GOOD_URLS),
        "url": "https://test.it-cpi018-rt.cfapps.eu10.hana.ondemand.com",
        "certificate": pairs[pair],
        "key": pairs[pair + 1],
    }
    for name, values in _FIELDS.items():
        if _one_in(draw, 8):
            continue
        fields[name] = good[name] if name in good and not _one_in(draw, 8) else draw(values)
    if external and draw(st.booleans()):
        fields.pop("key", None)
    layout = draw(st.sampled_from(["nested", "flat", "nested-junk"]))
    data: Any = {"oauth": fields} if layout == "nested" else fields
    if layout == "nested-junk":
        data = {"oauth": draw(_JSON), **fields}
    text = json.dumps(data, indent=draw(st.sampled_from([None, 2])))
    if _one_in(draw, 10):  # sometimes not quite JSON
        text = _mutate(text, draw(st.integers(min_value=0)), draw(st.characters()), draw(st.booleans()))
    key_file = draw(
        st.one_of(
            st.just(pairs[pair + 1].encode()),
            _real("key").map(str.encode),
            _pem_looking().map(str.encode),
            st.binary(max_size=200),
        )
    )
    return _KeyCase(text, fields, key_file)


def _check_key_outcome(parse: Callable[[], ServiceKey]) -> None:
    try:
        key = parse()
    except CredentialsError as exc:
        message = str(exc)
        assert message.startswith("key.json: ") or message.startswith("key.pem: ")
        assert _one_line(message), message
        assert "-----BEGIN" not in message
        event("CredentialsError")
        return
    event(f"ServiceKey ({key.key_type})")
    assert isinstance(key, ServiceKey)
    assert key.token_url.startswith("https://")
    assert key.key_type in ("certificate", "clientsecret", "external-certificate")
    assert key.uses_certificate == (key.key_type != "clientsecret")
    assert "PRIVATE KEY" not in repr(key)


@PROPERTY
@given(
    text=st.one_of(
        st.text(),
        st.binary().map(lambda b: b.decode("latin-1")),
        _JSON.map(json.dumps),
        st.text(alphabet='{}[]":,\\ntrue0', max_size=40),
    )
)
def test_service_key_any_text_gives_a_key_or_credentials_error(text: str) -> None:
    _check_key_outcome(lambda: parse_service_key(text, source="key.json"))


@PROPERTY
@given(case=_service_key_json(), now=st.sampled_from([None, None, None, dt.datetime(2000, 1, 1, tzinfo=dt.UTC)]))
def test_service_key_random_fields_give_a_key_or_credentials_error(case: _KeyCase, now: dt.datetime | None) -> None:
    _check_key_outcome(lambda: parse_service_key(case.text, source="key.json", now=now))


@PROPERTY
@given(case=_service_key_json(external=True), passphrase=st.sampled_from([None, "", "secret", "wrong"]))
def test_service_key_with_key_file_gives_a_key_or_credentials_error(case: _KeyCase, passphrase: str | None) -> None:
    _check_key_outcome(
        lambda: parse_service_key(
            case.text,
            source="key.json",
            key_file_data=case.key_file,
            key_file_name="key.pem",
            key_passphrase=passphrase,
        )
    )


# --- configs ------------------------------------------------------------------------------------------

_SECTIONS: dict[str, type[BaseModel]] = {
    "credentials": CredentialsConfig,
    "token": TokenConfig,
    "runtime": RuntimeConfig,
    "pool": PoolConfig,
    "server": ServerConfig,
    "push": PushConfig,
    "defaults": SendSettings,
    "relay": RelayConfig,
}
_KEYS = st.text(max_size=12)
_INTERESTING = st.sampled_from(
    [
        "",
        "0",
        "-1",
        "5s",
        "0s",
        "-5s",
        "1m30s",
        "500ms",
        "1e400",
        "nan",
        "inf",
        "30",
        "soon",
        "*/5 * * * *",
        "0 0 31 2 *",
        "* * *",
        "61 * * * *",
        "UTC",
        "Europe/Berlin",
        "Mars/Base",
        "Europe",
        "/etc/passwd",
        "https://x.example",
        "https://",
        "http://x",
        "https://[::1",
        "127.0.0.1:9464",
        ":80",
        "host:99999",
        "h:\u00b2",
        "/http/x",
        "http/x",
        "GET",
        "post",
        "auto",
        "now",
        "spread",
        "body.xml",
        "missing.xml",
        "~/x",
        "~nobody/x",
        "..",
        "(",
        "a\nb",
        "a\x00b",
    ]
)
_TOML_SCALARS = st.one_of(
    _INTERESTING,
    st.text(max_size=30),
    st.integers(),
    st.integers(min_value=-1000, max_value=1000),
    st.floats(),
    st.booleans(),
    st.datetimes(),
    st.datetimes(timezones=st.just(dt.UTC)),
    st.dates(),
    st.times(),
)
_TOML_VALUES = st.recursive(
    _TOML_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS, inner, max_size=3), max_leaves=8
)
_DURATIONS = st.sampled_from(["30s", "5m", "1m30s", "500ms", 1, 2.5, "1h"])
_GOOD: dict[str, st.SearchStrategy[Any]] = {
    "service_key": st.sampled_from(["external-key.json", "missing.json"]),
    "key_file": st.sampled_from(["client.key", "missing.key"]),
    "ca_file": st.just("client.key"),
    "url": st.sampled_from(["https://x.example", "https://x.example/"]),
    "gateway": st.sampled_from(["http://pushgateway:9091", "https://pg.example"]),
    "listen": st.sampled_from(["127.0.0.1:0", "0.0.0.0:9464", "[::1]:8787"]),
    "refresh_left": st.floats(min_value=0.01, max_value=0.99),
    "refresh_jitter": st.floats(min_value=0, max_value=0.49),
    "enabled": st.booleans(),
    "ordered": st.booleans(),
    "csrf": st.sampled_from([True, False, "auto"]),
    "method": st.sampled_from(["GET", "post", "Put", "DELETE"]),
    "headers": st.dictionaries(st.sampled_from(["Accept", "X-Id"]), st.sampled_from(["text/plain", "1"])),
    "query": st.dictionaries(st.sampled_from(["a", "b"]), st.sampled_from(["1", "x y"])),
    "expect_status": st.lists(st.integers(100, 599), max_size=3),
    "retry_on": st.lists(st.integers(100, 599), max_size=3),
    "expect_body": st.sampled_from(["ok", "Current time \\(UTC\\)", ".*"]),
    "name": st.sampled_from(["a", "b", "c", "d", "e", "f", "timestamp", "orders.v2"]),
    "path": st.sampled_from(["/http/x", "https://x.example/http/x"]),
    "every": _DURATIONS,
    "cron": st.sampled_from(["*/5 * * * *", "0 6 * * 1-5", "0 0 1 1 *"]),
    "timezone": st.sampled_from(["UTC", "Europe/Berlin", "America/New_York"]),
    "body": st.just("<order/>"),
    "body_file": st.sampled_from(["body.xml", "missing.xml"]),
    "start": st.sampled_from(["spread", "now"]),
    "spool_dir": st.just("spool"),
}
"""Right values for the schema's keys; any other key gets a duration or a small number."""


_BY_TYPE: dict[Any, st.SearchStrategy[Any]] = {
    int: st.integers(min_value=1, max_value=100),
    bool: st.booleans(),
    str: st.sampled_from(["senderd", "SENDERD_X"]),
    str | None: st.sampled_from(["senderd", "SENDERD_X"]),
}


def _value(model: type[BaseModel], key: str) -> st.SearchStrategy[Any]:
    """Mostly a right value for `key` (from `_GOOD`, else by its type; a duration for other floats)."""
    good = _GOOD[key] if key in _GOOD else _BY_TYPE.get(model.model_fields[key].annotation, _DURATIONS)
    return st.integers(0, 7).flatmap(lambda n: _TOML_VALUES if n == 4 else good)


@st.composite
def _table(draw: st.DrawFn, model: type[BaseModel]) -> dict[str, Any]:
    """Some of the model's own keys with mostly right values, and sometimes an unknown key."""
    names = draw(st.lists(st.sampled_from(sorted(model.model_fields)), unique=True, max_size=6))
    table = {name: draw(_value(model, name)) for name in names}
    if _one_in(draw, 10):
        table[draw(_KEYS)] = draw(_TOML_VALUES)
    return table


_SCHEDULES = st.sampled_from([(), ("every",), ("cron",), ("cron", "timezone"), ("every", "cron"), ("timezone",)])
_BODIES = st.sampled_from([(), ("body",), ("body_file",), ("body", "body_file")])


@st.composite
def _flow(draw: st.DrawFn) -> dict[str, Any]:
    """A flow: name and path (rarely missing), a schedule and a body (sometimes both kinds), other settings."""
    flow = draw(_table(SendSettings)) if draw(st.booleans()) else draw(_table(FlowConfig))
    for name in ("name", "path", *draw(_SCHEDULES), *draw(_BODIES)):
        if name in ("name", "path") and _one_in(draw, 10):
            continue
        flow[name] = draw(_value(FlowConfig, name))
    return flow


@st.composite
def _config_dict(draw: st.DrawFn) -> dict[str, Any]:
    """A config shaped like the schema: known sections with mostly right values, flows, the odd stray."""
    data: dict[str, Any] = {}
    for name, model in _SECTIONS.items():
        if _one_in(draw, 2):
            data[name] = draw(_TOML_VALUES) if _one_in(draw, 10) else draw(_table(model))
    if not _one_in(draw, 4):
        data["flows"] = draw(_TOML_VALUES) if _one_in(draw, 10) else draw(st.lists(_flow(), min_size=1, max_size=3))
    if _one_in(draw, 10):
        data[draw(_KEYS | st.sampled_from(["flow", "tokens", *Config.model_fields]))] = draw(_TOML_VALUES)
    return data


def _check_config_outcome(load: Callable[[], Config], source: str) -> None:
    try:
        config = load()
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith(f"{source}: "), message
        assert _one_line(message), message
        event("ConfigError")
        return
    event(f"Config with {len(config.flows)} flows")
    assert isinstance(config, Config)
    assert config.source == source
    assert len({flow.name for flow in config.flows}) == len(config.flows)


@PROPERTY
@given(data=_config_dict())
def test_config_from_random_dicts_gives_a_config_or_config_error(data: dict[str, Any]) -> None:
    _check_config_outcome(lambda: config_from_dict(data, source="senderd.toml", base=SUPPORT), "senderd.toml")


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key, ensure_ascii=False)


def _toml_value(value: Any) -> str:
    """TOML for a value (JSON's string escapes are TOML's; a DEL or such makes it invalid TOML, also fine)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)  # inf, -inf and nan are TOML too
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(value, ensure_ascii=False)


def _toml(data: Mapping[str, Any]) -> str:
    """A TOML document for `data`: scalars first, then tables, then arrays of tables."""
    head, tables = [], []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append(
                f"[{_toml_key(key)}]\n" + "".join(f"{_toml_key(k)} = {_toml_value(v)}\n" for k, v in value.items())
            )
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for item in value:
                tables.append(
                    f"[[{_toml_key(key)}]]\n" + "".join(f"{_toml_key(k)} = {_toml_value(v)}\n" for k, v in item.items())
                )
        else:
            head.append(f"{_toml_key(key)} = {_toml_value(value)}\n")
    return "".join(head) + "\n".join(tables)


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("properties")


@PROPERTY
@given(
    content=st.one_of(
        st.text(),
        st.binary(max_size=200),
        st.lists(
            st.sampled_from(
                [
                    "[token]",
                    "[[flows]]",
                    "[pool]",
                    'name = "a"',
                    'path = "/x"',
                    "every = 5",
                    'timeout = "5s"',
                    "workers = 0",
                    "[credentials",
                    "x = ",
                    "= 1",
                    '"a\\nb" = 1',
                    "flows = 1",
                    "[flows]",
                    "a.b = 1",
                    "[defaults.headers]",
                    "k = 'v'",
                ]
            )
            | st.text(max_size=20),
            max_size=8,
        ).map("\n".join),
        _config_dict().map(_toml),
    )
)
def test_load_config_on_any_file_gives_a_config_or_config_error(content: str | bytes, config_dir: Path) -> None:
    path = config_dir / "senderd.toml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    _check_config_outcome(lambda: load_config(path), str(path))
