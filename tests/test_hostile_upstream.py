"""A hostile TIW (tests/support/raw_upstream.py) against a real facade over a real gRPC channel.

For each behaviour, every RPC is called and must fail with its documented code, reason and outcome,
without the facade's secrets (session token, secret key, the request's signature and Authorization
header) in anything the caller, the logs or the /metrics page show; afterwards a normal call
must succeed (the process stays healthy). Then: redirects are not followed, answers are capped
before and without inflation (memory measured), hostile envelopes and hostile error codes are
UPSTREAM_MALFORMED, never UNKNOWN or INTERNAL.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import json
import logging
import pathlib
import re
import struct
import tracemalloc
from collections.abc import AsyncIterator, Iterator

import aiohttp
import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from support.facade import facade_environment
from support.raw_upstream import (
    Behaviour,
    RawUpstream,
    answer,
    envelope,
    gzip_bomb,
    http,
    ok,
    redirect,
    reset,
    stall,
    stream,
)
from support.rich_status import unpack_details
from support.tiw import FRESH
from tiw_facade import settings
from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as pb
from tiw_facade._proto.tiw.v20190919 import tiw_pb2_grpc
from tiw_facade.logs import JsonFormatter
from tiw_facade.server import FacadeServer
from tiw_facade.translate import from_tiw

C = grpc.StatusCode
TOKEN = "hostile-test-session-token-5f1c9a"
SECRET_KEY = "hostile-test-secret-key-c0ffee42"
SERVICE = pb.DESCRIPTOR.services_by_name["TiwService"]
SEEDS = json.loads((pathlib.Path(__file__).parent / "data" / "seed_examples.json").read_text())
# One valid request per RPC, from TIW's own examples.
REQUESTS: dict[str, Message] = {
    method.name: from_tiw(SEEDS["requests"][method.name], message_factory.GetMessageClass(method.input_type))
    for method in SERVICE.methods
}
HEALTHY = ok({"TaskId": "ghucnligqtgtvk2624mb", "Status": "PUSHING", "RequestId": "req-healthy"})


# --- the facade, its caller, and what it shows ------------------------------------------------------


@dataclasses.dataclass
class Failure:
    code: grpc.StatusCode
    details: str
    trailers: list[tuple[str, str | bytes]]
    status: status_pb2.Status | None

    @property
    def info(self) -> error_details_pb2.ErrorInfo:
        assert self.status is not None, self.details
        found = unpack_details(self.status)["ErrorInfo"]
        assert isinstance(found, error_details_pb2.ErrorInfo)
        return found

    def texts(self) -> Iterator[str]:
        """Everything the caller gets, as text: message, every trailer, every detail's every field."""
        yield self.details
        for key, value in self.trailers:
            yield key
            yield value.decode("latin-1") if isinstance(value, bytes) else value
        if self.status is not None:
            yield str(self.status)
            for detail in unpack_details(self.status).values():
                yield str(detail)


@dataclasses.dataclass
class Hostile:
    upstream: RawUpstream
    server: FacadeServer
    stub: tiw_pb2_grpc.TiwServiceStub
    logs: list[str]
    healthy_checks: int = 0

    async def call(
        self, action: str, within: float = 5.0, request: Message | None = None
    ) -> Message | Failure:
        method = getattr(self.stub, action)
        try:
            # Every call here is to reach the upstream: none may be answered from the answer cache
            # (docs/answers.md) with what an earlier, healthy call left there.
            response: Message = await method(request or REQUESTS[action], timeout=within, metadata=FRESH)
            return response
        except grpc.aio.AioRpcError as exc:
            trailers = list(exc.trailing_metadata() or ())
            raw = next((v for k, v in trailers if k == "grpc-status-details-bin"), None)
            status = status_pb2.Status.FromString(raw) if isinstance(raw, bytes) else None
            return Failure(exc.code(), exc.details() or "", trailers, status)

    async def fail(self, action: str, within: float = 5.0, request: Message | None = None) -> Failure:
        result = await self.call(action, within, request)
        assert isinstance(result, Failure), f"{action} succeeded: {result}"
        return result

    async def metrics_page(self) -> str:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{self.server.http_port}/metrics") as response,
        ):
            return await response.text()

    def secrets(self) -> list[str]:
        """What must never be shown: the configured secrets, and each request's signature and
        Authorization header as the upstream received them."""
        found = [TOKEN, SECRET_KEY]
        for request in self.upstream.requests:
            authorization = request.headers["authorization"]
            found += [authorization, authorization.rsplit("Signature=", 1)[1]]
            assert request.headers["x-tc-token"] == TOKEN  # the token was sent: there is one to leak
        return found

    async def assert_healthy(self) -> None:
        self.upstream.behaviour = HEALTHY
        # A task of its own: a call identical to one still waiting on a hostile upstream (``silent``)
        # would share that request (docs/answers.md) rather than send its own.
        self.healthy_checks += 1
        request = pb.DescribeWhiteboardPushRequest.FromString(
            REQUESTS["DescribeWhiteboardPush"].SerializeToString()
        )
        request.task_id = f"healthy-{self.healthy_checks}"
        response = await self.call("DescribeWhiteboardPush", request=request)
        assert not isinstance(response, Failure), response
        assert response.request_id == "req-healthy"  # type: ignore[attr-defined]


