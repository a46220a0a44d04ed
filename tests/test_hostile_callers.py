"""Hostile callers on the gRPC side: oversized requests, bursts beyond grpc's own queues, undecodable
bytes. Each answer is one the README documents, counted and logged; nothing hostile reaches TIW."""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.message import DecodeError, Message
from grpc_status import rpc_status
from support.facade import Facade, StartFacade, facade_environment
from support.facade_process import rss_bytes, start_facade_process, wait_serving
from support.rich_status import unpack_details
from support.tiw import PUSH_TASK, SDK_APP_ID, raw_method, upstream_requests
from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as pb
from tiw_facade.emulator import Emulator
from tiw_facade.handler import SERVICE

MAX_REQUEST_BYTES = 16 << 10  # the default TIW_MAX_REQUEST_BYTES
MiB = 1 << 20


def padded_push_request(size: int) -> bytes:
    """A valid DescribeWhiteboardPushRequest of ``size`` bytes: the padding is an unknown field,
    which protobuf keeps (so the server holds it) and the facade ignores."""
    valid = pb.DescribeWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=PUSH_TASK).SerializeToString()
    header = b"\xfa\x3e"  # field 999, length-delimited; then the length as a varint
    room = size - len(valid) - len(header)
    length = _varint(room - len(_varint(room)))
    padding = header + length + b"p" * (room - len(length))
    assert len(valid + padding) == size
    return valid + padding


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


# --- 4: request size and memory --------------------------------------------------------------------


@pytest.mark.slow
async def test_a_request_over_the_limit_is_refused_by_grpc(facade: Facade) -> None:
    call = raw_method(facade.channel)
    assert await call(padded_push_request(MAX_REQUEST_BYTES), timeout=10)  # at the limit: served
    before = upstream_requests(facade.emulator)
    for size in (MAX_REQUEST_BYTES + 1, 4 * MiB - 64):  # the latter fitted grpc's default limit
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(padded_push_request(size), timeout=10)
        assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in (caught.value.details() or "")
    assert upstream_requests(facade.emulator) == before


