"""The facade's Prometheus metrics: one object per server, with its own registry.

gRPC server metrics follow go-grpc-prometheus exactly (names, label names, Go-spelled codes), so the
dashboards and alerts operators already have keep working, and like it no ``_created`` series.
Upstream and limiter metrics are ours (`tiw_` prefix). ``prime`` creates every series of the five
actions at start-up, with every retry and rejection reason (of the open-ended upstream codes, OK),
so dashboards and alerts have no gaps.

The counters and histograms that every call updates (the gRPC server's, the answers' sources and
ages, the upstream's and the limiter's per attempt) are ``LoopCounter`` and ``LoopHistogram``:
exported exactly as prometheus_client's, updated without its lock and checks.
"""

from __future__ import annotations

import bisect
import math
import platform
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from tiw_facade import failures, shared_redis

if TYPE_CHECKING:  # the children's classes; prometheus_client types them as their parents'
    CounterChild = Counter
    GaugeChild = Gauge

# go-grpc-prometheus spells codes as Go's codes.Code.String() does.
GO_CODE_NAMES: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.OK: "OK",
    grpc.StatusCode.CANCELLED: "Canceled",
    grpc.StatusCode.UNKNOWN: "Unknown",
    grpc.StatusCode.INVALID_ARGUMENT: "InvalidArgument",
    grpc.StatusCode.DEADLINE_EXCEEDED: "DeadlineExceeded",
    grpc.StatusCode.NOT_FOUND: "NotFound",
    grpc.StatusCode.ALREADY_EXISTS: "AlreadyExists",
    grpc.StatusCode.PERMISSION_DENIED: "PermissionDenied",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "ResourceExhausted",
    grpc.StatusCode.FAILED_PRECONDITION: "FailedPrecondition",
    grpc.StatusCode.ABORTED: "Aborted",
    grpc.StatusCode.OUT_OF_RANGE: "OutOfRange",
    grpc.StatusCode.UNIMPLEMENTED: "Unimplemented",
    grpc.StatusCode.INTERNAL: "Internal",
    grpc.StatusCode.UNAVAILABLE: "Unavailable",
    grpc.StatusCode.DATA_LOSS: "DataLoss",
    grpc.StatusCode.UNAUTHENTICATED: "Unauthenticated",
}

# go-grpc-prometheus's default buckets (prometheus.DefBuckets).
HANDLING_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Waiting for a rate-limit slot is measured in fractions of the 1-second window, up to the max wait.
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)

# The age of an answer given to a caller: 0 from upstream, up to TIW_MAX_STALE_ON_SATURATION.
AGE_BUCKETS = (0.0, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0)

GRPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")

# Where an answer to a Describe call came from (``tiw_answers_total``'s source; the ``tiw-source``
# metadata of the answer): TIW just now, another call's request to TIW, or the cache.
ANSWER_SOURCES: tuple[str, ...] = ("upstream", "coalesced", "cache")
# Why a cached answer left the process's cache (``tiw_cache_evictions_total``'s reason).
EVICTION_REASONS: tuple[str, ...] = ("expired", "capacity", "invalidated")
# The same counter's reason for an answer this replica deleted from the shared answers' Redis to keep
# their share within TIW_SHARED_ANSWERS_MAX_BYTES: a reason of its own, since it is not this
# process's cache. Its series is made at start-up by the shared store (answers/_shared.py), so it
# exists whenever answers are shared, the only case in which it can count.
SHARED_EVICTION_REASON = "shared_capacity"
REFRESH_OUTCOMES: tuple[str, ...] = ("ok", "failed")

# Why an attempt is sent again (``tiw_upstream_retries_total``'s reason), the one list ``prime``
# creates series for: the TIW codes retries.py retries (its NOT_EXECUTED families, and InternalError
# where resending is safe), and the facade's failures to get an answer, named as failures.py names
# them. tests/test_metrics.py checks that a retry of each kind adds no series.
RETRY_REASONS: tuple[str, ...] = (
    "RequestLimitExceeded",
    "AuthFailure.SignatureExpire",
    "InternalError",
    *(
        failure.reason
        for failure in (
            failures.UpstreamTimeout,
            failures.UpstreamUnreachable,
            failures.UpstreamConnectionLost,
            failures.UpstreamHttpError,
        )
    ),
)
# ``tiw_limiter_rejected_total``'s reasons: the values of ``limiter.Reason``. A test keeps the two
# equal; importing the limiter here would make it and this module depend on each other.
REJECT_REASONS: tuple[str, ...] = ("deadline", "max_wait", "queue_full")

