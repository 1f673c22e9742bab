"""The container image built and run with podman (for tests/test_container.py): a stand-in for the Dockerfile's
base image made from Debian packages (no image registry is reachable in CI), the image built on it, and
containers run from it.

Podman runs rootful with runc (crun fails on this kernel's cgroups) and needs `CONTAINERS_CONF` as `.ci/run`
writes it. The stand-in's root file system is cached as a tarball in `CACHE`, so only the first run on a
machine pays for debootstrap. A missing tool fails the test under CI=true and skips it elsewhere.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import time
import tomllib
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from tests.conftest import secrets_in
from tests.tools import require_tool

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
CACHE = Path("/var/cache/senderd-container")
"""Where the stand-in base's root file system is kept between runs (a tarball named by its recipe)."""
CONTAINERS_CONF = Path("/etc/containers/containers.conf")
CONTAINERS_CONF_TEXT = '[containers]\ndefault_ulimits = []\n\n[engine]\ncgroup_manager = "cgroupfs"\n'
"""What `.ci/run` writes to `CONTAINERS_CONF`: no ulimits copied into containers, cgroups without systemd."""
SUITE = "bookworm"  # Debian 12: Python 3.11, as in python:3.11-slim
PACKAGES = ("python3", "python3-pip", "python3-venv", "ca-certificates")
RECIPE = hashlib.sha256(f"{SUITE} {' '.join(PACKAGES)} EXTERNALLY-MANAGED python pip v1".encode()).hexdigest()[:12]
"""Names the cached tarball and labels the stand-in image: a change to the recipe makes a new one."""
RECIPE_LABEL = "senderd.stand-in-recipe"
IMAGE = "localhost/senderd:test"
APP_UID = 10001
"""The user the Dockerfile runs senderd as."""


def dockerfile_base() -> str:
    """The default of the Dockerfile's `ARG PYTHON_IMAGE` (the base image, named by digest)."""
    found = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", DOCKERFILE.read_text(encoding="utf-8"), re.MULTILINE)
    assert found, f"{DOCKERFILE}: no `ARG PYTHON_IMAGE=...` line"
    return found.group(1)


def stand_in_name(base: str) -> str:
    """The stand-in's name for `base`: its repository and tag under localhost/ (podman cannot tag an image by
    digest, so the build gets it through `--build-arg PYTHON_IMAGE`)."""
    name = base.split("@", 1)[0]
    return f"localhost/senderd-stand-in/{name.rsplit('/', 1)[-1]}"


