"""TIW's callbacks end to end: the emulator posts its tasks' changes, signed, over real HTTP to one
replica's intake; two facades share a real redis-server; watchers and subscribers use real gRPC.

Answers are kept fresh by callbacks alone here: TIW_MAX_STALENESS is 30 s, so the periodic refresh
(at 27 s) never runs within a test, and a change a watcher sees came through a callback.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from support.callbacks import post, signed_body
from support.facade import Facade, StartFacade
from support.redis_server import RedisServer
from tiw_facade._proto.tiw.facade.v1 import events_pb2, events_pb2_grpc, watcher_pb2, watcher_pb2_grpc
from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as pb
from tiw_facade.emulator import DEMO_CALLBACK_KEY, CallbackFault, CallbackFaultKind

# Real processes' worth of waiting (a redis-server, two facades, callbacks in flight).
pytestmark = pytest.mark.slow

APP = 1400000001
KEY = DEMO_CALLBACK_KEY
PUSH = "DescribeWhiteboardPush"
CALLBACKS = "tiw_callbacks_total"


async def fleet(start_facade: StartFacade, redis_server: RedisServer, **extra: str) -> tuple[Facade, Facade]:
    """Two replicas sharing Redis, each with an intake; the emulator's push callbacks go to the first."""
    settings = {
        "TIW_REDIS_URL": redis_server.url,
        "TIW_CALLBACK_PORT": "0",
        "TIW_CALLBACK_KEYS": f"{APP}={DEMO_CALLBACK_KEY}",
        "TIW_MAX_STALENESS": "30",
        **extra,
    }
    first, second = await start_facade(**settings), await start_facade(**settings)
    # The first admission against a brand-new Redis waits about a second (docs/limiter.md, "Redis
    # restarts"): taken here, before the tests' tasks start their clocks.
    warm_up = first.emulator.add_push_task(sdk_app_id=APP, prepare_seconds=60)
    await first.stub.DescribeWhiteboardPush(pb.DescribeWhiteboardPushRequest(sdk_app_id=APP, task_id=warm_up))
    first.emulator.callbacks.routes.push_urls[APP] = f"{intake(first)}/callbacks/push"
    return first, second


def intake(facade: Facade) -> str:
    return f"http://127.0.0.1:{facade.server.callback_port}"


def counted(facade: Facade, name: str, **labels: str) -> float:
    return facade.server.metrics.registry.get_sample_value(name, labels) or 0.0


async def statuses(stream: AsyncIterator[pb.DescribeWhiteboardPushResponse]) -> list[str]:
    return [answer.status async for answer in stream]


async def events(
    facade: Facade, cursor: str = "", count: int = 1, **filters: list[str]
) -> list[events_pb2.Event]:
    """The first ``count`` events a new subscription on ``facade`` gets."""
    stub = events_pb2_grpc.EventStreamStub(facade.channel)
    request = events_pb2.WatchEventsRequest(sdk_app_ids=[APP], cursor=cursor, **filters)
    call = stub.WatchEvents(request, timeout=10)
    got = []
    async for event in call:
        got.append(event)
        if len(got) == count:
            break
    call.cancel()
    return got


async def subscribed(facade: Facade) -> grpc.aio.UnaryStreamCall[Any, events_pb2.Event]:
    """A subscription on ``facade`` whose stream is open at the facade (its first read pending)."""
    stub = events_pb2_grpc.EventStreamStub(facade.channel)
    call = stub.WatchEvents(events_pb2.WatchEventsRequest(sdk_app_ids=[APP]), timeout=15)
    await _until(lambda: counted(facade, "tiw_event_watches_active") >= 1)
    return call


async def _until(condition: object, within: float = 10.0) -> None:
    assert callable(condition)
    end = time.monotonic() + within
    while not condition():
        assert time.monotonic() < end, "not so in time"
        await asyncio.sleep(0.02)


async def test_a_change_reaches_a_watcher_on_another_replica_through_one_callback(
    start_facade: StartFacade, redis_server: RedisServer
) -> None:
    first, second = await fleet(start_facade, redis_server)
    before = len(first.emulator.arrivals(PUSH))
    task = first.emulator.add_push_task(sdk_app_id=APP, prepare_seconds=0.5, push_seconds=0.5)
    watcher = watcher_pb2_grpc.TaskWatcherStub(second.channel)
    request = pb.DescribeWhiteboardPushRequest(sdk_app_id=APP, task_id=task)
    stream = watcher.WatchWhiteboardPush(watcher_pb2.WatchWhiteboardPushRequest(request=request), timeout=10)
    # PREPARED at once, then PUSHING and STOPPED as the callbacks came: without them, a watch with
    # a 30 s bound would see neither within its 10 s deadline.
    assert await statuses(stream) == ["PREPARED", "PUSHING", "STOPPED"]
    assert counted(first, "tiw_callbacks_total", kind="push", result="accepted") == 2
    sent = counted(first, "tiw_callback_confirms_total", action=PUSH, outcome="sent")
    assert counted(second, "tiw_callback_confirms_total", action=PUSH, outcome="sent") == 0
    # The watch's first answer, then one request per callback, by the replica that took it (the
    # second may wait for the turn the first took); none by the watcher's own replica.
    assert sent == 2
    assert len(first.emulator.arrivals(PUSH)) == before + 1 + 2


