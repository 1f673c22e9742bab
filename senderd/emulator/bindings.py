"""Credentials as the SAP BTP service operator and Cloud Foundry hand them to a program.

- `binding_files` gives the entries of a binding Secret in one of the operator's layouts (default,
  `secretKey`, `secretRootKey`), or a Secret holding one downloaded key file;
- `write_projected` puts them on disk as kubelet does for a Secret volume (the atomic writer: every entry
  a symlink `NAME -> ..data/NAME`, `..data -> ..<timestamp>`, the files in `..<timestamp>/`), and writes
  them again the same way, which is how a rotated Secret reaches a running pod;
- `vcap_service` gives one entry of `VCAP_SERVICES`.

Shapes follow SBO `controllers/servicebinding_controller.go` and kubelet `pkg/volume/util/atomic_writer.go`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

Layout = Literal["default", "secretKey", "secretRootKey", "keyfile"]
"""default: one entry per top-level credential field; secretKey: the key JSON verbatim under one name;
secretRootKey: one JSON of strings (credentials encoded twice); keyfile: a Secret made from one key file
(`kubectl create secret generic --from-file=service-key.json`)."""
LAYOUTS: tuple[Layout, ...] = ("default", "secretKey", "secretRootKey", "keyfile")
SERVICE_LABEL = "it-rt"
"""The technical name of the service "Process Integration Runtime" (`label` and `type` of its bindings)."""
DATA_DIR = "..data"
_DATA_DIR_TMP = "..data_tmp"
_INSTANCE_FIELDS = ("instance_name", "instance_guid", "plan", "label", "type")

Step = Literal["write", "link data", "swap data", "link entries", "remove stale entries", "remove old"]
"""The steps of `write_projected`, in order, as `on_step` reports them."""


@dataclass(frozen=True)
class Instance:
    """The service instance a binding belongs to."""

    name: str
    guid: str
    plan: str
    label: str = SERVICE_LABEL

    def fields(self) -> dict[str, str]:
        """What the operator adds to every binding Secret: instance_name, instance_guid, plan, label, type."""
        return {
            "instance_name": self.name,
            "instance_guid": self.guid,
            "plan": self.plan,
            "label": self.label,
            "type": self.label,
        }


def _compact(value: Any) -> str:
    """JSON as Go's json.Marshal writes a map: no spaces, keys sorted."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def binding_files(
    layout: Layout,
    key: Mapping[str, Any],
    instance: Instance,
    *,
    credentials_entry: str = "credentials",
    root_entry: str = "root",
    key_file: str = "service-key.json",
) -> dict[str, str]:
    """The entries (name -> text) of a binding Secret holding `key` (the broker's credentials, e.g. the nested
    `{"oauth": {...}}` of a downloaded key) in `layout`; `credentials_entry`, `root_entry` and `key_file` name
    the one credentials entry of the layouts that have one."""
    info = instance.fields()
    metadata_properties = [{"name": name, "format": "text"} for name in _INSTANCE_FIELDS]
    if layout == "default":
        files: dict[str, str] = {}
        credential_properties = []
        for name, value in key.items():
            entry = name.replace(" ", "_")
            text = isinstance(value, str)
            files[entry] = value if isinstance(value, str) else _compact(value)
            credential_properties.append({"name": entry, "format": "text" if text else "json"})
        files.update(info)
        files[".metadata"] = _compact_ordered(
            {"metaDataProperties": metadata_properties, "credentialProperties": credential_properties}
        )
        return files
    if layout == "secretKey":
        return {
            credentials_entry: json.dumps(key, separators=(",", ":")),  # the broker's JSON verbatim
            **info,
            ".metadata": _compact_ordered(
                {
                    "metaDataProperties": metadata_properties,
                    "credentialProperties": [{"name": credentials_entry, "format": "json", "container": True}],
                }
            ),
        }
    if layout == "secretRootKey":
        root = {name: value if isinstance(value, str) else _compact(value) for name, value in key.items()}
        return {root_entry: _compact({**root, **info})}
    if layout == "keyfile":
        return {key_file: json.dumps(key, indent=2) + "\n"}
    raise ValueError(f"unknown binding layout {layout!r}: one of {', '.join(LAYOUTS)}")