def _missing(message: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def _run(args: Sequence[str | Path], *, timeout: float, stdin: int | None = None) -> str:
    """Run a command to its end; fail the test with its output if it fails. Returns its stdout."""
    command = [str(arg) for arg in args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False, stdin=stdin)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited {result.returncode}:\n{(result.stdout + result.stderr)[-4000:]}")
    return result.stdout


@dataclass(frozen=True)
class Podman:
    """The podman command line this machine can use: `podman --runtime runc`."""

    command: tuple[str, ...]

    @classmethod
    def find(cls) -> Podman:
        """Podman and runc found, and containers.conf set as they need here; else fail (CI) or skip."""
        podman, runc = require_tool("podman"), require_tool("runc")
        if os.geteuid() != 0:  # rootless podman maps uid 10001 elsewhere, and debootstrap needs root
            _missing("the container tests run podman as root (as .ci/run does)")
        try:
            conf = tomllib.loads(CONTAINERS_CONF.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            conf = {}
            reason = str(exc)
        else:
            reason = "it lacks them"
        if conf.get("containers", {}).get("default_ulimits") != [] or (
            conf.get("engine", {}).get("cgroup_manager") != "cgroupfs"
        ):
            _missing(
                f"{CONTAINERS_CONF}: needs `default_ulimits = []` under [containers] and `cgroup_manager = "
                f'"cgroupfs"` under [engine] ({reason}): write it as .ci/run does'
            )
        return cls((podman, "--runtime", runc))

    def __call__(self, *args: str | Path, timeout: float = 120, stdin: int | None = None) -> str:
        """Run `podman ARGS` to its end (failing the test if it fails); its stdout."""
        return _run([*self.command, *args], timeout=timeout, stdin=stdin)

    def output(self, *args: str | Path) -> str | None:
        """`podman ARGS`'s stdout, or None if it fails (a question: is that image there?)."""
        result = subprocess.run([*self.command, *map(str, args)], capture_output=True, text=True, check=False)
        return result.stdout if result.returncode == 0 else None

    async def run_async(self, *args: str) -> tuple[int, str, str]:
        """`podman ARGS` without blocking the event loop (the emulator serves the container from it): exit
        code, stdout, stderr."""
        result = await anyio.run_process([*self.command, *args], check=False)
        return result.returncode, result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace")


def base_tarball(directory: Path = CACHE) -> Path:
    """The stand-in's root file system as a tarball, from the cache or made now with debootstrap (root only):
    Debian's python3 and pip, pip allowed to install system-wide, `python` and `pip` in /usr/local/bin as in
    the python images."""
    tarball = directory / f"python-3.11-{SUITE}-{RECIPE}.tar"
    if tarball.exists():
        return tarball
    debootstrap = require_tool("debootstrap")
    if os.geteuid() != 0:
        _missing(f"{tarball} is not there yet and only root can make it with debootstrap (run .ci/run as root)")
    directory.mkdir(parents=True, exist_ok=True)
    rootfs = directory / "rootfs.partial"
    shutil.rmtree(rootfs, ignore_errors=True)
    include = ",".join(PACKAGES)
    _run([debootstrap, "--variant=minbase", f"--include={include}", SUITE, rootfs], timeout=900)
    (rootfs / "usr/lib/python3.11/EXTERNALLY-MANAGED").unlink(missing_ok=True)
    for link, target in (("python", "/usr/bin/python3"), ("pip", "/usr/bin/pip3")):
        (rootfs / "usr/local/bin" / link).symlink_to(target)
    for leftovers in ("var/cache/apt/archives", "var/lib/apt/lists"):  # downloaded packages, package lists
        for entry in (rootfs / leftovers).glob("*"):
            if entry.is_file():
                entry.unlink()
    partial = tarball.with_suffix(".tar.partial")
    _run(["tar", "--numeric-owner", "-C", rootfs, "-cf", partial, "."], timeout=300)
    partial.rename(tarball)
    shutil.rmtree(rootfs)
    return tarball


def make_base(podman: Podman, base: str | None = None) -> str:
    """The stand-in for `base` (the Dockerfile's default) in podman's store, imported from `base_tarball()`
    unless it is there already from the same recipe; returns its name."""
    require_tool("debootstrap")  # needed on a machine's first run; CI machines are always fresh
    name = stand_in_name(base or dockerfile_base())
    label = podman.output("image", "inspect", "--format", f'{{{{ index .Labels "{RECIPE_LABEL}" }}}}', name)
    if label is not None and label.strip() == RECIPE:
        return name
    tarball = base_tarball()
    with tarball.open("rb") as stream:
        podman("import", "--change", f"LABEL {RECIPE_LABEL}={RECIPE}", "-", name, timeout=300, stdin=stream.fileno())
    return name


@dataclass(frozen=True)
class Built:
    """The image built from the Dockerfile, and what that took."""

    image: str
    base: str
    seconds: float
    size_bytes: int


def build_image(podman: Podman, base: str, image: str = IMAGE) -> Built:
    """Build the Dockerfile on `base` as `image`. The build's RUN steps get the host network and its CA
    certificates (and /etc/pip.conf, if any), so that pip reaches the package index as the host does."""
    volumes = ["-v", "/etc/ssl/certs:/etc/ssl/certs:ro"]
    if Path("/etc/pip.conf").exists():
        volumes += ["-v", "/etc/pip.conf:/etc/pip.conf:ro"]
    started = time.monotonic()
    podman(
        "build",
        "--pull=never",
        "--network=host",
        *volumes,
        "--build-arg",
        f"PYTHON_IMAGE={base}",
        "-t",
        image,
        "-f",
        DOCKERFILE,
        ROOT,
        timeout=600,
    )
    seconds = time.monotonic() - started
    size = int(podman("image", "inspect", "--format", "{{ .Size }}", image).strip())
    return Built(image, base, seconds, size)


class Container:
    """A container started detached from the image; see `running`."""

    def __init__(self, podman: Podman, name: str) -> None:
        self.podman = podman
        self.name = name

    async def exec(self, *command: str) -> tuple[int, str, str]:
        """Run `command` inside the container: exit code, stdout, stderr."""
        return await self.podman.run_async("exec", self.name, *command)

    async def logs(self) -> str:
        """What the container wrote so far, stdout then stderr."""
        _, out, err = await self.podman.run_async("logs", self.name)
        return out + err

    async def stop(self, timeout: int = 20) -> int:
        """SIGTERM (SIGKILL after `timeout` seconds); the process's exit code once it has exited."""
        code, _, err = await self.podman.run_async("stop", "--time", str(timeout), self.name)
        assert code == 0, err
        _, out, _ = await self.podman.run_async("inspect", "--format", "{{ .State.ExitCode }}", self.name)
        return int(out.strip())

    async def inspect(self, template: str) -> str:
        """`podman inspect --format TEMPLATE` of the container."""
        code, out, err = await self.podman.run_async("inspect", "--format", template, self.name)
        assert code == 0, err
        return out.strip()


@asynccontextmanager
async def running(podman: Podman, image: str, *options: str, command: Sequence[str] = ()) -> AsyncIterator[Container]:
    """`podman run -d --read-only --network=host OPTIONS IMAGE COMMAND` for the block, removed at its end;
    its output is checked for secrets then."""
    name = f"senderd-test-{uuid.uuid4().hex[:12]}"
    code, _, err = await podman.run_async(
        "run", "-d", "--name", name, "--read-only", "--network=host", *options, image, *command
    )
    assert code == 0, f"podman run: {err}"
    container = Container(podman, name)
    try:
        yield container
        output = await container.logs()
        assert not secrets_in(output), f"a secret in the container's output: {secrets_in(output)}"
    finally:
        with anyio.CancelScope(shield=True):
            await podman.run_async("rm", "--force", "--time", "0", name)


async def run_once(podman: Podman, image: str, *options: str, command: Sequence[str]) -> tuple[int, str, str]:
    """`podman run --rm --read-only --network=host OPTIONS IMAGE COMMAND` to its end: exit code, stdout,
    stderr (checked for secrets)."""
    code, out, err = await podman.run_async("run", "--rm", "--read-only", "--network=host", *options, image, *command)
    assert not secrets_in(out + err), f"a secret in the container's output: {secrets_in(out + err)}"
    return code, out, err
