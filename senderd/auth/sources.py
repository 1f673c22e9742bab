"""Where a credentials set's service key comes from: a file, an environment variable, a mounted binding
directory (the SAP BTP service operator's Secret, in any of its layouts), `$SERVICE_BINDING_ROOT`,
`VCAP_SERVICES`; and the fingerprint that tells a rotation.

`read_key_source` turns a set's configuration into the key's JSON text plus what is known about it (its
plan, whether it can rotate, which files to watch); `servicekey.parse_service_key` validates the text.
Paths are never resolved once and kept: Kubernetes swaps a mounted Secret's whole directory through its
`..data` symlink, so every read goes through the path as configured.

A binding directory is read in whichever layout the service operator wrote it:

- default: one file per credential field (`oauth` holds the key's fields as JSON text; flat credentials
  give `clientid`, `certificate`, `key`, `tokenurl`, `url`, `certificatedetails` files), the instance's
  `type`, `plan`, `label`, `instance_name`, `instance_guid`, and `.metadata` naming each file's format;
- `secretKey`: one file holding the whole key JSON, marked `"container": true` in `.metadata`;
- `secretRootKey`: one file whose JSON values are all strings (`oauth` is JSON encoded twice);
- a directory holding just one service key JSON file (plan unknown);
- without `.metadata` (older operators, hand-made Secrets, `/etc/secrets/sapcp/<service>/<instance>/`):
  every file but the instance's is a credential, JSON objects are parsed.

Its `type` (and `label`) must be `it-rt`, its plan must fit the set's `Purpose`. The roots searched for a
`binding_name`, and for a binding when a set names no source, are `$SERVICE_BINDING_ROOT` (from
`environ`) and `LEGACY_BINDING_ROOT` (a parameter of `read_key_source`, for tests).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from senderd.config import CredentialsConfig
from senderd.errors import ConfigError, CredentialsError

Purpose = Literal["send", "api"]
"""What a set is used for: sending to iFlows (plan `integration-flow`) or the MPL API (plan `api`)."""
MAX_KEY_BYTES = 1 << 20
"""A service key (or one binding file) is a few KiB; anything beyond this is not one (and is not read whole)."""
MAX_BINDING_ENTRIES = 64
"""A binding directory holds about a dozen files; more than this and it is not one."""
MAX_BINDINGS = 256
"""How many directories of `$SERVICE_BINDING_ROOT` (or of the legacy root) are looked at."""
MAX_VCAP_BYTES = 4 * MAX_KEY_BYTES
"""`VCAP_SERVICES` holds every service bound to the app: allow it more than one key."""
SERVICE = "it-rt"
"""The technical name of SAP Process Integration Runtime: a binding's `type` and `label`."""
PLANS: Mapping[Purpose, str] = {"send": "integration-flow", "api": "api"}
"""The plan each purpose needs."""
BINDING_ROOT_ENV = "SERVICE_BINDING_ROOT"
LEGACY_BINDING_ROOT = Path("/etc/secrets/sapcp")
"""Where older service operators mounted bindings: `<root>/<service>/<instance>/`."""
VCAP_ENV = "VCAP_SERVICES"
VCAP_FILE_ENV = "VCAP_SERVICES_FILE_PATH"

_METADATA = ".metadata"
_DATA_LINK = "..data"
_INSTANCE_FIELDS = frozenset(
    {"type", "provider", "plan", "label", "instance_name", "instance_guid", "tags", "binding_name", "binding_guid"}
)
"""Entries of a binding that describe the service instance, not the credentials."""
_KEY_FIELDS = frozenset(
    {"oauth", "clientid", "clientsecret", "certificate", "key", "tokenurl", "certurl", "url", "certificatedetails"}
)
_READ_ATTEMPTS = 20
_FIX_BINDING = "recreate the ServiceBinding"
_OAUTH_FIX = f"it must hold the service key's fields as JSON; {_FIX_BINDING}"


