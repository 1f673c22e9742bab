"""The `senderd` command line: argument parsing, exit codes and wiring, nothing more.

Exit codes: 0 success; 1 the work failed (a send or token fetch); 2 a user mistake (config, service key,
arguments), printed as one line on stderr; 3 `once` could not push its metrics (every flow passed: a failed
flow is 1 still); 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import io
import os
import shlex
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from senderd import __version__
from senderd.errors import ConfigError, CredentialsError, TokenError, UsageError

if TYPE_CHECKING:
    from senderd.config import Config
    from senderd.result import SendResult

# The config (pydantic), logging (structlog) and what each command needs are imported in the functions that use
# them: `main` pauses the garbage collector before they load (see `StartupCollection`).

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PUSH_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "json", "console")
DAEMON_COMMANDS = ("run", "once")


def _common(parser: argparse.ArgumentParser, *, config: bool = True) -> None:
    if config:
        parser.add_argument("-c", "--config", type=Path, help="TOML config file (default: $SENDERD_CONFIG)")
        parser.add_argument("--service-key", type=Path, help="service key JSON file (overrides the config)")
        parser.add_argument("--binding", type=Path, help="a mounted binding directory (overrides the config)")
        parser.add_argument("--key-file", type=Path, help="private key file for an External Certificate key")
        parser.add_argument("--ca-file", type=Path, help="extra CA bundle (PEM) to trust")
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=None,
        help="default: info for run/once/demo, error for the one-shot tools",
    )
    parser.add_argument("--log-format", choices=LOG_FORMATS, default="auto")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="senderd", description="A sender to SAP Cloud Integration iFlows.")
    parser.add_argument("--version", action="version", version=f"senderd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    token = commands.add_parser("token", help="fetch a token and print its claims")
    _common(token)
    token.add_argument("--credentials", metavar="NAME", help="the credentials set (when there are several)")
    token.add_argument("--raw", action="store_true", help="also print the raw access token")

    check = commands.add_parser("check", help="validate config and credentials offline")
    _common(check)
    check.add_argument("--online", action="store_true", help="also fetch a token")

    key = commands.add_parser("key", help="service key tools")
    key_commands = key.add_subparsers(dest="key_command", required=True, metavar="ACTION")
    export = key_commands.add_parser("export", help="write client.crt and client.key for curl or Postman")
    export.add_argument("service_key", type=Path)
    export.add_argument("--out", type=Path, required=True, help="folder to write to")
    export.add_argument("--key-file", type=Path, help="private key file for an External Certificate key")
    export.add_argument("--passphrase-env", help="environment variable holding the key file's passphrase")
    export.add_argument("--ca-file", type=Path, help="CA bundle (PEM) that the curl command should trust")
    _common(export, config=False)

    run = commands.add_parser("run", help="the daemon: send on schedules until SIGTERM/SIGINT")
    _common(run)
    run.add_argument("--listen", metavar="HOST:PORT", help="metrics/health endpoint (overrides server.listen)")

    once = commands.add_parser(
        "once", help="every (selected) flow once; exit 0 if all passed, 1 if not, 3 if the push failed"
    )
    _common(once)
    once.add_argument("--flow", action="append", default=[], metavar="NAME", help="only this flow (repeatable)")
    once.add_argument("--push-gateway", metavar="URL", help="push metrics to this Prometheus Pushgateway")
    once.add_argument("--push-instance", metavar="NAME", help="the grouping key's instance (overrides push.instance)")

    send = commands.add_parser("send", help="one send to a flow; print status, correlation id and body")
    _common(send)
    send.add_argument("flow", help="the flow's name")
    send.add_argument("--body", help="the body, or @FILE to read it from a file")

    demo = commands.add_parser("demo", help="run senderd against the embedded emulator (Ctrl-C stops)")
    demo.add_argument("--dir", type=Path, help="keep the emulator's files here (default: a temp folder)")
    demo.add_argument("--token-lifetime", type=float, default=30.0, help="emulated token lifetime, seconds")
    demo.add_argument("--every", default="5s", help="how often each demo flow is sent (default 5s)")
    demo.add_argument("--duration", type=float, help="stop after this many seconds")
    _common(demo, config=False)

    emulator = commands.add_parser("emulator", help="run the BTP emulator (token server and runtime)")
    emulator.add_argument("--dir", type=Path, required=True, help="where to write the service key and CA")
    emulator.add_argument("--token-lifetime", type=float, default=3600.0, help="token lifetime in seconds")
    emulator.add_argument("--token-port", type=int, default=0)
    emulator.add_argument("--runtime-port", type=int, default=0)
    _common(emulator, config=False)
    return parser


def config_path(args: argparse.Namespace) -> Path | None:
    """The config file that `-c` or `$SENDERD_CONFIG` names, if any."""
    from senderd.config import CONFIG_ENV

    if args.config is not None:
        return Path(args.config)
    env = os.environ.get(CONFIG_ENV)
    return Path(env) if env else None


def _config(args: argparse.Namespace, *, flows_needed: bool = False) -> Config:
    """The config of `-c`/`$SENDERD_CONFIG` with the command line's credentials flags applied.

    Without a config file, a command that needs flows, or one given no `--service-key` either, is told
    how to name one (rather than what the empty default config lacks).
    """
    from senderd.config import CONFIG_ENV, SOURCE_KEYS, config_from_dict, load_config

    path = config_path(args)
    given_key = getattr(args, "service_key", None) is not None or getattr(args, "binding", None) is not None
    if path is None and (flows_needed or not given_key):
        raise UsageError(f"no config file given: use -c FILE or ${CONFIG_ENV}")
    config = load_config(path)
    overrides = {
        name: getattr(args, name)
        for name in ("service_key", "binding", "key_file", "ca_file")
        if getattr(args, name, None) is not None
    }
    if overrides:
        if len(config.credentials) > 1:
            raise UsageError(
                f"--{next(iter(overrides)).replace('_', '-')}: the config has several credentials sets "
                f"({', '.join(config.credentials)}): set the key in the config file's set instead"
            )
        data = config.model_dump(exclude={"source"})
        name, fields = next(iter(data["credentials"].items()))
        fields = {k: v for k, v in fields.items() if v is not None}
        if "service_key" in overrides or "binding" in overrides:
            for key in SOURCE_KEYS:  # the command line's source replaces the file's
                fields.pop(key, None)
        # absolute, but links kept: a Kubernetes Secret is a symlink that is swapped on update
        fields.update({k: os.path.abspath(v) for k, v in overrides.items()})
        data["credentials"] = {name: fields}
        config = config_from_dict(data, source=config.source if path else "command line")
    if flows_needed:
        config.require_flows()
    _warn(config.warnings())
    return config


def _warn(lines: Sequence[str]) -> None:
    for line in lines:
        print(f"senderd: warning: {line}", file=sys.stderr)


def _utc(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _set_where(config: Config, name: str) -> str:
    return "credentials" if len(config.credentials) == 1 else f"credentials.{name}"


async def _token(args: argparse.Namespace) -> int:
    from senderd.auth.servicekey import load_credentials
    from senderd.auth.token import TokenProvider, claims_of

    config = _config(args)
    name = args.credentials or config.credentials_default
    if name is None:
        raise UsageError(f"--credentials: the config has several credentials sets ({', '.join(config.credentials)})")
    creds = config.credentials_set(name)
    key = load_credentials(creds, source=config.source, where=_set_where(config, name), purpose=config.purpose(name))
    _warn(key.notes)
    if creds.auth != "oauth":
        raise UsageError(f"credentials set {name!r} sends with auth = {creds.auth!r}: it uses no token")
    async with TokenProvider.open(key, creds, config.token_for(name)) as provider:
        token = await provider.get()
    claims = claims_of(token.value)
    scopes = claims.get("scope") or list(token.scopes)
    print(f"client_id:  {claims.get('client_id', key.client_id)}")
    print(f"token_url:  {key.token_url}")
    print(f"scopes:     {' '.join(scopes) if isinstance(scopes, list) else scopes}")
    if "iat" in claims:
        print(f"issued:     {_utc(float(claims['iat']))}")
    print(f"expires:    {_utc(float(claims.get('exp', token.expires_at_wall)))}")
    print(f"lifetime:   {token.lifetime:.0f}s")
    if args.raw:
        print(f"token:      {token.value}")
    return EXIT_OK


async def _check(args: argparse.Namespace) -> int:
    from senderd.auth.servicekey import load_set
    from senderd.auth.token import TokenProvider

    config = _config(args)
    loaded = {}
    for name, creds in config.credentials.items():
        where = _set_where(config, name)
        loaded[name] = load_set(creds, source=config.source, where=where, purpose=config.purpose(name))
        _warn(loaded[name][0].notes)
    if config_path(args) is not None:
        config.require_flows()  # what `run` and `once` would refuse, `check` refuses too
    print(f"config OK: {config.source} ({len(config.flows)} flows)")
    for name, (key, source) in loaded.items():
        creds = config.credentials[name]
        label = f"[{name}] " if len(config.credentials) > 1 else ""
        print(f"{label}service key OK: {key.source} ({key.key_type}, client {key.client_id}), auth {creds.auth}")
        if key.certificate_not_after is not None:
            print(f"{label}client certificate valid until {key.certificate_not_after:%Y-%m-%d %H:%M:%S} UTC")
        if not source.rotates:
            _warn([f"{label}{key.source}: an environment variable cannot change while senderd runs: a rotated "
                   "key needs a restart (mount the Secret as a directory to rotate without one)"])  # fmt: skip
        if args.online and creds.auth == "oauth":
            async with TokenProvider.open(key, creds, config.token_for(name)) as provider:
                token = await provider.get()
            print(f"{label}token OK: valid for {token.lifetime:.0f}s")
    return EXIT_OK


def _key_export(args: argparse.Namespace) -> int:
    from senderd.auth.servicekey import load_service_key

    passphrase = os.environ.get(args.passphrase_env) if args.passphrase_env else None
    key = load_service_key(args.service_key, key_file=args.key_file, key_passphrase=passphrase)
    _warn(key.notes)
    if not key.uses_certificate:
        raise UsageError(
            f"{key.source}: a ClientSecret key has no certificate: use clientid and clientsecret "
            "with HTTP Basic instead"
        )
    out: Path = args.out
    cert_path, key_path = out / "client.crt", out / "client.key"
    for path in (out, cert_path, key_path):
        if path.is_symlink():  # never write key material through a link someone left there
            raise UsageError(f"--out {out}: {path} is a symbolic link: remove it, senderd does not write through links")
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_new_file(cert_path, key.chain_pem(), 0o644)
        write_new_file(key_path, key.private_key_pem(), 0o600)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot write there ({exc.strerror or exc}): choose a writable folder") from None
    print(f"wrote {cert_path} (certificate chain, leaf first)")
    print(f"wrote {key_path} (private key, mode 0600)")
    trust = f" --cacert {shlex.quote(os.path.abspath(args.ca_file))}" if args.ca_file else ""
    print("get a token with:")
    print(
        f"  curl --cert {shlex.quote(str(cert_path))} --key {shlex.quote(str(key_path))}{trust} \\\n"
        f"    -d grant_type=client_credentials --data-urlencode {shlex.quote('client_id=' + key.client_id)} \\\n"
        f"    {shlex.quote(key.token_url)}"
    )
    return EXIT_OK


def usable_dir(path: Path) -> Path:
    """`--dir` as a folder senderd can write to (created if missing), or a UsageError saying why not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".senderd-write-test"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"--dir {path}: cannot use it ({exc.strerror or exc}): give a writable folder") from None
    return path


