"""The sending engine: everything one send needs, built once from a config and shared by all callers.

`Engine.open(config)` loads the service key, opens the token session and the runtime session (each
created once and reused), keeps a token fresh in the background, and gives `send(flow)`: a whole delivery
with retries, the confirmation through the Message Processing Log API where the flow asks for it
(`confirm = "mpl"`, by the one shared poller of its `confirm_credentials`), metrics and one log event;
`run_once(flows)` sends each flow once through a bounded pool (the CronJob mode).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio

from senderd.auth.credset import CredentialSet
from senderd.auth.token import TokenProvider
from senderd.clock import Clock, SystemClock
from senderd.config import APPLICATION_ID_HEADER, RECOMMENDED_MAX_BODY, Config, ConfigHolder, FlowConfig
from senderd.confirm import Confirmation, MplPoller
from senderd.errors import ConfigError
from senderd.logs import get_logger
from senderd.metrics import Metrics
from senderd.pool import WorkerPool
from senderd.result import Attempt, SendResult
from senderd.retry import AttemptListener, RetryPolicy, deliver, succeeded_first_time
from senderd.sender import Sender, new_message_id

log = get_logger("sender")
SendListener = Callable[[SendResult], None]


def retry_policy(flow: FlowConfig) -> RetryPolicy:
    """The retry policy that a flow's settings describe."""
    return RetryPolicy(
        retries=flow.retries,
        backoff_initial=flow.backoff_initial,
        backoff_max=flow.backoff_max,
        retry_after_max=flow.retry_after_max,
        deadline=flow.deadline,
        retry_on=frozenset(flow.retry_on),
        replay_safe=not flow.modifying,
    )


