"""The TOML configuration: schema, defaults, validation into immutable objects.

Unknown keys are errors; every error is one line `FILE: section.key: what is wrong (how to fix)`.
Relative paths are resolved against the config file's folder. Defaults live here and nowhere else.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from senderd.durations import parse_duration
from senderd.errors import ConfigError
from senderd.logs import register_secret

CONFIG_ENV = "SENDERD_CONFIG"


def _duration(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError("a duration is a string such as 500ms, 30s, 5m, 1h")
    try:
        return parse_duration(value)
    except ConfigError as exc:  # pydantic reports ValueError with the field's location
        raise ValueError(str(exc)) from None


Duration = Annotated[float, BeforeValidator(_duration)]
PositiveDuration = Annotated[float, BeforeValidator(_duration), Field(ge=0.001)]
"""A duration of at least 1 ms: zero would turn a timeout into instant failure or a backoff into a busy loop."""
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _is_url(value: str, schemes: tuple[str, ...]) -> bool:
    """`value` is an absolute URL with one of `schemes`, a host, and a port (if any) in range."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018  (raises ValueError when out of range)
    except ValueError:
        return False
    return parts.scheme in schemes and bool(parts.hostname) and value.startswith(parts.scheme + "://")


def _no_control(value: str, what: str) -> str:
    if _CONTROL.search(value):
        raise ValueError(f"{what} contains a control character (such as a line break): remove it")
    return value


class Section(BaseModel):
    """A config table: immutable, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


SOURCE_KEYS = ("service_key", "service_key_env", "binding", "binding_name", "vcap_service")
"""The keys of a credentials set that say where its credentials come from: at most one per set."""
AuthMode = Literal["oauth", "client-certificate", "basic"]
"""How a set authenticates to the runtime: a Bearer token (OAuth client credentials), the client
certificate itself, or HTTP Basic with clientid:clientsecret."""
SET_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
DEFAULT_SET = "default"
"""The name of the one set that a plain `[credentials]` table is."""


class CredentialsConfig(Section):
    """One credentials set (`[credentials]`, or `[credentials.NAME]`): where the service key comes from, how
    it authenticates, which CAs and proxy it uses. Each set has its own token provider and sessions."""

    service_key: Path | None = None
    """A service key JSON file (as downloaded from the BTP cockpit)."""
    service_key_env: str | None = None
    """Or: the environment variable holding the key's JSON (cannot rotate while running)."""
    binding: Path | None = None
    """Or: a mounted binding directory (SAP BTP service operator Secret, any of its layouts)."""
    binding_name: str | None = None
    """Or: the binding `$SERVICE_BINDING_ROOT/NAME` (else `/etc/secrets/sapcp/<service>/NAME`)."""
    vcap_service: str | None = None
    """Or: the service instance of that name in `VCAP_SERVICES` (or the file `VCAP_SERVICES_FILE_PATH`)."""
    key_file: Path | None = None
    key_passphrase_env: str | None = None
    ca_file: Path | None = None
    watch_interval: PositiveDuration = 10.0
    """How often the daemon checks the set's files (key, key file, binding) for a replacement."""
    runtime_url: str | None = None
    """The runtime this set sends to (default: `[runtime] url`, else the key's `url`)."""
    auth: AuthMode = "oauth"
    client_auth: Literal["post", "basic"] = "post"
    """How a ClientId/Secret key's secret reaches the token server: in the form body (as SAP's libraries
    send it; a `+` in a secret breaks HTTP Basic) or as HTTP Basic."""
    proxy: str | Literal[False] | None = None
    """An HTTP proxy for this set's token and runtime requests (`http://[user:pass@]host:port`); unset:
    `HTTPS_PROXY`/`https_proxy`/`NO_PROXY` from the environment; false: never a proxy."""
    token: dict[str, Any] | None = None
    """Overrides of `[token]` for this set (e.g. `token = { timeout = "30s" }`)."""

    @model_validator(mode="after")
    def _one_source(self) -> CredentialsConfig:
        given = [key for key in SOURCE_KEYS if getattr(self, key) is not None]
        if len(given) > 1:
            raise ValueError(f"give one source of credentials, not {' and '.join(given)}")
        if self.token is not None:
            TokenConfig.model_validate(self.token)
        return self

    @field_validator("runtime_url")
    @classmethod
    def _runtime_https(cls, value: str | None) -> str | None:
        if value is not None and not _is_url(value, ("https",)):
            raise ValueError(f"must be an https:// URL, found {value!r}")
        return value.rstrip("/") if value else value

    @field_validator("proxy")
    @classmethod
    def _proxy_url(cls, value: str | bool | None) -> str | bool | None:
        if value is True:
            raise ValueError('must be a proxy URL such as "http://proxy.example:3128", or false')
        if isinstance(value, str):
            if not _is_url(value, ("http", "https")):
                raise ValueError("must be a proxy URL such as http://proxy.example:3128 (user:password@ allowed)")
            register_secret_parts(value)
        return value

    @property
    def source_key(self) -> str | None:
        """The key naming this set's source of credentials (None: found in `$SERVICE_BINDING_ROOT`)."""
        return next((key for key in SOURCE_KEYS if getattr(self, key) is not None), None)

    def key_passphrase(self) -> str | None:
        """The external key's passphrase, read from the named environment variable."""
        if self.key_passphrase_env is None:
            return None
        value = os.environ.get(self.key_passphrase_env)
        if value is None:
            raise ConfigError(
                f"credentials.key_passphrase_env: environment variable {self.key_passphrase_env} is not set"
            )
        return value