async def wait_for_stop(signals: AsyncIterator[int]) -> None:
    """Return on the first SIGINT or SIGTERM from `signals` (a foreground tool stopped on purpose exits 0)."""
    async for _ in signals:
        return


def write_new_file(path: Path, data: bytes, mode: int) -> None:
    """Replace `path` by a new file with `mode`, created without following a link (O_EXCL|O_NOFOLLOW)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as file:
        file.write(data)


async def _emulator(args: argparse.Namespace) -> int:
    from senderd.emulator.stack import EmulatorStack

    started = EmulatorStack.started(
        usable_dir(args.dir),
        token_lifetime=args.token_lifetime,
        token_port=args.token_port,
        runtime_port=args.runtime_port,
    )
    try:
        stack = await started.__aenter__()
    except OSError as exc:
        raise UsageError(
            f"--token-port {args.token_port} / --runtime-port {args.runtime_port}: cannot listen "
            f"({exc.strerror or exc}): choose free ports, or 0 for any"
        ) from None
    try:
        print(f"token server:  {stack.token_server.token_url}")
        print(f"runtime:       {stack.runtime.url}")
        print(f"MPL API:       {stack.tenant.api_url}")
        print(f"service key:   {stack.service_key_path}")
        print(f"CA file:       {stack.ca_path}")
        print(f"config:        {stack.config_path}")
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:  # before saying so
            print("press Ctrl-C to stop")
            await wait_for_stop(signals)
    finally:
        await started.__aexit__(None, None, None)
    return EXIT_OK


async def _run(args: argparse.Namespace) -> int:
    from senderd.daemon import Daemon

    def load() -> Config:
        """The config with the command line applied: at start, and again at every SIGHUP."""
        config = _config(args, flows_needed=True)
        if args.listen:
            from senderd.config import parse_listen

            parse_listen(args.listen)
            config = config.model_copy(update={"server": config.server.model_copy(update={"listen": args.listen})})
        return config

    await Daemon.create(load(), loader=load if config_path(args) is not None else None).serve()
    return EXIT_OK


async def _once(args: argparse.Namespace) -> int:
    config = _config(args, flows_needed=True)
    flows = [config.flow(name) for name in args.flow] if args.flow else list(config.flows)
    _start_ahead(config)

    from senderd.engine import Engine
    from senderd.metrics import Metrics

    metrics = Metrics()
    for flow in flows:
        metrics.declare_flow(flow.name, flow.every, confirms=flow.confirm == "mpl")
    STARTUP.started()
    async with Engine.open(config, metrics=metrics) as engine:
        results = await engine.run_once(flows)
    failed = sum(not r.ok for r in results)
    _print_summary(results)
    gateway = args.push_gateway or config.push.gateway
    push_failed = False
    if gateway:
        from senderd.errors import PushError
        from senderd.push import push_metrics

        job, instance = config.push.job, args.push_instance or config.push.instance
        metrics.once_finished(success=failed == 0, at=time.time())
        try:
            await push_metrics(metrics.registry, gateway, job=job, instance=instance)
            print(f"pushed metrics to {gateway} (job {job}, instance {instance})")
        except PushError as exc:
            print(f"senderd: error: {exc}", file=sys.stderr)
            push_failed = True
    print(f"{len(results) - failed} passed, {failed} failed")
    if failed:
        return EXIT_FAILED  # the flows' verdict first: with the push lost, the exit code is its only record
    return EXIT_PUSH_FAILED if push_failed else EXIT_OK


def _start_ahead(config: Config) -> None:
    """Start, in threads, what opening the engine will need (taken there as if done there): each set's key,
    whose parsing holds the GIL, and the system trust store of each set's runtime context and, for OAuth, of
    its token server's, which OpenSSL loads without it. Both then overlap the import of aiohttp and the engine,
    whose own trust stores load without the GIL as well."""
    from senderd.auth.servicekey import load_set_ahead
    from senderd.auth.tls import prepare_trust

    for name, creds in config.credentials.items():
        load_set_ahead(creds, source=config.source, where=_set_where(config, name), purpose=config.purpose(name))
    prepare_trust(sum(1 + (creds.auth == "oauth") for creds in config.credentials.values()))


def _print_summary(results: Sequence[SendResult]) -> None:
    """The table of a `once` run on stdout, and each failed flow's error on stderr."""
    rows = [("flow", "outcome", "status", "attempts", "latency", "mpl id")]
    for result in results:
        rows.append(
            (
                result.flow,
                result.outcome,
                str(result.status or "-"),
                str(result.attempts),
                f"{result.duration * 1000:.0f} ms",
                result.mpl_id or "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    for result in results:
        if not result.ok and result.last.error:
            print(f"{result.flow}: {result.last.error}", file=sys.stderr)


def _body_argument(value: str | None) -> bytes | None:
    if value is None:
        return None
    if value.startswith("@"):
        path = Path(value[1:])
        try:
            return path.read_bytes()
        except OSError as exc:
            raise UsageError(f"--body {value}: cannot read {path} ({exc.strerror})") from None
    return value.encode()


async def _send(args: argparse.Namespace) -> int:
    from senderd.engine import Engine

    config = _config(args)
    flow = config.flow(args.flow)
    body = _body_argument(args.body)
    async with Engine.open(config) as engine:
        result = await engine.send(flow, body=body)
    print(
        f"status: {result.status if result.status is not None else '-'} ({result.outcome}, "
        f"{result.attempts} attempt{'s' if result.attempts != 1 else ''}, {result.duration * 1000:.0f} ms)"
    )
    for name, value in result.last.correlation.items():
        print(f"{name}: {value}")
    if result.last.error and not result.ok:
        print(f"error: {result.last.error}", file=sys.stderr)
    print()
    sys.stdout.write(result.last.body.decode("utf-8", errors="replace"))
    if result.last.body and not result.last.body.endswith(b"\n"):
        print()
    return EXIT_OK if result.ok else EXIT_FAILED


async def _demo(args: argparse.Namespace) -> int:
    from senderd.demo import run_demo

    return await run_demo(
        usable_dir(args.dir) if args.dir else None,
        token_lifetime=args.token_lifetime,
        every=args.every,
        stop_after=args.duration,
    )


COMMANDS: dict[str, Callable[[argparse.Namespace], Any]] = {
    "run": _run,
    "once": _once,
    "send": _send,
    "demo": _demo,
    "token": _token,
    "check": _check,
    "emulator": _emulator,
}


def _sole_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one real error inside nested task-group exception groups (cancellations aside), or the group."""
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        real = [e for e in error.exceptions if not isinstance(e, asyncio.CancelledError)]  # after the loop ended
        if len(real) != 1:
            return group
        error = real[0]
    return error


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed command and map errors to exit codes (one line on stderr)."""
    try:
        try:
            if args.command == "key":
                return _key_export(args)
            handler = COMMANDS[args.command]
            result: int = anyio.run(handler, args)
            return result
        except BaseExceptionGroup as group:  # raised inside a task group: report the error it carries
            raise _sole_error(group) from None
    except (ConfigError, CredentialsError, UsageError) as exc:
        print(f"senderd: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except TokenError as exc:
        print(f"senderd: token: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


class StartupCollection:
    """The cyclic garbage collector paused while a command that runs briefly (`once`) starts up.

    Importing senderd's dependencies makes some 85,000 objects that live as long as the process, and the
    collector, woken by every 700 new ones, scans them again and again (~130 passes, one of them full: ~50M
    instructions, 1.5-2% of `once`'s start on the critical path, measured with callgrind). `paused()`
    stops it for the start; `started()` moves what there is to the permanent generation (`gc.freeze`: never
    scanned again, as `Daemon` does after its start) and lets it collect what comes next; leaving `paused()`
    without `started()` (a start that failed) just lets it run again (for a `main` called inside a
    longer-lived process, as the tests do).
    """

    def __init__(self) -> None:
        self._paused = False

    @contextlib.contextmanager
    def paused(self, pause: bool = True) -> Iterator[None]:
        """Pause the collector (when `pause` and it runs) until `started()` or the end of the block."""
        self._paused = pause and gc.isenabled()
        if self._paused:
            gc.disable()
        try:
            yield
        finally:
            if self._paused:
                gc.enable()
            self._paused = False

    def started(self) -> None:
        """The start is over: its objects go to the permanent generation and the collector runs again."""
        if self._paused:
            gc.freeze()
            gc.enable()
            self._paused = False


STARTUP = StartupCollection()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `senderd` console script and `python -m senderd`."""
    args = build_parser().parse_args(argv)
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)  # a line at a time, also into a pipe
    with STARTUP.paused(args.command == "once"):
        from senderd.logs import configure_logging

        level = args.log_level or ("info" if args.command in DAEMON_COMMANDS else "error")
        configure_logging(level, args.log_format, stream=sys.stdout if args.command == "run" else sys.stderr)
        return run_command(args)