# The roles of tiw_store_errors_total (the limiter's errors have a counter of their own).
STORE_ROLES: tuple[shared_redis.Role, ...] = ("answers", "idempotency", "events")
# tiw_store_invalid_total's (role, what): data read from Redis that failed its check and was dropped.
# A test keeps these equal to answers._shared.INVALID_WHATS; importing it here would load protobuf.
STORE_INVALID: tuple[tuple[str, str], ...] = (
    *(("answers", what) for what in ("time", "fields", "payload", "key", "stamp", "schedule", "type")),
    ("limiter", "epoch"),
)

# The intake's paths (``tiw_callbacks_total``'s kind): /callbacks/<kind>; ``other`` for any other path.
CALLBACK_KINDS: tuple[str, ...] = ("push", "snapshot", "video")
# ``tiw_callbacks_total``'s result: taken, already taken (a replay or TIW's retry), or why it was
# refused. callbacks.py's Refusal values; a test keeps the two equal.
CALLBACK_RESULTS: tuple[str, ...] = (
    "accepted",
    "replayed",
    "bad_sign",
    "expired",
    "too_far_ahead",
    "unknown_app",
    "too_large",
    "bad_method",
    "not_found",
    "bad_json",
    "bad_fields",
    "unavailable",
)
# ``tiw_callback_confirms_total``'s outcome: a confirming Describe sent; one folded into the next
# (within TIW_CALLBACK_CONFIRM_INTERVAL of the task's last); none sent (no quota, or TIW failed).
CONFIRM_OUTCOMES: tuple[str, ...] = ("sent", "deferred", "failed")

# go-grpc-prometheus (client_golang) exports no ``_created`` series; prometheus_client would add one
# per counter and histogram child. The switch is process-wide and read at each scrape.
disable_created_metrics()  # type: ignore[no-untyped-call]


class CounterValue:
    """One series of a ``LoopCounter``: ``inc()`` as a prometheus_client child's."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class HistogramValue:
    """One series of a ``LoopHistogram``: ``observe()`` as a prometheus_client child's."""

    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0.0] * len(bounds)  # per bucket, not cumulative: one increment an observation
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        self.sum += amount
        # The first bucket whose bound is >= amount, as prometheus_client's ``amount <= bound``.
        self.counts[bisect.bisect_left(self._bounds, amount)] += 1.0


class _LoopMetric(Collector):
    """A labelled metric whose series are updated without a lock, registered as a collector.

    prometheus_client's ``inc()`` and ``observe()`` take a lock and check their argument: 0.6 and
    1.1 µs, and every RPC makes five (the interceptor's), an answer from the cache two more, an
    attempt upstream six more. These take 0.07 and 0.15 µs. No lock is needed: every update is made
    on the event loop's thread; the metrics page's thread only reads (a float, whole, under the
    GIL) and copies what it iterates. ``labels()`` takes label values by name or by position, as
    prometheus_client's.
    """

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], *, registry: CollectorRegistry
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._series: dict[tuple[str, ...], object] = {}
        registry.register(self)

    def _key(self, values: tuple[object, ...], by_name: dict[str, object]) -> tuple[str, ...]:
        if by_name and not values and set(by_name) == set(self._labelnames):
            return tuple(str(by_name[name]) for name in self._labelnames)
        if values and not by_name and len(values) == len(self._labelnames):
            return tuple(str(value) for value in values)
        raise ValueError(f"{self._name}: the label values of {self._labelnames}, by name or by position")

    def describe(self) -> list[Metric]:
        return [self._family()]

    def _family(self) -> Metric:
        raise NotImplementedError


class LoopCounter(_LoopMetric):
    """A labelled counter of ``CounterValue`` series, exported as prometheus_client's ``Counter``."""

    _series: dict[tuple[str, ...], CounterValue]  # type: ignore[assignment]

    def labels(self, *values: object, **by_name: object) -> CounterValue:
        key = self._key(values, by_name)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = CounterValue()
        return series

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def collect(self) -> list[Metric]:
        family = self._family()
        for key, series in list(self._series.items()):  # a copy: the loop may add a series meanwhile
            family.add_metric(key, series.value)
        return [family]


