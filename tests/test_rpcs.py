"""All five RPCs end to end: a real gRPC channel, the facade, real HTTP to the emulator."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from conftest import Facade, StartFacade, unpack_details
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as pb
from tiw_facade.emulator import Emulator, Fault, FaultKind

SDK_APP_ID = 1400000001  # the SdkAppId of the emulator's seeded (documented) tasks
PUSH_TASK = "ghucnligqtgtvk2624mb"
VIDEO_TASK = "00e1jv8ve0jcqk7da9lb"


def create_request() -> pb.CreateSnapshotTaskRequest:
    """The seed's example input."""
    return pb.CreateSnapshotTaskRequest(
        cos=pb.SnapshotCOS(
            target_dir="snapshot/",
            region="ap-guangzhou",
            bucket="test-123070000",
            domain="xxx.file.com",
            uin=130001358,
        ),
        whiteboard=pb.SnapshotWhiteboard(width=1280, init_params='{"ratio":"16:9"}', height=720),
        room_id=12345,
        sdk_app_id=1400123480,
        callback_url="http://xx/callback",
    )


def rich(error: grpc.aio.AioRpcError) -> dict[str, object]:
    """The details of a rich status, by type name."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "the status carries google.rpc.Status details"
    return dict(unpack_details(status))


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
        pb.DescribeSnapshotTaskRequest(task_id=created.task_id, sdk_app_id=1400123480), timeout=5
    )
    assert finished.status == "Finished"
    assert finished.finish_time >= finished.create_time
    assert finished.result.error_code == "OK"
    assert finished.result.total == len(finished.result.snapshots) > 0
    assert facade.emulator.stats()["CreateSnapshotTask"].tasks_created == 1


async def test_whiteboard_push_lifecycle(facade: Facade) -> None:
    request = pb.DescribeWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=PUSH_TASK)
    prepared = await facade.stub.DescribeWhiteboardPush(request, timeout=5)
    assert prepared.task_id == PUSH_TASK and prepared.status == "PREPARED"
    await asyncio.sleep(0.4)
    pushing = await facade.stub.DescribeWhiteboardPush(request, timeout=5)
    assert pushing.status == "PUSHING" and pushing.push_start_time > 0 and not pushing.finish_reason
    stopped = await facade.stub.StopWhiteboardPush(
        pb.StopWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=PUSH_TASK), timeout=5
    )
    assert stopped.request_id
    after = await facade.stub.DescribeWhiteboardPush(request, timeout=5)
    assert after.status == "STOPPED"
    assert after.finish_reason == "USER_CALL"
    assert after.push_stop_time >= after.push_start_time > 0
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await facade.stub.StopWhiteboardPush(
            pb.StopWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=PUSH_TASK), timeout=5
        )
    assert again.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    info = rich(again.value)["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.reason == "UnsupportedOperation.TaskHasAlreadyStopped"


async def test_video_generation_lifecycle(facade: Facade) -> None:
    task = facade.emulator.add_video_task(sdk_app_id=SDK_APP_ID)
    request = pb.DescribeVideoGenerationTaskRequest(sdk_app_id=SDK_APP_ID, task_id=task)
    first = await facade.stub.DescribeVideoGenerationTask(request, timeout=5)
    assert first.task_id == task and first.status in {"QUEUED", "PROCESSING"}
    await asyncio.sleep(0.7)
    done = await facade.stub.DescribeVideoGenerationTask(request, timeout=5)
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
    bad_request = rich(caught.value)["BadRequest"]
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
    info = rich(caught.value)["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.reason == tiw_code
    assert info.domain == facade.server.settings.upstream_host
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
    info = rich(caught.value)["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo) and info.reason == "AuthFailure.SignatureFailure"


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        (Fault(FaultKind.HTTP_STATUS, status=502), "HTTP_502"),
        (Fault(FaultKind.HTTP_STATUS, status=404), "HTTP_404"),
        (Fault(FaultKind.MALFORMED), "MalformedResponse"),
        (Fault(FaultKind.DROP), "ConnectionError"),
    ],
)
async def test_transport_failures_are_unavailable(facade: Facade, fault: Fault, reason: str) -> None:
    facade.emulator.add_fault(fault)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await facade.stub.DescribeVideoGenerationTask(
            pb.DescribeVideoGenerationTaskRequest(sdk_app_id=SDK_APP_ID, task_id=VIDEO_TASK), timeout=5
        )
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    info = rich(caught.value)["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo) and info.reason == reason


async def test_connection_refused_is_unavailable(start_facade: StartFacade, unused_tcp_port: int) -> None:
    facade = await start_facade(endpoint=f"http://127.0.0.1:{unused_tcp_port}")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await facade.stub.DescribeSnapshotTask(
            pb.DescribeSnapshotTaskRequest(task_id="t", sdk_app_id=1), timeout=5
        )
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    info = rich(caught.value)["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo) and info.reason == "ConnectionError"


async def test_caller_deadline_bounds_a_slow_upstream(facade: Facade) -> None:
    # The upstream would answer in 5 s; the default upstream time-out is 10 s. A 200 ms deadline
    # must end the call in about 200 ms.
    facade.emulator.add_fault(Fault(FaultKind.LATENCY, action="DescribeSnapshotTask", delay=5.0))
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await facade.stub.DescribeSnapshotTask(
            pb.DescribeSnapshotTaskRequest(task_id="t", sdk_app_id=1), timeout=0.2
        )
    elapsed = time.monotonic() - started
    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < 1.5, f"took {elapsed:.2f}s: the upstream time-out did not follow the deadline"


async def test_default_upstream_timeout_without_deadline(
    start_facade: StartFacade, emulator: Emulator
) -> None:
    facade = await start_facade(TIW_UPSTREAM_TIMEOUT="0.3")
    emulator.add_fault(Fault(FaultKind.LATENCY, action="DescribeSnapshotTask", delay=3.0))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await facade.stub.DescribeSnapshotTask(pb.DescribeSnapshotTaskRequest(task_id="t", sdk_app_id=1))
    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    info = rich(caught.value)["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo) and info.reason == "Timeout"