async def test_a_subscriber_on_another_replica_resumes_after_its_cursor(
    start_facade: StartFacade, redis_server: RedisServer
) -> None:
    first, second = await fleet(start_facade, redis_server)
    call = await subscribed(second)
    task = first.emulator.add_push_task(sdk_app_id=APP, prepare_seconds=0.2, push_seconds=0.3)
    started = await anext(aiter(call))
    call.cancel()
    assert (started.event_type, started.task_id, started.kind) == ("WhiteboardPushStarted", task, "push")
    # Meanwhile, disconnected: the push stops, and its callback is taken by the first replica.
    await _until(lambda: counted(first, "tiw_callbacks_total", kind="push", result="accepted") == 2)
    missed = await events(second, cursor=started.cursor)
    assert [(event.event_type, event.task_id) for event in missed] == [("WhiteboardPushStopped", task)]
    assert missed[0].body.startswith(b"{") and b'"WhiteboardPushStopped"' in missed[0].body


async def test_the_emulators_faults_reach_the_intake_as_tiw_s_would(
    start_facade: StartFacade, redis_server: RedisServer
) -> None:
    first, _ = await fleet(start_facade, redis_server)
    emulator = first.emulator
    faults = [
        (CallbackFaultKind.DUPLICATE, "replayed"),
        (CallbackFaultKind.BAD_SIGN, "bad_sign"),
        (CallbackFaultKind.EXPIRED, "expired"),
    ]
    for kind, result in faults:
        emulator.add_callback_fault(CallbackFault(kind, count=1))
        call = await subscribed(first)
        task = emulator.add_push_task(sdk_app_id=APP, prepare_seconds=0.1)
        await _until(
            lambda result=result: counted(first, "tiw_callbacks_total", kind="push", result=result) == 1
        )
        if kind is CallbackFaultKind.DUPLICATE:  # taken once, acknowledged twice
            event = await anext(aiter(call))
            assert event.task_id == task
        call.cancel()
    # A dropped callback never comes; a delayed one comes late, and is taken.
    emulator.add_callback_fault(CallbackFault(CallbackFaultKind.DROP, count=1))
    emulator.add_push_task(sdk_app_id=APP, prepare_seconds=0.1)
    await _until(lambda: emulator.callback_stats().dropped == 1)
    emulator.add_callback_fault(CallbackFault(CallbackFaultKind.DELAY, count=1, delay=0.5))
    call = await subscribed(first)
    task = emulator.add_push_task(sdk_app_id=APP, prepare_seconds=0.1)
    event = await anext(aiter(call))
    call.cancel()
    assert event.task_id == task
    record = next(record for record in emulator.task_records() if record.task_id == task)
    pushing = next(at for at, state in record.changes if state == "PUSHING")
    assert event.received_at.ToMicroseconds() / 1e6 >= pushing + 0.5
    accepted = counted(first, "tiw_callbacks_total", kind="push", result="accepted")
    assert accepted == 2, "the duplicate's first delivery and the delayed one; nothing refused taken"


async def test_a_flood_under_one_signature_costs_at_most_the_bound(
    start_facade: StartFacade, redis_server: RedisServer
) -> None:
    """TIW's Sign does not cover the body: whoever saw one can post any body under it until it
    expires. A flood naming a watched task costs one request now and one at the turn's end; one
    naming tasks nobody asked about costs none; and no body is ever taken for a state."""
    first, second = await fleet(start_facade, redis_server, TIW_CALLBACK_CONFIRM_INTERVAL="5")
    task = first.emulator.add_push_task(sdk_app_id=APP, prepare_seconds=60)
    watcher = watcher_pb2_grpc.TaskWatcherStub(second.channel)
    request = pb.DescribeWhiteboardPushRequest(sdk_app_id=APP, task_id=task)
    stream = watcher.WatchWhiteboardPush(watcher_pb2.WatchWhiteboardPushRequest(request=request), timeout=20)
    first_answer = await anext(aiter(stream))
    assert first_answer.status == "PREPARED"
    before = len(first.emulator.arrivals(PUSH))
    now = int(time.time())
    for stamp in range(40):  # distinct Timestamps: not replays, each a new "event"
        forged = signed_body(
            "WhiteboardPushStopped",
            sdk_app_id=APP,
            key=DEMO_CALLBACK_KEY,
            task_id=task,
            timestamp=now - stamp,
        )
        assert (await post(f"{intake(first)}/callbacks/push", forged))[0] == 200
        unknown = signed_body("push", sdk_app_id=APP, key=DEMO_CALLBACK_KEY, task_id=f"no-such-{stamp}")
        assert (await post(f"{intake(first)}/callbacks/push", unknown))[0] == 200
    await _until(lambda: counted(first, "tiw_callback_confirms_total", action=PUSH, outcome="sent") == 1)
    await asyncio.sleep(0.5)
    assert len(first.emulator.arrivals(PUSH)) == before + 1, "one request now; the rest wait for the turn"
    stream.cancel()
    # The forged "Stopped" changed nothing: TIW still says PREPARED.
    answer = await first.stub.DescribeWhiteboardPush(request, timeout=5)
    assert answer.status == "PREPARED"
