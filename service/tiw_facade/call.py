"""`tiw-facade call ACTION 'JSON'`: one TiwService call from a shell, in TIW's JSON both ways.

The request is TIW's JSON (its parameter names, the contract's ``json_name``; 64-bit integers as
numbers or strings, as ``buf curl`` takes them). The answer is printed as TIW writes its
``Response`` object: TIW's names, integers as JSON integers, every field of the message, zero values
included. A field the contract marks ``optional`` (or a message) is left out when absent: TIW sends
those as null or not at all, and the facade cannot tell the two apart either.

A failed call prints its gRPC code, message and every detail of its google.rpc.Status in words to
stderr. Exit status: 0 answered, 1 the call failed (any gRPC status), 2 the command line or the JSON
is wrong. Only the package's runtime dependencies are used: it works right after ``make serve``.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Callable, Iterator
from typing import Any, TextIO

import grpc
from google.protobuf import json_format, message_factory, text_format
from google.protobuf.any_pb2 import Any as AnyMessage
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tiw_facade._proto.tiw.v20190919 import tiw_pb2, tiw_pb2_grpc

DEFAULT_TARGET = "localhost:50051"
DEFAULT_TIMEOUT = 10.0

EXIT_FAILED = 1  # the facade (or the channel) answered a gRPC error
EXIT_USAGE = 2  # what the user typed is wrong; nothing was sent

_SERVICE = tiw_pb2.DESCRIPTOR.services_by_name["TiwService"]
METHODS: dict[str, MethodDescriptor] = {method.name: method for method in _SERVICE.methods}
ACTIONS: tuple[str, ...] = tuple(METHODS)


# `tiw-facade call --help`.
DESCRIPTION = f"""\
Call one action of a running tiw-facade and print the answer as TIW's JSON.

{textwrap.fill("ACTION is one of " + ", ".join(ACTIONS) + ".", 100)}
JSON is the request with TIW's parameter names, e.g.
  tiw-facade call DescribeWhiteboardPush '{{"SdkAppId": 1400000001, "TaskId": "ghucnligqtgtvk2624mb"}}'
(64-bit integers as numbers or strings). The answer has TIW's names, integers as integers and every
field, zero values included; a field TIW may leave null is left out when absent.

A failed call prints its gRPC code, message and every detail (ErrorInfo, BadRequest, RetryInfo,
QuotaFailure, ...) to stderr. Exit status: 0 answered, 1 the call failed, 2 wrong command line or JSON.
"""


class UsageError(ValueError):
    """The command line or the JSON is wrong; the message says what, in one line."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", metavar="ACTION", help=f"one of {', '.join(ACTIONS)}")
    parser.add_argument(
        "request",
        metavar="JSON",
        help='the request as TIW\'s JSON object, e.g. \'{"SdkAppId": 1400000001, "TaskId": "…"}\'; '
        "- reads it from stdin",
    )
    parser.add_argument(
        "--target", default=DEFAULT_TARGET, help=f"the facade's gRPC address ({DEFAULT_TARGET})"
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_TIMEOUT,
        help=f"deadline of the call in seconds ({DEFAULT_TIMEOUT:g})",
    )


def main(args: argparse.Namespace, stdin: TextIO = sys.stdin) -> int:
    try:
        method = _method(args.action)
        if not args.target:
            raise UsageError("--target is empty; give host:port, e.g. localhost:50051")
        text = stdin.read() if args.request == "-" else args.request
        request = parse_request(method, text)
    except UsageError as exc:
        print(f"tiw-facade call: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        answer = call(args.target, method, request, args.timeout)
    except grpc.RpcError as error:
        for line in describe_error(error):
            print(line, file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:  # Ctrl-C while waiting: the call is cancelled, no traceback
        return 130
    print(json.dumps(to_json(answer), indent=2, ensure_ascii=False))
    return 0


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds: {text!r}")
    return value


def _method(action: str) -> MethodDescriptor:
    method = METHODS.get(action)
    if method is None:
        raise UsageError(f"unknown action {action!r}; the actions are: {', '.join(ACTIONS)}")
    return method


def parse_request(method: MethodDescriptor, text: str) -> Message:
    """The request message of ``method`` from TIW's JSON; unknown names are errors (typos cost a call)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"the request is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"the request must be a JSON object, not {type(data).__name__}")
    request = message_factory.GetMessageClass(method.input_type)()
    try:
        json_format.ParseDict(data, request)
    except json_format.ParseError as exc:
        problem = " ".join(str(exc).split())  # protobuf's message spans lines
        raise UsageError(f"the request does not fit {method.input_type.name}: {problem}") from None
    return request


def call(target: str, method: MethodDescriptor, request: Message, timeout: float) -> Message:
    with grpc.insecure_channel(target) as channel:
        stub = tiw_pb2_grpc.TiwServiceStub(channel)
        answer: Message = getattr(stub, method.name)(request, timeout=timeout)
        return answer


def to_json(message: Message) -> dict[str, Any]:
    """``message`` as TIW writes it: JSON names, every field, integers as integers, absent optionals out.

    Not json_format.MessageToDict: it writes 64-bit integers as strings, which TIW never does.
    """
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        convert = to_json if field.type == FieldDescriptor.TYPE_MESSAGE else _same
        if field.is_repeated:
            out[field.json_name] = [convert(item) for item in value]
        elif not field.has_presence or message.HasField(field.name):
            out[field.json_name] = convert(value)
    return out


def _same(value: Any) -> Any:
    return value


# --- a failed call, in words ---


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