@dataclass(frozen=True)
class KeySource:
    """A service key as read from its source, before validation."""

    text: str = field(repr=False)
    """The key's JSON (nested `{"oauth": {...}}` or flat), as `parse_service_key` takes it (never in a repr)."""
    source: str
    """Where it came from, for messages (never a secret): a path (a key file, a binding directory or the one
    file in it), `$VAR`, `$VCAP_SERVICES it-rt/NAME` or `FILE it-rt/NAME`."""
    plan: str | None = None
    """The binding's plan (`integration-flow`, `api`) when the source says."""
    rotates: bool = True
    """False where a replacement cannot reach a running process (an environment variable)."""
    watched: tuple[Path, ...] = ()
    """The files whose content decides `fingerprint`, as configured (links are followed anew each read)."""
    layout: str = "file"
    """How the key was found: `file`, `env`, `default`, `secretKey`, `secretRootKey`, `key file` (one JSON
    file in a directory), `files` (a binding without `.metadata`), `VCAP_SERVICES`."""


def read_key_source(
    config: CredentialsConfig, *, where: str = "credentials", purpose: Purpose | None = None,
    environ: Mapping[str, str] | None = None, legacy_root: Path | None = None,
) -> KeySource:  # fmt: skip
    """The service key that `config` names (with no source named: the one fitting binding in
    `$SERVICE_BINDING_ROOT`). `where` prefixes configuration errors (e.g. `credentials.prod`); `purpose`
    refuses a binding of the wrong plan; `environ` (default `os.environ`) gives `SERVICE_BINDING_ROOT`,
    `VCAP_SERVICES`, `VCAP_SERVICES_FILE_PATH` and `service_key_env`; `legacy_root` (default
    `LEGACY_BINDING_ROOT`) is where `binding_name` looks last. Raises ConfigError / CredentialsError (one line)."""
    env = os.environ if environ is None else environ
    if config.service_key is not None:
        return KeySource(_read_file(config.service_key), str(config.service_key), watched=(config.service_key,))
    if config.service_key_env is not None:
        value = env.get(config.service_key_env)
        source = f"${config.service_key_env}"
        if not value:
            raise CredentialsError(
                f"{source}: environment variable is not set or empty: put the service key JSON in it"
            )
        if len(value) > MAX_KEY_BYTES:
            raise CredentialsError(f"{source}: larger than {MAX_KEY_BYTES // 1024} KiB, too large for a service key")
        return KeySource(value, source, rotates=False, layout="env")
    if config.binding is not None:
        return read_binding(config.binding, setting=f"{where}.binding", purpose=purpose)
    if config.binding_name is not None:
        return _named_binding(
            config.binding_name, where, purpose, env, LEGACY_BINDING_ROOT if legacy_root is None else legacy_root
        )
    if config.vcap_service is not None:
        return _vcap_service(config.vcap_service, where, purpose, env)
    return _detect(where, purpose, env)


def fingerprint(source: KeySource) -> bytes | None:
    """A digest of the watched files as they are now (None when one cannot be read: a swap under way)."""
    digest = hashlib.sha256()
    for path in source.watched:
        try:
            with path.open("rb") as file:
                data = file.read(MAX_VCAP_BYTES + 1)
        except OSError:
            return None
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.digest()


def read_binding(
    directory: Path, *, setting: str = "credentials.binding", purpose: Purpose | None = None,
    default_label: str | None = None,
) -> KeySource:  # fmt: skip
    """The service key in a mounted binding directory, in any of the service operator's layouts (see the
    module docstring). `setting` is the configuration key that named it (for the fix in messages);
    `default_label` is the service a legacy `/etc/secrets/sapcp/<service>/` directory implies."""
    files = _snapshot(directory, setting)
    found = _interpret(directory, files, setting, default_label, purpose)
    plan = found.facts["plan"][0] if "plan" in found.facts else None
    watched = tuple(directory / name for name in sorted(files))
    return KeySource(found.text, found.source, plan=plan, watched=watched, layout=found.layout)


# --- reading a directory ------------------------------------------------------------------------------


