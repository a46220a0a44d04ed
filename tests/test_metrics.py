"""The interceptor's metrics and access-log line over a real gRPC server, and the series that exist
from start-up."""

from __future__ import annotations

import io
import json
import logging
import typing
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from support.facade import Facade, StartFacade
from support.pages import samples, scrape
from support.tiw import ACTIONS, SERVICE
from support.waiting import wait_until
from tiw_facade import limiter, retries
from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as pb
from tiw_facade.call_record import CURRENT_CALL
from tiw_facade.emulator import Fault, FaultKind
from tiw_facade.interceptor import RpcObserver
from tiw_facade.logs import JsonFormatter
from tiw_facade.metrics import REJECT_REASONS, RETRY_REASONS, Metrics

HEALTH = health.SERVICE_NAME
REFLECTION = reflection.SERVICE_NAME
TEST_SERVICE = "test.Probe"
REQUEST_ID = "6c4f8b40-5f8b-4d3c-9e31-2a1f6f1b9a77"


# --- a small server: the interceptor, the standard health and reflection services, and test.Probe ---


async def collect(requests: AsyncIterator[bytes], context: Any) -> bytes:
    """Client streaming, through the request iterator."""
    return b"".join([request async for request in requests])


async def chat(requests: AsyncIterator[bytes], context: Any) -> None:
    """Bidi streaming through context.read() and context.write(): echoes until the client closes."""
    while (message := await context.read()) is not grpc.aio.EOF:
        await context.write(message)


async def refuse(request: bytes, context: Any) -> bytes:
    """A failed call whose handler filled the CallRecord in, as the TIW handler does."""
    record = CURRENT_CALL.get()
    record.action, record.request_id, record.tiw_code = (
        "DescribeWhiteboardPush",
        REQUEST_ID,
        "ResourceNotFound",
    )
    context.set_code(grpc.StatusCode.NOT_FOUND)
    context.set_details("no such task")
    return b""


PROBE = grpc.method_handlers_generic_handler(
    TEST_SERVICE,
    {
        "Collect": grpc.stream_unary_rpc_method_handler(collect),
        "Chat": grpc.stream_stream_rpc_method_handler(chat),
        "Refuse": grpc.unary_unary_rpc_method_handler(refuse),
    },
)


class Observed(typing.NamedTuple):
    metrics: Metrics
    health: health.aio.HealthServicer
    channel: grpc.aio.Channel
    log: io.StringIO

    def value(self, name: str, kind: str, service: str, method: str, **labels: str) -> float:
        found = self.metrics.registry.get_sample_value(
            name, {"grpc_type": kind, "grpc_service": service, "grpc_method": method, **labels}
        )
        return found or 0.0

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.getvalue().splitlines()]