@pytest.mark.slow
async def test_the_request_limit_is_a_setting(start_facade: StartFacade) -> None:
    facade = await start_facade(TIW_MAX_REQUEST_BYTES=str(1024))
    call = raw_method(facade.channel)
    assert await call(padded_push_request(1024), timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(padded_push_request(1025), timeout=10)
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture
def facade_process(emulator: Emulator, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A facade in a process of its own (so its memory can be read), logging to a file."""
    environment = facade_environment(emulator.url, TIW_LOG_LEVEL="WARNING", TIW_MAX_QUEUE_WAIT="1")
    process, target = start_facade_process(environment, tmp_path / "facade.log")
    try:
        yield process, target
    finally:
        process.kill()
        process.wait()


@pytest.mark.slow
async def test_a_burst_of_large_requests_leaves_memory_bounded(
    facade_process: tuple[subprocess.Popen[bytes], str],
) -> None:
    process, target = facade_process
    # Big enough for the 4 MiB messages to go out unsplit by the client's default limits.
    options = [("grpc.max_send_message_length", 8 * MiB)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        await wait_serving(channel, process)
        call = raw_method(channel)
        await call(padded_push_request(1000), timeout=10)  # warm: connections, caches, first call
        before = rss_bytes(process.pid)

        async def send(request: bytes) -> grpc.StatusCode:
            try:
                await call(request, timeout=15)
            except grpc.aio.AioRpcError as error:
                return error.code()
            return grpc.StatusCode.OK

        # 100 requests of 4 MiB (which the default limit let in and the limiter queued: 400 MiB
        # held), then 400 at the limit, all at once.
        huge = padded_push_request(4 * MiB - 64)
        codes = await asyncio.gather(*(send(huge) for _ in range(100)))
        assert set(codes) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        large = padded_push_request(MAX_REQUEST_BYTES)
        codes = await asyncio.gather(*(send(large) for _ in range(400)))
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        grown = rss_bytes(process.pid) - before
    # 400 x 16 KiB is 6 MiB; it grows ~10 MiB. Before: 35 to 230 MiB (grpc's flow-control windows
    # took in the huge ones before reading their length) and, with the default limit, 400 MiB.
    assert grown < 64 * MiB, f"RSS grew {grown / MiB:.0f} MiB"


# --- 5: bursts beyond grpc's own pending-call queue ---------------------------------------------------

BURST = 4000
BURST_ACTIONS = ("DescribeWhiteboardPush", "DescribeSnapshotTask", "DescribeVideoGenerationTask")


def burst_request(action: str, emulator: Emulator, index: int) -> Message:
    """A request of its own for each call of the burst: identical calls at once would share one
    request to TIW (docs/answers.md), and the burst is to be one the limiter must refuse. Pushes
    are tasks the emulator knows (OK); snapshots and videos are unknown (NOT_FOUND)."""
    if action == "DescribeWhiteboardPush":
        return pb.DescribeWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=emulator.add_push_task())
    unknown: dict[str, type[Message]] = {
        "DescribeSnapshotTask": pb.DescribeSnapshotTaskRequest,
        "DescribeVideoGenerationTask": pb.DescribeVideoGenerationTaskRequest,
    }
    return unknown[action](sdk_app_id=SDK_APP_ID, task_id=f"unknown-task-{index}")


@pytest.mark.slow
async def test_a_burst_of_4000_calls_gets_only_documented_answers(
    facade_process: tuple[subprocess.Popen[bytes], str], emulator: Emulator
) -> None:
    # The facade in a process of its own: one event loop for both sides would miss the deadlines.
    process, target = facade_process
    channels = [grpc.aio.insecure_channel(target) for _ in range(4)]
    try:
        await wait_serving(channels[0], process)
        actions = list(itertools.islice(itertools.cycle(BURST_ACTIONS), BURST))
        requests = [
            burst_request(action, emulator, i).SerializeToString() for i, action in enumerate(actions)
        ]
        calls = [
            raw_method(channels[i % len(channels)], f"/{SERVICE.full_name}/{action}")(requests[i], timeout=15)
            for i, action in enumerate(actions)
        ]

        async def outcome(call: grpc.aio.UnaryUnaryCall) -> tuple[grpc.StatusCode, bool]:
            try:
                await call
            except grpc.aio.AioRpcError as error:
                status = rpc_status.from_call(error)
                retry = status is not None and "RetryInfo" in unpack_details(status)
                return error.code(), retry
            return grpc.StatusCode.OK, False

        outcomes = collections.Counter(await asyncio.gather(*(outcome(call) for call in calls)))
    finally:
        for channel in channels:
            await channel.close()
    allowed = {
        (grpc.StatusCode.OK, False),
        (grpc.StatusCode.NOT_FOUND, False),  # the unknown tasks, from TIW
        (grpc.StatusCode.RESOURCE_EXHAUSTED, True),  # the limiter's, with RetryInfo
    }
    assert set(outcomes) <= allowed, outcomes
    assert outcomes[(grpc.StatusCode.RESOURCE_EXHAUSTED, True)] > 0, "the burst was meant to be refused"


# --- 6 and 10a: undecodable and mutated requests ----------------------------------------------------


def sample_requests() -> dict[str, bytes]:
    """A valid request per method, the seed of the mutations."""
    cos = pb.SnapshotCOS(uin=1, region="ap-guangzhou", bucket="b-1")
    samples: dict[str, Message] = {
        "CreateSnapshotTask": pb.CreateSnapshotTaskRequest(
            whiteboard=pb.SnapshotWhiteboard(width=1280, height=720, init_params='{"ratio":"16:9"}'),
            sdk_app_id=SDK_APP_ID,
            room_id=1234,
            callback_url="https://example.com/cb",
            cos=cos,
        ),
        "DescribeSnapshotTask": pb.DescribeSnapshotTaskRequest(sdk_app_id=SDK_APP_ID, task_id="t-1"),
        "DescribeWhiteboardPush": pb.DescribeWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=PUSH_TASK),
        "StopWhiteboardPush": pb.StopWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=PUSH_TASK),
        "DescribeVideoGenerationTask": pb.DescribeVideoGenerationTaskRequest(
            sdk_app_id=SDK_APP_ID, task_id="t-1"
        ),
    }
    assert set(samples) == {method.name for method in SERVICE.methods}
    return {name: request.SerializeToString() for name, request in samples.items()}


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One random mutation of ``data``: flip, insert, delete, truncate, or replace with noise."""
    buffer = bytearray(data)
    kind = rng.randrange(6)
    if kind == 0 and buffer:
        for _ in range(rng.randint(1, 4)):
            buffer[rng.randrange(len(buffer))] ^= 1 << rng.randrange(8)
    elif kind == 1:
        at = rng.randrange(len(buffer) + 1)
        buffer[at:at] = rng.randbytes(rng.randint(1, 8))
    elif kind == 2 and buffer:
        at = rng.randrange(len(buffer))
        del buffer[at : at + rng.randint(1, 8)]
    elif kind == 3:
        del buffer[rng.randrange(len(buffer) + 1) :]
    elif kind == 4:  # a tag and a length-delimited field claiming far more than is there
        buffer += bytes([rng.randrange(1, 16) << 3 | 2]) + b"\xff\xff\xff\x0f"
    else:
        buffer = bytearray(rng.randbytes(rng.randint(1, 64)))
    return bytes(buffer)


def decodes(method: str, data: bytes) -> bool:
    descriptor = SERVICE.methods_by_name[method].input_type
    try:
        message_factory.GetMessageClass(descriptor).FromString(data)
    except DecodeError:
        return False
    return True


def fuzz_inputs(per_method: int, seed: int = 8) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    return [(name, mutate(data, rng)) for name, data in sample_requests().items() for _ in range(per_method)]


DOCUMENTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
}


async def send_all(facade: Facade, inputs: list[tuple[str, bytes]]) -> list[grpc.aio.AioRpcError | None]:
    async def one(method: str, data: bytes) -> grpc.aio.AioRpcError | None:
        try:
            await raw_method(facade.channel, f"/{SERVICE.full_name}/{method}")(data, timeout=10)
        except grpc.aio.AioRpcError as error:
            return error
        return None

    return await asyncio.gather(*(one(method, data) for method, data in inputs))


async def test_undecodable_requests_are_invalid_argument_counted_and_logged_in_one_line(
    facade: Facade, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    inputs = [(name, data) for name, data in fuzz_inputs(20, seed=6) if not decodes(name, data)]
    assert len(inputs) > 20
    errors = await send_all(facade, inputs)
    for error in errors:
        assert error is not None and error.code() is grpc.StatusCode.INVALID_ARGUMENT
        status = rpc_status.from_call(error)
        assert status is not None
        details = unpack_details(status)
        assert details["ErrorInfo"].reason == "MALFORMED_REQUEST"  # type: ignore[attr-defined]
        assert "BadRequest" in details
    assert upstream_requests(facade.emulator) == 0
    lines = [r for r in caplog.records if r.name == "tiw_facade.rpc"]
    assert len(lines) == len(inputs)
    assert {r.tiw_code for r in lines} == {"MALFORMED_REQUEST"}  # type: ignore[attr-defined]
    assert {r.grpc_code for r in lines} == {"INVALID_ARGUMENT"}  # type: ignore[attr-defined]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    handled = facade.server.metrics.registry.get_sample_value
    total = sum(
        handled(
            "grpc_server_handled_total",
            {
                "grpc_service": SERVICE.full_name,
                "grpc_method": m.name,
                "grpc_type": "unary",
                "grpc_code": "InvalidArgument",
            },
        )
        or 0
        for m in SERVICE.methods
    )
    assert total == len(inputs)


async def test_fuzzed_requests_get_only_documented_codes(
    facade: Facade, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    inputs = fuzz_inputs(80)  # 400 in all
    undecodable = [(name, data) for name, data in inputs if not decodes(name, data)]
    decodable = [(name, data) for name, data in inputs if decodes(name, data)]
    assert undecodable and decodable

    codes = collections.Counter(
        e.code() if e else grpc.StatusCode.OK for e in await send_all(facade, undecodable)
    )
    assert set(codes) == {grpc.StatusCode.INVALID_ARGUMENT}
    assert upstream_requests(facade.emulator) == 0, "undecodable input reached TIW"

    codes.update(e.code() if e else grpc.StatusCode.OK for e in await send_all(facade, decodable))
    assert set(codes) <= DOCUMENTED, codes
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
