"""The TIW-code → gRPC-code table, the failures → gRPC-code table, and the rich statuses built
from failures; the README's tables are these tables."""

from __future__ import annotations

import pathlib
import re

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from support.rich_status import unpack_details
from tiw_facade.errors import (
    ERROR_TABLE,
    FACADE_DOMAIN,
    FAILURE_CODES,
    MAX_TIW_TEXT_BYTES,
    MAX_TOKEN_BYTES,
    TIW_DOMAIN,
    bounded,
    grpc_code_for,
    status_for,
)
from tiw_facade.failures import (
    FACADE_FAILURES,
    FacadeError,
    InvalidRequest,
    MalformedRequest,
    Outcome,
    RateLimited,
    ShuttingDown,
    TiwError,
    Unexpected,
    UpstreamConnectionLost,
    UpstreamHttpError,
    UpstreamMalformed,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from tiw_facade.validate import Violation

README = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()

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
        TiwError("InvalidParameter.TaskNotFound", "task not found", "req-1"), action="DescribeWhiteboardPush"
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
    status = status_for(TiwError("Brand.NewCode", "new", "r"), action="A")
    assert status.code is C.UNKNOWN
    _, (info,) = details(status)
    assert isinstance(info, error_details_pb2.ErrorInfo) and info.reason == "Brand.NewCode"


@pytest.mark.parametrize(
    ("exc", "code", "reason", "metadata"),
    [
        (
            UpstreamHttpError(502),
            C.UNAVAILABLE,
            "UPSTREAM_HTTP_ERROR",
            {"http_status": "502", "outcome": "unknown"},
        ),
        (
            UpstreamHttpError(302),
            C.UNAVAILABLE,
            "UPSTREAM_HTTP_ERROR",
            {"http_status": "302", "outcome": "unknown"},
        ),
        (
            UpstreamMalformed("not an envelope", request_id="req-3"),
            C.UNAVAILABLE,
            "UPSTREAM_MALFORMED",
            {"request_id": "req-3", "outcome": "unknown"},
        ),
        (UpstreamUnreachable("refused"), C.UNAVAILABLE, "UPSTREAM_UNREACHABLE", {"outcome": "not_sent"}),
        (UpstreamConnectionLost("reset"), C.UNAVAILABLE, "UPSTREAM_CONNECTION_LOST", {"outcome": "unknown"}),
        (UpstreamTimeout("slow"), C.DEADLINE_EXCEEDED, "UPSTREAM_TIMEOUT", {"outcome": "unknown"}),
        (
            UpstreamTimeout("no time left", outcome=Outcome.NOT_SENT),
            C.DEADLINE_EXCEEDED,
            "UPSTREAM_TIMEOUT",
            {"outcome": "not_sent"},
        ),
        (ShuttingDown(), C.UNAVAILABLE, "SHUTTING_DOWN", {"outcome": "not_sent"}),
        (ZeroDivisionError("a bug"), C.INTERNAL, "INTERNAL", {}),
    ],
)
def test_facade_failures(
    exc: Exception, code: grpc.StatusCode, reason: str, metadata: dict[str, str]
) -> None:
    status = status_for(exc, action="DescribeSnapshotTask")
    assert status.code is code
    _, (info,) = details(status)
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.reason == reason and info.domain == FACADE_DOMAIN
    assert dict(info.metadata) == {"action": "DescribeSnapshotTask", **metadata}


def test_reasons_are_upper_snake_case_and_distinct() -> None:
    reasons = [kind.reason for kind in FACADE_FAILURES]
    assert all(re.fullmatch(r"[A-Z]+(_[A-Z]+)*", reason) for reason in reasons)
    assert len(set(reasons)) == len(reasons)


def test_tiw_errors_have_tiw_s_domain_wherever_tiw_is() -> None:
    _, (info,) = details(status_for(TiwError("InternalError", "oops", "r"), action="A"))
    assert isinstance(info, error_details_pb2.ErrorInfo) and info.domain == TIW_DOMAIN


def test_a_subclass_gets_its_nearest_ancestor_s_code() -> None:
    class Newer(UpstreamTimeout):
        pass

    assert status_for(Newer("slow"), action="A").code is C.DEADLINE_EXCEEDED
    assert status_for(FacadeError("bare"), action="A").code is C.INTERNAL


@pytest.mark.parametrize("text", ["x" * 20_000, "超时" * 5_000])
def test_tiw_text_is_bounded(text: str) -> None:
    status = status_for(TiwError("FailedOperation", text, "r"), action="A")
    proto, _ = details(status)
    for copied in (status.details, proto.message):
        assert copied.endswith("…")
        assert len(copied.encode()) <= MAX_TIW_TEXT_BYTES
        assert text.startswith(copied[:-1])
    assert bounded("short") == "short"


def _trailer_bytes(status: grpc.Status) -> int:
    """What the status costs in HTTP/2 trailers: grpc-message percent-encoded (every byte outside
    printable ASCII, and %, takes three), the details base64-encoded."""
    message = sum(1 if 0x20 <= b <= 0x7E and b != 0x25 else 3 for b in status.details.encode())
    ((_, value),) = status.trailing_metadata
    return message + (len(value) + 2) // 3 * 4


def test_a_hostile_tiw_error_fits_in_the_trailers() -> None:
    # 10 KB of everything TIW's envelope could carry, Chinese (which percent-encoding triples).
    huge = "推" * 10_000
    status = status_for(TiwError("FailedOperation." + "A" * 10_000, huge, huge), action="A")
    _, (info,) = details(status)
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert len(status.details.encode()) <= MAX_TIW_TEXT_BYTES
    assert len(info.reason.encode()) <= MAX_TOKEN_BYTES
    assert len(info.metadata["request_id"].encode()) <= MAX_TOKEN_BYTES
    # gRPC refuses trailers beyond 8 KiB by default, other headers included.
    assert _trailer_bytes(status) < 6 * 1024


@pytest.mark.parametrize("text", ["bad \ud800 surrogate", "\udfff" * 2_000])
def test_text_that_is_not_utf8_still_makes_a_status(text: str) -> None:
    # JSON's "\ud800" decodes to a lone surrogate, which protobuf and gRPC refuse to encode.
    status = status_for(TiwError("FailedOperation", text, text), action="A")
    _, (info,) = details(status)
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert "?" in status.details and "?" in info.metadata["request_id"]
    assert bounded(text).encode()  # encodable


def test_quota_exceeded_has_retry_info_and_quota_failure() -> None:
    status = status_for(RateLimited("CreateSnapshotTask", "deadline", 0.75), action="CreateSnapshotTask")
    assert status.code is C.RESOURCE_EXHAUSTED
    _, found = details(status)
    retry = next(d for d in found if isinstance(d, error_details_pb2.RetryInfo))
    quota = next(d for d in found if isinstance(d, error_details_pb2.QuotaFailure))
    assert retry.retry_delay.seconds == 0 and retry.retry_delay.nanos == 750_000_000
    assert quota.violations[0].subject == "action:CreateSnapshotTask"


def test_invalid_argument_has_bad_request() -> None:
    status = status_for(
        InvalidRequest([Violation("COS.Uin", "is required"), Violation("RoomId", "must be greater than 0")]),
        action="CreateSnapshotTask",
    )
    assert status.code is C.INVALID_ARGUMENT
    _, (bad, info) = details(status)
    assert isinstance(info, error_details_pb2.ErrorInfo) and info.reason == "INVALID_REQUEST"
    assert isinstance(bad, error_details_pb2.BadRequest)
    assert [(v.field, v.description) for v in bad.field_violations] == [
        ("COS.Uin", "is required"),
        ("RoomId", "must be greater than 0"),
    ]


def test_every_row_applies_to_its_own_codes() -> None:
    # The lookup takes the exact row, else the longest family, so no row shadows another whatever
    # the order they are listed in: each row decides the codes it names.
    for pattern, code in ERROR_TABLE:
        sample = pattern[:-1] + ".Sample" if pattern.endswith("*") else pattern
        assert grpc_code_for(sample) is code, pattern


def readme_table(after: str) -> list[list[str]]:
    """The first table after the text ``after`` in the README's Errors section."""
    section = README.split("## Errors\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.split(after, 1)[1].splitlines() if line.startswith("|")]
    _, _, *body = rows
    table = []
    for line in body:
        if line.count("|") != rows[0].count("|"):
            break
        table.append([cell.strip() for cell in line.strip("|").split("|")])
    return table


def test_readme_failure_table_is_the_code_table() -> None:
    rows = readme_table("The facade's own failures")
    expected = []
    for kind in FACADE_FAILURES:
        code = next(FAILURE_CODES[k] for k in kind.__mro__ if k in FAILURE_CODES)
        outcome = {
            UpstreamTimeout: "`unknown` or `not_sent`",
            Unexpected: "—",
            InvalidRequest: "—",
            MalformedRequest: "—",
        }.get(kind, f"`{kind.outcome}`" if kind.outcome else "—")
        expected.append([f"`{kind.reason}`", f"`{code.name}`", outcome])
    assert [row[:3] for row in rows] == expected
