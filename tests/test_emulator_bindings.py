"""Bindings as the SAP BTP service operator writes them and kubelet mounts them, and VCAP_SERVICES.

Everything is read back here with plain os/json calls, as a program in a pod would see it.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from senderd.emulator.bindings import write_projected

TIMESTAMP_DIR = re.compile(r"\.\.\d{4}_\d\d_\d\d_\d\d_\d\d_\d\d\.\d+")


def projected(directory: Path) -> dict[str, str]:
    """Check kubelet's atomic-writer layout and return the entries as a program reads them."""
    data = directory / "..data"
    assert data.is_symlink()
    target = os.readlink(data)
    assert TIMESTAMP_DIR.fullmatch(target), target
    real = directory / target
    assert real.is_dir() and not real.is_symlink()
    assert stat.S_IMODE(real.stat().st_mode) == 0o755
    names = sorted(os.listdir(real))
    assert sorted(n for n in os.listdir(directory) if not n.startswith("..")) == names
    assert sorted(n for n in os.listdir(directory) if n.startswith("..")) == sorted(["..data", target])
    entries = {}
    for name in names:
        assert os.readlink(directory / name) == f"..data/{name}"
        assert (real / name).is_file() and not (real / name).is_symlink()
        assert stat.S_IMODE((real / name).stat().st_mode) == 0o600
        entries[name] = (directory / name).read_text()
    return entries


def test_write_projected_adds_and_removes_entries(tmp_path: Path) -> None:
    directory = tmp_path / "secret"
    first = write_projected(directory, {"a": "1", "b": "2"})
    assert projected(directory) == {"a": "1", "b": "2"}
    second = write_projected(directory, {"b": "3", "c": b"4"})
    assert projected(directory) == {"b": "3", "c": "4"}
    assert not first.exists()
    assert second.name == os.readlink(directory / "..data")
    assert not (directory / "a").is_symlink()
    with pytest.raises(ValueError, match="not a Secret entry name"):
        write_projected(directory, {"..data": "x"})
