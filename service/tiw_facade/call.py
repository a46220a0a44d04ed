"""`tiw-facade call ACTION 'JSON'`: one TiwService call from a shell, in TIW's JSON both ways.

The request is TIW's JSON (its parameter names, the contract's ``json_name``; 64-bit integers as
numbers or strings, as ``buf curl`` takes them); the answer is printed as TIW writes it
(``call_rpc``).

The facade's request metadata goes with ``--metadata KEY=VALUE`` and its shorthands (``--max-age``,
``--caller``, ``--idempotency-key``); ``-v`` prints where the answer came from (its initial metadata
``tiw-source`` and ``tiw-age-ms``) on stderr, so stdout stays the answer alone. ``--watch`` asks a
Describe action's TaskWatcher stream instead and prints each state as one JSON line until the task
ends.

A failed call prints its gRPC code, message and every detail of its google.rpc.Status in words to
stderr (``call_errors``). Exit status: 0 answered, 1 the call failed (any gRPC status), 2 the command
line or the JSON is wrong, 130 interrupted (Ctrl-C). Only the package's runtime dependencies are
used: it works right after ``make serve``.

This module is the command line: its flags, the metadata they make, and the exit status.
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from typing import TextIO

import grpc
from google.protobuf.descriptor import MethodDescriptor

from tiw_facade._proto.tiw.facade.v1 import watcher_pb2
from tiw_facade._proto.tiw.v20190919 import tiw_pb2
from tiw_facade.call_errors import describe_error
from tiw_facade.call_rpc import (
    ANSWER_METADATA,
    UsageError,
    parse_request,
    print_answer_metadata,
    stream,
    unary,
)

DEFAULT_TARGET = "localhost:50051"
DEFAULT_TIMEOUT = 10.0

EXIT_FAILED = 1  # the facade (or the channel) answered a gRPC error
EXIT_USAGE = 2  # what the user typed is wrong; nothing was sent
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports it

_SERVICE = tiw_pb2.DESCRIPTOR.services_by_name["TiwService"]
METHODS: dict[str, MethodDescriptor] = {method.name: method for method in _SERVICE.methods}
ACTIONS: tuple[str, ...] = tuple(METHODS)

# The watch method of each Describe action: the TaskWatcher method whose request holds that action's
# request in its `request` field (watcher.proto's convention), found rather than listed.
_WATCHER = watcher_pb2.DESCRIPTOR.services_by_name["TaskWatcher"]
WATCHES: dict[str, MethodDescriptor] = {
    describe.name: watch
    for watch in _WATCHER.methods
    for describe in _SERVICE.methods
    if watch.input_type.fields_by_name["request"].message_type is describe.input_type
}

# The flags that name one metadata key of the facade's (README, "Calling it"): dest -> key.
SHORTHANDS: dict[str, str] = {
    "max_age": "tiw-max-age-ms",
    "caller": "tiw-caller",
    "idempotency_key": "idempotency-key",
}

# What gRPC itself accepts (the facade checks its own keys' values): a key of lowercase letters,
# digits, `-`, `_` and `.`; a value of printable ASCII. A `-bin` key's value is bytes: sent as UTF-8.
_METADATA_KEY = re.compile(r"[0-9a-z_.-]+")
_METADATA_VALUE = re.compile(r"[\x20-\x7e]*")


# `tiw-facade call --help`.
_WATCH_HELP = (
    f"--watch, with {', '.join(WATCHES)}, streams the task's states instead (tiw.facade.v1.TaskWatcher): "
    "one JSON line per state until its final one."
)
DESCRIPTION = f"""\
Call one action of a running tiw-facade and print the answer as TIW's JSON.

{textwrap.fill("ACTION is one of " + ", ".join(ACTIONS) + ".", 100)}
JSON is the request with TIW's parameter names, e.g.
  tiw-facade call DescribeWhiteboardPush '{{"SdkAppId": 1400000001, "TaskId": "ghucnligqtgtvk2624mb"}}'
(64-bit integers as numbers or strings). The answer has TIW's names, integers as integers and every
field, zero values included; a field TIW may leave null is left out when absent.

Request metadata: --metadata KEY=VALUE (repeatable), or --max-age MS (tiw-max-age-ms), --caller NAME
(tiw-caller), --idempotency-key KEY (idempotency-key). -v prints the answer's tiw-source and
tiw-age-ms on stderr, e.g.
  tiw-facade call -v --max-age 0 DescribeSnapshotTask '{{"SdkAppId": 1400123480, "TaskID": "…"}}'
{textwrap.fill(_WATCH_HELP, 100)}

