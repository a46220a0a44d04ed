"""Every failure the facade can answer with, as a rich gRPC status (google.rpc.Status).

Two tables, both rendered in the README: TIW's error codes → gRPC codes (``ERROR_TABLE``), and the
facade's own failures, by class → gRPC code (``FAILURE_CODES``). Every status carries a
``google.rpc.ErrorInfo``: ``reason`` is TIW's code verbatim for TIW's errors and the facade's
UPPER_SNAKE_CASE reason for its own; ``domain`` is ``tiw.tencentcloudapi.com`` or ``tiw-facade``,
the same in every environment; ``metadata`` has the action and, where known, TIW's RequestId, the
outcome (``not_sent``: safe to retry; ``unknown``: TIW may have executed it) and the HTTP status.
Invalid input adds BadRequest; the rate limit adds RetryInfo and QuotaFailure.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from tiw_facade import failures

log = logging.getLogger("tiw_facade.errors")

TIW_DOMAIN = "tiw.tencentcloudapi.com"  # TIW's codes: the API's name, not this deployment's endpoint
FACADE_DOMAIN = "tiw-facade"

# TIW error code → gRPC code. "X*" matches every code that starts with X. Row order does not matter:
# an exact row beats every family, and a longer family beats a shorter one.
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
FALLBACK_CODE = grpc.StatusCode.UNKNOWN  # a TIW code the table does not know

_EXACT = {pattern: code for pattern, code in ERROR_TABLE if not pattern.endswith("*")}
_FAMILIES = sorted(
    ((pattern[:-1], code) for pattern, code in ERROR_TABLE if pattern.endswith("*")),
    key=lambda row: len(row[0]),
    reverse=True,
)

# The facade's own failures → gRPC code, looked up along the failure's MRO (so order cannot matter).
FAILURE_CODES: dict[type[failures.FacadeError], grpc.StatusCode] = {
    failures.FacadeError: grpc.StatusCode.INTERNAL,
    failures.InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    failures.CallerMismatch: grpc.StatusCode.PERMISSION_DENIED,
    failures.NotAuthorized: grpc.StatusCode.PERMISSION_DENIED,
    failures.AuthenticationFailed: grpc.StatusCode.UNAUTHENTICATED,
    # The facade cannot check any token: its own trouble, which a retry (elsewhere) may outlast.
    failures.KeysUnavailable: grpc.StatusCode.UNAVAILABLE,
    failures.IdempotencyKeyReused: grpc.StatusCode.INVALID_ARGUMENT,
    failures.IdempotencyInFlight: grpc.StatusCode.DEADLINE_EXCEEDED,
    failures.OutcomeUnknown: grpc.StatusCode.FAILED_PRECONDITION,
    # Not UNAVAILABLE: retrying as is cannot help until the caller has looked for the task.
    failures.IdempotencyRecordsLost: grpc.StatusCode.FAILED_PRECONDITION,
    failures.IdempotencyUnavailable: grpc.StatusCode.UNAVAILABLE,
    failures.RateLimited: grpc.StatusCode.RESOURCE_EXHAUSTED,
    failures.ShuttingDown: grpc.StatusCode.UNAVAILABLE,
    failures.TooManyWatches: grpc.StatusCode.RESOURCE_EXHAUSTED,
    failures.CursorExpired: grpc.StatusCode.OUT_OF_RANGE,
    failures.EventsUnavailable: grpc.StatusCode.UNAVAILABLE,
    failures.UpstreamFailure: grpc.StatusCode.UNAVAILABLE,
    failures.UpstreamTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    failures.Unexpected: grpc.StatusCode.INTERNAL,
}

# TIW's text is copied into the status message and ErrorInfo; bounded, because the status travels in
# the trailers and a trailer above gRPC's metadata limit (8 KiB by default) turns the real code
# into RESOURCE_EXHAUSTED. Bytes of UTF-8: a Chinese message triples in size, and more when
# percent-encoded into grpc-message.
MAX_TIW_TEXT_BYTES = 1024
# ErrorInfo's reason and metadata values (TIW's code, its RequestId) are tokens, not prose: an
# answer where they are long is hostile, and the trailers carry them besides the message.
MAX_TOKEN_BYTES = 256
ELLIPSIS = "…"


@functools.lru_cache(maxsize=512)
def grpc_code_for(tiw_code: str) -> grpc.StatusCode:
    """The gRPC code for a TIW error code, by ``ERROR_TABLE``."""
    exact = _EXACT.get(tiw_code)
    if exact is not None:
        return exact
    for prefix, code in _FAMILIES:
        if tiw_code.startswith(prefix):
            return code
    return FALLBACK_CODE


def bounded(text: str, limit: int = MAX_TIW_TEXT_BYTES) -> str:
    """``text`` cut to at most ``limit`` bytes of UTF-8 (at a character boundary), marked with an ellipsis.

    What cannot be UTF-8 (a lone surrogate, which JSON's ``\\ud800`` makes) becomes ``?``: protobuf
    and gRPC would refuse the whole status otherwise, and the caller get a bare UNKNOWN.
    """
    encoded = text.encode(errors="replace")
    if len(encoded) <= limit:
        return text if text.isascii() else encoded.decode()
    cut = limit - len(ELLIPSIS.encode())
    return encoded[:cut].decode(errors="ignore") + ELLIPSIS


def build_status(code: grpc.StatusCode, message: str, details: Iterable[object] = ()) -> grpc.Status:
    """A grpc.Status carrying a google.rpc.Status with ``details`` (packed into Any unless they are)."""
    packed = [detail if isinstance(detail, any_pb2.Any) else _pack(detail) for detail in details]
    proto = status_pb2.Status(code=_rpc_code(code), message=message, details=packed)
    status: grpc.Status = rpc_status.to_status(proto)
    return status


def answer(context: grpc.aio.ServicerContext[Any, Any], status: grpc.Status) -> None:
    """End the call (or stream, after what it sent) with ``status``. Setting it and returning, rather
    than ``abort_with_status``, spares grpc.aio raising and unwinding an exception through every
    frame: a quarter of the CPU of a call answered without going upstream (bench/RESULTS.md, local
    path)."""
    context.set_code(status.code)
    context.set_details(status.details)
    context.set_trailing_metadata(status.trailing_metadata)


def status_for(exc: BaseException, *, action: str) -> grpc.Status:
    """The status a caller gets for a failure of ``action``."""
    if not isinstance(exc, failures.FacadeError):
        log.error("unexpected failure", exc_info=exc, extra={"action": action})
        exc = failures.Unexpected(exc)
    return _builder(type(exc))(exc, action)


Builder = Callable[[failures.FacadeError, str], grpc.Status]


def _builder(kind: type[failures.FacadeError]) -> Builder:
    """The builder of the nearest class along ``kind``'s MRO (FacadeError's at worst)."""
    return next(_BUILDERS[klass] for klass in kind.__mro__ if klass in _BUILDERS)


def _error_info(
    exc: failures.FacadeError, action: str, domain: str = FACADE_DOMAIN
) -> error_details_pb2.ErrorInfo:
    metadata = {key: bounded(value, MAX_TOKEN_BYTES) for key, value in exc.metadata().items()}
    return error_details_pb2.ErrorInfo(
        reason=bounded(exc.reason, MAX_TOKEN_BYTES), domain=domain, metadata={"action": action, **metadata}
    )


def _tiw_error(exc: failures.FacadeError, action: str) -> grpc.Status:
    assert isinstance(exc, failures.TiwError)
    code = grpc_code_for(exc.code)
    if code == grpc.StatusCode.INTERNAL:
        log.error(
            "TIW rejected the facade's credentials or signature: check TENCENTCLOUD_SECRET_ID/KEY "
            "and the clock",
            extra={"action": action, "tiw_code": exc.code, "tiw_request_id": exc.request_id},
        )
    return build_status(code, bounded(exc.message or exc.code), [_error_info(exc, action, TIW_DOMAIN)])


def _facade_error(exc: failures.FacadeError, action: str) -> grpc.Status:
    code = next(FAILURE_CODES[k] for k in type(exc).__mro__ if k in FAILURE_CODES)
    return build_status(code, bounded(str(exc)), [_error_info(exc, action)])


def _invalid_request(exc: failures.FacadeError, action: str) -> grpc.Status:
    assert isinstance(exc, failures.InvalidRequest)
    violations = [
        error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
        for field, description in exc.violations
    ]
    return build_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        str(exc),
        [error_details_pb2.BadRequest(field_violations=violations), _error_info(exc, action)],
    )


def _rate_limited(exc: failures.FacadeError, action: str) -> grpc.Status:
    assert isinstance(exc, failures.RateLimited)
    seconds = exc.retry_after
    delay = duration_pb2.Duration(seconds=int(seconds), nanos=int((seconds % 1) * 1e9))
    why = _WHY.get(exc.limiter_reason, exc.limiter_reason)
    return build_status(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"{exc.action}: rate limit, {why}; retry in {seconds:.3f}s",
        [error_details_pb2.RetryInfo(retry_delay=delay), *_quota_details(exc.action, exc.limiter_reason)],
    )


@functools.lru_cache(maxsize=64)
def _quota_details(action: str, reason: str) -> tuple[any_pb2.Any, any_pb2.Any]:
    """QuotaFailure and ErrorInfo of a refusal, packed once: they depend only on action and reason,
    and callers over the limit are refused in bulk."""
    why = _WHY.get(reason, reason)
    quota = error_details_pb2.QuotaFailure(
        violations=[
            error_details_pb2.QuotaFailure.Violation(
                subject=f"action:{action}",
                description=f"TIW allows a limited number of {action} requests per second; {why}",
            )
        ]
    )
    info = error_details_pb2.ErrorInfo(
        reason=failures.RateLimited.reason,
        domain=FACADE_DOMAIN,
        metadata={"action": action, "limiter_reason": reason, "outcome": "not_sent"},
    )
    return _pack(quota), _pack(info)


_BUILDERS: dict[type[failures.FacadeError], Builder] = {
    failures.FacadeError: _facade_error,
    failures.TiwError: _tiw_error,
    failures.InvalidRequest: _invalid_request,
    failures.RateLimited: _rate_limited,
}


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
