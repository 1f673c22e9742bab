"""The TOML configuration: schema, defaults, validation into immutable objects.

Unknown keys are errors; every error is one line `FILE: section.key: what is wrong (how to fix)`.
Relative paths are resolved against the config file's folder. Defaults live here and nowhere else.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from senderd.durations import parse_duration
from senderd.errors import ConfigError

CONFIG_ENV = "SENDERD_CONFIG"


def _duration(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError("a duration is a string such as 500ms, 30s, 5m, 1h")
    try:
        return parse_duration(value)
    except ConfigError as exc:  # pydantic reports ValueError with the field's location
        raise ValueError(str(exc)) from None


Duration = Annotated[float, BeforeValidator(_duration)]


class Section(BaseModel):
    """A config table: immutable, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class CredentialsConfig(Section):
    """`[credentials]`: where the service key, an external private key and extra CAs come from."""

    service_key: Path | None = None
    service_key_env: str | None = None
    key_file: Path | None = None
    key_passphrase_env: str | None = None
    ca_file: Path | None = None

    @model_validator(mode="after")
    def _one_source(self) -> CredentialsConfig:
        if self.service_key is not None and self.service_key_env is not None:
            raise ValueError("give service_key or service_key_env, not both")
        return self

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


class TokenConfig(Section):
    """`[token]`: refresh ahead of expiry and back off on failure."""

    refresh_left: float = Field(default=1 / 3, gt=0, lt=1)
    refresh_jitter: float = Field(default=0.1, ge=0, lt=0.5)
    backoff_initial: Duration = 1.0
    backoff_max: Duration = 60.0
    timeout: Duration = 10.0


class Config(BaseModel):
    """The whole validated configuration."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = "<defaults>"
    credentials: CredentialsConfig = CredentialsConfig()
    token: TokenConfig = TokenConfig()


def _location(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + part
    return text


def _message(error: Any) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key: remove it or check its spelling"
    if kind == "missing":
        return "required key is missing"
    message = str(error["msg"])
    return message.removeprefix("Value error, ")


def format_validation_error(source: str, exc: ValidationError) -> str:
    """One line for the first problem (plus a count of the others)."""
    errors = exc.errors()
    first = errors[0]
    loc = _location(tuple(p for p in first["loc"] if p not in ("function-after",)))
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    where = f"{loc}: " if loc else ""
    return f"{source}: {where}{_message(first)}{more}"


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    creds = data.get("credentials")
    if isinstance(creds, dict):
        for name in ("service_key", "key_file", "ca_file"):
            value = creds.get(name)
            if isinstance(value, str) and value:
                creds[name] = str((base / os.path.expanduser(value)).resolve())


def config_from_dict(data: dict[str, Any], *, source: str, base: Path | None = None) -> Config:
    """Validate a parsed config (`source` names it in errors; relative paths resolve against `base`)."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    if base is not None:
        _resolve_paths(data, base)
    if "source" in data:
        raise ConfigError(f"{source}: source: unknown key: remove it or check its spelling")
    try:
        return Config.model_validate({**data, "source": source})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source, exc)) from None


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
    return config_from_dict(data, source=str(path), base=path.parent)