class LoopHistogram(_LoopMetric):
    """A labelled histogram of ``HistogramValue`` series, exported as prometheus_client's ``Histogram``."""

    _series: dict[tuple[str, ...], HistogramValue]  # type: ignore[assignment]

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        super().__init__(name, documentation, labelnames, registry=registry)
        self._bounds = (*buckets, math.inf)
        self._les = tuple(floatToGoString(bound) for bound in self._bounds)  # type: ignore[no-untyped-call]

    def labels(self, *values: object, **by_name: object) -> HistogramValue:
        key = self._key(values, by_name)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = HistogramValue(self._bounds)
        return series

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def collect(self) -> list[Metric]:
        family = self._family()
        for key, series in list(self._series.items()):
            total, cumulative = 0.0, []
            for le, count in zip(self._les, list(series.counts), strict=True):
                total += count
                cumulative.append((le, total))
            family.add_metric(key, cumulative, series.sum)
        return [family]


class Metrics:
    """Every metric the facade exports, registered in ``self.registry``."""

    def __init__(self, version: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # The one cache of bound children (``labels()`` takes a lock and a dict lookup per call).
        self._actions: dict[str, ActionSeries] = {}
        self._methods: dict[tuple[str, str, str], MethodSeries] = {}
        self._answers: dict[str, AnswerSeries] = {}

        # --- gRPC server (go-grpc-prometheus) ---
        self.grpc_started = LoopCounter(
            "grpc_server_started_total",
            "Total number of RPCs started on the server.",
            GRPC_LABELS,
            registry=r,
        )
        self.grpc_handled = LoopCounter(
            "grpc_server_handled_total",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            (*GRPC_LABELS, "grpc_code"),
            registry=r,
        )
        self.grpc_msg_received = LoopCounter(
            "grpc_server_msg_received_total",
            "Total number of RPC stream messages received on the server.",
            GRPC_LABELS,
            registry=r,
        )
        self.grpc_msg_sent = LoopCounter(
            "grpc_server_msg_sent_total",
            "Total number of gRPC stream messages sent by the server.",
            GRPC_LABELS,
            registry=r,
        )
        self.grpc_handling_seconds = LoopHistogram(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level handled "
            "by the server.",
            GRPC_LABELS,
            buckets=HANDLING_BUCKETS,
            registry=r,
        )

        # --- upstream (TIW) ---
        self.upstream_requests = LoopCounter(
            "tiw_upstream_requests_total",
            "Requests sent to TIW, by action and outcome (the TIW error code, OK, or a transport failure).",
            ("action", "code"),
            registry=r,
        )
        self.upstream_duration = LoopHistogram(
            "tiw_upstream_request_duration_seconds",
            "Duration of one request to TIW (one attempt), by action.",
            ("action",),
            buckets=HANDLING_BUCKETS,
            registry=r,
        )
        self.upstream_retries = Counter(
            "tiw_upstream_retries_total",
            "Attempts re-sent to TIW, by action and reason.",
            ("action", "reason"),
            registry=r,
        )

        # --- limiter ---
        self.limiter_admitted = LoopCounter(
            "tiw_limiter_admitted_total",
            "Upstream attempts admitted by the rate limiter.",
            ("action",),
            registry=r,
        )
        self.limiter_rejected = LoopCounter(
            "tiw_limiter_rejected_total",
            "Calls refused by the rate limiter, by reason (deadline, max_wait, queue_full).",
            ("action", "reason"),
            registry=r,
        )
        self.limiter_wait_seconds = LoopHistogram(
            "tiw_limiter_wait_seconds",
            "Time a call waited for its rate-limit slot.",
            ("action",),
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.limiter_queue_depth = Gauge(
            "tiw_limiter_queue_depth",
            "Calls waiting for a rate-limit slot in this replica.",
            ("action",),
            registry=r,
        )
        self.limiter_limit = Gauge(
            "tiw_limiter_limit",
            "Configured upstream requests per second per action (all replicas).",
            ("action",),
            registry=r,
        )
        self.limiter_paused = Counter(
            "tiw_limiter_pauses_total",
            "Admissions paused because TIW itself answered RequestLimitExceeded.",
            ("action",),
            registry=r,
        )
        # By caller's share, with bounded cardinality: the callers named in TIW_CALLER_WEIGHTS,
        # `unidentified` (every unproven caller not named there), and proven others as `other`.
        self.limiter_caller_admitted = LoopCounter(
            "tiw_limiter_caller_admitted_total",
            "Upstream attempts admitted by the rate limiter, by caller (named in TIW_CALLER_WEIGHTS, "
            "unidentified, or other).",
            ("action", "caller"),
            registry=r,
        )
        self.limiter_caller_rejected = LoopCounter(
            "tiw_limiter_caller_rejected_total",
            "Calls refused by the rate limiter, by caller (named in TIW_CALLER_WEIGHTS, "
            "unidentified, or other) and reason.",
            ("action", "caller", "reason"),
            registry=r,
        )
        self.limiter_caller_wait_seconds = LoopHistogram(
            "tiw_limiter_caller_wait_seconds",
            "Time a call waited for its rate-limit slot, by caller (named in TIW_CALLER_WEIGHTS, "
            "unidentified, or other).",
            ("action", "caller"),
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.limiter_backend = Gauge(
            "tiw_limiter_backend_info",
            "The rate limiter's backend (memory or redis); value 1.",
            ("backend",),
            registry=r,
        )
        self.limiter_degraded = Gauge(
            "tiw_limiter_degraded",
            "1 while the shared (Redis) limiter is unreachable and this replica uses its local share "
            "of the limit.",
            registry=r,
        )
        self.limiter_backend_errors = Counter(
            "tiw_limiter_backend_errors_total",
            "Errors talking to the limiter's shared backend (Redis), by kind: unreachable, timeout, "
            "refused (Redis answered an error: OOM, READONLY...).",
            ("kind",),
            registry=r,
        )
        self.store_errors = Counter(
            "tiw_store_errors_total",
            "Errors talking to the Redis of the answers or idempotency keys, by role and kind: "
            "unreachable, timeout, refused (Redis answered an error: OOM, READONLY...).",
            ("role", "kind"),
            registry=r,
        )
        # Unlabelled: present (0) from start-up, so an alert on its increase sees the first loss.
        self.idempotency_records_lost = Counter(
            "tiw_idempotency_records_lost_total",
            "Times this replica found the idempotency records' Redis had lost them (its marker gone): "
            "keys it has no record of are refused for TIW_IDEMPOTENCY_LOSS_WINDOW.",
            registry=r,
        )
        self.store_invalid = Counter(
            "tiw_store_invalid_total",
            "Data read from Redis that failed its check and was dropped (never used), by role and "
            "what: an answer entry's time, fields, payload, or key (another request's answer); an "
            "invalidation stamp; a refresh schedule member; the limiter's epoch.",
            ("role", "what"),
            registry=r,
        )

        # --- answers (answers/: coalescing, the cache, refreshes, watches) ---
        self.answers = LoopCounter(
            "tiw_answers_total",
            "Answers to Describe calls and watches, by action and source (upstream, coalesced, cache).",
            ("action", "source"),
            registry=r,
        )
        self.answers_stale = Counter(
            "tiw_answers_stale_total",
            "Cached answers given instead of RESOURCE_EXHAUSTED (no rate-limit slot within the deadline).",
            ("action",),
            registry=r,
        )
        self.answer_age = LoopHistogram(
            "tiw_answer_age_seconds",
            "How old TIW's answer was when given to a caller (0 when it came from TIW for this call).",
            ("action",),
            buckets=AGE_BUCKETS,
            registry=r,
        )
        self.cache_entries = Gauge(
            "tiw_cache_entries", "Describe answers kept in this process's cache.", registry=r
        )
        self.cache_evictions = Counter(
            "tiw_cache_evictions_total",
            "Answers dropped from this process's cache, by reason (expired, capacity, invalidated); "
            "shared_capacity: deleted from the shared answers' Redis to stay within its bound.",
            ("reason",),
            registry=r,
        )
        self.refreshes = Counter(
            "tiw_refreshes_total",
            "Cached answers refreshed from TIW with spare quota, by action and outcome (ok, failed).",
            ("action", "outcome"),
            registry=r,
        )
        self.coalesced_waiters = Gauge(
            "tiw_coalesced_waiters",
            "Calls waiting now for the answer to another call's (or replica's) request to TIW.",
            ("action",),
            registry=r,
        )
        self.watches_active = Gauge(
            "tiw_watches_active", "Watch streams open on this replica, by action.", ("action",), registry=r
        )

        self.build_info = Gauge(
            "tiw_facade_build_info", "Build information; value 1.", ("version", "python_version"), registry=r
        )
        self.build_info.labels(version=version, python_version=platform.python_version()).set(1)

        # --- credentials and Tencent's clock (credentials.py, upstream.py) ---
        self.credentials_refreshes = Counter(
            "tiw_credentials_refreshes_total",
            "New credentials taken into use: a new credentials file, or temporary credentials from STS.",
            registry=r,
        )
        self.credentials_refresh_failures = Counter(
            "tiw_credentials_refresh_failures_total",
            "Failed attempts to get new credentials: an invalid credentials file, or a failed STS call.",
            registry=r,
        )
        self.credentials_expiry = Gauge(
            "tiw_credentials_expiry_timestamp_seconds",
            "When the temporary credentials in use expire (Unix time); 0 for a long-term key.",
            registry=r,
        )
        self.upstream_clock_offset = Gauge(
            "tiw_upstream_clock_offset_seconds",
            "Tencent's clock minus this host's, measured from the Date header of TIW's answers.",
            registry=r,
        )

        # --- callers' bearer tokens (authn.py) ---
        self.authn_failures = Counter(
            "tiw_authn_failures_total",
            "Calls refused because of their bearer token (a projected service-account token), by "
            "reason (failures.AuthnReason: MISSING_TOKEN, EXPIRED, WRONG_AUDIENCE...).",
            ("reason",),
            registry=r,
        )

        # --- the authorization policy (authz.py); primed by authz.DecisionCounter with its rules ---
        self.authz_decisions = LoopCounter(
            "tiw_authz_decisions_total",
            "Calls decided by the authorization policy (TIW_AUTHZ_POLICY_FILE), by decision (allow, "
            "deny; would_deny in TIW_AUTHZ_MODE=audit) and rule (the deciding rule's name; none: no "
            "allow rule matched; other: rules past the first 100 names).",
            ("decision", "rule"),
            registry=r,
        )
        # Unlabelled: present (0) from start-up, so an alert on its increase sees the first refusal.
        self.authz_policy_reload_failures = Counter(
            "tiw_authz_policy_reload_failures_total",
            "Versions of the authorization policy file refused (malformed or unreadable): the last "
            "good policy stays in use.",
            registry=r,
        )

        self._callback_metrics(r)

    def _callback_metrics(self, r: CollectorRegistry) -> None:
        """TIW's callbacks (callbacks.py) and the events they carry (events/)."""
        self.callbacks = Counter(
            "tiw_callbacks_total",
            "Callbacks TIW posted to the intake, by kind (push, snapshot, video, other) and result: "
            "accepted, replayed (already taken: TIW's retry or a replay), or why it was refused.",
            ("kind", "result"),
            registry=r,
        )
        self.callback_last_accepted = Gauge(
            "tiw_callback_last_accepted_timestamp_seconds",
            "When this replica last accepted a callback of the kind (Unix time; 0: never).",
            ("kind",),
            registry=r,
        )
        self.callback_confirms = Counter(
            "tiw_callback_confirms_total",
            "Describe requests callbacks asked for, by action and outcome: sent; deferred (within "
            "TIW_CALLBACK_CONFIRM_INTERVAL of the task's last, folded into one at its end); failed.",
            ("action", "outcome"),
            registry=r,
        )
        self.answer_changes = Counter(
            "tiw_answer_changes_total",
            "Answers this replica got from TIW that differ from the one it held before, by action.",
            ("action",),
            registry=r,
        )
        # Unlabelled: present (0) from start-up, so an alert on its increase sees the first refusal.
        self.callback_key_reload_failures = Counter(
            "tiw_callback_key_reload_failures_total",
            "Versions of the callback key file (TIW_CALLBACK_KEY_FILE) refused (malformed, empty or "
            "unreadable): the last good keys stay in use.",
            registry=r,
        )
        self.event_watches_active = Gauge(
            "tiw_event_watches_active", "WatchEvents streams open on this replica.", registry=r
        )

    def prime(self, service: str, methods: Iterable[str], limit: int, backend: str) -> None:
        """Create every series that dashboards and alerts rely on, before the first call."""
        for method in methods:
            self.method("unary", service, method)
            series = self.action(method)  # RPCs are named exactly as the TIW actions
            series.upstream("OK")
            for reason in RETRY_REASONS:
                series.retried(reason)
            for reason in REJECT_REASONS:
                series.rejected(reason)
            series.depth.set(0)
            series.limit.set(limit)
        self.limiter_backend.labels(backend=backend).set(1)
        self.limiter_degraded.set(0)
        for kind in shared_redis.KINDS:
            self.limiter_backend_errors.labels(kind=kind)
            for role in STORE_ROLES:
                self.store_errors.labels(role=role, kind=kind)
        for owner, what in STORE_INVALID:
            self.store_invalid.labels(role=owner, what=what)
        for reason in failures.AuthnReason:
            self.authn_failures.labels(reason=reason.value)

    def prime_answers(self, actions: Iterable[str]) -> None:
        """Create the answer cache's series of the actions it serves, before the first call."""
        for action in actions:
            self.answers_of(action)
            self.watches_active.labels(action=action).set(0)
            self.answer_changes.labels(action=action)
        self.cache_entries.set(0)
        for reason in EVICTION_REASONS:
            self.cache_evictions.labels(reason=reason)

    def prime_callbacks(self, actions: Iterable[str]) -> None:
        """Create the callbacks' series (the intake's, and the confirms of ``actions``)."""
        for kind in CALLBACK_KINDS:
            for result in CALLBACK_RESULTS:
                self.callbacks.labels(kind=kind, result=result)
            self.callback_last_accepted.labels(kind=kind).set(0)
        for action in actions:
            for outcome in CONFIRM_OUTCOMES:
                self.callback_confirms.labels(action=action, outcome=outcome)
        self.event_watches_active.set(0)

    def answers_of(self, action: str) -> AnswerSeries:
        """The bound answer-cache children of one Describe action, made once."""
        series = self._answers.get(action)
        if series is None:
            series = self._answers[action] = AnswerSeries(self, action)
        return series

    @classmethod
    def unobserved(cls) -> Metrics:
        """Metrics nobody scrapes (a registry of their own): for components built without a server,
        so that no code path needs to ask whether there are metrics."""
        return cls("unobserved")

    def action(self, action: str) -> ActionSeries:
        """The bound children of one TIW action (upstream and limiter), made once."""
        series = self._actions.get(action)
        if series is None:
            series = self._actions[action] = ActionSeries(self, action)
        return series

    def method(self, grpc_type: str, service: str, method: str) -> MethodSeries:
        """The bound go-grpc-prometheus children of one RPC method, made once."""
        key = (grpc_type, service, method)
        series = self._methods.get(key)
        if series is None:
            series = self._methods[key] = MethodSeries(self, grpc_type, service, method)
        return series


# Distinct ``code`` label values of tiw_upstream_requests_total per action (TIW documents a few dozen).
MAX_CODES = 100
OTHER_CODE = "OTHER"


class ActionSeries:
    """The metric children of one action. Label values that vary (codes, reasons) are bound on first
    use and kept."""

    __slots__ = (
        "_metrics",
        "_rejected",
        "_retried",
        "_upstream",
        "action",
        "admitted",
        "depth",
        "limit",
        "paused",
        "upstream_duration",
        "wait",
    )

    def __init__(self, metrics: Metrics, action: str) -> None:
        self._metrics = metrics
        self.action = action
        self.admitted: CounterValue = metrics.limiter_admitted.labels(action=action)
        self.wait: HistogramValue = metrics.limiter_wait_seconds.labels(action=action)
        self.depth: GaugeChild = metrics.limiter_queue_depth.labels(action=action)
        self.limit: GaugeChild = metrics.limiter_limit.labels(action=action)
        self.paused: CounterChild = metrics.limiter_paused.labels(action=action)
        self.upstream_duration: HistogramValue = metrics.upstream_duration.labels(action=action)
        self._rejected: dict[str, CounterValue] = {}
        self._upstream: dict[str, CounterValue] = {}
        self._retried: dict[str, CounterChild] = {}

    def rejected(self, reason: str) -> CounterValue:
        child = self._rejected.get(reason)
        if child is None:
            child = self._rejected[reason] = self._metrics.limiter_rejected.labels(
                action=self.action, reason=reason
            )
        return child

    def upstream(self, code: str) -> CounterValue:
        """``tiw_upstream_requests_total`` of one outcome (TIW's code, OK, or a transport failure).

        TIW's codes are its own to add to, so they are label values as they come; but an upstream
        answering ever new codes must not grow the series without bound: past ``MAX_CODES`` distinct
        codes per action, the rest count as ``OTHER``.
        """
        child = self._upstream.get(code)
        if child is None:
            if len(self._upstream) >= MAX_CODES:
                code = OTHER_CODE
                child = self._upstream.get(code)
            if child is None:
                child = self._metrics.upstream_requests.labels(action=self.action, code=code)
                self._upstream[code] = child
        return child

    def retried(self, reason: str) -> CounterChild:
        child = self._retried.get(reason)
        if child is None:
            child = self._retried[reason] = self._metrics.upstream_retries.labels(
                action=self.action, reason=reason
            )
        return child


class AnswerSeries:
    """The answer cache's children of one Describe action, every label value bound at once."""

    __slots__ = ("age", "by_source", "coalesced_waiters", "refreshed", "stale", "watches")

    def __init__(self, metrics: Metrics, action: str) -> None:
        self.by_source: dict[str, CounterValue] = {
            source: metrics.answers.labels(action=action, source=source) for source in ANSWER_SOURCES
        }
        self.stale: CounterChild = metrics.answers_stale.labels(action=action)
        self.age: HistogramValue = metrics.answer_age.labels(action=action)
        self.refreshed: dict[str, CounterChild] = {
            outcome: metrics.refreshes.labels(action=action, outcome=outcome) for outcome in REFRESH_OUTCOMES
        }
        self.coalesced_waiters: GaugeChild = metrics.coalesced_waiters.labels(action=action)
        self.watches: GaugeChild = metrics.watches_active.labels(action=action)

    def served(self, source: str, age: float) -> None:
        self.by_source[source].inc()
        self.age.observe(age)


class MethodSeries:
    """The go-grpc-prometheus children of one RPC method."""

    __slots__ = ("handled", "received", "seconds", "sent", "started")

    def __init__(self, metrics: Metrics, grpc_type: str, service: str, method: str) -> None:
        labels = {"grpc_type": grpc_type, "grpc_service": service, "grpc_method": method}
        self.started: CounterValue = metrics.grpc_started.labels(**labels)
        self.received: CounterValue = metrics.grpc_msg_received.labels(**labels)
        self.sent: CounterValue = metrics.grpc_msg_sent.labels(**labels)
        self.seconds: HistogramValue = metrics.grpc_handling_seconds.labels(**labels)
        self.handled: dict[grpc.StatusCode, CounterValue] = {
            code: metrics.grpc_handled.labels(**labels, grpc_code=name)
            for code, name in GO_CODE_NAMES.items()
        }


class CallerSeries:
    """The limiter's metrics by caller (a ``limiter.CallerObserver``), which sees each call's share
    (``call_record.CURRENT_SHARE``): a name listed in ``known`` (TIW_CALLER_WEIGHTS), ``unidentified`` (every
    unproven, unlisted name together), or a client certificate's name. Certificates are as many as a
    CA issues, so an unlisted one counts as ``other``: labels stay the listed names and these two."""

    # Label values of their own, so TIW_CALLER_WEIGHTS refuses them as caller names: a caller listed
    # so would be counted together with everyone they stand for.
    UNIDENTIFIED = "unidentified"  # calls.UNIDENTIFIED (tests/test_settings.py checks they agree)
    OTHER = "other"

    def __init__(self, metrics: Metrics, known: Iterable[str]) -> None:
        self._metrics = metrics
        self._known = frozenset(known) | {self.UNIDENTIFIED}
        self._admitted: dict[tuple[str, str], tuple[CounterValue, HistogramValue]] = {}
        self._rejected: dict[tuple[str, str, str], CounterValue] = {}

    def _label(self, caller: str) -> str:
        return caller if caller in self._known else self.OTHER

    def admitted(self, action: str, caller: str, wait: float) -> None:
        key = (action, self._label(caller))
        children = self._admitted.get(key)
        if children is None:
            children = self._admitted[key] = (
                self._metrics.limiter_caller_admitted.labels(*key),
                self._metrics.limiter_caller_wait_seconds.labels(*key),
            )
        children[0].inc()
        children[1].observe(wait)

    def refused(self, action: str, caller: str, reason: str) -> None:
        key = (action, self._label(caller), reason)
        child = self._rejected.get(key)
        if child is None:
            child = self._rejected[key] = self._metrics.limiter_caller_rejected.labels(*key)
        child.inc()