class _Lines(logging.Handler):
    """Every record of the facade's loggers (and any that reach the root), formatted as the facade
    formats them but with NO secrets configured: scrubbing cannot hide a leak."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.lines = lines
        self.setFormatter(JsonFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
async def hostile() -> AsyncIterator[Hostile]:
    lines: list[str] = []
    handler = _Lines(lines)
    root, ours = logging.getLogger(), logging.getLogger("tiw_facade")
    root.addHandler(handler)
    level = ours.level
    ours.setLevel(logging.DEBUG)
    async with RawUpstream(HEALTHY) as upstream:
        config = settings.load(
            facade_environment(
                upstream.url, TENCENTCLOUD_SESSION_TOKEN=TOKEN, TENCENTCLOUD_SECRET_KEY=SECRET_KEY
            )
        )
        server = FacadeServer(config)
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}")
        try:
            yield Hostile(upstream, server, tiw_pb2_grpc.TiwServiceStub(channel), lines)
        finally:
            await channel.close()
            await server.stop(0)
            root.removeHandler(handler)
            ours.setLevel(level)


# --- every behaviour, every RPC: the documented failure, and no secret anywhere ------------------


def _head(extra: str = "Content-Length: 1000\r\n") -> bytes:
    return f"HTTP/1.1 200 OK\r\nConnection: close\r\n{extra}\r\n".encode()


@dataclasses.dataclass(frozen=True)
class Case:
    behaviour: Behaviour
    code: grpc.StatusCode
    reason: str
    outcome: str = "unknown"
    within: float = 5.0


CASES: dict[str, Case] = {
    "garbage": Case(answer(b"\x00\xff\xfe\x9c garbage \x07\r\n\r\n"), C.UNAVAILABLE, "UPSTREAM_MALFORMED"),
    "not_http": Case(answer(b"SSH-2.0-OpenSSH_9.6\r\n\r\n"), C.UNAVAILABLE, "UPSTREAM_MALFORMED"),
    "bad_status_line": Case(
        answer(b"HTTP/1.1 two-hundred OK\r\nContent-Length: 0\r\n\r\n"), C.UNAVAILABLE, "UPSTREAM_MALFORMED"
    ),
    "bad_header_line": Case(
        answer(_head("no colon in this header line\r\n")), C.UNAVAILABLE, "UPSTREAM_MALFORMED"
    ),
    "bad_content_length": Case(
        answer(_head("Content-Length: twelve\r\n")), C.UNAVAILABLE, "UPSTREAM_MALFORMED"
    ),
    "headers_too_long": Case(
        answer(_head("X-Long: " + "a" * 70_000 + "\r\n")), C.UNAVAILABLE, "UPSTREAM_MALFORMED"
    ),
    "bad_chunk_size": Case(
        answer(_head("Transfer-Encoding: chunked\r\n") + b"zz\r\n{}\r\n0\r\n\r\n"),
        C.UNAVAILABLE,
        "UPSTREAM_MALFORMED",
    ),
    "truncated_body": Case(
        answer(_head() + b'{"Response": {"Req'), C.UNAVAILABLE, "UPSTREAM_CONNECTION_LOST"
    ),
    "closed_without_answer": Case(answer(b""), C.UNAVAILABLE, "UPSTREAM_CONNECTION_LOST"),
    "reset_before_answer": Case(reset(), C.UNAVAILABLE, "UPSTREAM_CONNECTION_LOST"),
    "reset_mid_body": Case(reset(_head() + b'{"Response": '), C.UNAVAILABLE, "UPSTREAM_CONNECTION_LOST"),
    "redirect_loop": Case(redirect("/"), C.UNAVAILABLE, "UPSTREAM_HTTP_ERROR"),
    "http_500": Case(answer(http(b"<html>oops</html>", status=500)), C.UNAVAILABLE, "UPSTREAM_HTTP_ERROR"),
    "gzip": Case(
        answer(http(gzip.compress(envelope({"RequestId": "r"})), headers={"Content-Encoding": "gzip"})),
        C.UNAVAILABLE,
        "UPSTREAM_MALFORMED",
    ),
    "oversized": Case(stream(4 << 20), C.UNAVAILABLE, "UPSTREAM_MALFORMED"),
    "not_json": Case(answer(http(b"<html>Bad Gateway</html>")), C.UNAVAILABLE, "UPSTREAM_MALFORMED"),
    "silent": Case(stall(30), C.DEADLINE_EXCEEDED, "UPSTREAM_TIMEOUT", within=1.0),
}


# `silent` is slow: the facade's stop waits out the upstream time-out of a request TIW never answers.
@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=pytest.mark.slow) if name == "silent" else name for name in CASES]
)
async def test_every_rpc_fails_as_documented_and_shows_no_secret(hostile: Hostile, name: str) -> None:
    case = CASES[name]
    hostile.upstream.behaviour = case.behaviour
    failures = await asyncio.gather(*(hostile.fail(action, case.within) for action in REQUESTS))
    for action, failure in zip(REQUESTS, failures, strict=True):
        assert (failure.code, failure.info.reason) == (case.code, case.reason), (action, failure.details)
        assert failure.info.metadata["outcome"] == case.outcome
        assert failure.info.metadata["action"] == action
    assert {request.action for request in hostile.upstream.requests} == set(REQUESTS)
    shown = [text for failure in failures for text in failure.texts()]
    shown += hostile.logs
    shown.append(await hostile.metrics_page())
    for secret in hostile.secrets():
        leaks = [text for text in shown if secret in text]
        assert not leaks, f"{secret!r} shown in {leaks[0][:300]!r}"
    await hostile.assert_healthy()


# --- redirects are never followed ----------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_a_redirect_elsewhere_is_not_followed(hostile: Hostile, status: int) -> None:
    async with RawUpstream(HEALTHY) as elsewhere:
        hostile.upstream.behaviour = redirect(elsewhere.url + "/", status)
        failures = await asyncio.gather(*(hostile.fail(action) for action in REQUESTS))
        assert {(f.code, f.info.reason, f.info.metadata["http_status"]) for f in failures} == {
            (C.UNAVAILABLE, "UPSTREAM_HTTP_ERROR", str(status))
        }
        assert elsewhere.requests == []
    await hostile.assert_healthy()


async def test_a_redirect_loop_sends_a_create_once_and_says_its_outcome_is_unknown(hostile: Hostile) -> None:
    hostile.upstream.behaviour = redirect("/")  # to itself, for ever
    failure = await hostile.fail("CreateSnapshotTask")
    assert (failure.code, failure.info.reason) == (C.UNAVAILABLE, "UPSTREAM_HTTP_ERROR")
    # A 3xx proves nothing about what the server behind it did with the request.
    assert failure.info.metadata["outcome"] == "unknown"
    assert [request.action for request in hostile.upstream.requests] == ["CreateSnapshotTask"]


# --- answers too large, compressed or not: capped, never inflated, memory flat -------------------


class PeakMemory:
    """How far this process's resident memory rose above where it was, at its peak: VmHWM after
    resetting it (``clear_refs`` 5, Linux); where that is refused, tracemalloc's peak of Python
    allocations."""

    def __enter__(self) -> PeakMemory:
        self.growth = 0
        self._baseline = self._status("VmRSS")
        try:
            pathlib.Path("/proc/self/clear_refs").write_text("5")
            self._traced = False
        except OSError:
            tracemalloc.start()
            self._traced = True
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._traced:
            self.growth = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        else:
            self.growth = self._status("VmHWM") - self._baseline

    @staticmethod
    def _status(field: str) -> int:
        text = pathlib.Path("/proc/self/status").read_text()
        match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
        assert match is not None
        return int(match.group(1)) * 1024


MEMORY_BOUND = 64 << 20  # generous: a read of the whole answer would be 100 MB or 500 MB


@pytest.mark.parametrize(
    "behaviour",
    [
        pytest.param(stream(100 << 20), id="100MB-streamed"),
        pytest.param(
            answer(
                http(gzip_bomb(), headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})
            ),
            id="gzip-bomb-500MB",
        ),
    ],
)
async def test_a_huge_answer_is_malformed_without_the_memory(hostile: Hostile, behaviour: Behaviour) -> None:
    await hostile.assert_healthy()  # connections, caches and the like are in place before measuring
    hostile.upstream.behaviour = behaviour
    with PeakMemory() as peak:
        failure = await hostile.fail("DescribeWhiteboardPush")
    assert (failure.code, failure.info.reason) == (C.UNAVAILABLE, "UPSTREAM_MALFORMED")
    assert peak.growth < MEMORY_BOUND, f"{peak.growth / (1 << 20):.1f} MiB"
    await hostile.assert_healthy()


def test_the_gzip_bomb_is_one() -> None:
    assert gzip.decompress(gzip_bomb(8 << 20)) == b" " * (8 << 20)  # made the same way, checked whole
    bomb = gzip_bomb()
    # Within the answer cap (so it is read whole and must not be inflated), 500 MB inflated.
    assert len(bomb) < 1 << 20
    assert struct.unpack("<I", bomb[-4:]) == ((500 << 20) & 0xFFFFFFFF,)


# --- envelopes TIW would not send: UPSTREAM_MALFORMED, keeping a readable RequestId --------------


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


ENVELOPES: dict[str, tuple[bytes, str]] = {
    "nested_deeply": (b'{"Response": {"RequestId": "r-1", "X": ' + _nested(100_000).encode() + b"}}", ""),
    "nan": (b'{"Response": {"RequestId": "r-1", "TaskId": "t", "Extra": NaN}}', ""),
    "response_a_list": (b'{"Response": ["RequestId", "r-1"]}', ""),
    "response_a_string": (b'{"Response": "r-1"}', ""),
    "error_a_string": (envelope({"Error": "InternalError", "RequestId": "r-1"}), "r-1"),
    "error_empty": (envelope({"Error": {}, "RequestId": "r-1"}), "r-1"),
    "error_code_a_number": (envelope({"Error": {"Code": 4100, "Message": "m"}, "RequestId": "r-1"}), "r-1"),
    "error_code_an_object": (envelope({"Error": {"Code": {"x": 1}}, "RequestId": "r-1"}), "r-1"),
    "error_code_empty": (envelope({"Error": {"Code": "", "Message": "m"}, "RequestId": "r-1"}), "r-1"),
    "error_code_huge": (
        envelope({"Error": {"Code": "A" * 10_000, "Message": "m"}, "RequestId": "r-1"}),
        "r-1",
    ),
    "error_code_spaces": (
        envelope({"Error": {"Code": "Invalid Parameter", "Message": "m"}, "RequestId": "r-1"}),
        "r-1",
    ),
    "error_message_an_object": (
        envelope({"Error": {"Code": "InternalError", "Message": {"a": 1}}, "RequestId": "r-1"}),
        "r-1",
    ),
    "error_request_id_a_number": (envelope({"Error": {"Code": "InternalError"}, "RequestId": 7}), ""),
    "request_id_a_number": (envelope({"TaskId": "t", "RequestId": 7}), ""),
    "request_id_a_list": (envelope({"TaskId": "t", "RequestId": ["r-1"]}), ""),
    "string_for_integer": (envelope({"RoomId": "880528", "RequestId": "r-1"}), "r-1"),
    "float_for_integer": (envelope({"RoomId": 1.5, "RequestId": "r-1"}), "r-1"),
    "beyond_int64": (envelope({"RoomId": 2**64, "RequestId": "r-1"}), "r-1"),
    "integer_too_long": (b'{"Response": {"RequestId": "r-1", "RoomId": ' + b"9" * 5000 + b"}}", ""),
    "list_for_string": (envelope({"TaskId": ["t"], "RequestId": "r-1"}), "r-1"),
    "object_for_integer": (envelope({"PushStartTime": {"s": 1}, "RequestId": "r-1"}), "r-1"),
    "lone_surrogate": (b'{"Response": {"TaskId": "\\ud800", "RequestId": "r-1"}}', "r-1"),
}


@pytest.mark.parametrize("name", list(ENVELOPES))
async def test_an_envelope_tiw_would_not_send_is_malformed(hostile: Hostile, name: str) -> None:
    body, request_id = ENVELOPES[name]
    hostile.upstream.behaviour = answer(http(body))
    failure = await hostile.fail("DescribeWhiteboardPush")
    assert (failure.code, failure.info.reason) == (C.UNAVAILABLE, "UPSTREAM_MALFORMED"), failure.details
    assert failure.info.metadata.get("request_id", "") == request_id
    assert failure.info.metadata["outcome"] == "unknown"
    await hostile.assert_healthy()


async def test_beyond_uint64_is_malformed(hostile: Hostile) -> None:
    hostile.upstream.behaviour = ok({"CreateTime": 2**64, "RequestId": "r-2"})
    failure = await hostile.fail("DescribeSnapshotTask")
    assert (failure.info.reason, failure.info.metadata["request_id"]) == ("UPSTREAM_MALFORMED", "r-2")
    assert "CreateTime" in failure.details


async def test_a_list_for_an_object_is_malformed(hostile: Hostile) -> None:
    hostile.upstream.behaviour = ok({"Result": [], "RequestId": "r-3"})
    failure = await hostile.fail("DescribeSnapshotTask")
    assert (failure.info.reason, failure.info.metadata["request_id"]) == ("UPSTREAM_MALFORMED", "r-3")
    assert "Result" in failure.details


# --- TIW's own text, hostile: trailers and metric labels stay bounded ----------------------------


async def test_hostile_text_in_a_tiw_error_fits_in_the_trailers(hostile: Hostile) -> None:
    # Chinese triples when percent-encoded into grpc-message; unbounded, the trailers would pass
    # gRPC's 8 KiB metadata limit and the caller get RESOURCE_EXHAUSTED instead of TIW's error.
    message = "白板推流失败" * 2_000 + "\ud800"
    hostile.upstream.behaviour = ok(
        {"Error": {"Code": "FailedOperation.WhiteboardPush", "Message": message}, "RequestId": "r" * 10_000}
    )
    failure = await hostile.fail("DescribeWhiteboardPush")
    assert (failure.code, failure.info.reason) == (C.FAILED_PRECONDITION, "FailedOperation.WhiteboardPush")
    assert failure.details.startswith("白板推流失败") and failure.details.endswith("…")
    assert "request_id" not in failure.info.metadata  # 10 KB is no RequestId


@pytest.mark.slow
async def test_implausible_codes_make_no_new_metric_series(hostile: Hostile) -> None:
    codes = [f"Hostile code {n}" for n in range(10)] + ["X" * 200 + str(n) for n in range(10)]
    for code in codes:
        hostile.upstream.behaviour = ok({"Error": {"Code": code, "Message": "m"}, "RequestId": "r"})
        failure = await hostile.fail("DescribeWhiteboardPush")
        assert failure.info.reason == "UPSTREAM_MALFORMED"
    hostile.upstream.behaviour = ok({"Error": {"Code": "InvalidParameter.TaskNotFound"}, "RequestId": "r"})
    assert (await hostile.fail("DescribeWhiteboardPush")).code == C.NOT_FOUND  # a real code is TIW's
    page = await hostile.metrics_page()
    labels = set(
        re.findall(r'tiw_upstream_requests_total\{action="DescribeWhiteboardPush",code="([^"]*)"', page)
    )
    assert "UPSTREAM_MALFORMED" in labels and "InvalidParameter.TaskNotFound" in labels
    assert not any("Hostile" in label or "XXX" in label for label in labels)
    malformed = re.search(
        r'tiw_upstream_requests_total\{action="DescribeWhiteboardPush",code="UPSTREAM_MALFORMED"\} (\S+)',
        page,
    )
    assert malformed is not None and float(malformed.group(1)) == len(codes)


# --- hostile values in requests ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("init_params", "problem"),
    [
        pytest.param(_nested(1_000), "nested at most 32 deep", id="nested-1000"),
        pytest.param(_nested(7_000), "nested at most 32 deep", id="nested-7000"),
        pytest.param("NaN", "NaN is not JSON", id="NaN"),
        pytest.param('{"ratio": Infinity}', "Infinity is not JSON", id="Infinity"),
        pytest.param("[-Infinity]", "-Infinity is not JSON", id="-Infinity"),
    ],
)
async def test_hostile_init_params_are_invalid_arguments(
    hostile: Hostile, init_params: str, problem: str
) -> None:
    request = pb.CreateSnapshotTaskRequest.FromString(REQUESTS["CreateSnapshotTask"].SerializeToString())
    request.whiteboard.init_params = init_params
    failure = await hostile.fail("CreateSnapshotTask", request=request)
    assert (failure.code, failure.info.reason) == (C.INVALID_ARGUMENT, "INVALID_REQUEST")
    assert failure.status is not None
    bad = unpack_details(failure.status)["BadRequest"]
    assert isinstance(bad, error_details_pb2.BadRequest)
    assert [(v.field, problem in v.description) for v in bad.field_violations] == [
        ("Whiteboard.InitParams", True)
    ]
    assert hostile.upstream.requests == []  # rejected before anything was sent: no quota spent
    await hostile.assert_healthy()
