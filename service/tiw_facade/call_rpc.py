"""The shell client's one exchange (``tiw-facade call``): a TiwService call or a TaskWatcher stream,
the request read from TIW's JSON and each answer printed as TIW's JSON.

The answer is printed as TIW writes its ``Response`` object: TIW's names, integers as JSON integers,
every field of the message, zero values included. A field the contract marks ``optional`` (or a
message) is left out when absent: TIW sends those as null or not at all, and the facade cannot tell
the two apart either.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Iterable
from types import FrameType
from typing import Any

import grpc
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message

from tiw_facade._proto.tiw.facade.v1 import watcher_pb2_grpc
from tiw_facade._proto.tiw.v20190919 import tiw_pb2_grpc

# The initial metadata `-v` prints: where a Describe answer came from and how old it is.
ANSWER_METADATA = ("tiw-source", "tiw-age-ms")


class UsageError(ValueError):
    """The command line or the JSON is wrong; the message says what, in one line."""


def unary(
    channel: grpc.Channel,
    method: MethodDescriptor,
    request: Message,
    *,
    timeout: float,
    metadata: list[tuple[str, str | bytes]],
    verbose: bool,
) -> None:
    """Call ``method`` once and print its answer as indented JSON (with_call: the answer's metadata)."""
    stub = tiw_pb2_grpc.TiwServiceStub(channel)
    answer, call = getattr(stub, method.name).with_call(request, timeout=timeout, metadata=metadata)
    if verbose:
        print_answer_metadata(call)
    print(json.dumps(to_json(answer), indent=2, ensure_ascii=False))


def stream(
    channel: grpc.Channel,
    watch: MethodDescriptor,
    request: Message,
    *,
    timeout: float | None,
    metadata: list[tuple[str, str | bytes]],
    verbose: bool,
) -> None:
    """Watch the task ``request`` describes: one compact JSON line per state, until the stream ends.

    No deadline unless given: a task may run for hours, and the stream ends by itself when it is done.
    """
    watch_request = message_factory.GetMessageClass(watch.input_type)(request=request)
    stub = watcher_pb2_grpc.TaskWatcherStub(channel)
    answers = getattr(stub, watch.name)(watch_request, timeout=timeout, metadata=metadata)
    # Ctrl-C cancels the stream (grpc's own cancellation example does the same) instead of raising
    # KeyboardInterrupt wherever the main thread happens to be, inside grpc's iterator or a print:
    # the iterator then ends with CANCELLED, which is the user's doing, not an error to print.
    interrupted = threading.Event()

    def cancel(signum: int, frame: FrameType | None) -> None:
        interrupted.set()
        answers.cancel()

    previous = signal.signal(signal.SIGINT, cancel)
    try:
        if verbose:
            print_answer_metadata(answers)
        for answer in answers:
            # Flushed: whoever reads the pipe (jq, a script) sees each state when it happens.
            print(json.dumps(to_json(answer), ensure_ascii=False, separators=(",", ":")), flush=True)
    except grpc.RpcError:
        if interrupted.is_set():
            raise KeyboardInterrupt from None
        raise
    finally:
        signal.signal(signal.SIGINT, previous)


def print_answer_metadata(call: grpc.Call) -> None:
    for key, value in answer_metadata(call.initial_metadata() or ()):
        print(f"{key}: {value}", file=sys.stderr)


def answer_metadata(metadata: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The entries of ``metadata`` -v shows, in ANSWER_METADATA's order (text: no key ends in -bin)."""
    given = dict(metadata)
    return [(key, given[key]) for key in ANSWER_METADATA if key in given]


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