class _Vanished(Exception):
    """A file listed in the directory was gone when opened (a `..data` swap, or a broken link)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _data_link(directory: Path) -> str | None:
    try:
        return os.readlink(directory / _DATA_LINK)
    except OSError:
        return None


def _snapshot(directory: Path, setting: str) -> dict[str, bytes]:
    """Every file of the binding (no dot-entries but `.metadata`), all from one generation: when the kubelet
    swaps `..data` while we read, read again."""
    vanished = ""
    for _ in range(_READ_ATTEMPTS):
        before = _data_link(directory)
        try:
            files = _read_directory(directory, setting)
        except _Vanished as exc:
            if _data_link(directory) == before:
                raise CredentialsError(
                    f"{directory / exc.name}: a link to nothing (its target is missing): "
                    f"mount the ServiceBinding's Secret as a whole directory at {directory}"
                ) from None
            vanished = exc.name
            continue
        if _data_link(directory) == before:
            return files
    raise CredentialsError(  # pragma: no cover - needs a Secret updated several times within one read
        f"{directory}: changed while being read {_READ_ATTEMPTS} times{f' ({vanished})' if vanished else ''}: "
        "a Secret update is under way; try again"
    )


def _read_directory(directory: Path, setting: str) -> dict[str, bytes]:
    try:
        mode = os.stat(directory).st_mode
    except FileNotFoundError:
        raise CredentialsError(
            f"{directory}: binding directory not found: mount the ServiceBinding's Secret there, or fix {setting}"
        ) from None
    except OSError as exc:
        raise CredentialsError(f"{directory}: cannot read the binding directory ({_reason(exc)})") from None
    if not stat.S_ISDIR(mode):
        raise CredentialsError(
            f"{directory}: a file, not a binding directory: a single-file (subPath) mount never sees a rotated "
            f"Secret; mount the Secret as a directory (no subPath) and point {setting} at it"
        )
    try:
        names = sorted(_entries(directory, setting))
    except OSError as exc:
        raise CredentialsError(f"{directory}: cannot read the binding directory ({_reason(exc)})") from None
    files: dict[str, bytes] = {}
    folders: list[str] = []
    for name in names:
        path = directory / name
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            raise _Vanished(name) from None
        except OSError as exc:
            raise CredentialsError(f"{path}: cannot read the binding file ({_reason(exc)})") from None
        if stat.S_ISDIR(mode):
            folders.append(name)
        elif stat.S_ISREG(mode):
            files[name] = _read_bounded(path, setting)
    if not files:
        if folders:
            raise CredentialsError(
                f"{directory}: holds directories ({', '.join(folders)}) but no files: this looks like "
                f"$SERVICE_BINDING_ROOT; point {setting} at one binding in it (or use binding_name)"
            )
        raise CredentialsError(
            f"{directory}: empty binding directory: the ServiceBinding's Secret is not mounted there; "
            f"check the volume mount and {setting}"
        )
    return files


def _entries(directory: Path, setting: str) -> Iterable[str]:
    """The names to read: no dot-entries (`..data`, `..2026_…`) except `.metadata`; bounded in number."""
    names: list[str] = []
    with os.scandir(directory) as scan:
        for entry in scan:
            if entry.name.startswith(".") and entry.name != _METADATA:
                continue
            names.append(entry.name)
            if len(names) > MAX_BINDING_ENTRIES:
                raise CredentialsError(
                    f"{directory}: more than {MAX_BINDING_ENTRIES} entries, not a service binding: check {setting}"
                )
    return names


def _read_bounded(path: Path, setting: str) -> bytes:
    try:
        with path.open("rb") as file:
            data = file.read(MAX_KEY_BYTES + 1)
    except FileNotFoundError:
        raise _Vanished(path.name) from None
    except OSError as exc:
        raise CredentialsError(f"{path}: cannot read the binding file ({_reason(exc)})") from None
    if len(data) > MAX_KEY_BYTES:
        raise CredentialsError(
            f"{path}: larger than {MAX_KEY_BYTES // 1024} KiB, too large for a binding file: check {setting}"
        )
    return data


def _reason(exc: OSError) -> str:
    return exc.strerror or (errno.errorcode.get(exc.errno or 0) or type(exc).__name__)


# --- what the files mean ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Found:
    """A binding's key text, and what it says about itself."""

    text: str
    source: str
    layout: str
    facts: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    """`type`, `label`, `plan` -> (value, where it was read); none for a bare key file."""


