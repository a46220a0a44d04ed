"""Retries by what is safe, and Tencent's own throttling, through the real facade and emulator."""

from __future__ import annotations

import time

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from support.facade import Facade, StartFacade
from support.pages import retries, samples, scrape
from support.rich_status import error_info
from support.tiw import PUSH_TASK, SDK_APP_ID, VIDEO_TASK, create_request
from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as pb
from tiw_facade.emulator import Emulator, Fault, FaultKind
from tiw_facade.handler import POLICIES, SERVICE, retry_policy
from tiw_facade.retries import NEVER_RESEND, RetryPolicy


def describe_video() -> pb.DescribeVideoGenerationTaskRequest:
    return pb.DescribeVideoGenerationTaskRequest(sdk_app_id=SDK_APP_ID, task_id=VIDEO_TASK)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        (Fault(FaultKind.HTTP_STATUS, status=503, count=1), "UPSTREAM_HTTP_ERROR"),
        (Fault(FaultKind.DROP, count=1), "UPSTREAM_CONNECTION_LOST"),
        (Fault(FaultKind.ERROR_CODE, code="InternalError", count=2), "InternalError"),
        (Fault(FaultKind.LATENCY, delay=2.0, count=1), "UPSTREAM_TIMEOUT"),
    ],
)
async def test_reads_are_retried(start_facade: StartFacade, fault: Fault, reason: str) -> None:
    facade = await start_facade(TIW_UPSTREAM_TIMEOUT="0.5")  # a single attempt's time-out
    facade.emulator.add_fault(fault)
    answer = await facade.stub.DescribeVideoGenerationTask(describe_video(), timeout=5)
    assert answer.task_id == VIDEO_TASK
    assert (await retries(facade, "DescribeVideoGenerationTask"))[reason] == (fault.count or 0)


async def test_retries_stop_at_the_attempt_cap(start_facade: StartFacade) -> None:
    facade = await start_facade(TIW_MAX_ATTEMPTS="2")
    facade.emulator.add_fault(Fault(FaultKind.HTTP_STATUS, status=502))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await facade.stub.DescribeVideoGenerationTask(describe_video(), timeout=5)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert facade.emulator.stats()["DescribeVideoGenerationTask"].faulted == 2


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fault", "code"),
    [
        # TIW executed the request (a task exists) but its answer never came back in time.
        (Fault(FaultKind.LATENCY, delay=2.0, count=1), grpc.StatusCode.DEADLINE_EXCEEDED),
        (Fault(FaultKind.DROP, count=1), grpc.StatusCode.UNAVAILABLE),
    ],
)
async def test_create_is_never_resent_once_tiw_may_have_it(
    start_facade: StartFacade, fault: Fault, code: grpc.StatusCode
) -> None:
    facade = await start_facade(TIW_UPSTREAM_TIMEOUT="0.5")
    facade.emulator.add_fault(fault)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await facade.stub.CreateSnapshotTask(create_request(), timeout=5)
    assert caught.value.code() is code
    assert error_info(caught.value).metadata["outcome"] == "unknown"  # the caller must not just retry
    stats = facade.emulator.stats()["CreateSnapshotTask"]
    assert stats.accepted == 1 and stats.tasks_created == 1, "exactly one task: no duplicate"
    assert await retries(facade, "CreateSnapshotTask") == {}


@pytest.mark.parametrize(
    "fault",
    [
        Fault(FaultKind.HTTP_STATUS, status=502, count=1),
        Fault(FaultKind.ERROR_CODE, code="InternalError", count=1),
    ],
)
async def test_create_is_not_resent_after_an_ambiguous_failure(facade: Facade, fault: Fault) -> None:
    facade.emulator.add_fault(fault)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await facade.stub.CreateSnapshotTask(create_request(), timeout=5)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert facade.emulator.stats()["CreateSnapshotTask"].faulted == 1


@pytest.mark.slow
@pytest.mark.parametrize("code", ["RequestLimitExceeded", "AuthFailure.SignatureExpire"])
async def test_create_is_resent_when_tiw_provably_did_not_execute_it(facade: Facade, code: str) -> None:
    facade.emulator.add_fault(Fault(FaultKind.ERROR_CODE, action="CreateSnapshotTask", code=code, count=1))
    answer = await facade.stub.CreateSnapshotTask(create_request(), timeout=5)
    assert answer.task_id
    assert facade.emulator.stats()["CreateSnapshotTask"].tasks_created == 1
    assert (await retries(facade, "CreateSnapshotTask")) == {code: 1}


