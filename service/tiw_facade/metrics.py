"""The facade's Prometheus metrics: one object per server, with its own registry.

gRPC server metrics follow go-grpc-prometheus exactly (names, label names, Go-spelled codes), so the
dashboards and alerts operators already have keep working. Upstream and limiter metrics are ours
(`tiw_` prefix). Series for the five actions are created at start-up, so dashboards have no gaps.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import inspect
import logging
import platform
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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

GRPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")


class Metrics:
    """Every metric the facade exports, registered in ``self.registry``."""

    def __init__(self, version: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry

        # --- gRPC server (go-grpc-prometheus) ---
        self.grpc_started = Counter(
            "grpc_server_started_total",
            "Total number of RPCs started on the server.",
            GRPC_LABELS,
            registry=r,
        )
        self.grpc_handled = Counter(
            "grpc_server_handled_total",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            (*GRPC_LABELS, "grpc_code"),
            registry=r,
        )
        self.grpc_msg_received = Counter(
            "grpc_server_msg_received_total",
            "Total number of RPC stream messages received on the server.",
            GRPC_LABELS,
            registry=r,
        )
        self.grpc_msg_sent = Counter(
            "grpc_server_msg_sent_total",
            "Total number of gRPC stream messages sent by the server.",
            GRPC_LABELS,
            registry=r,
        )
        self.grpc_handling_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level handled "
            "by the server.",
            GRPC_LABELS,
            buckets=HANDLING_BUCKETS,
            registry=r,
        )

        # --- upstream (TIW) ---
        self.upstream_requests = Counter(
            "tiw_upstream_requests_total",
            "Requests sent to TIW, by action and outcome (the TIW error code, OK, or a transport failure).",
            ("action", "code"),
            registry=r,
        )
        self.upstream_duration = Histogram(
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
        self.limiter_admitted = Counter(
            "tiw_limiter_admitted_total",
            "Upstream attempts admitted by the rate limiter.",
            ("action",),
            registry=r,
        )
        self.limiter_rejected = Counter(
            "tiw_limiter_rejected_total",
            "Calls refused by the rate limiter, by reason (deadline, max_wait, queue_full).",
            ("action", "reason"),
            registry=r,
        )
        self.limiter_wait_seconds = Histogram(
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
            "Errors talking to the limiter's shared backend (Redis).",
            registry=r,
        )

        self.build_info = Gauge(
            "tiw_facade_build_info", "Build information; value 1.", ("version", "python_version"), registry=r
        )
        self.build_info.labels(version=version, python_version=platform.python_version()).set(1)

    def prime(self, service: str, methods: Iterable[str], limit: int, backend: str) -> None:
        """Create every series that dashboards and alerts rely on, before the first call."""
        for method in methods:
            labels = {"grpc_type": "unary", "grpc_service": service, "grpc_method": method}
            self.grpc_started.labels(**labels)
            self.grpc_msg_received.labels(**labels)
            self.grpc_msg_sent.labels(**labels)
            self.grpc_handling_seconds.labels(**labels)
            self.grpc_handled.labels(**labels, grpc_code="OK")
            action = method  # RPCs are named exactly as the TIW actions
            self.upstream_requests.labels(action=action, code="OK")
            self.upstream_duration.labels(action=action)
            self.limiter_admitted.labels(action=action)
            self.limiter_wait_seconds.labels(action=action)
            self.limiter_queue_depth.labels(action=action).set(0)
            self.limiter_limit.labels(action=action).set(limit)
            self.limiter_paused.labels(action=action)
        self.limiter_backend.labels(backend=backend).set(1)
        self.limiter_degraded.set(0)


@dataclasses.dataclass(slots=True)
class CallRecord:
    """What the handler learns about a call that the log line reports (set through CURRENT_CALL)."""

    action: str = ""
    request_id: str = ""


CURRENT_CALL: contextvars.ContextVar[CallRecord] = contextvars.ContextVar("tiw_facade_call")


class _MethodSeries:
    """The metric children of one method, bound once: labels() on every call is avoidable work."""

    def __init__(self, metrics: Metrics, grpc_type: str, service: str, method: str) -> None:
        labels = {"grpc_type": grpc_type, "grpc_service": service, "grpc_method": method}
        self.started = metrics.grpc_started.labels(**labels)
        self.received = metrics.grpc_msg_received.labels(**labels)
        self.sent = metrics.grpc_msg_sent.labels(**labels)
        self.seconds = metrics.grpc_handling_seconds.labels(**labels)
        self.handled = {
            code: metrics.grpc_handled.labels(**labels, grpc_code=name)
            for code, name in GO_CODE_NAMES.items()
        }


class RpcObserver(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc is untyped
    """go-grpc-prometheus metrics and one structured log line for every RPC.

    Written by hand because py-grpc-prometheus is sync-only and spells its labels differently.
    """

    def __init__(
        self, metrics: Metrics, log: logging.Logger, quiet_services: frozenset[str] = frozenset()
    ) -> None:
        self._metrics = metrics
        self._log = log
        self._quiet = quiet_services  # health and reflection: logged at DEBUG, probes are frequent
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = await continuation(handler_call_details)
            if handler is None:
                return handler
            wrapped = self._wrapped[method] = self._wrap(method, handler)
        return wrapped

    def _wrap(self, full_method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        service, _, method = full_method.lstrip("/").rpartition("/")
        level = logging.DEBUG if service in self._quiet else logging.INFO
        if handler.unary_unary is not None:
            series = _MethodSeries(self._metrics, "unary", service, method)
            inner = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                # The hot path, so no context manager here: its generator costs ~10% of a call
                # answered locally. Same bookkeeping as _observe.
                started, record, token = _begin(series)
                error: BaseException | None = None
                try:
                    return await inner(request, context)
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    CURRENT_CALL.reset(token)
                    code = _outcome(context, error)
                    if code is grpc.StatusCode.OK:
                        series.sent.inc()
                    self._record(
                        series,
                        record,
                        code=code,
                        elapsed=time.perf_counter() - started,
                        method=full_method,
                        level=level,
                    )

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        # Streaming RPCs here are only health Watch and reflection: count and log them, pass through.
        kind = "server_stream" if handler.unary_stream is not None else "bidi_stream"
        stream_inner = handler.unary_stream or handler.stream_stream
        if stream_inner is None or handler.stream_unary is not None:
            return handler
        series = _MethodSeries(self._metrics, kind, service, method)

        async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            async with self._observe(series, context, full_method, level):
                result = stream_inner(request, context)
                if inspect.isawaitable(result):
                    await result
                else:
                    async for item in result:
                        series.sent.inc()
                        yield item

        factory = (
            grpc.unary_stream_rpc_method_handler
            if kind == "server_stream"
            else grpc.stream_stream_rpc_method_handler
        )
        return factory(
            stream,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    @contextlib.asynccontextmanager
    async def _observe(
        self, series: _MethodSeries, context: grpc.aio.ServicerContext[Any, Any], method: str, level: int
    ) -> AsyncIterator[None]:
        started, record, token = _begin(series)
        error: BaseException | None = None
        try:
            yield
        except BaseException as exc:
            error = exc
            raise
        finally:
            CURRENT_CALL.reset(token)
            self._record(
                series,
                record,
                code=_outcome(context, error),
                elapsed=time.perf_counter() - started,
                method=method,
                level=level,
            )

    def _record(
        self,
        series: _MethodSeries,
        record: CallRecord,
        *,
        code: grpc.StatusCode,
        elapsed: float,
        method: str,
        level: int,
    ) -> None:
        series.handled[code].inc()
        series.seconds.observe(elapsed)
        if self._log.isEnabledFor(level):
            self._log.log(
                level,
                "rpc",
                extra={
                    "grpc_method": method,
                    "grpc_code": code.name,
                    "duration_ms": round(elapsed * 1000, 3),
                    "tiw_action": record.action or None,
                    "tiw_request_id": record.request_id or None,
                },
            )


def _begin(series: _MethodSeries) -> tuple[float, CallRecord, contextvars.Token[CallRecord]]:
    """Start observing one RPC: its clock, its record for the log line, its counters."""
    record = CallRecord()
    token = CURRENT_CALL.set(record)
    series.started.inc()
    series.received.inc()
    return time.perf_counter(), record, token


def _outcome(context: grpc.aio.ServicerContext[Any, Any], error: BaseException | None) -> grpc.StatusCode:
    """The status an RPC ended with: what the handler set on its context, else what its end implies."""
    if isinstance(error, asyncio.CancelledError):  # the caller's deadline passed, or the caller left
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= 0
        return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
    fallback = grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN
    return _status_code(context.code()) or fallback


_CODES_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


def _status_code(value: object) -> grpc.StatusCode | None:
    """context.code() gives a StatusCode, a raw int, or None depending on how the call ended."""
    if isinstance(value, grpc.StatusCode):
        return value
    if isinstance(value, int):
        return _CODES_BY_VALUE.get(value)
    return None
