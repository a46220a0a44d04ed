"""The TIW-code → gRPC-code table, and the rich statuses built from failures."""

from __future__ import annotations

import grpc
import pytest
from conftest import unpack_details
from google.rpc import error_details_pb2, status_pb2
from tiw_facade.errors import ERROR_TABLE, grpc_code_for, invalid_argument, status_for
from tiw_facade.limiter import QuotaExceeded
from tiw_facade.upstream import TiwError, TransportError, UpstreamTimeout
from tiw_facade.validate import Violation

C = grpc.StatusCode


@pytest.mark.parametrize(
    ("tiw_code", "expected"),
    [
        ("InvalidParameter.TaskNotFound", C.NOT_FOUND),
        ("InvalidParameter", C.INVALID_ARGUMENT),
        ("InvalidParameter.BodyParameterTypeUnmatched", C.INVALID_ARGUMENT),
        ("InvalidParameter.SdkAppIdNotFound", C.INVALID_ARGUMENT),
        ("InvalidParameterValue", C.INVALID_ARGUMENT),
        ("InvalidParameterValue.Whatever", C.INVALID_ARGUMENT),
        ("MissingParameter", C.INVALID_ARGUMENT),
        ("UnknownParameter", C.INVALID_ARGUMENT),
        ("RequestLimitExceeded", C.RESOURCE_EXHAUSTED),
        ("RequestLimitExceeded.UinLimitExceeded", C.RESOURCE_EXHAUSTED),
        ("LimitExceeded", C.RESOURCE_EXHAUSTED),
        ("UnauthorizedOperation", C.PERMISSION_DENIED),
        ("UnauthorizedOperation.SdkAppId", C.PERMISSION_DENIED),
        ("ResourceUnavailable.NotRegistered", C.FAILED_PRECONDITION),
        ("ResourceUnavailable.ServiceExpired", C.FAILED_PRECONDITION),
        ("UnsupportedOperation.TaskHasAlreadyStopped", C.FAILED_PRECONDITION),
        ("FailedOperation.WhiteboardPush", C.FAILED_PRECONDITION),
        ("FailedOperation.Record", C.FAILED_PRECONDITION),
        ("AuthFailure", C.INTERNAL),
        ("AuthFailure.SignatureFailure", C.INTERNAL),
        ("AuthFailure.SignatureExpire", C.INTERNAL),
        ("InternalError", C.UNAVAILABLE),
        ("InternalError.DbError", C.UNAVAILABLE),
        ("ServiceUnavailable", C.UNAVAILABLE),
        ("InvalidAction", C.UNKNOWN),
        ("NoSuchVersion", C.UNKNOWN),
        ("ServiceUnavailableish", C.UNKNOWN),  # an exact row matches only itself
        ("ResourceNotFound", C.UNKNOWN),
    ],
)
def test_table(tiw_code: str, expected: grpc.StatusCode) -> None:
    assert grpc_code_for(tiw_code) is expected


def details(status: grpc.Status) -> tuple[status_pb2.Status, list[object]]:
    ((key, value),) = status.trailing_metadata
    assert key == "grpc-status-details-bin"
    proto = status_pb2.Status.FromString(value)
    return proto, list(unpack_details(proto).values())


def test_tiw_error_carries_error_info() -> None:
    status = status_for(
        TiwError("InvalidParameter.TaskNotFound", "task not found", "req-1"),
        action="DescribeWhiteboardPush",
        host="tiw.tencentcloudapi.com",
    )
    assert status.code is C.NOT_FOUND
    assert status.details == "task not found"
    proto, (info,) = details(status)
    assert proto.code == C.NOT_FOUND.value[0]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.reason == "InvalidParameter.TaskNotFound"
    assert info.domain == "tiw.tencentcloudapi.com"
    assert dict(info.metadata) == {"request_id": "req-1", "action": "DescribeWhiteboardPush"}


def test_unknown_tiw_code_is_unknown_with_error_info() -> None:
    status = status_for(TiwError("Brand.NewCode", "new", "r"), action="A", host="h")
    assert status.code is C.UNKNOWN
    _, (info,) = details(status)
    assert isinstance(info, error_details_pb2.ErrorInfo) and info.reason == "Brand.NewCode"


@pytest.mark.parametrize(
    ("exc", "code", "reason"),
    [
        (TransportError("HTTP_502", "TIW answered HTTP 502", delivered=True), C.UNAVAILABLE, "HTTP_502"),
        (
            TransportError("MalformedResponse", "not an envelope", delivered=True),
            C.UNAVAILABLE,
            "MalformedResponse",
        ),
        (TransportError("ConnectionError", "refused", delivered=False), C.UNAVAILABLE, "ConnectionError"),
        (UpstreamTimeout("slow"), C.DEADLINE_EXCEEDED, "Timeout"),
    ],
)
def test_transport_failures(exc: Exception, code: grpc.StatusCode, reason: str) -> None:
    status = status_for(exc, action="DescribeSnapshotTask", host="h")
    assert status.code is code
    _, (info,) = details(status)
    assert isinstance(info, error_details_pb2.ErrorInfo) and info.reason == reason


def test_quota_exceeded_has_retry_info_and_quota_failure() -> None:
    status = status_for(
        QuotaExceeded("CreateSnapshotTask", "deadline", 0.75), action="CreateSnapshotTask", host="h"
    )
    assert status.code is C.RESOURCE_EXHAUSTED
    _, found = details(status)
    retry = next(d for d in found if isinstance(d, error_details_pb2.RetryInfo))
    quota = next(d for d in found if isinstance(d, error_details_pb2.QuotaFailure))
    assert retry.retry_delay.seconds == 0 and retry.retry_delay.nanos == 750_000_000
    assert quota.violations[0].subject == "action:CreateSnapshotTask"


def test_invalid_argument_has_bad_request() -> None:
    status = invalid_argument(
        [Violation("COS.Uin", "is required"), Violation("RoomId", "must be greater than 0")]
    )
    assert status.code is C.INVALID_ARGUMENT
    _, (bad,) = details(status)
    assert isinstance(bad, error_details_pb2.BadRequest)
    assert [(v.field, v.description) for v in bad.field_violations] == [
        ("COS.Uin", "is required"),
        ("RoomId", "must be greater than 0"),
    ]


def test_the_table_has_no_shadowed_rows() -> None:
    # A row that an earlier row already matches would never apply.
    for index, (pattern, _) in enumerate(ERROR_TABLE):
        sample = pattern.rstrip("*")
        earlier = ERROR_TABLE[:index]
        assert not any((p.endswith("*") and sample.startswith(p[:-1])) or p == sample for p, _ in earlier), (
            f"{pattern} is shadowed"
        )
