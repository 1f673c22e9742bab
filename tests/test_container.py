"""The container image, built from the Dockerfile with podman (on a stand-in base made from Debian packages)
and run as a cluster would run it: read-only root file system, uid 10001, config and a service binding
mounted read-only, the emulator on the host network, the relay spool on a volume. Fails (not skips) under
CI=true when podman, runc or debootstrap is missing (see tests/container.py)."""

from __future__ import annotations

import os
import shutil
import time
import tomllib
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from senderd.emulator.runtime import FlowSpec
from senderd.emulator.stack import EmulatorStack
from tests.container import (
    APP_UID,
    CONTAINERS_CONF,
    CONTAINERS_CONF_TEXT,
    PACKAGES,
    ROOT,
    SUITE,
    Built,
    Container,
    Podman,
    build_image,
    dockerfile_base,
    make_base,
    run_once,
    running,
    stand_in_name,
)
from tests.tools import free_port

# The first test pays for the module's build: debootstrap (once per machine), then the image build.
pytestmark = [pytest.mark.anyio, pytest.mark.timeout(900)]

CONFIG = """\
[credentials]
binding_name = "emulator-default"        # below $SERVICE_BINDING_ROOT, as on Kyma
ca_file = "/etc/senderd/ca.pem"

[server]
listen = "127.0.0.1:{port}"

[[flows]]
name = "timestamp"
path = "/http/GetTimestamp"
expect_body = "Current time"
"""

RELAY = """
[[flows]]
name = "orders"
path = "/http/Orders"
method = "POST"
retries = 0

[relay]
listen = "127.0.0.1:{port}"
spool_dir = "/var/lib/senderd/spool"
redelivery_initial = "200ms"
redelivery_max = "1s"
"""


@pytest.fixture(scope="module")
def podman() -> Podman:
    return Podman.find()


@pytest.fixture(scope="module")
def image(podman: Podman) -> Built:
    """The image, built once for the module; the time each step took is printed (`pytest -s`)."""
    started = time.monotonic()
    base = make_base(podman)
    base_seconds = time.monotonic() - started
    built = build_image(podman, base)
    print(
        f"\nstand-in base {base}: {base_seconds:.1f} s; image {built.image}: built in {built.seconds:.1f} s, "
        f"{built.size_bytes / 1e6:.0f} MB"
    )
    return built


def deploy(stack: EmulatorStack, directory: Path, config: str) -> list[str]:
    """The config and the CA in `directory/etc`, the stack's bindings in `directory/bindings`, owned by the
    app's user (as a pod's fsGroup makes them readable); the `podman run` options that mount them read-only."""
    etc, bindings = directory / "etc", directory / "bindings"
    etc.mkdir(parents=True)
    shutil.copy(stack.ca_path, etc / "ca.pem")
    (etc / "senderd.toml").write_text(config, encoding="utf-8")
    shutil.copytree(stack.binding_root, bindings, symlinks=True)  # the `..data` links of a mounted Secret
    for path in (etc, bindings, *etc.rglob("*"), *bindings.rglob("*")):
        os.lchown(path, APP_UID, APP_UID)
    return [
        *("-v", f"{etc}:/etc/senderd:ro"),
        *("-v", f"{bindings}:/bindings:ro"),
        *("-e", "SERVICE_BINDING_ROOT=/bindings"),
    ]


async def wait_listening(container: Container, port: int, timeout: float = 60) -> None:
    """Wait until the container's senderd accepts connections on 127.0.0.1:`port` (polling: nothing crosses
    the process boundary to wait on); fail at once with its output if the container has ended."""
    with anyio.fail_after(timeout):
        while True:
            try:
                stream = await anyio.connect_tcp("127.0.0.1", port)
            except OSError:
                if await container.inspect("{{ .State.Running }}") != "true":
                    pytest.fail(f"the container ended before listening on {port}:\n{await container.logs()}")
                await anyio.sleep(0.1)
                continue
            await stream.aclose()
            return