A failed call prints its gRPC code, message and every detail (ErrorInfo, BadRequest, RetryInfo,
QuotaFailure, ...) to stderr. Exit status: 0 answered (a watch: the task ended), 1 the call failed,
2 wrong command line or JSON, 130 interrupted by Ctrl-C.
"""


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
        help=f"deadline of the call in seconds ({DEFAULT_TIMEOUT:g}; a --watch has none unless given)",
    )
    metadata = parser.add_argument_group("request metadata (sent with the call)")
    metadata.add_argument(
        "--metadata",
        metavar="KEY=VALUE",
        type=_metadata_pair,
        action="append",
        default=[],
        help="one metadata entry, e.g. tiw-max-age-ms=0; repeatable",
    )
    metadata.add_argument(
        "--max-age", metavar="MS", type=_metadata_value, help="tiw-max-age-ms: oldest answer accepted"
    )
    metadata.add_argument("--caller", metavar="NAME", type=_metadata_value, help="tiw-caller: who calls")
    metadata.add_argument(
        "--idempotency-key",
        metavar="KEY",
        type=_metadata_value,
        help="idempotency-key: a CreateSnapshotTask retried with it is not done twice",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help=f"print the answer's {' and '.join(ANSWER_METADATA)} (initial metadata) on stderr",
    )
    parser.add_argument(
        "--watch",
        action="store_true",
        help=f"with {', '.join(WATCHES)}: stream the task's states, one JSON line each, until it ends",
    )


def main(args: argparse.Namespace, stdin: TextIO = sys.stdin) -> int:
    try:
        method = _method(args.action)
        watch = _watch_method(method) if args.watch else None
        if not args.target:
            raise UsageError("--target is empty; give host:port, e.g. localhost:50051")
        text = stdin.read() if args.request == "-" else args.request
        request = parse_request(method, text)
    except UsageError as exc:
        print(f"tiw-facade call: {exc}", file=sys.stderr)
        return EXIT_USAGE
    metadata = request_metadata(args)
    try:
        with grpc.insecure_channel(args.target) as channel:
            if watch is None:
                timeout = args.timeout or DEFAULT_TIMEOUT
                unary(channel, method, request, timeout=timeout, metadata=metadata, verbose=args.verbose)
            else:
                stream(channel, watch, request, timeout=args.timeout, metadata=metadata, verbose=args.verbose)
    except grpc.RpcError as error:
        if args.verbose and watch is None:  # a failure has metadata too (a stream's is printed already)
            print_answer_metadata(error)
        for line in describe_error(error):
            print(line, file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:  # Ctrl-C while waiting: leaving the channel cancels the call; no traceback
        return EXIT_INTERRUPTED
    return 0


def request_metadata(args: argparse.Namespace) -> list[tuple[str, str | bytes]]:
    """--metadata entries in their order, then the shorthands given."""
    entries: list[tuple[str, str | bytes]] = list(args.metadata)
    entries += [
        (key, getattr(args, dest)) for dest, key in SHORTHANDS.items() if getattr(args, dest) is not None
    ]
    return entries


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds: {text!r}")
    return value


def _metadata_pair(text: str) -> tuple[str, str | bytes]:
    """KEY=VALUE as gRPC sends it; argparse turns the error into a usage error (exit 2, nothing sent)."""
    key, equals, value = text.partition("=")
    if not equals:
        raise argparse.ArgumentTypeError(f"not KEY=VALUE: {text!r}")
    if not _METADATA_KEY.fullmatch(key):
        raise argparse.ArgumentTypeError(
            f"invalid metadata key {key!r}: gRPC takes lowercase letters, digits, '-', '_' and '.'"
        )
    if key.startswith("grpc-"):
        raise argparse.ArgumentTypeError(f"metadata key {key!r}: the grpc- prefix is gRPC's own")
    if key.endswith("-bin"):
        return key, value.encode()
    return key, _metadata_value(value)


def _metadata_value(text: str) -> str:
    if not _METADATA_VALUE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"not printable ASCII, as gRPC metadata must be: {text!r}")
    return text


def _method(action: str) -> MethodDescriptor:
    method = METHODS.get(action)
    if method is None:
        raise UsageError(f"unknown action {action!r}; the actions are: {', '.join(ACTIONS)}")
    return method


def _watch_method(method: MethodDescriptor) -> MethodDescriptor:
    watch = WATCHES.get(method.name)
    if watch is None:
        raise UsageError(f"--watch takes a Describe action ({', '.join(WATCHES)}), not {method.name}")
    return watch