async def test_create_is_resent_when_the_connection_was_never_made(
    start_facade: StartFacade, unused_tcp_port: int
) -> None:
    facade = await start_facade(endpoint=f"http://127.0.0.1:{unused_tcp_port}", TIW_MAX_ATTEMPTS="3")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await facade.stub.CreateSnapshotTask(create_request(), timeout=5)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert await retries(facade, "CreateSnapshotTask") == {"UPSTREAM_UNREACHABLE": 2}
    assert error_info(caught.value).metadata["outcome"] == "not_sent"


def test_every_method_has_the_policy_its_proto_declares() -> None:
    assert set(POLICIES) == {method.name for method in SERVICE.methods}
    read = RetryPolicy(resend_maybe_delivered=True)
    assert dict(POLICIES) == {
        "CreateSnapshotTask": NEVER_RESEND,  # no idempotency_level: a duplicate task is worse than an error
        "DescribeSnapshotTask": read,
        "DescribeWhiteboardPush": read,
        "DescribeVideoGenerationTask": read,
        "StopWhiteboardPush": RetryPolicy(
            resend_maybe_delivered=True,
            success_after_lost_answer="UnsupportedOperation.TaskHasAlreadyStopped",
        ),
    }


def test_a_method_without_idempotency_level_is_never_resent() -> None:
    # A method added to the proto without a declaration gets the safe policy, not the reads'.
    file = descriptor_pb2.FileDescriptorProto(name="new.proto", package="new")
    file.message_type.add(name="M")
    service = file.service.add(name="S")
    service.method.add(name="CreateSomething", input_type=".new.M", output_type=".new.M")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    method = pool.FindMethodByName("new.S.CreateSomething")
    assert retry_policy(method) == NEVER_RESEND
    assert not NEVER_RESEND.resend_maybe_delivered


async def test_stop_whose_answer_was_lost_succeeds(facade: Facade, emulator: Emulator) -> None:
    task = emulator.add_push_task(sdk_app_id=SDK_APP_ID)
    emulator.add_fault(Fault(FaultKind.DROP, action="StopWhiteboardPush", count=1))  # stops it, answer lost
    answer = await facade.stub.StopWhiteboardPush(
        pb.StopWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=task), timeout=5
    )
    assert answer.request_id
    assert emulator.stats()["StopWhiteboardPush"].accepted == 2
    # Without a lost answer, stopping a stopped task is the caller's error, as TIW says.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await facade.stub.StopWhiteboardPush(
            pb.StopWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=task), timeout=5
        )
    assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.slow
async def test_tencent_throttling_pauses_the_action_and_retries(facade: Facade) -> None:
    facade.emulator.add_fault(
        Fault(FaultKind.ERROR_CODE, action="DescribeWhiteboardPush", code="RequestLimitExceeded", count=1)
    )
    started = time.monotonic()
    answer = await facade.stub.DescribeWhiteboardPush(
        pb.DescribeWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=PUSH_TASK), timeout=5
    )
    assert answer.task_id == PUSH_TASK
    # The retry waited out the window in which Tencent had no quota left for us.
    assert time.monotonic() - started >= 0.9
    text = await scrape(facade)
    assert samples(text, "tiw_limiter_pauses_total")[(("action", "DescribeWhiteboardPush"),)] == 1
    assert (
        samples(text, "tiw_upstream_requests_total")[
            (("action", "DescribeWhiteboardPush"), ("code", "RequestLimitExceeded"))
        ]
        == 1
    )


async def test_throttled_without_time_to_wait_is_resource_exhausted(facade: Facade) -> None:
    facade.emulator.add_fault(
        Fault(
            FaultKind.ERROR_CODE,
            action="DescribeWhiteboardPush",
            code="RequestLimitExceeded.UinLimitExceeded",
        )
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await facade.stub.DescribeWhiteboardPush(
            pb.DescribeWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=PUSH_TASK), timeout=0.5
        )
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