@dataclass
class Engine:
    """The credentials sets (each with its token provider and runtime session), senders and metrics of one
    running senderd, over the config in `holder`."""

    holder: ConfigHolder
    sets: dict[str, CredentialSet]
    senders: dict[str, Sender]
    metrics: Metrics
    clock: Clock
    listeners: list[SendListener] = field(default_factory=list)
    confirmers: dict[str, MplPoller] = field(default_factory=dict)
    """The Message Processing Log poller of each credentials set of plan `api`, by set name."""
    _policies: dict[str, tuple[FlowConfig, RetryPolicy, Sender, bytes | None]] = field(default_factory=dict)
    _stopping: anyio.Event = field(default_factory=anyio.Event)
    _large_warned: set[str] = field(default_factory=set)

    @property
    def config(self) -> Config:
        """The configuration in force now (a reload swaps it in the holder)."""
        return self.holder.current

    @property
    def only_set(self) -> CredentialSet:
        """The one sending credentials set of a config with one (the common case; for tools and tests)."""
        sending = [s for s in self.sets.values() if s.purpose == "send"]
        if len(sending) != 1:
            raise ConfigError(f"{self.config.source}: several credentials sets ({', '.join(self.sets)}): name one")
        return sending[0]

    @property
    def tokens(self) -> TokenProvider:
        """The token provider of the one (OAuth) credentials set."""
        tokens = self.only_set.tokens
        if tokens is None:
            raise ConfigError(
                f"credentials set {self.only_set.name!r} sends with {self.only_set.config.auth}: no token"
            )
        return tokens

    @property
    def sender(self) -> Sender:
        """The sender of the one credentials set."""
        return self.senders[self.only_set.name]

    def sender_for(self, flow: FlowConfig) -> Sender:
        """The sender of the set that `flow` sends with."""
        return self.senders[self.config.set_of(flow)]

    def stop_waiting(self) -> None:
        """Senderd is stopping: sends waiting for a token or for their next retry end at once (with what
        they have); exchanges already on the wire finish."""
        self._stopping.set()
        for credential_set in self.sets.values():
            if credential_set.tokens is not None:
                credential_set.tokens.stop()
        for poller in self.confirmers.values():
            poller.stop()

    async def _retry_sleep(self, seconds: float) -> None:
        """The wait before a retry, cut short when senderd stops."""
        if self._stopping.is_set():
            return
        async with anyio.create_task_group() as waits:

            async def until_stopping() -> None:
                await self._stopping.wait()
                waits.cancel_scope.cancel()

            waits.start_soon(until_stopping)
            await self.clock.sleep(seconds)
            waits.cancel_scope.cancel()

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        config: Config,
        *,
        metrics: Metrics | None = None,
        clock: Clock | None = None,
        refresh: bool = True,
    ) -> AsyncIterator[Engine]:
        """Build the engine from `config`: every credentials set opened, each keeping its token fresh in the
        background; sessions close on exit. Raises ConfigError/CredentialsError.

        `refresh=False` leaves the token providers without their background refresher (sends then fetch
        for themselves): for tests that step a fake clock, which a refresher would keep moving.
        """
        clock = clock or SystemClock()
        metrics = metrics or Metrics()
        async with contextlib.AsyncExitStack() as stack:
            sets: dict[str, CredentialSet] = {}
            for name in config.credentials:
                sets[name] = await stack.enter_async_context(
                    CredentialSet.open(name, config, metrics=metrics, clock=clock)
                )
            senders = {
                name: Sender(s.session, s.auth, s.runtime_url, metrics, clock, s.config, name=name)
                for name, s in sets.items()
                if s.purpose == "send"
            }
            confirmers = {
                name: MplPoller(name, s.session, s.auth, s.runtime_url, clock)
                for name, s in sets.items()
                if s.purpose == "api"
            }
            engine = cls(holder=ConfigHolder(config), sets=sets, senders=senders, metrics=metrics, clock=clock,
                         confirmers=confirmers)  # fmt: skip
            error: Exception | None = None
            async with anyio.create_task_group() as background:
                if refresh:
                    for credential_set in sets.values():  # fetches happen here, not in a send that may give up
                        if credential_set.tokens is not None:
                            await background.start(credential_set.tokens.run)
                for poller in confirmers.values():
                    await background.start(poller.run)
                try:
                    yield engine
                except Exception as exc:  # the caller's own error: re-raised as it is, not in a group
                    error = exc
                finally:
                    background.cancel_scope.cancel()
            if error is not None:
                raise error

    def policy(self, flow: FlowConfig) -> RetryPolicy:
        """The flow's retry policy (built once per flow configuration)."""
        return self._of(flow)[1]

    def _of(self, flow: FlowConfig) -> tuple[FlowConfig, RetryPolicy, Sender, bytes | None]:
        """The flow's retry policy, sender and body, found once per flow configuration (finding the set scans
        the config's flows; the body is a pydantic private attribute, slow to read)."""
        cached = self._policies.get(flow.name)
        if cached is None or cached[0] is not flow:  # a reload brings new flow objects
            cached = (flow, retry_policy(flow), self.sender_for(flow), flow.body_bytes())
            self._policies[flow.name] = cached
        return cached

    async def send(
        self,
        flow: FlowConfig,
        *,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        message_id: str | None = None,
        scheduled_at: float | None = None,
        probe: bool = False,
        deadline: float | None = None,
    ) -> SendResult:
        """Deliver to `flow` with its retry policy, then confirm the delivery where the flow asks for it;
        counts, logs and tells the listeners.

        A `probe` send is counted apart (`senderd_probe_sends_total`); `deadline` shortens the flow's own (and
        bounds the confirmation too).
        """
        clock = self.clock
        if scheduled_at is not None:
            self.metrics.schedule_lag.labels(flow.name).observe(max(0.0, clock.monotonic() - scheduled_at))
        ids = flow.message_ids
        if message_id is None and ids is not None:
            message_id = new_message_id() if ids == "auto" else ids
        _, policy, sender, configured = self._of(flow)
        payload = body if body is not None else configured
        if payload is not None and len(payload) > RECOMMENDED_MAX_BODY and flow.name not in self._large_warned:
            self._large_warned.add(flow.name)  # once per flow: the config and the relay warn too
            log.warning("large_body", flow=flow.name, body_mb=round(len(payload) / 2**20),
                        hint="SAP recommends messages of at most 40 MB")  # fmt: skip
        self.metrics.inflight_sends += 1
        if not policy.replay_safe and message_id is not None:  # the id makes a replay recognisable
            policy = dataclasses.replace(policy, replay_safe=True)
        if deadline is not None and deadline < flow.deadline:
            policy = dataclasses.replace(policy, deadline=deadline)
        started = clock.monotonic()
        deadline_at = started + policy.deadline
        try:
            first = await sender.attempt(flow, payload, headers, message_id, timeout=policy.deadline)
            debug = log.is_enabled_for(logging.DEBUG)
            if first.outcome == "success" and not debug:  # the common case, without the retry loop
                result = succeeded_first_time(flow.name, first, clock.monotonic() - started, message_id)
            else:
                result = await deliver(
                    flow.name,
                    lambda: sender.attempt(flow, payload, headers, message_id, timeout=deadline_at - clock.monotonic()),
                    policy,
                    sleep=self._retry_sleep,
                    monotonic=clock.monotonic,
                    message_id=message_id,
                    should_stop=self._stopping.is_set,
                    on_attempt=_log_attempt(flow) if debug else None,
                    first=(first, started),
                )
            if result.ok and flow.confirm == "mpl":
                limit = flow.confirm_timeout
                if deadline is not None:
                    limit = min(limit, max(0.0, started + deadline - clock.monotonic()))
                result = await self._confirmed(flow, result, _sent_id(flow, headers, message_id), limit)
        except Exception as exc:  # a bug, or an error nobody foresaw: this send's outcome, not the daemon's end
            log.exception("send_crashed", flow=flow.name)
            self.metrics.internal_error("send")
            failed = Attempt("internal_error", error=f"internal error: {type(exc).__name__}: {str(exc)[:200]}")
            result = SendResult(flow.name, "internal_error", 1, clock.monotonic() - started, failed, message_id)
        finally:
            self.metrics.inflight_sends -= 1
        self._record(flow, result, probe)
        return result

    async def _confirmed(
        self, flow: FlowConfig, result: SendResult, application_id: str | None, timeout: float
    ) -> SendResult:
        """`result` with the verdict of the Message Processing Log API (`flow_failed`, `unconfirmed`)."""
        assert flow.confirm_credentials is not None, "validated at load"
        poller = self.confirmers.get(flow.confirm_credentials)
        if poller is None:  # a reload made this set an MPL API set: that takes a restart
            confirmation = Confirmation(
                "api_error", error=f"credentials set {flow.confirm_credentials!r} was not opened for the MPL API: "
                "restart senderd to confirm with it"
            )  # fmt: skip
        else:
            confirmation = await poller.confirm(
                flow.name, mpl_id=result.mpl_id, application_id=application_id, timeout=timeout
            )
        self.metrics.confirmation(flow.name, confirmation.status, confirmation.duration)
        outcome = confirmation.outcome
        last = result.last
        if outcome != "success":
            last = dataclasses.replace(last, outcome=outcome, error=confirmation.describe(timeout))
        return dataclasses.replace(result, outcome=outcome, last=last, confirmation=confirmation)

    async def run_once(self, flows: Sequence[FlowConfig]) -> list[SendResult]:
        """Send every flow once through a pool of `pool.workers`; results in the order of `flows`."""
        results: dict[str, SendResult] = {}
        pool = WorkerPool(self.config.pool.workers, max(1, len(flows)))
        async with anyio.create_task_group() as group:
            await group.start(pool.run)
            for flow in flows:

                async def job(flow: FlowConfig = flow) -> None:
                    results[flow.name] = await self.send(flow)

                await pool.put(flow.name, job)
            pool.close()
        return [results[flow.name] for flow in flows]

    def _record(self, flow: FlowConfig, result: SendResult, probe: bool) -> None:
        if probe:
            self.metrics.probes.labels(flow.name, result.outcome).inc()
        else:
            self.metrics.send_finished(flow.name, result.outcome, result.duration, self.clock.time())
        fields: dict[str, object] = {
            "flow": flow.name,
            "method": flow.method,
            "status": result.status,
            "outcome": result.outcome,
            "latency_ms": round(result.duration * 1000, 1),
            "attempts": result.attempts,
        }
        if result.confirmation is not None:
            fields.update(_confirmation_fields(result.confirmation))
        for header, value in result.last.correlation.items():
            fields[_snake(header)] = value
        if result.last.error:
            fields["error"] = result.last.error
        if result.message_id:
            fields["message_id"] = result.message_id
        if probe:
            fields["trigger"] = "probe"
        (log.info if result.ok else log.warning)("send_finished", **fields)
        for listener in self.listeners:
            try:
                listener(result)
            except Exception:  # a hook's bug is not the send's
                log.exception("send_listener_crashed", flow=flow.name)
                self.metrics.internal_error("send")


