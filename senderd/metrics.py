"""Every senderd metric and every label vocabulary, defined on an injected registry (never at import time).

The metric names, their labels and the vocabularies below are a public interface: dashboards and alert
rules depend on them. Series of declared flows and of every known reason exist at zero from the first
scrape, so `rate()` and alerts work before the first failure.
"""

from __future__ import annotations

import bisect
import platform
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Literal, Protocol, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from senderd import __version__

if TYPE_CHECKING:
    from senderd.auth.token import Token
    from senderd.errors import TokenError

Outcome = Literal[
    "success",
    "http_error",
    "check_failed",
    "timeout",
    "connection_error",
    "auth_error",
    "internal_error",
    "flow_failed",
    "unconfirmed",
]
"""How a send ended: `senderd_sends_total{outcome}` and the `send_finished` log event (`internal_error`: an
exception senderd did not foresee, logged with its traceback as `send_crashed`). A flow with `confirm = "mpl"`
ends `flow_failed` when the runtime accepted the message but its processing log says FAILED, ESCALATED or
CANCELLED, and `unconfirmed` when no final status was found within `confirm_timeout`."""
OUTCOMES: tuple[Outcome, ...] = get_args(Outcome)
ConfirmationStatus = Literal["completed", "failed", "escalated", "cancelled", "pending", "not_found", "api_error"]
"""How a confirmation ended: `senderd_confirmations_total{status}`. The first four are the final MPL statuses;
`pending`: the log still said PROCESSING, RETRY, ABANDONED (or another status that is not final) at the timeout;
`not_found`: no log was found; `api_error`: the MPL API refused or could not be reached (its last answer)."""
CONFIRMATION_STATUSES: tuple[ConfirmationStatus, ...] = get_args(ConfirmationStatus)
TokenFailureReason = Literal[
    "bad_credentials",
    "client_certificate",
    "bad_request",
    "rate_limited",
    "server_error",
    "unreachable",
    "tls_trust",
    "timeout",
    "bad_response",
]
"""Why a token fetch failed: `senderd_auth_failures_total{stage="token",reason}`."""
TOKEN_FAILURE_REASONS: tuple[TokenFailureReason, ...] = get_args(TokenFailureReason)
TRANSIENT_TOKEN_FAILURES: frozenset[str] = frozenset({"timeout", "unreachable", "server_error", "rate_limited"})
"""Token failures that the token server itself may end by the next attempt."""
RuntimeFailureReason = Literal["unauthorized", "forbidden"]
RUNTIME_FAILURE_REASONS: tuple[RuntimeFailureReason, ...] = get_args(RuntimeFailureReason)
SkipReason = Literal["overlap", "queue_full", "late", "claimed_elsewhere"]
"""Why a scheduled tick did not run: `senderd_skipped_ticks_total{reason}`."""
SKIP_REASONS: tuple[SkipReason, ...] = get_args(SkipReason)
DeliveryResult = Literal["delivered", "retry", "paused", "dead"]
"""How one relay delivery round ended: `senderd_relay_deliveries_total{result}`."""
DELIVERY_RESULTS: tuple[DeliveryResult, ...] = get_args(DeliveryResult)
ErrorComponent = Literal["send", "delivery", "job", "relay_api"]
"""Where an unforeseen exception was caught and isolated: `senderd_internal_errors_total{component}`."""
ERROR_COMPONENTS: tuple[ErrorComponent, ...] = get_args(ErrorComponent)
SpoolState = Literal["queued", "in_flight", "delivered", "dead"]
"""A relay message's state: `senderd_spool_messages{state}` and the relay's status API."""
SPOOL_STATES: tuple[SpoolState, ...] = get_args(SpoolState)

SEND_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CONFIRMATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class SpoolReadings(Protocol):
    """What the spool gauges read from the spool at scrape time (a `relay.spool.Spool` is one)."""

    @property
    def counts(self) -> Mapping[SpoolState, int]:
        """Messages by state."""

    @property
    def bytes(self) -> int:
        """Body bytes of the messages held against `max_bytes` (queued, in flight and dead)."""

    @property
    def max_bytes(self) -> int:
        """`relay.max_spool_bytes`."""

    @property
    def max_messages(self) -> int:
        """`relay.max_spool_messages` (queued, in flight and dead count against it)."""