async def get(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.json(content_type=None)


async def wait_for_message(url: str, done: set[str], timeout: float = 30) -> dict[str, Any]:
    """Poll the relay's `GET url` until the message's status is one of `done`; the message."""
    with anyio.fail_after(timeout):
        while True:
            status, message = await get(url)
            assert status == 200, message
            if message["status"] in done and message["attempts"] >= 1:
                return dict(message)
            await anyio.sleep(0.1)


@asynccontextmanager
async def spool_volume(podman: Podman) -> AsyncIterator[str]:
    """A podman named volume for the block (a PersistentVolumeClaim's stand-in), removed at its end."""
    name = f"senderd-test-spool-{uuid.uuid4().hex[:12]}"
    podman("volume", "create", name)
    try:
        yield name
    finally:
        with anyio.CancelScope(shield=True):
            await podman.run_async("volume", "rm", "--force", name)


def test_the_recipe_in_readme_and_ci_is_the_helpers() -> None:
    """README's recipe by hand and .ci/run's containers.conf say what tests/container.py does."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    name = stand_in_name(dockerfile_base())
    assert name == "localhost/senderd-stand-in/python:3.11-slim"
    assert f"debootstrap --variant=minbase --include={','.join(PACKAGES)} {SUITE} rootfs" in readme
    assert f"podman import - {name}" in readme and f"--build-arg PYTHON_IMAGE={name}" in readme
    conf = CONTAINERS_CONF_TEXT.replace("\n", "\\n")
    assert f"printf '{conf}' >/etc/containers/containers.conf" in readme
    assert f"printf '{conf}' >{CONTAINERS_CONF}" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


async def test_daemon_runs_read_only_as_uid_10001_and_answers_healthz(
    podman: Podman, image: Built, stack: EmulatorStack, tmp_path: Path
) -> None:
    port = free_port()
    mounts = deploy(stack, tmp_path / "pod", CONFIG.format(port=port))
    async with running(podman, image.image, *mounts) as container:  # the image's own CMD: `run -c ...`
        await wait_listening(container, port)
        status, answer = await get(f"http://127.0.0.1:{port}/healthz")
        assert status == 200, answer
        code, proc, _ = await container.exec("cat", "/proc/1/status", "/proc/1/cmdline")
        assert code == 0
        uids = next(line for line in proc.splitlines() if line.startswith("Uid:")).split()[1:]
        assert uids == [str(APP_UID)] * 4, proc  # real, effective, saved and file-system uid of senderd (pid 1)
        assert "senderd" in proc and "/etc/senderd/senderd.toml" in proc
        assert await container.inspect("{{ .HostConfig.ReadonlyRootfs }}") == "true"
        for path in ("/usr/local/lib/senderd-was-here", "/etc/senderd/senderd-was-here", "/bindings/x"):
            code, _, err = await container.exec("touch", path)
            assert code != 0 and "Read-only file system" in err, (path, err)
        assert await container.stop() == 0  # SIGTERM to pid 1: a graceful stop
        logs = await container.logs()
    assert '"event":"stopped"' in logs, logs


async def test_once_against_the_emulator_on_the_host_network_exits_0(
    podman: Podman, image: Built, stack: EmulatorStack, tmp_path: Path
) -> None:
    mounts = deploy(stack, tmp_path / "job", CONFIG.format(port=free_port()))
    code, out, err = await run_once(podman, image.image, *mounts, command=["once", "-c", "/etc/senderd/senderd.toml"])
    assert code == 0, out + err
    assert "timestamp" in out and "success" in out, out
    assert [message.address for message in stack.runtime.stats.messages] == ["/gettimestamp"]
    assert stack.token_server.stats.requests >= 1


async def test_image_holds_the_locked_dependencies_and_the_wheel(podman: Podman, image: Built) -> None:
    """What `pip install -c requirements.lock` put in the image: the lock's pins exactly, and the wheel."""
    code, out, err = await run_once(podman, image.image, "--entrypoint", "pip", command=["freeze", "--no-cache-dir"])
    assert code == 0, err
    version = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    wheel = f"senderd @ file:///tmp/dist/senderd-{version}-py3-none-any.whl"  # built from the wheel, not sources
    lock = (ROOT / "requirements.lock").read_text(encoding="utf-8")
    locked = {line for line in lock.splitlines() if line and not line.startswith("#")}
    assert set(out.splitlines()) == locked | {wheel}, out


async def test_relay_spool_on_a_volume_survives_a_container_restart(
    podman: Podman, image: Built, stack: EmulatorStack, tmp_path: Path
) -> None:
    orders = FlowSpec("/Orders", unavailable=-1, retry_after=0)  # down until the test says otherwise
    stack.runtime.add_flow(orders)
    relay_port = free_port()
    config = CONFIG.format(port=free_port()) + RELAY.format(port=relay_port)
    mounts = deploy(stack, tmp_path / "pod", config)
    relay = f"http://127.0.0.1:{relay_port}"
    async with spool_volume(podman) as volume:
        options = [*mounts, "-v", f"{volume}:/var/lib/senderd/spool"]
        async with running(podman, image.image, *options) as first:
            await wait_listening(first, relay_port)
            async with (
                aiohttp.ClientSession() as session,
                session.post(
                    f"{relay}/v1/flows/orders/messages", data=b"<Order id='7'/>", headers={"Content-Type": "text/xml"}
                ) as response,
            ):
                assert response.status == 202, await response.text()
                message_id = (await response.json())["id"]
            waiting = await wait_for_message(f"{relay}/v1/messages/{message_id}", {"queued"})
            assert waiting["http_status"] == 503, waiting  # tried, refused, waiting for its next round
            assert await first.stop() == 0
        orders.unavailable = 0
        async with running(podman, image.image, *options) as second:
            await wait_listening(second, relay_port)
            delivered = await wait_for_message(f"{relay}/v1/messages/{message_id}", {"delivered"})
            assert await second.stop() == 0
    assert delivered["id"] == message_id
    assert delivered["attempts"] > waiting["attempts"]  # the same row, its first container's tries counted
    received = [message for message in stack.runtime.stats.messages if message.address == "/orders"]
    assert received, "the message never reached the flow"
    assert received[-1].body == b"<Order id='7'/>"
    assert received[-1].headers["sap_applicationid"] == message_id
    assert received[-1].mpl_id == delivered["correlation_id"]