def _compact_ordered(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def vcap_service(key: Mapping[str, Any], instance: Instance, *, binding_guid: str | None = None) -> dict[str, Any]:
    """One entry of `VCAP_SERVICES["it-rt"]`: the instance bound to an app, `credentials` being `key`."""
    return {
        "label": instance.label,
        "provider": None,
        "plan": instance.plan,
        "name": instance.name,
        "tags": [],
        "instance_guid": instance.guid,
        "instance_name": instance.name,
        "binding_guid": binding_guid or str(uuid.uuid4()),
        "binding_name": None,
        "credentials": dict(key),
        "syslog_drain_url": None,
        "volume_mounts": [],
    }


def write_projected(
    directory: Path,
    files: Mapping[str, str | bytes],
    *,
    mode: int = 0o600,
    on_step: Callable[[Step], None] | None = None,
) -> Path:
    """Write `files` into `directory` as kubelet's atomic writer does, replacing what is there; returns the
    new timestamped directory.

    A first write and every later one (a rotation) go the same way: write all files into a new
    `..<timestamp>.<n>` directory; point `..data_tmp` at it and rename that over `..data` (the one atomic
    step: a reader of `NAME` sees the old set or the new one, never a mix or nothing); add the `NAME ->
    ..data/NAME` links that are new; remove those of names no longer present; remove the old directory.
    Files get `mode` (a Secret volume's `defaultMode`; 0600 here, as they hold secrets). `on_step` is told
    after each step (for tests that look at the directory in between)."""
    for name in files:
        if not name or "/" in name or name.startswith("..") or name in (".", ".."):
            raise ValueError(f"not a Secret entry name: {name!r}")

    def step(name: Step) -> None:
        if on_step is not None:
            on_step(name)

    directory.mkdir(parents=True, exist_ok=True)
    data_link = directory / DATA_DIR
    old = os.readlink(data_link) if data_link.is_symlink() else None
    old_names = set(os.listdir(directory / old)) if old else set()
    new_dir = _timestamp_dir(directory)
    for name, content in files.items():
        data = content.encode() if isinstance(content, str) else content
        fd = os.open(new_dir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.chmod(new_dir / name, mode)  # whatever the umask
    step("write")
    tmp_link = directory / _DATA_DIR_TMP
    if tmp_link.is_symlink():
        tmp_link.unlink()
    os.symlink(new_dir.name, tmp_link)
    step("link data")
    os.rename(tmp_link, data_link)
    step("swap data")
    for name in files:
        entry = directory / name
        if not entry.is_symlink():
            os.symlink(f"{DATA_DIR}/{name}", entry)
    step("link entries")
    for name in old_names - set(files):
        (directory / name).unlink(missing_ok=True)
    step("remove stale entries")
    if old:
        shutil.rmtree(directory / old)
    step("remove old")
    return new_dir


def _timestamp_dir(directory: Path) -> Path:
    """`os.MkdirTemp(dir, "..2006_01_02_15_04_05.")`, as kubelet names it; mode 0755."""
    prefix = datetime.now(UTC).strftime("..%Y_%m_%d_%H_%M_%S.")
    while True:
        path = directory / f"{prefix}{random.randrange(1 << 32)}"
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            continue
        path.chmod(0o755)
        return path


def write_plain(directory: Path, files: Mapping[str, str | bytes], *, mode: int = 0o600) -> None:
    """Write `files` into `directory` as regular files (a bind mount, a copied folder), each replaced
    atomically by a rename; entries no longer present are not removed."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        data = content.encode() if isinstance(content, str) else content
        tmp = directory / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, directory / name)