def register_secret_parts(url: str) -> None:
    """Register the password (and user name) of a URL's `user:password@` for redaction."""
    parts = urlsplit(url)
    for part in (parts.password, parts.username):
        if part:
            register_secret(part)


class TokenConfig(Section):
    """`[token]`: refresh ahead of expiry and back off on failure."""

    refresh_left: float = Field(default=1 / 3, gt=0, lt=1)
    refresh_jitter: float = Field(default=0.1, ge=0, lt=0.5)
    backoff_initial: PositiveDuration = 1.0
    backoff_max: PositiveDuration = 60.0
    timeout: PositiveDuration = 10.0
    startup_jitter: Duration = 1.0
    """The daemon's first token fetch waits a random part of this, so replicas started together spread out."""


MODIFYING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
DEFAULT_RETRY_ON = (429, 502, 503, 504)
APPLICATION_ID_HEADER = "SAP_ApplicationID"
APPLICATION_ID_MAX = 120
"""Characters of `SAP_ApplicationID` that Cloud Integration monitoring keeps (and finds a message by)."""
RECOMMENDED_MAX_BODY = 40 * 1024 * 1024
"""SAP's recommended maximum payload (40 MB): larger bodies are allowed, with a warning."""
_WHITESPACE = re.compile(r"\s")
HTTP_HEADERS_WITH_SPACES = frozenset(
    {"accept", "accept-charset", "accept-encoding", "accept-language", "cache-control", "content-type",
     "if-match", "if-none-match", "prefer", "user-agent"}
)  # fmt: skip
"""Standard HTTP headers whose syntax has spaces (`text/xml; charset=utf-8`): Cloud Integration's rule of header
values without whitespace is about the headers an iFlow reads, which these are not."""


class RuntimeConfig(Section):
    """`[runtime]`: the Cloud Integration runtime (defaults to the service key's `url`)."""

    url: str | None = None
    ca_file: Path | None = None

    @field_validator("url")
    @classmethod
    def _https(cls, value: str | None) -> str | None:
        if value is not None and not _is_url(value, ("https",)):
            raise ValueError(f"must be an https:// URL, found {value!r}")
        return value.rstrip("/") if value else value


class PoolConfig(Section):
    """`[pool]`: how many sends run at once, how many may wait, how long a stop waits for them."""

    workers: int = Field(default=8, ge=1, le=1024)
    queue: int = Field(default=256, ge=1, le=100_000)
    drain_timeout: Duration = 30.0


