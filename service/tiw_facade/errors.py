"""Every failure the facade can answer with, as a rich gRPC status (google.rpc.Status).

One table maps TIW error codes to gRPC codes (rendered in the README); builders attach the standard
details callers' libraries already understand: ErrorInfo (the exact TIW code as ``reason``, the TIW
host as ``domain``, RequestId and action in ``metadata``), BadRequest for invalid input, RetryInfo and
QuotaFailure when the rate limit refuses a call.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from tiw_facade.limiter import LimiterClosed, QuotaExceeded
from tiw_facade.upstream import TiwError, TransportError, UpstreamTimeout
from tiw_facade.validate import Violation

log = logging.getLogger("tiw_facade.errors")

FACADE_DOMAIN = "tiw-facade"

# TIW error code → gRPC code, first match wins. "X*" matches every code that starts with X.
# Order matters: the exact code before the family it belongs to.
ERROR_TABLE: tuple[tuple[str, grpc.StatusCode], ...] = (
    ("InvalidParameter.TaskNotFound", grpc.StatusCode.NOT_FOUND),
    ("InvalidParameter*", grpc.StatusCode.INVALID_ARGUMENT),  # also InvalidParameterValue*
    ("MissingParameter*", grpc.StatusCode.INVALID_ARGUMENT),
    ("UnknownParameter*", grpc.StatusCode.INVALID_ARGUMENT),
    ("RequestLimitExceeded*", grpc.StatusCode.RESOURCE_EXHAUSTED),
    ("LimitExceeded*", grpc.StatusCode.RESOURCE_EXHAUSTED),
    ("UnauthorizedOperation*", grpc.StatusCode.PERMISSION_DENIED),
    ("ResourceUnavailable*", grpc.StatusCode.FAILED_PRECONDITION),
    ("UnsupportedOperation*", grpc.StatusCode.FAILED_PRECONDITION),
    ("FailedOperation*", grpc.StatusCode.FAILED_PRECONDITION),
    # The facade's own credentials or clock are wrong, not the caller's: an operator must act.
    ("AuthFailure*", grpc.StatusCode.INTERNAL),
    ("InternalError*", grpc.StatusCode.UNAVAILABLE),
    ("ServiceUnavailable", grpc.StatusCode.UNAVAILABLE),
)
# What is not a TIW error code but still fails a call (see upstream.TransportError):
TRANSPORT_CODE = grpc.StatusCode.UNAVAILABLE  # non-200 HTTP, not a TIW envelope, connection failure
TIMEOUT_CODE = grpc.StatusCode.DEADLINE_EXCEEDED  # upstream time-out or the caller's deadline spent
FALLBACK_CODE = grpc.StatusCode.UNKNOWN


@functools.lru_cache(maxsize=512)
def grpc_code_for(tiw_code: str) -> grpc.StatusCode:
    """The gRPC code for a TIW error code, by ``ERROR_TABLE``."""
    for pattern, code in ERROR_TABLE:
        if (pattern.endswith("*") and tiw_code.startswith(pattern[:-1])) or tiw_code == pattern:
            return code
    return FALLBACK_CODE


def build_status(code: grpc.StatusCode, message: str, details: Iterable[object] = ()) -> grpc.Status:
    """A grpc.Status carrying a google.rpc.Status with ``details`` (packed into Any unless they are)."""
    packed = [detail if isinstance(detail, any_pb2.Any) else _pack(detail) for detail in details]
    proto = status_pb2.Status(code=_rpc_code(code), message=message, details=packed)
    status: grpc.Status = rpc_status.to_status(proto)
    return status


def invalid_argument(found: Iterable[Violation]) -> grpc.Status:
    violations = [
        error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description) for v in found
    ]
    summary = "; ".join(f"{v.field} {v.description}" for v in violations)
    return build_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"invalid request: {summary}",
        [error_details_pb2.BadRequest(field_violations=violations)],
    )


def status_for(exc: Exception, *, action: str, host: str) -> grpc.Status:
    """The status a caller gets for a failure of ``action`` against TIW at ``host``."""
    if isinstance(exc, TiwError):
        code = grpc_code_for(exc.code)
        if code == grpc.StatusCode.INTERNAL:
            log.error(
                "TIW rejected the facade's credentials or signature: check TENCENTCLOUD_SECRET_ID/KEY "
                "and the clock",
                extra={"action": action, "tiw_code": exc.code, "tiw_request_id": exc.request_id},
            )
        metadata = {"action": action, "request_id": exc.request_id}
        info = error_details_pb2.ErrorInfo(reason=exc.code, domain=host, metadata=metadata)
        return build_status(code, exc.message or exc.code, [info])
    if isinstance(exc, QuotaExceeded):
        return _quota_exceeded(exc)
    if isinstance(exc, LimiterClosed):
        info = error_details_pb2.ErrorInfo(
            reason="SHUTTING_DOWN", domain=FACADE_DOMAIN, metadata={"action": action}
        )
        return build_status(
            grpc.StatusCode.UNAVAILABLE, "the facade is shutting down; retry on another replica", [info]
        )
    if isinstance(exc, UpstreamTimeout):
        info = error_details_pb2.ErrorInfo(reason=exc.reason, domain=host, metadata={"action": action})
        return build_status(TIMEOUT_CODE, str(exc), [info])
    if isinstance(exc, TransportError):
        info = error_details_pb2.ErrorInfo(reason=exc.reason, domain=host, metadata={"action": action})
        return build_status(TRANSPORT_CODE, str(exc), [info])
    log.exception("unexpected failure", exc_info=exc, extra={"action": action})
    info = error_details_pb2.ErrorInfo(reason="Unexpected", domain=FACADE_DOMAIN, metadata={"action": action})
    return build_status(FALLBACK_CODE, f"unexpected failure: {type(exc).__name__}", [info])


def _quota_exceeded(exc: QuotaExceeded) -> grpc.Status:
    seconds = max(exc.retry_after, 0.0)
    delay = duration_pb2.Duration(seconds=int(seconds), nanos=int((seconds % 1) * 1e9))
    message = f"{exc.action}: rate limit, {_WHY[exc.reason]}; retry in {seconds:.3f}s"
    return build_status(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        message,
        [error_details_pb2.RetryInfo(retry_delay=delay), *_quota_details(exc.action, exc.reason)],
    )


@functools.lru_cache(maxsize=64)
def _quota_details(action: str, reason: str) -> tuple[any_pb2.Any, any_pb2.Any]:
    """QuotaFailure and ErrorInfo of a refusal, packed once: they depend only on action and reason,
    and callers over the limit are refused in bulk."""
    quota = error_details_pb2.QuotaFailure(
        violations=[
            error_details_pb2.QuotaFailure.Violation(
                subject=f"action:{action}",
                description=f"TIW allows a limited number of {action} requests per second; {_WHY[reason]}",
            )
        ]
    )
    info = error_details_pb2.ErrorInfo(
        reason="RATE_LIMITED", domain=FACADE_DOMAIN, metadata={"action": action, "limiter_reason": reason}
    )
    return _pack(quota), _pack(info)


def _pack(detail: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(detail)  # type: ignore[arg-type]
    return packed


_WHY = {
    "deadline": "the next free slot is beyond the call's deadline",
    "max_wait": "the next free slot is beyond the longest wait allowed (TIW_MAX_QUEUE_WAIT)",
    "queue_full": "too many calls are already waiting (TIW_MAX_QUEUE_LENGTH)",
}


def _rpc_code(code: grpc.StatusCode) -> int:
    value: int = code.value[0]
    return value