def _text(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise CredentialsError(f"{path}: not UTF-8 text: {_FIX_BINDING} (its Secret is damaged)") from None


def _json(text: str, where: str, fix: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CredentialsError(
            f"{where}: not valid JSON at line {exc.lineno} column {exc.colno} ({exc.msg}): {fix}"
        ) from None
    except (ValueError, RecursionError):
        raise CredentialsError(f"{where}: not valid JSON (too long a number, or nested too deeply): {fix}") from None


def _interpret(
    directory: Path, files: dict[str, bytes], setting: str, default_label: str | None, purpose: Purpose | None
) -> _Found:
    """Tell the layout, check what the binding is (before its credentials: a wrong service is the better
    message), then gather the credentials."""
    names = [name for name in files if name != _METADATA]
    if _METADATA not in files and len(names) == 1:
        path = directory / names[0]
        text = _text(path, files[names[0]])
        root = _root_key(text)
        if root is None:
            return _Found(text, str(path), "key file")
        facts = _root_facts(path, root)
        _check_kind(facts, purpose)
        return _Found(_root_credentials(path, root), str(path), "secretRootKey", facts)
    if _METADATA not in files and not {"type", "label", *_KEY_FIELDS} & set(names) and default_label is None:
        raise CredentialsError(
            f"{directory}: several candidate key files ({', '.join(names)}): keep only the service key "
            "there, or set service_key to the one to use"
        )
    facts = {
        name: (_text(directory / name, files[name]).strip(), str(directory / name))
        for name in ("type", "label", "plan")
        if name in files
    }
    if "label" not in facts and default_label is not None:
        facts["label"] = (default_label, str(directory))
    if "type" not in facts and "label" not in facts:
        raise CredentialsError(
            f"{directory}: no 'type' file: not a service binding (the SAP BTP service operator writes "
            f"type = {SERVICE}); mount the ServiceBinding's Secret there, or fix {setting}"
        )
    _check_kind(facts, purpose)
    if _METADATA in files:
        text, layout = _with_metadata(directory, files)
    else:
        text, layout = _field_files(directory, files), "files"
    return _Found(text, str(directory), layout, facts)


def _with_metadata(directory: Path, files: dict[str, bytes]) -> tuple[str, str]:
    """The service operator's default and `secretKey` layouts: `.metadata` names each credential file."""
    where = directory / _METADATA
    fix = f"{_FIX_BINDING} (its Secret is damaged)"
    meta = _json(_text(where, files[_METADATA]), str(where), fix)
    properties = meta.get("credentialProperties") if isinstance(meta, dict) else None
    if not isinstance(properties, list) or not all(
        isinstance(p, dict) and isinstance(p.get("name"), str) for p in properties
    ):
        raise CredentialsError(
            f"{where}: not the service operator's format (a 'credentialProperties' list of "
            f'{{"name": ..., "format": ...}}): {fix}'
        )
    credentials: dict[str, Any] = {}
    container: str | None = None
    for prop in properties:
        name: str = prop["name"]
        path = directory / name
        if name not in files:
            raise CredentialsError(f"{path}: missing, though .metadata lists it: {fix}")
        text = _text(path, files[name])
        if prop.get("format") != "json":
            credentials[name] = text
            continue
        value = _json(text, str(path), _OAUTH_FIX if name == "oauth" else fix)
        if prop.get("container") is True:
            if not isinstance(value, dict):
                raise CredentialsError(f"{path}: holds JSON {_kind(value)}, not the service key object: {fix}")
            credentials.update(value)
            container = name
        else:
            credentials[name] = value
    if container is None:
        _decode_twice(credentials, str(directory / "oauth"))
        _require(credentials, directory, files_of=directory)
        return json.dumps(credentials), "default"
    _decode_twice(credentials, f"{directory / container}: field 'oauth'")
    _require(credentials, directory / container, files_of=None)
    return json.dumps(credentials), "secretKey"


def _root_key(text: str) -> dict[str, Any] | None:
    """The JSON of a `secretRootKey` file (it names the instance, or holds `oauth` as text), else None."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # parse_service_key says what is wrong with it
        return None
    if isinstance(value, dict) and (_INSTANCE_FIELDS & value.keys() or isinstance(value.get("oauth"), str)):
        return value
    return None


def _root_facts(path: Path, root: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    facts: dict[str, tuple[str, str]] = {}
    for name in ("type", "label", "plan"):
        fact = root.get(name)
        if fact is not None:
            if not isinstance(fact, str):
                raise CredentialsError(f"{path}: field '{name}' must be a string: {_FIX_BINDING}")
            facts[name] = (fact.strip(), f"{path}: field '{name}'")
    if "type" not in facts:
        raise CredentialsError(
            f"{path}: field 'type' is missing: not a service binding (the SAP BTP service operator writes "
            f'"type": "{SERVICE}"): {_FIX_BINDING}'
        )
    return facts


def _root_credentials(path: Path, root: Mapping[str, Any]) -> str:
    credentials = {k: v for k, v in root.items() if k not in _INSTANCE_FIELDS}
    _decode_twice(credentials, f"{path}: field 'oauth'")
    _require(credentials, path, files_of=None)
    return json.dumps(credentials)


def _field_files(directory: Path, files: dict[str, bytes]) -> str:
    """No `.metadata`: one file per field, JSON objects parsed (as @sap/xsenv reads them)."""
    credentials: dict[str, Any] = {}
    for name in sorted(files):
        if name in _INSTANCE_FIELDS:
            continue
        path = directory / name
        text = _text(path, files[name])
        if name == "oauth":
            credentials[name] = _json(text, str(path), _OAUTH_FIX)
        elif text.lstrip().startswith("{"):
            try:
                credentials[name] = json.loads(text)
            except (ValueError, RecursionError):
                credentials[name] = text
        else:
            credentials[name] = text
    if "oauth" not in credentials and "clientid" not in credentials:
        keys = [name for name, value in credentials.items() if isinstance(value, dict) and _KEY_FIELDS & value.keys()]
        if len(keys) > 1:
            raise CredentialsError(
                f"{directory}: several candidate key files ({', '.join(keys)}): keep only one there, "
                "or set service_key to the one to use"
            )
        if keys:  # a secretKey Secret whose .metadata is gone, or a key file beside type/plan files
            credentials = dict(credentials[keys[0]])
            _decode_twice(credentials, f"{directory / keys[0]}: field 'oauth'")
            _require(credentials, directory / keys[0], files_of=None)
            return json.dumps(credentials)
    _decode_twice(credentials, str(directory / "oauth"))
    _require(credentials, directory, files_of=directory)
    return json.dumps(credentials)


def _decode_twice(credentials: dict[str, Any], place: str) -> None:
    """`oauth` (and `certificatedetails`) held as JSON text, as a `secretRootKey` Secret holds them; `place`
    names the `oauth` field in messages."""
    oauth = credentials.get("oauth")
    if isinstance(oauth, str):
        oauth = credentials["oauth"] = _json(oauth, place, _OAUTH_FIX)
    if oauth is not None and not isinstance(oauth, dict):
        raise CredentialsError(f"{place}: holds JSON {_kind(oauth)}, not an object of key fields: {_FIX_BINDING}")
    fields = credentials.get("oauth", credentials)
    details = fields.get("certificatedetails")
    if isinstance(details, str) and details.lstrip().startswith("{"):
        with contextlib.suppress(ValueError, RecursionError):  # informative only: parse_service_key ignores it
            fields["certificatedetails"] = json.loads(details)


def _require(credentials: Mapping[str, Any], where: Path, *, files_of: Path | None) -> None:
    """The fields without which there is no key: `clientid`, and `tokenurl` (or `certurl`). `files_of` is
    the directory when each credential is a file of its own (the default layout), else `where` is the file."""
    oauth = credentials.get("oauth")
    fields: Mapping[str, Any] = oauth if isinstance(oauth, dict) else credentials
    missing = _missing(fields)
    if missing is None:
        return
    fix = f"{_FIX_BINDING} (its credentials are incomplete)"
    if files_of is None:
        raise CredentialsError(f"{where}: field '{'oauth.' if oauth is not None else ''}{missing}' is missing: {fix}")
    if oauth is not None:
        raise CredentialsError(f"{files_of / 'oauth'}: field '{missing}' is missing: {fix}")
    if not _KEY_FIELDS & credentials.keys():
        raise CredentialsError(f"{files_of}: no credentials: neither an 'oauth' nor a 'clientid' file: {fix}")
    raise CredentialsError(f"{files_of / missing}: missing: the binding has no field '{missing}': {fix}")


def _missing(fields: Mapping[str, Any]) -> str | None:
    if fields.get("clientid") is None:
        return "clientid"
    if fields.get("tokenurl") is None and fields.get("certurl") is None:
        return "tokenurl"
    return None


def _kind(value: object) -> str:
    if isinstance(value, list):
        return "list"
    if isinstance(value, str):
        return "string"
    return "object" if isinstance(value, dict) else "value"


def _check_kind(facts: Mapping[str, tuple[str, str]], purpose: Purpose | None) -> None:
    """Refuse another service's binding, and a plan that does not fit what the set is for."""
    for name in ("type", "label"):
        if name in facts:
            value, where = facts[name]
            if value != SERVICE:
                raise CredentialsError(
                    f"{where}: a binding of service {value!r}, expected {SERVICE} (SAP Process Integration "
                    "Runtime): bind a service instance of offering it-rt"
                )
    if "plan" in facts:
        _check_plan(*facts["plan"], purpose)


def _check_plan(plan: str, where: str, purpose: Purpose | None) -> None:
    if purpose is None:
        if plan not in PLANS.values():
            raise CredentialsError(
                f"{where}: plan {plan!r}, expected integration-flow (to send to iFlows) or api (the MPL API): "
                f"bind an {SERVICE} instance of one of those plans"
            )
        return
    wanted = PLANS[purpose]
    if plan != wanted:
        use = "sending to iFlows" if purpose == "send" else "the Message Processing Log API"
        raise CredentialsError(
            f"{where}: plan {plan!r}, but {use} needs plan {wanted}: bind an {SERVICE} instance of plan {wanted}"
        )


# --- binding_name and $SERVICE_BINDING_ROOT -----------------------------------------------------------


def _subdirectories(root: Path) -> list[str]:
    """The binding directories under `root` (no dot-entries), sorted; bounded; empty when unreadable."""
    names: list[str] = []
    try:
        with os.scandir(root) as scan:
            for entry in scan:
                if not entry.name.startswith(".") and entry.is_dir():
                    names.append(entry.name)
                    if len(names) >= MAX_BINDINGS:
                        break
    except OSError:
        return []
    return sorted(names)


def _named_binding(name: str, where: str, purpose: Purpose | None, env: Mapping[str, str], legacy: Path) -> KeySource:
    setting = f"{where}.binding_name"
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"{setting}: {name!r} is not a binding name: give the name of its directory")
    root = env.get(BINDING_ROOT_ENV)
    looked: list[str] = []
    there: list[str] = []
    if root:
        path = Path(root) / name
        if os.path.lexists(path):
            return read_binding(path, setting=setting, purpose=purpose)
        looked.append(f"${BINDING_ROOT_ENV} ({root})")
        there = _subdirectories(Path(root))
    services = _subdirectories(legacy)
    for service in sorted(services, key=lambda s: s != SERVICE):
        path = legacy / service / name
        if os.path.isdir(path):
            return read_binding(path, setting=setting, purpose=purpose, default_label=service)
    looked.append(f"{legacy}/*/")
    listed = f" (bindings there: {', '.join(there)})" if there else ""
    if not root:
        listed = f" (${BINDING_ROOT_ENV} is not set)"
    raise ConfigError(
        f"{setting}: no binding {name!r} in {' nor in '.join(looked)}{listed}: mount the ServiceBinding's "
        f"Secret at ${BINDING_ROOT_ENV}/{name}, or fix the name"
    )


def _small(path: Path) -> str | None:
    try:
        with path.open("rb") as file:
            return file.read(MAX_KEY_BYTES).decode("utf-8-sig").strip()
    except (OSError, UnicodeDecodeError):
        return None


def _identity(directory: Path) -> tuple[str | None, str | None]:
    """A binding's `type` and `plan`, read cheaply (from `type`/`plan`, or a `secretRootKey` file)."""
    kind = _small(directory / "type")
    if kind is not None:
        return kind, _small(directory / "plan")
    try:
        names = [n for n in os.listdir(directory) if not n.startswith(".")][:2]
    except OSError:
        return None, None
    if len(names) != 1:
        return None, None
    try:
        value = json.loads(_small(directory / names[0]) or "")
    except (ValueError, RecursionError):
        return None, None
    if not isinstance(value, dict):
        return None, None
    kind, plan = value.get("type"), value.get("plan")
    return (kind if isinstance(kind, str) else None), (plan if isinstance(plan, str) else None)


def _detect(where: str, purpose: Purpose | None, env: Mapping[str, str]) -> KeySource:
    """No source configured: the one `it-rt` binding of the fitting plan in `$SERVICE_BINDING_ROOT`."""
    root = env.get(BINDING_ROOT_ENV)
    if root:
        wanted = PLANS[purpose or "send"]
        fitting = [name for name in _subdirectories(Path(root)) if _identity(Path(root) / name) == (SERVICE, wanted)]
        if len(fitting) == 1:
            return read_binding(Path(root) / fitting[0], setting=f"{where}.binding_name", purpose=purpose)
        if fitting:
            raise ConfigError(
                f"{where}.binding_name: several {SERVICE} bindings of plan {wanted} in ${BINDING_ROOT_ENV} "
                f"({root}): {', '.join(fitting)}: set binding_name to the one to use"
            )
    raise ConfigError(
        f"{where}.service_key: no service key configured: set it in the config file, or pass --service-key"
    )


# --- Cloud Foundry ------------------------------------------------------------------------------------


def _vcap_service(name: str, where: str, purpose: Purpose | None, env: Mapping[str, str]) -> KeySource:
    """The `it-rt` instance `name` of `VCAP_SERVICES` (or of the file `VCAP_SERVICES_FILE_PATH` names)."""
    file_path = env.get(VCAP_FILE_ENV)
    watched: tuple[Path, ...] = ()
    if file_path:
        path = Path(file_path)
        label = str(path)
        hint = f"check {VCAP_FILE_ENV}"
        text = _read_file(path, what="VCAP_SERVICES", limit=MAX_VCAP_BYTES, hint=hint, directory_hint=hint)
        watched = (path,)
    else:
        label = f"${VCAP_ENV}"
        text = env.get(VCAP_ENV, "")
        if not text:
            raise CredentialsError(
                f"{label}: not set (nor {VCAP_FILE_ENV}): {where}.vcap_service reads Cloud Foundry's bound "
                f"services; bind the {SERVICE} instance to the app, or use another source of credentials"
            )
        if len(text) > MAX_VCAP_BYTES:
            raise CredentialsError(f"{label}: larger than {MAX_VCAP_BYTES // 1024} KiB, too large to be read")
    services = _json(text, label, "Cloud Foundry writes it: check what sets or overrides it")
    if not isinstance(services, dict):
        raise CredentialsError(f"{label}: holds JSON {_kind(services)}, not an object of services by label")
    instances = [
        (str(instance.get("label") or service), instance)
        for service, bound in services.items()
        if isinstance(bound, list)
        for instance in bound
        if isinstance(instance, dict)
    ]
    ours = [(service, i) for service, i in instances if service == SERVICE]
    named = [(service, i) for service, i in instances if (i.get("name") or i.get("instance_name")) == name]
    if not named:
        if not ours:
            bound = ", ".join(sorted(services)) or "none"
            raise CredentialsError(
                f"{label}: no {SERVICE} service is bound (services: {bound}): bind the Process Integration "
                f"Runtime instance {name!r} to the app"
            )
        names = ", ".join(sorted(str(i.get("name") or i.get("instance_name")) for _, i in ours))
        raise CredentialsError(
            f"{label}: no {SERVICE} instance named {name!r} (there are: {names}): set {where}.vcap_service "
            "to one of them"
        )
    service, instance = next(((s, i) for s, i in named if s == SERVICE), named[0])
    source = f"{label} {service}/{name}"
    if service != SERVICE:
        raise CredentialsError(
            f"{source}: a binding of service {service!r}, expected {SERVICE} (SAP Process Integration Runtime): "
            f"set {where}.vcap_service to an {SERVICE} instance"
        )
    plan = instance.get("plan")
    if isinstance(plan, str):
        _check_plan(plan, f"{source}: field 'plan'", purpose)
    credentials = instance.get("credentials")
    if not isinstance(credentials, dict):
        raise CredentialsError(
            f"{source}: field 'credentials' is missing or not an object: unbind and bind the service again"
        )
    credentials = dict(credentials)
    _decode_twice(credentials, f"{source}: field 'credentials.oauth'")
    _require_vcap(credentials, source)
    return KeySource(
        json.dumps(credentials),
        source,
        plan=plan if isinstance(plan, str) else None,
        rotates=bool(watched),
        watched=watched,
        layout="VCAP_SERVICES",
    )


def _require_vcap(credentials: Mapping[str, Any], source: str) -> None:
    oauth = credentials.get("oauth")
    missing = _missing(oauth if isinstance(oauth, dict) else credentials)
    if missing is not None:
        raise CredentialsError(
            f"{source}: field 'credentials.{'oauth.' if oauth is not None else ''}{missing}' is missing: "
            "unbind and bind the service instance again"
        )


# --- files --------------------------------------------------------------------------------------------


def _read_file(
    path: Path,
    *,
    what: str = "service key",
    limit: int = MAX_KEY_BYTES,
    hint: str = "check the path",
    directory_hint: str = "for a mounted binding, set binding instead",
) -> str:
    data = read_small_file(path, what=what, limit=limit, hint=hint, directory_hint=directory_hint)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise CredentialsError(f"{path}: cannot read the {what} (UnicodeDecodeError)") from None


def read_small_file(
    path: Path,
    *,
    what: str,
    limit: int = MAX_KEY_BYTES,
    hint: str = "check the path",
    directory_hint: str = "give a file",
) -> bytes:
    """At most `limit` bytes of the file at `path` (a service key, a private key): one line naming the file,
    what it should be and `hint` when it is missing, a directory, unreadable or too large."""
    source = str(path)
    try:
        with path.open("rb") as file:
            data = file.read(limit + 1)
    except FileNotFoundError:
        raise CredentialsError(f"{source}: {what} file not found: {hint}") from None
    except IsADirectoryError:
        raise CredentialsError(f"{source}: a directory, not a {what} file: {directory_hint}") from None
    except OSError as exc:
        raise CredentialsError(f"{source}: cannot read the {what} ({_reason(exc)})") from None
    if len(data) > limit:
        raise CredentialsError(f"{source}: larger than {limit // 1024} KiB, too large for a {what}: {hint}")
    return data
