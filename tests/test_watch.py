"""TaskWatcher end to end: a real gRPC channel, the facade, real HTTP to the emulator.

The emulator's tasks here stay in their first state until a test moves them (by editing the
emulator's task, as TIW's own progress would, or by StopWhiteboardPush): every expected message is
then certain, whatever the machine's speed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from support.facade import Facade, StartFacade
from support.rich_status import details, error_info
from support.tiw import SDK_APP_ID, upstream_requests
from support.waiting import wait_until
from support.watching import active_watches, ended, snapshot_watch, watcher
from tiw_facade._proto.tiw.facade.v1 import watcher_pb2 as wpb
from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as pb
from tiw_facade.emulator import Emulator, EmulatorConfig

LONG = 3600.0  # seconds: longer than any test, so a task moves only when the test moves it
TIMEOUT = 30.0  # a generous deadline for streams that must end by themselves


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    """conftest's emulator, with tasks that never move on by themselves."""
    instance = Emulator(
        EmulatorConfig(snapshot_seconds=LONG, push_prepare_seconds=LONG, video_queue_seconds=LONG)
    )
    await instance.start("127.0.0.1", 0)
    yield instance
    await instance.stop()


def snapshot_task(facade: Facade) -> str:
    """A snapshot task, Running until the test finishes it."""
    return facade.emulator.add_snapshot_task(sdk_app_id=SDK_APP_ID)


def finish_snapshot(emulator: Emulator, task_id: str) -> None:
    emulator.tasks.snapshots[SDK_APP_ID, task_id].finishes = time.time()


async def remaining(call: grpc.aio.UnaryStreamCall) -> list[Any]:
    """The messages still to come on ``call``, to its end. (A test reads the first with ``read()``, and
    grpc allows no ``async for`` on a call read that way.)"""
    found = []
    while (message := await call.read()) is not grpc.aio.EOF:
        found.append(message)
    return found


@pytest.mark.slow
async def test_snapshot_watch_sees_running_then_finished_and_ends_ok(facade: Facade) -> None:
    task_id = snapshot_task(facade)
    call = watcher(facade).WatchSnapshotTask(snapshot_watch(task_id), timeout=TIMEOUT)
    first = await call.read()
    assert isinstance(first, pb.DescribeSnapshotTaskResponse)  # the Describe RPC's own message
    assert (first.task_id, first.status) == (task_id, "Running")
    assert first.request_id and not first.HasField("finish_time")
    finish_snapshot(facade.emulator, task_id)
    later = await remaining(call)
    assert [m.status for m in later] == ["Finished"]  # a change each: no repeat of Running
    assert later[-1].result.error_code == "OK" and later[-1].finish_time > 0
    assert await call.code() == grpc.StatusCode.OK
    await wait_until(lambda: active_watches(facade) == 0)


async def test_a_finished_task_is_sent_once_and_the_stream_ends(facade: Facade) -> None:
    task_id = snapshot_task(facade)
    finish_snapshot(facade.emulator, task_id)
    call = watcher(facade).WatchSnapshotTask(snapshot_watch(task_id), timeout=TIMEOUT)
    assert [m.status for m in await remaining(call)] == ["Finished"]
    assert await call.code() == grpc.StatusCode.OK


async def test_push_watch_sees_stopped_after_stop(facade: Facade) -> None:
    task_id = facade.emulator.add_push_task()
    describe = pb.DescribeWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=task_id)
    request = wpb.WatchWhiteboardPushRequest(request=describe)
    call = watcher(facade).WatchWhiteboardPush(request, timeout=TIMEOUT)
    first = await call.read()
    assert isinstance(first, pb.DescribeWhiteboardPushResponse)
    assert (first.task_id, first.status) == (task_id, "PREPARED")
    await facade.stub.StopWhiteboardPush(
        pb.StopWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=task_id), timeout=5
    )
    later = await remaining(call)
    assert [m.status for m in later] == ["STOPPED"]
    assert later[-1].finish_reason == "USER_CALL"
    assert await call.code() == grpc.StatusCode.OK


@pytest.mark.slow
async def test_video_watch_ends_after_finished(facade: Facade) -> None:
    task_id = facade.emulator.add_video_task(sdk_app_id=SDK_APP_ID)
    describe = pb.DescribeVideoGenerationTaskRequest(sdk_app_id=SDK_APP_ID, task_id=task_id)
    request = wpb.WatchVideoGenerationTaskRequest(request=describe)
    call = watcher(facade).WatchVideoGenerationTask(request, timeout=TIMEOUT)
    first = await call.read()
    assert isinstance(first, pb.DescribeVideoGenerationTaskResponse)
    assert first.status == "QUEUED"
    task = facade.emulator.tasks.videos[SDK_APP_ID, task_id]
    task.processing_from = task.finishes = time.time()
    later = await remaining(call)
    assert [m.status for m in later] == ["FINISHED"]
    assert later[-1].video_info_list
    assert await call.code() == grpc.StatusCode.OK