@pytest.fixture
async def observed() -> AsyncIterator[Observed]:
    metrics = Metrics("test")
    log = logging.getLogger("test_metrics.rpc")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    servicer = health.aio.HealthServicer()
    server = grpc.aio.server(interceptors=[RpcObserver(metrics, log)])
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    reflection.enable_server_reflection((HEALTH, REFLECTION), server)
    server.add_generic_rpc_handlers((PROBE,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Observed(metrics, servicer, channel, stream)
    finally:
        await channel.close()
        await server.stop(0)
        log.removeHandler(handler)


async def test_unary_counts_one_message_each_way(observed: Observed) -> None:
    await health_pb2_grpc.HealthStub(observed.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert observed.value("grpc_server_msg_received_total", "unary", HEALTH, "Check") == 1
    assert observed.value("grpc_server_msg_sent_total", "unary", HEALTH, "Check") == 1
    assert observed.value("grpc_server_handled_total", "unary", HEALTH, "Check", grpc_code="OK") == 1


async def test_health_watch_counts_every_message_it_sends(observed: Observed) -> None:
    # Watch writes with context.write(), not yield: each write is a message sent.
    call = health_pb2_grpc.HealthStub(observed.channel).Watch(health_pb2.HealthCheckRequest(service="x"))
    statuses = [(await call.read()).status]
    await observed.health.set("x", health_pb2.HealthCheckResponse.SERVING)
    statuses.append((await call.read()).status)
    call.cancel()
    assert statuses == [
        health_pb2.HealthCheckResponse.SERVICE_UNKNOWN,
        health_pb2.HealthCheckResponse.SERVING,
    ]

    def handled() -> float:
        return observed.value(
            "grpc_server_handled_total", "server_stream", HEALTH, "Watch", grpc_code="Canceled"
        )

    await wait_until(lambda: handled() == 1)
    assert observed.value("grpc_server_started_total", "server_stream", HEALTH, "Watch") == 1
    assert observed.value("grpc_server_msg_received_total", "server_stream", HEALTH, "Watch") == 1
    assert observed.value("grpc_server_msg_sent_total", "server_stream", HEALTH, "Watch") == 2


async def test_reflection_counts_every_message_both_ways(observed: Observed) -> None:
    # Reflection is bidi and written as an async generator over the request iterator.
    requests = [reflection_pb2.ServerReflectionRequest(list_services="") for _ in range(3)]
    call = reflection_pb2_grpc.ServerReflectionStub(observed.channel).ServerReflectionInfo(
        iter(requests), timeout=5
    )
    answers = [answer async for answer in call]
    assert len(answers) == 3
    assert await call.code() is grpc.StatusCode.OK
    method = "ServerReflectionInfo"
    assert observed.value("grpc_server_msg_received_total", "bidi_stream", REFLECTION, method) == 3
    assert observed.value("grpc_server_msg_sent_total", "bidi_stream", REFLECTION, method) == 3
    assert observed.value("grpc_server_handled_total", "bidi_stream", REFLECTION, method, grpc_code="OK") == 1
    assert [line["grpc_method"] for line in observed.lines()] == [f"/{REFLECTION}/{method}"]


async def test_context_read_and_write_are_counted(observed: Observed) -> None:
    call = observed.channel.stream_stream(f"/{TEST_SERVICE}/Chat")(iter([b"a", b"b", b"c", b"d"]), timeout=5)
    assert [answer async for answer in call] == [b"a", b"b", b"c", b"d"]
    assert observed.value("grpc_server_msg_received_total", "bidi_stream", TEST_SERVICE, "Chat") == 4
    assert observed.value("grpc_server_msg_sent_total", "bidi_stream", TEST_SERVICE, "Chat") == 4


async def test_client_streams_are_observed(observed: Observed) -> None:
    answer = await observed.channel.stream_unary(f"/{TEST_SERVICE}/Collect")(iter([b"a", b"b"]), timeout=5)
    assert answer == b"ab"
    labels = ("client_stream", TEST_SERVICE, "Collect")
    assert observed.value("grpc_server_msg_received_total", *labels) == 2
    assert observed.value("grpc_server_msg_sent_total", *labels) == 1
    assert observed.value("grpc_server_handled_total", *labels, grpc_code="OK") == 1


async def test_the_access_line_of_a_failed_call_has_its_tiw_code_and_request_id(observed: Observed) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await observed.channel.unary_unary(f"/{TEST_SERVICE}/Refuse")(b"", timeout=5)
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    assert observed.value("grpc_server_msg_sent_total", "unary", TEST_SERVICE, "Refuse") == 0
    [line] = observed.lines()
    assert line.pop("duration_ms") > 0
    assert line.pop("ts")
    assert line == {
        "level": "INFO",
        "logger": "test_metrics.rpc",
        "msg": "rpc",
        "grpc_method": f"/{TEST_SERVICE}/Refuse",
        "grpc_code": "NOT_FOUND",
        "tiw_action": "DescribeWhiteboardPush",
        "tiw_request_id": REQUEST_ID,
        "tiw_code": "ResourceNotFound",
    }


# --- start-up series and the exposition ---


def test_every_per_action_series_exists_after_prime() -> None:
    metrics = Metrics("test")
    metrics.prime(SERVICE, ACTIONS, 20, "memory")
    sample = metrics.registry.get_sample_value
    for action in ACTIONS:
        for reason in RETRY_REASONS:
            assert sample("tiw_upstream_retries_total", {"action": action, "reason": reason}) == 0
        for reason in REJECT_REASONS:
            assert sample("tiw_limiter_rejected_total", {"action": action, "reason": reason}) == 0
    assert sample("tiw_limiter_degraded", {}) == 0


def test_the_primed_reasons_are_the_limiters_and_upstreams() -> None:
    assert set(REJECT_REASONS) == set(typing.get_args(limiter.Reason))
    assert set(retries.NOT_EXECUTED) <= set(RETRY_REASONS)


def test_no_created_series_are_exposed() -> None:
    metrics = Metrics("test")
    metrics.prime(SERVICE, ACTIONS, 20, "memory")
    metrics.action("DescribeWhiteboardPush").upstream_duration.observe(0.1)
    text = generate_latest(metrics.registry).decode()
    names = {s.name for family in text_string_to_metric_families(text) for s in family.samples}
    assert "tiw_upstream_request_duration_seconds_count" in names  # the scrape has the series
    assert not [name for name in names if name.endswith("_created")]


async def test_the_facade_exposes_retry_series_from_start_up(facade: Facade) -> None:
    retries = samples(await scrape(facade), "tiw_upstream_retries_total")
    for action in ACTIONS:
        for reason in RETRY_REASONS:
            assert retries[(("action", action), ("reason", reason))] == 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "fault",
    [
        Fault(FaultKind.HTTP_STATUS, status=503, count=1),
        Fault(FaultKind.DROP, count=1),
        Fault(FaultKind.LATENCY, delay=2.0, count=1),
        Fault(FaultKind.ERROR_CODE, code="InternalError", count=1),
        Fault(FaultKind.ERROR_CODE, code="RequestLimitExceeded", count=1),
    ],
    ids=["http-503", "connection-dropped", "timeout", "InternalError", "RequestLimitExceeded"],
)
async def test_a_retry_adds_no_series(start_facade: StartFacade, fault: Fault) -> None:
    """Every reason upstream.py retries for is one of RETRY_REASONS, primed at start-up."""
    facade = await start_facade(TIW_UPSTREAM_TIMEOUT="0.5")
    before = samples(await scrape(facade), "tiw_upstream_retries_total")
    facade.emulator.add_fault(fault)
    request = pb.DescribeWhiteboardPushRequest(sdk_app_id=1400000001, task_id="ghucnligqtgtvk2624mb")
    await facade.stub.DescribeWhiteboardPush(request, timeout=5)
    after = samples(await scrape(facade), "tiw_upstream_retries_total")
    assert sum(after.values()) == 1, "the fault caused one retry"
    assert after.keys() == before.keys()


async def test_the_facade_logs_the_tiw_code_of_a_failed_call(facade: Facade) -> None:
    facade.emulator.add_fault(Fault(FaultKind.ERROR_CODE, code="ResourceNotFound.TaskNotFound", count=1))
    log = logging.getLogger("tiw_facade.rpc")
    handler = logging.StreamHandler(io.StringIO())
    handler.setFormatter(JsonFormatter())
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        with pytest.raises(grpc.aio.AioRpcError):
            await facade.stub.DescribeWhiteboardPush(
                pb.DescribeWhiteboardPushRequest(sdk_app_id=1400000001, task_id="ghucnligqtgtvk2624mb"),
                timeout=5,
            )
    finally:
        log.removeHandler(handler)
        log.setLevel(logging.NOTSET)
    assert isinstance(handler.stream, io.StringIO)
    [line] = [json.loads(text) for text in handler.stream.getvalue().splitlines()]
    assert line["tiw_code"] == "ResourceNotFound.TaskNotFound"
    assert line["tiw_action"] == "DescribeWhiteboardPush"
    assert line["tiw_request_id"]


def test_upstream_codes_per_action_are_bounded() -> None:
    from tiw_facade.metrics import MAX_CODES, OTHER_CODE

    metrics = Metrics("test")
    series = metrics.action("DescribeSnapshotTask")
    for n in range(MAX_CODES * 3):
        series.upstream(f"FailedOperation.Made{n}").inc()
    samples = [
        sample
        for family in metrics.registry.collect()
        if family.name == "tiw_upstream_requests"
        for sample in family.samples
        if sample.name.endswith("_total")
    ]
    assert len(samples) == MAX_CODES + 1  # every code up to the bound, and the rest as one
    other = [s for s in samples if s.labels["code"] == OTHER_CODE]
    assert other and other[0].value == MAX_CODES * 2