class _SpoolCollector(Collector):
    """`senderd_spool_messages{state}`, `senderd_spool_oldest_message_age_seconds`, the spool's fill and
    capacity, read at scrape time."""

    def __init__(
        self,
        spool: SpoolReadings,
        oldest_age: Callable[[], float],
        unconfigured: Callable[[], int] | None = None,
    ) -> None:
        self.spool = spool
        self.oldest_age = oldest_age
        self.unconfigured = unconfigured

    def collect(self) -> Iterator[GaugeMetricFamily]:
        messages = GaugeMetricFamily("senderd_spool_messages", "Messages in the spool by state.", labels=["state"])
        counts = self.spool.counts
        for state in SPOOL_STATES:
            messages.add_metric([state], counts.get(state, 0))
        yield messages
        yield GaugeMetricFamily(
            "senderd_spool_oldest_message_age_seconds",
            "Age of the oldest message not yet delivered (0 when none waits).",
            value=self.oldest_age(),
        )
        yield GaugeMetricFamily(
            "senderd_spool_bytes",
            "Body bytes of the queued, in-flight and dead messages (what relay.max_spool_bytes bounds).",
            value=self.spool.bytes,
        )
        yield GaugeMetricFamily(
            "senderd_spool_capacity_bytes", "relay.max_spool_bytes: beyond it new messages are refused (503).",
            value=self.spool.max_bytes,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "senderd_spool_capacity_messages",
            "relay.max_spool_messages: queued, in-flight and dead messages beyond it are refused (503).",
            value=self.spool.max_messages,
        )
        if self.unconfigured is not None:
            yield GaugeMetricFamily(
                "senderd_spool_unconfigured_flow_messages",
                "Queued messages of flows not in the configuration now (kept until the flow returns).",
                value=self.unconfigured(),
            )


class FlowSends:
    """One flow's send figures as plain numbers, read by `_SendCollector` at scrape time.

    The event loop is their one writer, so an update is an addition, not prometheus-client's lock per
    counter (four of them a send were a tenth of a send's own cost)."""

    __slots__ = ("attempts", "buckets", "last_success", "outcomes", "seconds")

    def __init__(self) -> None:
        self.outcomes: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        self.buckets = [0] * (len(SEND_BUCKETS) + 1)
        """Sends by duration bucket, not cumulative (the last: beyond the largest bound)."""
        self.seconds = 0.0
        self.last_success = 0.0
        self.attempts: dict[int | None, int] = {}
        """HTTP attempts by status (None: no answer)."""


_SEND_BOUNDS = [*(floatToGoString(bound) for bound in SEND_BUCKETS), "+Inf"]  # type: ignore[no-untyped-call]


class _SendCollector(Collector):
    """`senderd_sends_total`, `senderd_send_duration_seconds`, `senderd_last_success_timestamp_seconds` and
    `senderd_send_attempts_total`, from each flow's `FlowSends`."""

    def __init__(self, flows: dict[str, FlowSends]) -> None:
        self.flows = flows

    def collect(self) -> Iterator[Metric]:
        flows = list(self.flows.items())  # one step under the GIL: a send may add a flow meanwhile
        sends = CounterMetricFamily("senderd_sends", "Finished sends by outcome.", labels=["flow", "outcome"])
        duration = HistogramMetricFamily(
            "senderd_send_duration_seconds", "Time of a whole send, retries included.", labels=["flow"]
        )
        last_success = GaugeMetricFamily(
            "senderd_last_success_timestamp_seconds", "Unix time of the flow's last successful send.", labels=["flow"]
        )
        attempts = CounterMetricFamily(
            "senderd_send_attempts", "HTTP attempts, retries included, by status code.", labels=["flow", "code"]
        )
        for flow, figures in flows:
            for outcome, count in list(figures.outcomes.items()):
                sends.add_metric([flow, outcome], count)
            cumulative, total = [], 0
            for bound, count in zip(_SEND_BOUNDS, list(figures.buckets), strict=True):
                total += count
                cumulative.append((bound, float(total)))
            duration.add_metric([flow], cumulative, figures.seconds)
            last_success.add_metric([flow], figures.last_success)
            for status, count in list(figures.attempts.items()):
                attempts.add_metric([flow, "none" if status is None else str(status)], count)
        yield from (sends, duration, last_success, attempts)


