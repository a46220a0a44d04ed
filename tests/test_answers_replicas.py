"""Answers shared by replicas through a real redis-server: one replica's answer serves the others'
callers, a stop on one is seen on the next call on another, one refresh schedule for all, and Redis
trouble degrades to per-process caching, never to wrong answers or failures."""

from __future__ import annotations

import asyncio

import pytest
from support.answers import describe, upstream
from support.facade import Facade, StartFacade
from support.redis_server import RedisServer
from support.tiw import SDK_APP_ID
from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as pb

pytestmark = pytest.mark.slow  # replicas on a real redis-server, and real refresh schedules and windows


async def replicas(
    start_facade: StartFacade, redis: RedisServer, count: int = 2, **extra: str
) -> list[Facade]:
    return [
        await start_facade(TIW_REDIS_URL=redis.url, TIW_EXPECTED_REPLICAS=str(count), **extra)
        for _ in range(count)
    ]


async def test_one_replicas_answer_serves_another_replicas_callers(
    start_facade: StartFacade, redis_server: RedisServer
) -> None:
    first, second = await replicas(start_facade, redis_server)
    task = first.emulator.add_snapshot_task(sdk_app_id=SDK_APP_ID, run_seconds=60)
    answer, metadata = await describe(first, task)
    assert metadata["tiw-source"] == "upstream"
    again, metadata = await describe(second, task)
    assert metadata["tiw-source"] == "cache"
    assert again.request_id == answer.request_id
    assert upstream(first.emulator) == 1


async def test_identical_calls_on_two_replicas_share_one_request(
    start_facade: StartFacade, redis_server: RedisServer
) -> None:
    first, second = await replicas(start_facade, redis_server)
    task = first.emulator.add_snapshot_task(sdk_app_id=SDK_APP_ID, run_seconds=60)
    from tiw_facade.emulator import Fault, FaultKind

    first.emulator.add_fault(Fault(FaultKind.LATENCY, action="DescribeSnapshotTask", count=1, delay=0.5))
    results = await asyncio.gather(
        *(describe(replica, task) for replica in (first, second) for _ in range(20))
    )
    assert upstream(first.emulator) == 1
    assert len({response.request_id for response, _ in results}) == 1
    assert sorted({metadata["tiw-source"] for _, metadata in results}) == ["coalesced", "upstream"]


async def test_stop_on_one_replica_is_seen_by_describe_on_another(
    start_facade: StartFacade, redis_server: RedisServer
) -> None:
    first, second = await replicas(start_facade, redis_server, TIW_MAX_STALENESS="60")
    task = first.emulator.add_push_task(sdk_app_id=SDK_APP_ID, prepare_seconds=0)
    request = pb.DescribeWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=task)
    for replica in (first, second):
        assert (await replica.stub.DescribeWhiteboardPush(request, timeout=5)).status == "PUSHING"
    await first.stub.StopWhiteboardPush(
        pb.StopWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=task), timeout=5
    )
    call = second.stub.DescribeWhiteboardPush(request, timeout=5)
    assert (await call).status == "STOPPED"
    assert dict(await call.initial_metadata())["tiw-source"] in {"upstream", "coalesced"}


async def test_two_replicas_share_one_refresh_schedule(
    start_facade: StartFacade, redis_server: RedisServer
) -> None:
    """Each asked task is refreshed about as often as by one replica alone, not twice as often."""
    first, second = await replicas(start_facade, redis_server, TIW_MAX_STALENESS="1.0")
    tasks = [first.emulator.add_snapshot_task(sdk_app_id=SDK_APP_ID, run_seconds=60) for _ in range(4)]
    for index, task in enumerate(tasks):  # each task asked on both replicas
        await describe(first if index % 2 else second, task)
        await describe(second if index % 2 else first, task)
    before = upstream(first.emulator)
    await asyncio.sleep(3.0)
    refreshes = upstream(first.emulator) - before
    # Refreshed from half of TIW_MAX_STALENESS (0.5 s): about 4 tasks x 3 s / 0.5 s = 24 at most for
    # one schedule; two schedules would make about twice that.
    assert 8 <= refreshes <= 30
    for task in tasks:
        for replica in (first, second):
            _, metadata = await describe(replica, task)
            assert metadata["tiw-source"] == "cache"
            assert int(metadata["tiw-age-ms"]) <= 1000


async def test_redis_down_degrades_to_per_process_caching(
    start_facade: StartFacade, redis_server: RedisServer
) -> None:
    first, second = await replicas(start_facade, redis_server, TIW_REDIS_TIMEOUT="0.2")
    task = first.emulator.add_snapshot_task(sdk_app_id=SDK_APP_ID, run_seconds=60)
    for replica in (first, second):  # both registered with the limiter, both hold a copy
        await describe(replica, task, max_age_ms=0)
    redis_server.kill()
    for replica in (first, second):
        for _ in range(3):
            response, metadata = await describe(replica, task, max_age_ms=60_000)
            assert response.status == "Running"
            assert metadata["tiw-source"] in {"upstream", "cache"}
    finished = first.emulator.add_snapshot_task(sdk_app_id=SDK_APP_ID, run_seconds=0)
    # Once the limiter's hold-off after losing Redis is over, new answers come from TIW as usual.
    response, _ = await describe(second, finished, deadline=10)
    assert response.status == "Finished"


async def test_a_describe_in_flight_on_one_replica_across_a_stop_on_another(
    start_facade: StartFacade, redis_server: RedisServer
) -> None:
    from tiw_facade.emulator import Fault, FaultKind

    first, second = await replicas(start_facade, redis_server)
    task = first.emulator.add_push_task(sdk_app_id=SDK_APP_ID, prepare_seconds=0)
    request = pb.DescribeWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=task)
    first.emulator.add_fault(Fault(FaultKind.LATENCY, action="DescribeWhiteboardPush", count=1, delay=1.0))
    before = asyncio.ensure_future(second.stub.DescribeWhiteboardPush(request, timeout=5))
    await asyncio.sleep(0.3)
    await first.stub.StopWhiteboardPush(
        pb.StopWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=task), timeout=5
    )
    after = await second.stub.DescribeWhiteboardPush(request, timeout=5)
    assert after.status == "STOPPED"
    assert (await before).status in {"PUSHING", "STOPPED"}