def _log_attempt(flow: FlowConfig) -> AttemptListener:
    def attempt_finished(attempt: Attempt, number: int, retry_in: float | None) -> None:
        log.debug(
            "attempt_finished",
            flow=flow.name,
            attempt=number,
            status=attempt.status,
            outcome=attempt.outcome,
            error=attempt.error,
            retry_in_s=round(retry_in, 3) if retry_in is not None else None,
        )

    return attempt_finished


def _snake(header: str) -> str:
    return header.lower().replace("-", "_")


def _sent_id(flow: FlowConfig, headers: dict[str, str] | None, message_id: str | None) -> str | None:
    """The `SAP_ApplicationID` the runtime got: a caller's or the flow's own header, else the message id."""
    for given in (headers or {}, flow.headers):
        for name, value in given.items():
            if name.lower() == APPLICATION_ID_HEADER.lower():
                return value
    return message_id


def _confirmation_fields(confirmation: Confirmation | None) -> dict[str, object]:
    if confirmation is None:
        return {}
    fields: dict[str, object] = {
        "confirmation": confirmation.status,
        "confirmation_ms": round(confirmation.duration * 1000, 1),
    }
    if confirmation.mpl_status is not None:
        fields["mpl_status"] = confirmation.mpl_status
    if confirmation.mpl_id is not None:
        fields["sap_messageprocessinglogid"] = confirmation.mpl_id
    return fields
