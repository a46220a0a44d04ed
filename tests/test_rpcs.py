"""All five RPCs end to end: a real gRPC channel, the facade, real HTTP to the emulator."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from support.facade import Facade, StartFacade
from support.pages import samples, scrape
from support.raw_upstream import RawUpstream, envelope, http
from support.rich_status import details, error_info
from support.tiw import FRESH, PUSH_TASK, SDK_APP_ID, VIDEO_TASK, create_request
from support.tiw_client import tiw_client
from support.waiting import wait_until
from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as pb
from tiw_facade._proto.tiw.v20190919 import tiw_pb2_grpc
from tiw_facade.call_record import CURRENT_CALL, CallRecord
from tiw_facade.emulator import Emulator, Fault, FaultKind
from tiw_facade.handler import build_handler
from tiw_facade.idempotency import Keys, KeysConfig


@pytest.mark.slow
async def test_snapshot_task_lifecycle(facade: Facade) -> None:
    created = await facade.stub.CreateSnapshotTask(create_request(), timeout=5)
    assert created.HasField("task_id") and created.task_id
    assert created.request_id
    running = await facade.stub.DescribeSnapshotTask(
        pb.DescribeSnapshotTaskRequest(task_id=created.task_id, sdk_app_id=1400123480), timeout=5
    )
    assert running.task_id == created.task_id
    assert running.status == "Running"
    assert running.create_time > 1_600_000_000  # seconds, not milliseconds
    assert not running.HasField("finish_time")  # null while running: absent, not zero
    await asyncio.sleep(0.5)
    finished = await facade.stub.DescribeSnapshotTask(
        pb.DescribeSnapshotTaskRequest(task_id=created.task_id, sdk_app_id=1400123480),
        timeout=5,
        metadata=FRESH,
    )
    assert finished.status == "Finished"
    assert finished.finish_time >= finished.create_time
    assert finished.result.error_code == "OK"
    assert finished.result.total == len(finished.result.snapshots) > 0
    assert facade.emulator.stats()["CreateSnapshotTask"].tasks_created == 1


@pytest.mark.slow
async def test_whiteboard_push_lifecycle(facade: Facade) -> None:
    request = pb.DescribeWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=PUSH_TASK)
    prepared = await facade.stub.DescribeWhiteboardPush(request, timeout=5)
    assert prepared.task_id == PUSH_TASK and prepared.status == "PREPARED"
    await asyncio.sleep(0.4)
    pushing = await facade.stub.DescribeWhiteboardPush(request, timeout=5, metadata=FRESH)
    assert pushing.status == "PUSHING" and pushing.push_start_time > 0 and not pushing.finish_reason
    stopped = await facade.stub.StopWhiteboardPush(
        pb.StopWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=PUSH_TASK), timeout=5
    )
    assert stopped.request_id
    # No tiw-max-age-ms: a stop through the facade drops its answers of the push (docs/answers.md).
    after = await facade.stub.DescribeWhiteboardPush(request, timeout=5)
    assert after.status == "STOPPED"
    assert after.finish_reason == "USER_CALL"
    assert after.push_stop_time >= after.push_start_time > 0
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await facade.stub.StopWhiteboardPush(
            pb.StopWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=PUSH_TASK), timeout=5
        )
    assert again.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(again.value)
    assert info.reason == "UnsupportedOperation.TaskHasAlreadyStopped"


@pytest.mark.slow
async def test_video_generation_lifecycle(facade: Facade) -> None:
    task = facade.emulator.add_video_task(sdk_app_id=SDK_APP_ID)
    request = pb.DescribeVideoGenerationTaskRequest(sdk_app_id=SDK_APP_ID, task_id=task)
    first = await facade.stub.DescribeVideoGenerationTask(request, timeout=5)
    assert first.task_id == task and first.status in {"QUEUED", "PROCESSING"}
    await asyncio.sleep(0.7)
    done = await facade.stub.DescribeVideoGenerationTask(request, timeout=5, metadata=FRESH)
    assert done.status == "FINISHED"
    assert done.total_time > 0  # milliseconds
    assert len(done.video_info_list) >= 1
    video = done.video_info_list[0]
    assert video.video_url.startswith("http") and video.video_format


async def test_documented_video_example(facade: Facade) -> None:
    answer = await facade.stub.DescribeVideoGenerationTask(
        pb.DescribeVideoGenerationTaskRequest(sdk_app_id=SDK_APP_ID, task_id=VIDEO_TASK), timeout=5
    )
    assert answer.task_id == VIDEO_TASK and answer.request_id


async def test_invalid_request_names_fields_and_costs_no_quota(facade: Facade) -> None:
    bad = pb.CreateSnapshotTaskRequest(
        whiteboard=pb.SnapshotWhiteboard(width=4000), room_id=1, cos=pb.SnapshotCOS(uin=1)
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await facade.stub.CreateSnapshotTask(bad, timeout=5)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    bad_request = details(caught.value)["BadRequest"]
    assert isinstance(bad_request, error_details_pb2.BadRequest)
    assert [v.field for v in bad_request.field_violations] == [
        "Whiteboard.Width",
        "SdkAppId",
        "COS.Region",
        "COS.Bucket",
    ]
    assert "SdkAppId is required" in (caught.value.details() or "")
    assert sum(s.accepted + s.throttled + s.rejected for s in facade.emulator.stats().values()) == 0


# One representative TIW code per row of the error table (and the fallback).
TABLE_ROWS = [
    ("InvalidParameter.TaskNotFound", grpc.StatusCode.NOT_FOUND),
    ("InvalidParameter.BodyParameterTypeUnmatched", grpc.StatusCode.INVALID_ARGUMENT),
    ("InvalidParameterValue", grpc.StatusCode.INVALID_ARGUMENT),
    ("MissingParameter", grpc.StatusCode.INVALID_ARGUMENT),
    ("UnknownParameter", grpc.StatusCode.INVALID_ARGUMENT),
    ("LimitExceeded", grpc.StatusCode.RESOURCE_EXHAUSTED),
    ("UnauthorizedOperation.SdkAppId", grpc.StatusCode.PERMISSION_DENIED),
    ("ResourceUnavailable.NotRegistered", grpc.StatusCode.FAILED_PRECONDITION),
    ("UnsupportedOperation", grpc.StatusCode.FAILED_PRECONDITION),
    ("FailedOperation.WhiteboardPush", grpc.StatusCode.FAILED_PRECONDITION),
    ("AuthFailure.InvalidSecretId", grpc.StatusCode.INTERNAL),
    ("ServiceUnavailable", grpc.StatusCode.UNAVAILABLE),
    ("IpInBlacklist", grpc.StatusCode.UNKNOWN),
]


@pytest.mark.parametrize(("tiw_code", "grpc_code"), TABLE_ROWS)
async def test_each_row_of_the_error_table(facade: Facade, tiw_code: str, grpc_code: grpc.StatusCode) -> None:
    facade.emulator.add_fault(
        Fault(FaultKind.ERROR_CODE, action="DescribeWhiteboardPush", code=tiw_code, message="as TIW says it")
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await facade.stub.DescribeWhiteboardPush(
            pb.DescribeWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=PUSH_TASK), timeout=5
        )
    assert caught.value.code() is grpc_code
    assert caught.value.details() == "as TIW says it"  # TIW's text is kept
    info = error_info(caught.value)
    assert info.reason == tiw_code
    assert info.domain == "tiw.tencentcloudapi.com"  # not the endpoint: stable across environments
    assert info.metadata["action"] == "DescribeWhiteboardPush"
    assert info.metadata["request_id"]  # TIW's RequestId of the failed call


async def test_internal_error_is_unavailable_after_retries(facade: Facade) -> None:
    facade.emulator.add_fault(
        Fault(FaultKind.ERROR_CODE, action="DescribeWhiteboardPush", code="InternalError")
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await facade.stub.DescribeWhiteboardPush(
            pb.DescribeWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=PUSH_TASK), timeout=5
        )
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert facade.emulator.stats()["DescribeWhiteboardPush"].faulted == facade.server.settings.max_attempts


async def test_real_signature_failure_is_internal(start_facade: StartFacade) -> None:
    facade = await start_facade(TENCENTCLOUD_SECRET_KEY="not-the-emulators-key")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await facade.stub.DescribeWhiteboardPush(
            pb.DescribeWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=PUSH_TASK), timeout=5
        )
    assert caught.value.code() is grpc.StatusCode.INTERNAL
    info = error_info(caught.value)
    assert info.reason == "AuthFailure.SignatureFailure"


@pytest.mark.parametrize(
    ("fault", "reason", "metadata"),
    [
        (Fault(FaultKind.HTTP_STATUS, status=502), "UPSTREAM_HTTP_ERROR", {"http_status": "502"}),
        (Fault(FaultKind.HTTP_STATUS, status=404), "UPSTREAM_HTTP_ERROR", {"http_status": "404"}),
        (Fault(FaultKind.HTTP_STATUS, status=302), "UPSTREAM_HTTP_ERROR", {"http_status": "302"}),
        (Fault(FaultKind.MALFORMED), "UPSTREAM_MALFORMED", {}),
        (Fault(FaultKind.DROP), "UPSTREAM_CONNECTION_LOST", {}),
    ],
)
async def test_transport_failures_are_unavailable(
    facade: Facade, fault: Fault, reason: str, metadata: dict[str, str]
) -> None:
    facade.emulator.add_fault(fault)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await facade.stub.DescribeVideoGenerationTask(
            pb.DescribeVideoGenerationTaskRequest(sdk_app_id=SDK_APP_ID, task_id=VIDEO_TASK), timeout=5
        )
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    info = error_info(caught.value)
    assert info.reason == reason and info.domain == "tiw-facade"
    assert dict(info.metadata) == {"action": "DescribeVideoGenerationTask", "outcome": "unknown", **metadata}
    # The metric counts the same reason; the HTTP status is in ErrorInfo, not in a label.
    found = samples(await scrape(facade), "tiw_upstream_requests_total")
    assert found[(("action", "DescribeVideoGenerationTask"), ("code", reason))] >= 1


async def test_connection_refused_is_unavailable_and_not_sent(
    start_facade: StartFacade, unused_tcp_port: int
) -> None:
    facade = await start_facade(endpoint=f"http://127.0.0.1:{unused_tcp_port}")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await facade.stub.CreateSnapshotTask(create_request(), timeout=5)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    info = error_info(caught.value)
    assert info.reason == "UPSTREAM_UNREACHABLE" and info.metadata["outcome"] == "not_sent"


async def test_a_lost_create_is_unavailable_with_outcome_unknown(facade: Facade) -> None:
    facade.emulator.add_fault(Fault(FaultKind.DROP, action="CreateSnapshotTask"))  # executed, answer lost
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await facade.stub.CreateSnapshotTask(create_request(), timeout=5)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    info = error_info(caught.value)
    assert info.reason == "UPSTREAM_CONNECTION_LOST" and info.metadata["outcome"] == "unknown"
    assert facade.emulator.stats()["CreateSnapshotTask"].tasks_created == 1


@pytest.mark.slow
async def test_caller_deadline_bounds_a_slow_upstream(facade: Facade) -> None:
    # The upstream would answer in 5 s; the default upstream time-out is 10 s. A 200 ms deadline
    # must end the facade's attempt too, not only the caller's wait (which the client's own deadline
    # ends whatever the facade does): the attempt is counted when it ends, long before TIW answers.
    # A Stop, since a Describe's request is shared and, once sent, waits for TIW (docs/answers.md).
    facade.emulator.add_fault(Fault(FaultKind.LATENCY, action="StopWhiteboardPush", delay=5.0))
    registry = facade.server.metrics.registry

    def attempts_ended() -> float:
        return sum(
            sample.value
            for metric in registry.collect()
            if metric.name == "tiw_upstream_requests"
            for sample in metric.samples
            if sample.labels["action"] == "StopWhiteboardPush"
        )

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await facade.stub.StopWhiteboardPush(
            pb.StopWhiteboardPushRequest(task_id=PUSH_TASK, sdk_app_id=SDK_APP_ID), timeout=0.2
        )
    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    await wait_until(lambda: attempts_ended() == 1, within=3.0)  # TIW would have answered at 5 s


@pytest.mark.slow
@pytest.mark.parametrize("action", ["DescribeSnapshotTask", "CreateSnapshotTask"])
async def test_the_caller_gets_the_rich_status_before_its_own_deadline(facade: Facade, action: str) -> None:
    # Without a margin, the caller's timer and the upstream budget end together and the caller
    # gets its own bare DEADLINE_EXCEEDED, without ErrorInfo, never learning what TIW may have done.
    facade.emulator.add_fault(Fault(FaultKind.LATENCY, action=action, delay=5.0))
    request: Any = (
        create_request()
        if action == "CreateSnapshotTask"
        else pb.DescribeSnapshotTaskRequest(task_id="t", sdk_app_id=1)
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await getattr(facade.stub, action)(request, timeout=1.0)
    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    info = error_info(caught.value)
    assert info.reason == "UPSTREAM_TIMEOUT"
    assert dict(info.metadata) == {"action": action, "outcome": "unknown"}


@pytest.mark.slow
async def test_default_upstream_timeout_without_deadline(
    start_facade: StartFacade, emulator: Emulator
) -> None:
    facade = await start_facade(TIW_UPSTREAM_TIMEOUT="0.3")
    emulator.add_fault(Fault(FaultKind.LATENCY, action="DescribeSnapshotTask", delay=3.0))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await facade.stub.DescribeSnapshotTask(pb.DescribeSnapshotTaskRequest(task_id="t", sdk_app_id=1))
    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert error_info(caught.value).reason == "UPSTREAM_TIMEOUT"


async def test_a_huge_tiw_message_keeps_the_real_code(facade: Facade) -> None:
    # 20 KB of TIW text copied whole would overflow gRPC's trailers: RESOURCE_EXHAUSTED or INTERNAL
    # instead of TIW's code.
    text = "任务已停止 task already stopped; " * 600
    facade.emulator.add_fault(
        Fault(FaultKind.ERROR_CODE, action="DescribeWhiteboardPush", code="FailedOperation", message=text)
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await facade.stub.DescribeWhiteboardPush(
            pb.DescribeWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=PUSH_TASK), timeout=5
        )
    assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    details = caught.value.details() or ""
    assert details.endswith("…") and text.startswith(details[:-1])
    assert error_info(caught.value).reason == "FailedOperation"


# --- what the access log learns of each call (CallRecord), over a real channel ---------------------


class Recorder(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Stands in for the server's interceptor: gives every call a CallRecord and keeps it."""

    def __init__(self) -> None:
        self.records: list[CallRecord] = []

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        behavior = handler.unary_unary

        async def observed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            record = CallRecord()
            self.records.append(record)
            token = CURRENT_CALL.set(record)
            try:
                return await behavior(request, context)
            finally:
                CURRENT_CALL.reset(token)

        return grpc.unary_unary_rpc_method_handler(
            observed,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


Recorded = Callable[[str], Awaitable[tuple[tiw_pb2_grpc.TiwServiceStub, list[CallRecord]]]]


@pytest.fixture
async def recorded() -> AsyncIterator[Recorded]:
    """A bare gRPC server (handler + Recorder) in front of a TiwClient to ``endpoint``."""
    async with contextlib.AsyncExitStack() as resources:

        async def start(endpoint: str) -> tuple[tiw_pb2_grpc.TiwServiceStub, list[CallRecord]]:
            keys = Keys.from_config(KeysConfig(scope="test"))
            resources.push_async_callback(keys.aclose)
            client = await resources.enter_async_context(tiw_client(endpoint, max_attempts=1))
            recorder = Recorder()
            server = grpc.aio.server(interceptors=[recorder])
            server.add_generic_rpc_handlers((build_handler(client, keys),))
            port = server.add_insecure_port("127.0.0.1:0")
            resources.push_async_callback(server.stop, 0)
            await server.start()
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
            resources.push_async_callback(channel.close)
            return tiw_pb2_grpc.TiwServiceStub(channel), recorder.records

        yield start


async def test_a_failed_call_records_its_code_and_request_id(emulator: Emulator, recorded: Recorded) -> None:
    stub, records = await recorded(emulator.url)
    emulator.add_fault(Fault(FaultKind.ERROR_CODE, action="DescribeWhiteboardPush", code="InvalidParameter"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.DescribeWhiteboardPush(
            pb.DescribeWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=PUSH_TASK), timeout=5
        )
    (record,) = records
    assert (record.action, record.tiw_code) == ("DescribeWhiteboardPush", "InvalidParameter")
    assert record.request_id and record.request_id == error_info(caught.value).metadata["request_id"]
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.DescribeWhiteboardPush(pb.DescribeWhiteboardPushRequest(), timeout=5)
    assert records[1].tiw_code == "INVALID_REQUEST"
    emulator.add_fault(Fault(FaultKind.HTTP_STATUS, status=503))
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.DescribeWhiteboardPush(
            pb.DescribeWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=PUSH_TASK), timeout=5
        )
    assert records[2].tiw_code == "UPSTREAM_HTTP_ERROR"


async def test_an_answer_that_does_not_fit_the_message_keeps_its_request_id(recorded: Recorded) -> None:
    # A TIW answer whose TaskId is a number: not the contract's string.
    upstream = RawUpstream(http(envelope({"TaskId": 5, "RequestId": "req-7"})))
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    try:
        stub, records = await recorded(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.DescribeWhiteboardPush(
                pb.DescribeWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=PUSH_TASK), timeout=5
            )
    finally:
        server.close()
        await server.wait_closed()
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    info = error_info(caught.value)
    assert info.reason == "UPSTREAM_MALFORMED" and info.metadata["request_id"] == "req-7"
    assert "TaskId" in (caught.value.details() or "")
    (record,) = records
    assert (record.tiw_code, record.request_id) == ("UPSTREAM_MALFORMED", "req-7")
