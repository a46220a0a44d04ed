"""A failed call of the shell client (``tiw-facade call``), in words: its gRPC code, its message and
every detail of its google.rpc.Status (ErrorInfo, BadRequest, RetryInfo, QuotaFailure, the other
standard details), one fact per line for stderr.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf import text_format
from google.protobuf.any_pb2 import Any as AnyMessage
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status


def describe_error(error: grpc.RpcError) -> Iterator[str]:
    """The code, the message and every detail of a failed call's status, one fact per line."""
    code = error.code()
    yield f"error: {code.name if code else 'UNKNOWN'}: {error.details() or '(no message)'}"
    try:
        status = rpc_status.from_call(error)
    except ValueError as exc:  # the details contradict the code: say so, show what there is
        yield f"  (the status details are inconsistent: {exc})"
        return
    if status is None:
        return
    for item in status.details:
        yield from _describe_detail(item)


def _describe_detail(item: AnyMessage) -> Iterator[str]:
    for kind, describe in _DESCRIBERS.items():
        if item.TypeName() == kind.DESCRIPTOR.full_name:
            detail = kind()
            item.Unpack(detail)
            yield from describe(detail)
            return
    yield f"  detail of unknown type {item.type_url} ({len(item.value)} bytes)"


def _error_info(info: error_details_pb2.ErrorInfo) -> Iterator[str]:
    yield f"  ErrorInfo: reason {info.reason}, domain {info.domain}"
    for key in sorted(info.metadata):
        yield f"    {key}: {info.metadata[key]}"


def _bad_request(bad: error_details_pb2.BadRequest) -> Iterator[str]:
    for violation in bad.field_violations:
        extra = _extra(violation, "field", "description")
        yield f"  BadRequest: field {violation.field}: {violation.description}{extra}"


def _retry_info(retry: error_details_pb2.RetryInfo) -> Iterator[str]:
    yield f"  RetryInfo: retry in {retry.retry_delay.ToTimedelta().total_seconds():g} s"


def _quota_failure(quota: error_details_pb2.QuotaFailure) -> Iterator[str]:
    for violation in quota.violations:
        yield (
            f"  QuotaFailure: {violation.subject}: {violation.description}"
            f"{_extra(violation, 'subject', 'description')}"
        )


def _other_standard(detail: Message) -> Iterator[str]:
    # The standard details the facade does not send today: their own field names are plain enough.
    yield f"  {detail.DESCRIPTOR.name}: {text_format.MessageToString(detail, as_one_line=True)}"


def _extra(message: Message, *shown: str) -> str:
    """The fields of ``message`` set beyond those already shown (newer fields of the standard
    details, e.g. QuotaFailure's quota_metric), in parentheses."""
    rest = type(message)()
    rest.CopyFrom(message)
    for name in shown:
        rest.ClearField(name)
    text = text_format.MessageToString(rest, as_one_line=True)
    return f" ({text})" if text else ""


_DESCRIBERS: dict[type[Message], Callable[[Any], Iterator[str]]] = {
    error_details_pb2.ErrorInfo: _error_info,
    error_details_pb2.BadRequest: _bad_request,
    error_details_pb2.RetryInfo: _retry_info,
    error_details_pb2.QuotaFailure: _quota_failure,
    **{
        kind: _other_standard
        for kind in (
            error_details_pb2.PreconditionFailure,
            error_details_pb2.ResourceInfo,
            error_details_pb2.RequestInfo,
            error_details_pb2.Help,
            error_details_pb2.LocalizedMessage,
            error_details_pb2.DebugInfo,
        )
    },
}
