"""Hostile request metadata: values the facade parses (``tiw-max-age-ms``, ``idempotency-key``) far
too long, or in digits of another script. Each is INVALID_ARGUMENT naming the key, before any quota
is taken or anything is sent to TIW, and without an ERROR line (which feeds the internal-errors
alert). Values past gRPC's own metadata limit never reach the facade at all.

gRPC's clients refuse to send a non-ASCII value in a text header; a hand-made HTTP/2 connection
sends it as a hostile client could.
"""

from __future__ import annotations

import asyncio
import logging
import struct

import grpc
import pytest
from google.protobuf.message import Message
from grpc_status import rpc_status
from support.facade import Facade
from support.rich_status import unpack_details
from support.tiw import PUSH_TASK, SDK_APP_ID, create_request, upstream_requests
from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as pb
from tiw_facade.handler import IDEMPOTENCY_KEY, MAX_AGE_DIGITS, MAX_AGE_KEY, SERVICE

DESCRIBE = pb.DescribeWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=PUSH_TASK)
KiB = 1 << 10


def admitted(facade: Facade) -> float:
    """Quota taken: attempts the rate limiter admitted, every action together."""
    registry = facade.server.metrics.registry
    return sum(
        registry.get_sample_value("tiw_limiter_admitted_total", {"action": method.name}) or 0
        for method in SERVICE.methods
    )


def assert_quiet(caplog: pytest.LogCaptureFixture) -> None:
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def access_codes(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.grpc_code for r in caplog.records if r.name == "tiw_facade.rpc"]  # type: ignore[attr-defined]


def violated_field(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)
    assert status is not None
    (violation,) = unpack_details(status)["BadRequest"].field_violations  # type: ignore[attr-defined]
    return str(violation.field)


@pytest.mark.parametrize(
    "value",
    ["5" * 5000, "0" * (MAX_AGE_DIGITS + 1), "9" * 4301],
    ids=["5000-digits", "bound-plus-one-zeros", "past-ints-digit-limit"],
)
async def test_an_over_long_max_age_is_invalid_argument_naming_it_and_costs_nothing(
    facade: Facade, caplog: pytest.LogCaptureFixture, value: str
) -> None:
    caplog.set_level(logging.INFO)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await facade.stub.DescribeWhiteboardPush(DESCRIBE, metadata=((MAX_AGE_KEY, value),), timeout=5)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert violated_field(caught.value) == MAX_AGE_KEY
    assert f"at most {MAX_AGE_DIGITS} ASCII digits" in (caught.value.details() or "")
    assert upstream_requests(facade.emulator) == 0 and admitted(facade) == 0
    assert access_codes(caplog) == ["INVALID_ARGUMENT"]
    assert_quiet(caplog)


async def test_leading_zeros_within_the_bound_are_still_a_max_age(facade: Facade) -> None:
    call = facade.stub.DescribeWhiteboardPush(
        DESCRIBE, metadata=((MAX_AGE_KEY, "0" * MAX_AGE_DIGITS),), timeout=5
    )
    await call
    assert dict(await call.initial_metadata())["tiw-source"] == "upstream"  # 0: asked TIW now
    assert upstream_requests(facade.emulator) == 1


async def test_an_over_long_idempotency_key_is_invalid_argument_naming_it_and_costs_nothing(
    facade: Facade, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await facade.stub.CreateSnapshotTask(
            create_request(), metadata=((IDEMPOTENCY_KEY, "k" * 5000),), timeout=5
        )
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert violated_field(caught.value) == IDEMPOTENCY_KEY
    assert "1 to 255 characters" in (caught.value.details() or "")
    assert upstream_requests(facade.emulator) == 0 and admitted(facade) == 0
    assert access_codes(caplog) == ["INVALID_ARGUMENT"]
    assert_quiet(caplog)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "request_message", "key"),
    [
        ("DescribeWhiteboardPush", DESCRIBE, MAX_AGE_KEY),
        ("CreateSnapshotTask", create_request(), IDEMPOTENCY_KEY),
    ],
)
async def test_a_100_kib_value_is_refused_by_grpc_before_the_facade_sees_it(
    facade: Facade, caplog: pytest.LogCaptureFixture, method: str, request_message: Message, key: str
) -> None:
    # gRPC's server refuses metadata past its hard limit (16 KiB) itself: RESOURCE_EXHAUSTED, with
    # no handler run, so nothing is parsed, counted against a quota, or sent.
    caplog.set_level(logging.INFO)
    call = getattr(facade.stub, method)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(request_message, metadata=((key, "7" * (100 * KiB)),), timeout=5)
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "metadata size exceeds" in (caught.value.details() or "")
    assert upstream_requests(facade.emulator) == 0 and admitted(facade) == 0
    assert access_codes(caplog) == []
    assert_quiet(caplog)