class SendSettings(Section):
    """Per-flow send settings; `[defaults]` sets them for every flow, a flow may override each."""

    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"] = "GET"
    timeout: PositiveDuration = 10.0
    headers: dict[str, str] = {}
    query: dict[str, str] = {}
    content_type: str | None = None
    csrf: bool | Literal["auto"] = "auto"
    expect_status: list[Annotated[int, Field(ge=100, le=599)]] | None = None
    expect_body: str | None = None
    retries: int = Field(default=3, ge=0, le=100)
    retry_on: list[Annotated[int, Field(ge=100, le=599)]] = list(DEFAULT_RETRY_ON)
    backoff_initial: PositiveDuration = 0.5
    backoff_max: PositiveDuration = 30.0
    retry_after_max: Duration = 60.0
    deadline: PositiveDuration = 120.0
    credentials: str | None = None
    """The credentials set to send with (needed when there are several)."""
    application_id: str | Literal[False] | None = None
    """`SAP_ApplicationID` header: "auto" (a fresh id per message, kept across its retries), a fixed value,
    or false (none). Unset: "auto" for modifying methods, none for GET and HEAD."""
    max_response_bytes: int = Field(default=10 * 1024 * 1024, ge=1024, le=1 << 31)
    """Bytes of an answer kept (decoded) for checks, logs and callers; reading stops beyond."""
    confirm: Literal["none", "mpl"] = "none"
    """"mpl": after a successful send, look the message up in the Message Processing Log API until it is
    COMPLETED (success), failed (`flow_failed`) or `confirm_timeout` has passed (`unconfirmed`)."""
    confirm_credentials: str | None = None
    """The credentials set (a key of plan `api`, role MonitoringDataRead) that reads the MPL API."""
    confirm_timeout: PositiveDuration = 120.0
    """How long a confirmation looks for a final status."""

    @field_validator("method", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("csrf", mode="before")
    @classmethod
    def _csrf(cls, value: Any) -> Any:
        if isinstance(value, bool) or value == "auto":
            return value
        raise ValueError('must be true, false or "auto"')

    @field_validator("headers", "query")
    @classmethod
    def _clean_pairs(cls, value: dict[str, str]) -> dict[str, str]:
        for name, item in value.items():
            _no_control(name, f"name {name!r}")
            _no_control(item, f"the value of {name!r}")
        return value

    @field_validator("headers")
    @classmethod
    def _header_syntax(cls, value: dict[str, str]) -> dict[str, str]:
        for name, item in value.items():
            if not name or _WHITESPACE.search(name) or ":" in name:
                raise ValueError(
                    f"header name {name!r} contains whitespace or ':': remove it (a header name is one word)"
                )
            if _WHITESPACE.search(item) and name.lower() not in HTTP_HEADERS_WITH_SPACES:
                raise ValueError(
                    f"the value of {name!r} contains whitespace: Cloud Integration expects header values without "
                    "whitespace: remove it (or encode the value)"
                )
            if name.lower() == APPLICATION_ID_HEADER.lower():
                _application_id(item)
        return value

    @field_validator("content_type", "application_id")
    @classmethod
    def _clean_text(cls, value: str | bool | None) -> str | bool | None:
        if value is True:
            raise ValueError('must be "auto", a fixed id, or false')
        return _no_control(value, "the value") if isinstance(value, str) else value

    @field_validator("application_id")
    @classmethod
    def _fixed_id(cls, value: str | bool | None) -> str | bool | None:
        if isinstance(value, str) and value != "auto":
            _application_id(value)
        return value

    @field_validator("expect_body")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression ({exc})") from None
        return value


class FlowConfig(SendSettings):
    """`[[flows]]`: one iFlow endpoint and when to call it."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    path: str
    every: Duration | None = None
    cron: str | None = None
    timezone: str = "UTC"
    body: str | None = None
    body_file: Path | None = None
    start: Literal["spread", "now"] = "spread"
    """First fire of an `every` flow: spread over the interval (default) or right at start-up."""
    ordered: bool = False
    _payload: bytes | None = PrivateAttr(default=None)
    probe: bool = False
    """Whether `/probe?flow=NAME` may send this flow (a probe is a real send: off unless asked for)."""

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not (value.startswith("/") or value.startswith("https://")):
            raise ValueError(f"must start with / (relative to runtime.url) or be an https:// URL, found {value!r}")
        return value

    @model_validator(mode="after")
    def _schedule_and_body(self) -> FlowConfig:
        if self.every is not None and self.cron is not None:
            raise ValueError("give every or cron, not both")
        if self.every is not None:
            from senderd.schedule import IntervalSchedule

            try:
                IntervalSchedule(self.every)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        if self.body is not None and self.body_file is not None:
            raise ValueError("give body or body_file, not both")
        if self.body_file is not None:
            self._payload = _read_body(self.body_file)
        elif self.body is not None:
            self._payload = self.body.encode()
        if self.cron is None and self.timezone != "UTC":
            raise ValueError("timezone applies only to cron schedules: remove it or use cron")
        if self.cron is not None or self.timezone != "UTC":
            from senderd.schedule import CronSchedule

            try:
                CronSchedule(self.cron or "* * * * *", self.timezone)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return self

    @property
    def modifying(self) -> bool:
        """True for methods that need a CSRF token on protected flows."""
        return self.method in MODIFYING_METHODS

    @property
    def message_ids(self) -> str | None:
        """Where a send's `SAP_ApplicationID` comes from: "auto", a fixed value, or None (no header). Unset:
        "auto" for modifying methods and for confirmed flows (the MPL API finds a message by that id)."""
        if self.application_id is None:
            return "auto" if self.modifying or self.confirm == "mpl" else None
        return self.application_id or None

    def body_bytes(self) -> bytes | None:
        """The configured body (from `body`, or `body_file` as it was read at load or reload), if any."""
        return self._payload


MAX_BODY_FILE_BYTES = 64 * 1024 * 1024
"""A body file is read whole at load; beyond this it is refused (SAP recommends payloads up to 40 MB)."""


def _application_id(value: str) -> None:
    if _WHITESPACE.search(value):
        raise ValueError(f"{APPLICATION_ID_HEADER} {value[:40]!r} contains whitespace: header values have none")
    if len(value) > APPLICATION_ID_MAX:
        raise ValueError(
            f"{APPLICATION_ID_HEADER} is {len(value)} characters long: Cloud Integration keeps only the first "
            f'{APPLICATION_ID_MAX} (and finds a message by them): use a shorter id, or "auto"'
        )


def _read_body(path: Path) -> bytes:
    """A flow's body file, read once (at load and reload), so that its later fate cannot fail a send."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_BODY_FILE_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"body_file {str(path)!r} is missing or unreadable ({exc.strerror}): check the path") from None
    if len(data) > MAX_BODY_FILE_BYTES:
        raise ValueError(f"body_file {str(path)!r} is larger than {MAX_BODY_FILE_BYTES >> 20} MiB: use a smaller body")
    return data


def check_listen(value: str) -> str:
    """A `host:port` listen address, or ValueError."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ValueError(f"use host:port, e.g. 127.0.0.1:9464 (or 0.0.0.0:9464 in a container), found {value!r}")
    return value


def is_loopback(host: str) -> bool:
    """Whether `host` (of a listen address) is this machine only: localhost, 127.0.0.0/8 or ::1."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def open_without_token(listen: str, token_env: str | None) -> bool:
    """Whether a `listen` address reaches beyond this machine while no `token_env` guards it."""
    return token_env is None and not is_loopback(listen.rpartition(":")[0])


def parse_listen(value: str) -> tuple[str, int]:
    """`host:port` (IPv6 as `[::1]:9464`) → (host, port); ConfigError if it is not one."""
    try:
        check_listen(value)
    except ValueError as exc:
        raise ConfigError(f"invalid listen address: {exc}") from None
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def env_secret(variable: str | None, key: str) -> str | None:
    """The secret in environment variable `variable` (None when no variable is configured); `key` names the
    config key in the error when the variable is unset or empty."""
    if variable is None:
        return None
    value = os.environ.get(variable)
    if not value:
        raise ConfigError(f"{key}: environment variable {variable} is not set or empty")
    register_secret(value)
    return value


class ServerConfig(Section):
    """`[server]`: the metrics and health endpoint."""

    listen: str = "127.0.0.1:9464"
    enabled: bool = True
    token_env: str | None = None
    """Environment variable holding the bearer token that `/metrics` and `/probe` require (none: open)."""

    def token(self) -> str | None:
        """The bearer token that scrapers must present, from `token_env`."""
        return env_secret(self.token_env, "server.token_env")

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        return check_listen(value)


PUSH_INSTANCE = "default"
"""`push.instance` unless configured: a fixed value, so that every run replaces the same group."""


class PushConfig(Section):
    """`[push]`: where `once` pushes its metrics (a Prometheus Pushgateway)."""

    gateway: str | None = None
    job: str = "senderd"
    instance: str = PUSH_INSTANCE
    """The `instance` of the grouping key: with `job`, the one group each run replaces (never the host name,
    which a CronJob's pod changes every run: groups would pile up, stale values with them)."""

    @field_validator("gateway")
    @classmethod
    def _http(cls, value: str | None) -> str | None:
        if value is not None and not _is_url(value, ("http", "https")):
            raise ValueError(f"must be an http:// or https:// URL, found {value!r}")
        return value

    @field_validator("job", "instance")
    @classmethod
    def _label(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty: it names the Pushgateway group each run replaces")
        return value


class RelayConfig(Section):
    """`[relay]`: the sidecar ingest API and its durable spool."""

    listen: str = "127.0.0.1:8787"
    spool_dir: Path = Path("/var/lib/senderd/spool")
    max_message_bytes: int = Field(default=10 * 1024 * 1024, ge=1, le=1 << 31)
    max_spool_bytes: int = Field(default=1 << 30, ge=1)
    max_spool_messages: int = Field(default=100_000, ge=1)
    token_env: str | None = None
    """Environment variable holding the bearer token the app must present (none: no auth, localhost only)."""
    max_deliveries: int = Field(default=10, ge=1, le=10_000)
    """Delivery rounds (each with the flow's own retries) before a message is dead."""
    redelivery_initial: PositiveDuration = 5.0
    redelivery_max: PositiveDuration = 300.0
    retention: Duration = 86_400.0
    """How long delivered messages are kept (for status queries) before pruning."""
    dead_retention: Duration | None = None
    """How long dead messages are kept (None: until re-driven)."""
    workers: int | None = Field(default=None, ge=1, le=1000)
    """Relay deliveries at once (None: as many as `pool.workers`). They run beside the pool's scheduled
    sends: up to `pool.workers` + `relay.workers` sends are under way together."""
    application_id_header: str = "SAP_ApplicationID"
    read_timeout: PositiveDuration = 10.0
    """A client that has not sent its whole body by then gets 408 (a slow-loris holds nothing for long)."""
    header_timeout: PositiveDuration = 10.0
    """A connection that has not sent a request's head by then (from connecting, or from the previous
    answer) is closed."""
    max_connections: int = Field(default=256, ge=1, le=100_000)
    """Connections at once; one more is answered 503 and closed."""
    max_buffered_bytes: int = Field(default=64 * 1024 * 1024, ge=1)
    """Body bytes held in memory at once across all posts; a post that cannot get its share within
    `read_timeout` is answered 503 (nothing acknowledged)."""
    store: Literal["sqlite", "postgresql"] = "sqlite"
    """Where messages are kept: `sqlite` in `spool_dir` (one daemon), or `postgresql` (shared by replicas)."""
    dsn_env: str | None = None
    """Environment variable holding the PostgreSQL connection string (a secret: never logged)."""
    lease: PositiveDuration = 30.0
    """With `postgresql`: how long a replica's claim on a message lasts unless renewed; a replica that dies
    loses its messages to the others after this long."""
    pool_size: int = Field(default=10, ge=1, le=1000)
    """With `postgresql`: connections this replica keeps to the database."""

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        return check_listen(value)

    @model_validator(mode="after")
    def _store_and_exposure(self) -> RelayConfig:
        if self.store == "postgresql" and self.dsn_env is None:
            raise ValueError(
                'dsn_env: store = "postgresql" needs the environment variable holding the DSN, '
                'e.g. dsn_env = "SENDERD_POSTGRES_DSN"'
            )
        if self.dsn_env is not None and self.store != "postgresql":
            raise ValueError('dsn_env: only with store = "postgresql"')
        if open_without_token(self.listen, self.token_env):
            raise ValueError(
                f"listen = {self.listen!r} is reachable beyond localhost without a token: set relay.token_env "
                "(the app then sends 'Authorization: Bearer ...'), or listen on 127.0.0.1"
            )
        return self

    def token(self) -> str | None:
        """The bearer token the app must present, from `token_env`."""
        return env_secret(self.token_env, "relay.token_env")

    def dsn(self) -> str:
        """The PostgreSQL connection string, from `dsn_env` (registered for redaction)."""
        value = env_secret(self.dsn_env, "relay.dsn_env")
        if value is None:
            raise ConfigError('relay.dsn_env: store = "postgresql" needs it')
        return value


_SHARD = re.compile(r"^(\d+)/(\d+)$")


class ClusterConfig(Section):
    """`[cluster]`: how replicas split scheduled flows without a database (with `relay.store =
    "postgresql"` a claim per tick in the database decides instead, and this is not needed)."""

    shard: str | None = None
    """`"I/N"`: this replica fires the scheduled flows whose stable name hash modulo N is I (0-based)."""
    shards: int | None = Field(default=None, ge=1, le=10_000)
    """N, when I comes from `shard_index_env` (a StatefulSet's pod ordinal)."""
    shard_index_env: str | None = None
    """Environment variable holding I, or a pod name ending in `-I` (`HOSTNAME` in a StatefulSet)."""

    @model_validator(mode="after")
    def _one_way(self) -> ClusterConfig:
        if self.shard is not None:
            match = _SHARD.match(self.shard)
            if match is None or int(match[1]) >= int(match[2]):
                raise ValueError(f'shard: use "I/N" with 0 <= I < N, e.g. "0/3", found {self.shard!r}')
            if self.shards is not None or self.shard_index_env is not None:
                raise ValueError("shard: give either shard, or shards with shard_index_env, not both")
        elif (self.shards is None) != (self.shard_index_env is None):
            raise ValueError("shards and shard_index_env go together: give both, or neither")
        return self

    def shard_of(self) -> tuple[int, int] | None:
        """(I, N) for this replica, or None when scheduled flows are not sharded; reads the environment."""
        if self.shard is not None:
            index, count = self.shard.split("/")
            return int(index), int(count)
        if self.shards is None or self.shard_index_env is None:
            return None
        value = os.environ.get(self.shard_index_env, "")
        ordinal = value.rpartition("-")[2]
        if not ordinal.isdigit() or int(ordinal) >= self.shards:
            raise ConfigError(
                f"cluster.shard_index_env: {self.shard_index_env}={value!r} is not a shard index below "
                f"cluster.shards ({self.shards}) nor a pod name ending in one"
            )
        return int(ordinal), self.shards


FORWARD_MAX_BODY = 128 * 1024 * 1024


class ForwardConfig(Section):
    """`[forward]`: request-reply through the sidecar: the app's own calls to iFlows, credentials injected
    (see `senderd.forward`)."""

    listen: str = "127.0.0.1:8788"
    token_env: str | None = None
    """Environment variable holding the bearer token the app must present (needed beyond localhost)."""
    credentials: str | None = None
    """The credentials set the calls go out with (default: the only sending set)."""
    allow: list[str] = ["/http/*"]
    """Path patterns forwarded (exact, or a prefix ending in `*`; case-insensitive); anything else is a 404."""
    max_body_bytes: int = Field(default=FORWARD_MAX_BODY, ge=1, le=1 << 40)
    """The largest request body forwarded (413 beyond); it is streamed, never held whole."""
    timeout: PositiveDuration = 60.0
    """How long the runtime may take to answer (the upload included), and the longest pause in its answer."""
    application_id: Literal["auto"] | Literal[False] = False
    """"auto": a fresh `SAP_ApplicationID` for a modifying request that carries none (the app's own always
    passes through)."""

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        return check_listen(value)

    @field_validator("allow")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError('give at least one path pattern, e.g. ["/http/*"]')
        for pattern in value:
            if not pattern.startswith("/") or "*" in pattern[:-1] or _CONTROL.search(pattern) or " " in pattern:
                raise ValueError(
                    f"{pattern!r}: a pattern is a path starting with / with at most one * at its end, e.g. /http/*"
                )
        return value

    @model_validator(mode="after")
    def _localhost_or_token(self) -> ForwardConfig:
        if open_without_token(self.listen, self.token_env):
            raise ValueError(
                f"listen = {self.listen!r} is beyond localhost: set token_env (the bearer token the app must "
                "present) or listen on 127.0.0.1"
            )
        return self

    def token(self) -> str | None:
        """The bearer token the app must present, from `token_env`."""
        return env_secret(self.token_env, "forward.token_env")


class Config(BaseModel):
    """The whole validated configuration."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = "<defaults>"
    credentials: dict[str, CredentialsConfig] = {DEFAULT_SET: CredentialsConfig()}
    """The credentials sets by name: `[credentials]` alone is the set named "default"."""
    token: TokenConfig = TokenConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    pool: PoolConfig = PoolConfig()
    server: ServerConfig = ServerConfig()
    push: PushConfig = PushConfig()
    defaults: SendSettings = SendSettings()
    flows: list[FlowConfig] = []
    relay: RelayConfig | None = None
    forward: ForwardConfig | None = None
    cluster: ClusterConfig = ClusterConfig()

    @model_validator(mode="after")
    def _unique_names(self) -> Config:
        seen: set[str] = set()
        for flow in self.flows:
            if flow.name in seen:
                raise ValueError(f"flow name {flow.name!r} is used twice: names must be unique")
            seen.add(flow.name)
        if not self.credentials:
            raise ValueError("credentials: no credentials set: add [credentials] or [credentials.NAME]")
        for name in self.credentials:
            if not re.match(SET_NAME, name):
                raise ValueError(f"credentials set name {name!r}: use letters, digits, '_', '.' and '-'")
        return self

    @property
    def api_sets(self) -> frozenset[str]:
        """The credentials sets that read the Message Processing Log API (a flow's `confirm_credentials`):
        keys of plan `api`, which send nothing."""
        return frozenset(f.confirm_credentials for f in self.flows if f.confirm_credentials is not None)

    def purpose(self, name: str) -> Literal["send", "api"]:
        """What credentials set `name` is for: sending to iFlows, or reading the MPL API."""
        return "api" if name in self.api_sets else "send"

    @property
    def send_sets(self) -> list[str]:
        """The credentials sets that send to iFlows (every set but the MPL API ones), in config order."""
        api = self.api_sets
        return [name for name in self.credentials if name not in api]

    @property
    def credentials_default(self) -> str | None:
        """The set a flow without `credentials` uses: the only sending one, if there is only one."""
        sending = self.send_sets
        return sending[0] if len(sending) == 1 else None

    def set_of(self, flow: SendSettings) -> str:
        """The name of the credentials set `flow` sends with."""
        name = flow.credentials or self.credentials_default
        assert name is not None, "validated at load: a flow names its set when there are several"
        return name

    def credentials_set(self, name: str | None = None) -> CredentialsConfig:
        """The credentials set `name` (default: the only one); ConfigError naming the sets otherwise."""
        name = name or self.credentials_default
        if name is None or name not in self.credentials:
            known = ", ".join(self.credentials)
            raise ConfigError(f"{self.source}: no credentials set named {name!r} (sets: {known})")
        return self.credentials[name]

    def token_for(self, name: str) -> TokenConfig:
        """`[token]` with the overrides of set `name` applied."""
        overrides = self.credentials[name].token
        return (
            self.token.model_copy(update=TokenConfig.model_validate(overrides).model_dump(exclude_unset=True))
            if overrides
            else self.token
        )

    def require_flows(self) -> None:
        """Refuse a config that `run` and `once` cannot work with (what `check` also says)."""
        if not self.flows:
            raise ConfigError(f"{self.source}: flows: no flows configured: add at least one [[flows]] table")

    def warnings(self) -> list[str]:
        """What is allowed but most likely a mistake, one line each."""
        lines = []
        for flow in self.flows:
            where = f"{self.source}: flows.{flow.name}"
            if flow.path.startswith("/") and not flow.path.lower().startswith("/http/"):
                lines.append(
                    f"{where}.path: {flow.path!r} does not start with /http/: Cloud "
                    "Integration serves an iFlow's HTTPS sender at /http/<address>; check the path"
                )
            size = len(flow.body_bytes() or b"")
            if size > RECOMMENDED_MAX_BODY:
                lines.append(
                    f"{where}: the body is {size / 2**20:.0f} MB, more than the 40 MB SAP recommends for a message"
                )
            spaced = [name for name, value in flow.query.items() if _WHITESPACE.search(value)]
            if spaced:
                lines.append(
                    f"{where}.query: whitespace in the value of {', '.join(spaced)}: Cloud Integration turns "
                    "query parameters into headers, whose values should have none"
                )
            if flow.confirm == "mpl" and flow.message_ids is None:
                lines.append(
                    f'{where}: confirm = "mpl" with application_id = false: only answers that carry an MPL id '
                    "can be confirmed (the MPL API finds other messages by their SAP_ApplicationID)"
                )
            elif flow.confirm == "mpl" and flow.message_ids not in (None, "auto"):
                lines.append(
                    f'{where}: confirm = "mpl" with a fixed application_id: every message has that id, so a '
                    "message without an MPL id in its answer may be confirmed by an earlier one's log"
                )
        if self.relay is not None and self.relay.max_message_bytes > RECOMMENDED_MAX_BODY:
            lines.append(
                f"{self.source}: relay.max_message_bytes allows {self.relay.max_message_bytes / 2**20:.0f} MB: SAP "
                "recommends messages of at most 40 MB"
            )
        return lines

    def flow(self, name: str) -> FlowConfig:
        """The flow called `name`."""
        for flow in self.flows:
            if flow.name == name:
                return flow
        known = ", ".join(f.name for f in self.flows) or "none configured"
        raise ConfigError(f"{self.source}: no flow named {name!r} (flows: {known})")


class ConfigHolder:
    """The configuration in force: every component reads `current`; a reload replaces it whole, at once."""

    def __init__(self, config: Config) -> None:
        self.current = config

    def swap(self, config: Config) -> Config:
        """Put `config` in force; returns the one it replaces."""
        old, self.current = self.current, config
        return old


def _credential_sets(data: dict[str, Any], source: str) -> bool:
    """`[credentials]` (one set, named "default") or `[credentials.NAME]` tables (named sets); not both.
    Returns True for the single-set form (its errors then read `credentials.KEY`)."""
    table = data.get("credentials")
    if table is None or not isinstance(table, dict):
        return True  # the default set, or a wrong type that pydantic names
    fields = set(CredentialsConfig.model_fields)
    own = [key for key in table if key in fields]
    named = [key for key in table if key not in fields]
    if own and named and all(isinstance(table[key], dict) for key in named):
        raise ConfigError(
            f"{source}: credentials: [credentials] keys ({', '.join(own)}) beside [credentials.NAME] tables "
            f"({', '.join(_location((name,)) for name in named)}): use one form, or put the keys into a named set"
        )
    if named and all(isinstance(table[key], dict) for key in named):
        data["credentials"] = {name: dict(value) for name, value in table.items()}
        return False
    data["credentials"] = {DEFAULT_SET: table}
    return True


def _check_flow_sets(config: Config) -> None:
    sets = ", ".join(config.credentials)
    api = config.api_sets
    for index, flow in enumerate(config.flows):
        where = f"{config.source}: flows[{index}]"
        if flow.credentials is None and len(config.send_sets) > 1:
            raise ConfigError(
                f"{where}.credentials: there are several credentials sets ({', '.join(config.send_sets)}): "
                "name the one this flow sends with (or set it in [defaults])"
            )
        if flow.credentials is not None and flow.credentials not in config.credentials:
            raise ConfigError(f"{where}.credentials: no credentials set named {flow.credentials!r} (sets: {sets})")
        if flow.credentials in api:
            raise ConfigError(
                f"{where}.credentials: set {flow.credentials!r} reads the Message Processing Log API (it is a "
                "flow's confirm_credentials, a key of plan api): it cannot send to iFlows; name another set"
            )
        if flow.confirm_credentials is not None and flow.confirm_credentials not in config.credentials:
            raise ConfigError(
                f"{where}.confirm_credentials: no credentials set named {flow.confirm_credentials!r} (sets: {sets})"
            )
        if flow.confirm == "mpl" and flow.confirm_credentials is None:
            raise ConfigError(
                f'{where}.confirm_credentials: confirm = "mpl" needs a credentials set with a key of plan api '
                "(role MonitoringDataRead) to read the Message Processing Log API: add [credentials.NAME] and "
                'confirm_credentials = "NAME"'
            )
        if not config.send_sets:
            raise ConfigError(f"{where}.credentials: every credentials set reads the MPL API: add one that sends")
    for name in api:
        if config.credentials[name].auth != "oauth":
            raise ConfigError(
                f"{config.source}: credentials.{name}.auth: the Message Processing Log API takes OAuth tokens: "
                f"remove auth = {config.credentials[name].auth!r}"
            )


def _check_forward_set(config: Config) -> None:
    forward = config.forward
    if forward is None:
        return
    where = f"{config.source}: forward.credentials"
    if forward.credentials is None:
        if config.credentials_default is None:
            raise ConfigError(f"{where}: there are several credentials sets ({', '.join(config.send_sets)}): name one")
    elif forward.credentials not in config.send_sets:
        raise ConfigError(f"{where}: no sending credentials set named {forward.credentials!r} (sets: "
                          f"{', '.join(config.send_sets)})")  # fmt: skip


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _location(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            name = part if _PLAIN_KEY.fullmatch(part) else json.dumps(part, ensure_ascii=False)
            text += ("." if text else "") + name
    return text


def _message(error: Any) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key: remove it or check its spelling"
    if kind == "missing":
        return "required key is missing"
    if kind == "model_type":
        return "must be a table ([section] or { key = value })"
    if kind == "path_type":
        return "must be a path (a string)"
    if kind == "greater_than_equal" and error.get("ctx", {}).get("ge") == 0.001:
        return "must be at least 1ms"
    message = str(error["msg"])
    return message.removeprefix("Value error, ")


def format_validation_error(
    source: str, exc: ValidationError, prefix: tuple[str, ...] = (), *, single_set: bool = False
) -> str:
    """One line for the first problem (plus a count of the others); with `single_set`, the one set's keys
    read `credentials.KEY`, as the user wrote them."""
    errors = exc.errors()
    first = errors[0]
    parts = prefix + tuple(p for p in first["loc"] if p not in ("function-after",))
    if single_set and parts[:2] == ("credentials", DEFAULT_SET):
        parts = ("credentials", *parts[2:])
    loc = _location(parts)
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    where = f"{loc}: " if loc else ""
    return f"{source}: {where}{_message(first)}{more}"


def _resolve(table: Any, names: tuple[str, ...], base: Path, source: str, where: str) -> None:
    if isinstance(table, dict):
        for name in names:
            value = table.get(name)
            if isinstance(value, str) and value:
                if _CONTROL.search(value):
                    raise ConfigError(f"{source}: {where}.{name}: the path contains a control character: remove it")
                # absolute, but links kept: a Kubernetes Secret is a symlink that is swapped on update
                table[name] = os.path.abspath(base / os.path.expanduser(value))


def _resolve_paths(data: dict[str, Any], base: Path, source: str, single: bool) -> None:
    sets = data.get("credentials")
    if isinstance(sets, dict):
        for name, table in sets.items():
            where = "credentials" if single else f"credentials.{name}"
            _resolve(table, ("service_key", "binding", "key_file", "ca_file"), base, source, where)
    _resolve(data.get("runtime"), ("ca_file",), base, source, "runtime")
    _resolve(data.get("relay"), ("spool_dir",), base, source, "relay")
    flows = data.get("flows")
    if isinstance(flows, list):
        for index, flow in enumerate(flows):
            _resolve(flow, ("body_file",), base, source, f"flows[{index}]")


def _apply_defaults(data: dict[str, Any], source: str) -> None:
    """Each flow starts from `[defaults]` (validated on its own, so its errors name `defaults.*`)."""
    defaults = data.get("defaults", {})
    try:
        SendSettings.model_validate(defaults)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source, exc, prefix=("defaults",))) from None
    flows = data.get("flows")
    if isinstance(flows, list) and isinstance(defaults, dict):
        data["flows"] = [{**defaults, **flow} if isinstance(flow, dict) else flow for flow in flows]


def config_from_dict(data: dict[str, Any], *, source: str, base: Path | None = None) -> Config:
    """Validate a parsed config (`source` names it in errors; relative paths resolve against `base`)."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    if isinstance(data.get("flows"), dict):
        raise ConfigError(f"{source}: flows: write [[flows]] (double brackets: one table per flow), not [flows]")
    if "source" in data:
        raise ConfigError(f"{source}: source: unknown key: remove it or check its spelling")
    single = _credential_sets(data, source)
    if base is not None:
        _resolve_paths(data, base, source, single)
    _apply_defaults(data, source)
    try:
        config = Config.model_validate({**data, "source": source})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source, exc, single_set=single)) from None
    _check_flow_sets(config)
    _check_forward_set(config)
    return config


def load_config(path: Path | None) -> Config:
    """Read and validate the TOML file at `path` (or `$SENDERD_CONFIG`); no file means all defaults."""
    if path is None:
        env = os.environ.get(CONFIG_ENV)
        path = Path(env) if env else None
    if path is None:
        return Config()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found: check -c/--config or ${CONFIG_ENV}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config file ({type(exc).__name__})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except ValueError:  # int() refuses more digits than sys.get_int_max_str_digits()
        raise ConfigError(f"{path}: not valid TOML: a number is too long") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid TOML: arrays or inline tables nested too deeply") from None
    return config_from_dict(data, source=str(path), base=path.parent)
