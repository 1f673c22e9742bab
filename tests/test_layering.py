"""Layering, read from the source with `ast` (nothing is imported): which modules may depend on which.

Every import counts, also one under `if TYPE_CHECKING:` or inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

SOURCE = Path(__file__).resolve().parent.parent / "senderd"


def module_of(path: Path) -> str:
    """The dotted name of the module in `path` (a package for `__init__.py`)."""
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_in(source: str, module: str, *, is_package: bool = False) -> set[str]:
    """The modules that the code of `module` imports, relative imports resolved. `from X import y` counts
    as X and as X.y (y may be a submodule)."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*parent, *([node.module] if node.module else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def imports_of(path: Path) -> set[str]:
    return imports_in(path.read_text(encoding="utf-8"), module_of(path), is_package=path.name == "__init__.py")


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_the_reader_sees_every_kind_of_import() -> None:
    source = (
        "import x.y\n"
        "from . import sibling\n"
        "from ..auth import token\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from senderd.config import Config\n"
        "def later() -> None:\n"
        "    import senderd.sender\n"
    )
    assert imports_in(source, "senderd.emulator.runtime") == {
        "x.y",
        "senderd.emulator",
        "senderd.emulator.sibling",
        "senderd.auth",
        "senderd.auth.token",
        "typing",
        "typing.TYPE_CHECKING",
        "senderd.config",
        "senderd.config.Config",
        "senderd.sender",
    }
    assert imports_in("from . import pki\n", "senderd.emulator", is_package=True) == {
        "senderd.emulator",
        "senderd.emulator.pki",
    }


def test_the_emulator_imports_nothing_of_senderd_outside_itself() -> None:
    """The emulator stands in for BTP: it must not borrow senderd's code, or a bug could hide on both sides."""
    files = sorted((SOURCE / "emulator").rglob("*.py"))
    assert len(files) >= 5
    outside = {
        f"{module_of(path)} imports {name}"
        for path in files
        for name in imports_of(path)
        if within(name, "senderd") and not within(name, "senderd.emulator")
    }
    assert outside == set()
    dynamic = [path.name for path in files if "import_module" in path.read_text() or "__import__" in path.read_text()]
    assert dynamic == []  # so the imports above are all there are


def test_retry_knows_neither_the_sender_nor_the_config() -> None:
    """The retry policy is plain data and a loop: the sender and the config build on it, not the reverse."""
    names = imports_of(SOURCE / "retry.py")
    assert {"senderd.metrics", "senderd.result"} <= names  # what it does use, so the reader did read it
    assert {name for name in names if within(name, "senderd.sender") or within(name, "senderd.config")} == set()


def test_site_does_not_import_the_config() -> None:
    """Site serves an aiohttp app on an address; the caller passes the config key its errors name."""
    names = imports_of(SOURCE / "site.py")
    assert "senderd.errors" in names
    assert {name for name in names if within(name, "senderd.config")} == set()