# --- values no gRPC client sends: over a hand-made HTTP/2 connection ---------------------------------


def _hpack_int(value: int, prefix: int) -> bytes:
    limit = (1 << prefix) - 1
    if value < limit:
        return bytes([value])
    out, value = bytearray([limit]), value - limit
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


async def raw_call(port: int, method: str, request: bytes, metadata: list[tuple[bytes, bytes]]) -> bytes:
    """One unary call on a new HTTP/2 connection, headers sent as given; every frame answered."""
    headers = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", f"/{SERVICE.full_name}/{method}".encode()),
        (b":authority", f"127.0.0.1:{port}".encode()),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
        *metadata,
    ]
    # HPACK literals without indexing, neither name nor value Huffman-coded: bytes go as they are.
    block = b"".join(b"\x00" + _hpack_int(len(n), 7) + n + _hpack_int(len(v), 7) + v for n, v in headers)
    body = b"\x00" + struct.pack(">I", len(request)) + request
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(4, 0, 0, b""))
        writer.write(_frame(1, 0x4, 1, block) + _frame(0, 0x1, 1, body))  # END_HEADERS; END_STREAM
        await writer.drain()
        received = bytearray()
        while True:
            head = await asyncio.wait_for(reader.readexactly(9), 5)
            payload = await reader.readexactly(int.from_bytes(head[:3], "big"))
            kind, flags, stream = head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
            if kind == 4 and not flags & 0x1:
                writer.write(_frame(4, 0x1, 0, b""))  # SETTINGS ACK
            received += payload
            if (kind == 1 and flags & 0x1 and stream == 1) or kind in (3, 7):  # trailers; RST; GOAWAY
                return bytes(received)
    finally:
        writer.close()


@pytest.mark.parametrize(
    "value",
    ["\u0661\u0662\u0663", "\uff11\uff12", "\u00b2", "12\u0663"],
    ids=["arabic-indic", "fullwidth", "superscript", "mixed"],
)
async def test_digits_of_other_scripts_are_not_a_max_age(
    facade: Facade, caplog: pytest.LogCaptureFixture, value: str
) -> None:
    caplog.set_level(logging.INFO)
    assert value.isdigit()  # what str.isdigit() alone would let through
    answer = await raw_call(
        facade.server.grpc_port,
        "DescribeWhiteboardPush",
        DESCRIBE.SerializeToString(),
        [(MAX_AGE_KEY.encode(), value.encode())],
    )
    assert b"grpc-status\x013" in answer  # INVALID_ARGUMENT
    assert MAX_AGE_KEY.encode() in answer  # named in grpc-message
    assert access_codes(caplog) == ["INVALID_ARGUMENT"]
    assert upstream_requests(facade.emulator) == 0 and admitted(facade) == 0
    assert_quiet(caplog)


async def test_a_non_ascii_idempotency_key_is_invalid_argument(
    facade: Facade, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    answer = await raw_call(
        facade.server.grpc_port,
        "CreateSnapshotTask",
        create_request().SerializeToString(),
        [(IDEMPOTENCY_KEY.encode(), "cl\u00e9-\u0661".encode())],
    )
    assert b"grpc-status\x013" in answer
    assert IDEMPOTENCY_KEY.encode() in answer
    assert access_codes(caplog) == ["INVALID_ARGUMENT"]
    assert upstream_requests(facade.emulator) == 0 and admitted(facade) == 0
    assert_quiet(caplog)