async def test_unknown_task_is_not_found_with_error_info(facade: Facade) -> None:
    call = watcher(facade).WatchSnapshotTask(snapshot_watch("no-such-task"), timeout=TIMEOUT)
    error = await ended(call)
    assert error.code() == grpc.StatusCode.NOT_FOUND
    info = error_info(error)
    assert info.reason == "InvalidParameter.TaskNotFound"
    assert info.domain == "tiw.tencentcloudapi.com"
    assert info.metadata["action"] == "DescribeSnapshotTask"  # the Describe action behind the watch
    assert info.metadata["request_id"]


@pytest.mark.parametrize(
    ("request_message", "fields"),
    [
        (snapshot_watch("", sdk_app_id=0), {"request.TaskID", "request.SdkAppId"}),
        (snapshot_watch("a task"), {"request.TaskID"}),  # not a task ID's shape
        (wpb.WatchSnapshotTaskRequest(), {"request.TaskID", "request.SdkAppId"}),  # no request at all
    ],
)
async def test_invalid_request_names_the_field_and_sends_nothing_upstream(
    facade: Facade, request_message: wpb.WatchSnapshotTaskRequest, fields: set[str]
) -> None:
    error = await ended(watcher(facade).WatchSnapshotTask(request_message, timeout=TIMEOUT))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad = details(error)["BadRequest"]
    assert {violation.field for violation in bad.field_violations} == fields  # type: ignore[attr-defined]
    assert error_info(error).metadata["action"] == "DescribeSnapshotTask"
    assert upstream_requests(facade.emulator) == 0


async def test_undecodable_request_is_invalid_argument(facade: Facade) -> None:
    method = facade.channel.unary_stream("/tiw.facade.v1.TaskWatcher/WatchSnapshotTask")
    error = await ended(method(b"\xff\xff\xff", timeout=TIMEOUT))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(error).reason == "MALFORMED_REQUEST"
    assert upstream_requests(facade.emulator) == 0


@pytest.mark.slow
async def test_deadline_ends_the_stream_deadline_exceeded(facade: Facade) -> None:
    task_id = snapshot_task(facade)
    call = watcher(facade).WatchSnapshotTask(snapshot_watch(task_id), timeout=1.5)
    assert (await call.read()).status == "Running"
    assert (await ended(call)).code() == grpc.StatusCode.DEADLINE_EXCEEDED  # the task never changed
    await wait_until(lambda: active_watches(facade) == 0)


async def test_cancelled_watch_leaves_nothing_behind(start_facade: StartFacade) -> None:
    facade = await start_facade(TIW_MAX_WATCHES="1")
    task_id = snapshot_task(facade)
    call = watcher(facade).WatchSnapshotTask(snapshot_watch(task_id), timeout=TIMEOUT)
    assert (await call.read()).status == "Running"
    assert active_watches(facade) == 1
    call.cancel()
    await wait_until(lambda: active_watches(facade) == 0)
    # Its slot is free again: with room for one watch, the next one is served.
    again = watcher(facade).WatchSnapshotTask(snapshot_watch(task_id), timeout=TIMEOUT)
    assert (await again.read()).status == "Running"
    again.cancel()


@pytest.mark.slow
async def test_beyond_max_watches_is_resource_exhausted(start_facade: StartFacade) -> None:
    facade = await start_facade(TIW_MAX_WATCHES="1")
    task_id = snapshot_task(facade)
    first = watcher(facade).WatchSnapshotTask(snapshot_watch(task_id), timeout=TIMEOUT)
    assert (await first.read()).status == "Running"
    error = await ended(watcher(facade).WatchSnapshotTask(snapshot_watch(task_id), timeout=TIMEOUT))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = error_info(error)
    assert (info.reason, info.metadata["outcome"]) == ("TOO_MANY_WATCHES", "not_sent")
    # The refused one did not take the open one's place: that one still ends as it should.
    finish_snapshot(facade.emulator, task_id)
    assert [m.status for m in await remaining(first)] == ["Finished"]
    assert await first.code() == grpc.StatusCode.OK


async def test_server_stop_ends_open_watches_unavailable(facade: Facade) -> None:
    task_id = snapshot_task(facade)
    push_id = facade.emulator.add_push_task()
    push = pb.DescribeWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=push_id)
    calls = [
        watcher(facade).WatchSnapshotTask(snapshot_watch(task_id), timeout=TIMEOUT),
        watcher(facade).WatchWhiteboardPush(wpb.WatchWhiteboardPushRequest(request=push), timeout=TIMEOUT),
    ]
    for call in calls:
        await call.read()
    # A grace far longer than the test: the watches must end because of the drain, not of its end.
    stopping = asyncio.create_task(facade.server.stop(grace=TIMEOUT))
    for call in calls:
        error = await ended(call)  # nothing changed: no message before the end
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert error_info(error).reason == "SHUTTING_DOWN"  # reconnect: another replica serves it
    await asyncio.wait_for(stopping, TIMEOUT)