class Metrics:
    """Every senderd metric, registered on `registry`."""

    def __init__(self, registry: CollectorRegistry | None = None, *, process: bool = True) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # `*_created`: a third of the output, unread
        self.registry = registry if registry is not None else CollectorRegistry()
        self._sends: dict[str, FlowSends] = {}
        r = self.registry
        r.register(_SendCollector(self._sends))
        self.auth_failures = Counter(
            "senderd_auth_failures",
            "Authentication failures by credentials set, stage and reason.",
            ["credentials", "stage", "reason"],
            registry=r,
        )
        self.token_fetches = Counter(
            "senderd_token_fetches", "Token requests by credentials set and result.", ["credentials", "result"],
            registry=r,
        )  # fmt: skip
        self.token_fetch_duration = Histogram(
            "senderd_token_fetch_duration_seconds", "Time of one token request.", ["credentials"],
            buckets=TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        self.token_expiry = Gauge(
            "senderd_token_expiry_timestamp_seconds", "Unix time at which the set's current token expires.",
            ["credentials"], registry=r,
        )  # fmt: skip
        self.credentials_ready = Gauge(
            "senderd_credentials_ready",
            "1 while the set holds usable credentials (a valid token, or credentials that need none), else 0.",
            ["credentials"],
            registry=r,
        )
        self.certificate_expiry = Gauge(
            "senderd_client_certificate_expiry_timestamp_seconds",
            "Unix time at which the set's client certificate expires.",
            ["credentials"],
            registry=r,
        )
        self.inflight = Gauge("senderd_inflight_sends", "Sends under way now.", registry=r)
        self.inflight_sends = 0
        """Sends under way now: counted by the engine, read at scrape time (a gauge's lock costs per send)."""
        self.inflight.set_function(lambda: self.inflight_sends)
        self.probes = Counter(
            "senderd_probe_sends",
            "Sends made for /probe (apart from scheduled ones), by outcome.",
            ["flow", "outcome"],
            registry=r,
        )
        self.confirmations = Counter(
            "senderd_confirmations",
            "Deliveries looked up in the Message Processing Log API, by how the lookup ended.",
            ["flow", "status"],
            registry=r,
        )
        self.confirmation_duration = Histogram(
            "senderd_confirmation_duration_seconds",
            "Time from a flow's answer to its confirmed (or unconfirmed) verdict.",
            ["flow"],
            buckets=CONFIRMATION_BUCKETS,
            registry=r,
        )
        self.schedule_lag = Histogram(
            "senderd_schedule_lag_seconds",
            "Start time minus scheduled time.",
            ["flow"],
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.skipped_ticks = Counter(
            "senderd_skipped_ticks", "Scheduled ticks not run, by reason.", ["flow", "reason"], registry=r
        )
        self.flow_interval = Gauge(
            "senderd_flow_interval_seconds",
            "Configured interval of a flow scheduled with `every`.",
            ["flow"],
            registry=r,
        )
        self.config_reload_ok = Gauge(
            "senderd_config_last_reload_successful", "1 if the last configuration (re)load succeeded.", registry=r
        )
        self.rotations = Counter(
            "senderd_credentials_rotations", "Replaced credentials taken into use, or refused, by set.",
            ["credentials", "result"], registry=r,
        )  # fmt: skip
        self.internal_errors = Counter(
            "senderd_internal_errors",
            "Unforeseen exceptions caught and isolated (each is logged with its traceback).",
            ["component"],
            registry=r,
        )
        for component in ERROR_COMPONENTS:
            self.internal_errors.labels(component)
        self.build_info = Gauge(
            "senderd_build_info", "senderd's version and Python's.", ["version", "python"], registry=r
        )
        self.build_info.labels(__version__, platform.python_version()).set(1)
        self.relay_requests: Counter | None = None
        self.relay_deliveries: Counter | None = None
        if process:
            ProcessCollector(registry=r)  # process_* (memory, CPU, fds, start time) on Linux
        self.config_reload_ok.set(1)

    # --- sends ------------------------------------------------------------------------------------------

    def flow_sends(self, flow: str) -> FlowSends:
        """The flow's send figures (made at zero on first use)."""
        figures = self._sends.get(flow)
        if figures is None:
            figures = self._sends[flow] = FlowSends()
        return figures

    def attempt(self, flow: str, status: int | None) -> None:
        """Count one HTTP attempt (`code` = the status, or "none" without an answer)."""
        attempts = self.flow_sends(flow).attempts
        attempts[status] = attempts.get(status, 0) + 1

    def send_finished(self, flow: str, outcome: Outcome, seconds: float, at: float) -> None:
        """Count a finished send of `flow`, its duration, and (when it succeeded) its Unix time `at`."""
        figures = self.flow_sends(flow)
        figures.outcomes[outcome] += 1
        figures.buckets[bisect.bisect_left(SEND_BUCKETS, seconds)] += 1
        figures.seconds += seconds
        if outcome == "success":
            figures.last_success = at

    def declare_flow(self, flow: str, every: float | None, *, confirms: bool = False) -> None:
        """Create the flow's series at zero so that rates and absent() work from the first scrape (with those
        of its confirmations when it `confirms`)."""
        self.flow_sends(flow)
        for reason in SKIP_REASONS:
            self.skipped_ticks.labels(flow, reason)
        if every is not None:
            self.flow_interval.labels(flow).set(every)
        if confirms:
            for status in CONFIRMATION_STATUSES:
                self.confirmations.labels(flow, status)
            self.confirmation_duration.labels(flow)

    def confirmation(self, flow: str, status: ConfirmationStatus, seconds: float) -> None:
        """Count a finished confirmation of a delivery to `flow` and the time it took."""
        self.confirmations.labels(flow, status).inc()
        self.confirmation_duration.labels(flow).observe(seconds)

    def tick_skipped(self, flow: str, reason: SkipReason, count: int = 1) -> None:
        """Count `count` ticks of `flow` that did not run."""
        self.skipped_ticks.labels(flow, reason).inc(count)

    def internal_error(self, component: ErrorComponent) -> None:
        """Count an unforeseen exception that was caught and isolated in `component`."""
        self.internal_errors.labels(component).inc()

    def runtime_auth_failure(self, credentials: str, reason: RuntimeFailureReason) -> None:
        """Count a 401 or 403 from the runtime to a send with credentials set `credentials`."""
        self.auth_failures.labels(credentials, "runtime", reason).inc()

    def declare_set(self, credentials: str) -> None:
        """Create a credentials set's series at zero (every result and known reason)."""
        for result in ("success", "failure"):
            self.token_fetches.labels(credentials, result)
        for reason in TOKEN_FAILURE_REASONS:
            self.auth_failures.labels(credentials, "token", reason)
        for runtime_reason in RUNTIME_FAILURE_REASONS:
            self.auth_failures.labels(credentials, "runtime", runtime_reason)
        for rotation in ("rotated", "refused"):
            self.rotations.labels(credentials, rotation)

    def watch_credentials(self, credentials: str, ready: Callable[[], bool]) -> None:
        """`senderd_credentials_ready{credentials}`, read from `ready()` at scrape time."""
        self.credentials_ready.labels(credentials).set_function(lambda: 1.0 if ready() else 0.0)

    def rotation(self, credentials: str, result: Literal["rotated", "refused"]) -> None:
        """Count a replacement of set `credentials`' credentials, taken into use or refused."""
        self.rotations.labels(credentials, result).inc()

    def certificate_expires(self, credentials: str, at: float) -> None:
        """The set's client certificate expires at Unix time `at`."""
        self.certificate_expiry.labels(credentials).set(at)

    # --- tokens -----------------------------------------------------------------------------------------

    def token_listener(self, credentials: str) -> Callable[[float, Token | None, TokenError | None], None]:
        """A `TokenProvider` listener recording each fetch of set `credentials`: its duration, then the new
        token's expiry or the failure's reason."""
        duration = self.token_fetch_duration.labels(credentials)

        def fetched(seconds: float, token: Token | None, error: TokenError | None) -> None:
            duration.observe(seconds)
            if token is not None:
                self.token_fetches.labels(credentials, "success").inc()
                self.token_expiry.labels(credentials).set(token.expires_at_wall)
            elif error is not None:
                self.token_fetches.labels(credentials, "failure").inc()
                self.auth_failures.labels(credentials, "token", error.reason).inc()

        return fetched

    # --- the relay --------------------------------------------------------------------------------------

    def watch_relay(
        self,
        spool: SpoolReadings,
        oldest_age: Callable[[], float],
        unconfigured: Callable[[], int] | None = None,
    ) -> None:
        """Register the relay's metrics; the spool gauges are read at scrape time from `spool` and the
        callables."""
        r = self.registry
        self.relay_requests = Counter(
            "senderd_relay_requests", "Relay API requests by HTTP status.", ["code"], registry=r
        )
        self.relay_deliveries = Counter(
            "senderd_relay_deliveries", "Relay delivery rounds by result.", ["flow", "result"], registry=r
        )
        r.register(_SpoolCollector(spool, oldest_age, unconfigured))

    def relay_request(self, status: int) -> None:
        """Count one answer of the relay API."""
        if self.relay_requests is not None:
            self.relay_requests.labels(str(status)).inc()

    def relay_delivery(self, flow: str, result: DeliveryResult) -> None:
        """Count one delivery round of a relay message."""
        if self.relay_deliveries is not None:
            self.relay_deliveries.labels(flow, result).inc()

    # --- `senderd once` ---------------------------------------------------------------------------------

    def once_finished(self, *, success: bool, at: float) -> None:
        """The run verdict `once` pushes: `senderd_once_last_run_timestamp_seconds` (Unix time the run
        ended) and `senderd_once_last_run_success` (1 if every flow passed); only in a run's registry."""
        r = self.registry
        Gauge("senderd_once_last_run_timestamp_seconds", "Unix time the last `senderd once` run ended.",
              registry=r).set(at)  # fmt: skip
        Gauge("senderd_once_last_run_success", "1 if every flow of the last `senderd once` run passed, else 0.",
              registry=r).set(1 if success else 0)  # fmt: skip

    # --- the forwarder ----------------------------------------------------------------------------------

    def watch_forward(self, routes: list[str]) -> ForwardMetrics:
        """Register the forwarder's metrics (`routes`: its `allow` patterns, the bounded `route` label)."""
        return ForwardMetrics(self.registry, routes)


FORWARD_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE"})
"""The `method` label of `senderd_forward_requests_total`: these, or "other"."""
FORWARD_NO_ROUTE = "none"
"""The `route` label of a request whose path no `allow` pattern matches (answered 404)."""
FORWARD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ForwardMetrics:
    """`senderd_forward_requests_total{route,method,code}`, `senderd_forward_duration_seconds{route}` and
    `senderd_forward_inflight_requests`."""

    def __init__(self, registry: CollectorRegistry, routes: list[str]) -> None:
        self.requests = Counter(
            "senderd_forward_requests", "Forwarded requests by allow pattern, method and the status answered.",
            ["route", "method", "code"], registry=registry,
        )  # fmt: skip
        self.duration = Histogram(
            "senderd_forward_duration_seconds", "Time of a forwarded request, the answer's streaming included.",
            ["route"], buckets=FORWARD_BUCKETS, registry=registry,
        )  # fmt: skip
        self.inflight = Gauge("senderd_forward_inflight_requests", "Forwarded requests under way.", registry=registry)
        for route in routes:
            self.duration.labels(route)

    def finished(self, route: str, method: str, code: int, seconds: float) -> None:
        """Count one answered request (`code` 0: the app went away before an answer)."""
        label = method if method in FORWARD_METHODS else "other"
        self.requests.labels(route, label, str(code)).inc()
        if route != FORWARD_NO_ROUTE:
            self.duration.labels(route).observe(seconds)
