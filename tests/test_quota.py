"""The upstream quota through real facades: at most the limit reaches TIW in any 1 s window, callers
wait while their deadline allows, and several replicas share one quota through a real redis-server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import grpc
import pytest
from google.rpc import error_details_pb2
from support.facade import Facade, StartFacade
from support.pages import healthz, samples, scrape
from support.redis_server import RedisServer
from support.rich_status import details
from support.tiw import SDK_APP_ID
from support.waiting import wait_until
from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as pb
from tiw_facade.emulator import Emulator, Fault, FaultKind

pytestmark = pytest.mark.slow

LIMIT = 20
# These tests count the requests reaching TIW, one per call: no refresh of an answer
# (docs/answers.md) may add its own. With this, a key's refreshes stop as soon as its call ends.
CALLS_ONLY = {"TIW_REFRESH_INTEREST": "0.001"}


# A task of its own for every call: identical calls at once would share one request to TIW, and a
# call after another would be answered from the cache (docs/answers.md); each is to cost a request.
def push(emulator: Emulator) -> pb.DescribeWhiteboardPushRequest:
    return pb.DescribeWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=emulator.add_push_task())


def video(emulator: Emulator) -> pb.DescribeVideoGenerationTaskRequest:
    return pb.DescribeVideoGenerationTaskRequest(sdk_app_id=SDK_APP_ID, task_id=emulator.add_video_task())


def assert_never_throttled(emulator: Emulator, action: str, accepted: int) -> None:
    stats = emulator.stats()[action]
    assert stats.throttled == 0, "TIW's strict window answered RequestLimitExceeded"
    assert stats.max_in_window <= LIMIT
    assert stats.accepted == accepted


async def test_a_burst_of_three_times_the_limit_is_spread_not_throttled(start_facade: StartFacade) -> None:
    facade = await start_facade(**CALLS_ONLY)
    emulator = facade.emulator
    calls = [facade.stub.DescribeWhiteboardPush(push(emulator), timeout=10) for _ in range(3 * LIMIT)]
    calls += [facade.stub.DescribeVideoGenerationTask(video(emulator), timeout=10) for _ in range(2 * LIMIT)]
    answers = await asyncio.gather(*calls)
    assert all(a.request_id for a in answers), "every accepted call is answered"
    assert_never_throttled(facade.emulator, "DescribeWhiteboardPush", 3 * LIMIT)
    assert_never_throttled(facade.emulator, "DescribeVideoGenerationTask", 2 * LIMIT)
    # The quota is used, not wasted: 60 calls of one action need about 2 windows, not 3.
    arrivals = sorted(facade.emulator.arrivals("DescribeWhiteboardPush"))
    assert arrivals[-1] - arrivals[0] < 2.9


async def hold_tokens(facade: Facade, count: int, seconds: float) -> list[asyncio.Future[object]]:
    """Start ``count`` calls that hold their tokens for ``seconds`` at TIW."""
    facade.emulator.add_fault(
        Fault(FaultKind.LATENCY, action="DescribeWhiteboardPush", delay=seconds, count=count)
    )
    held = [
        asyncio.ensure_future(facade.stub.DescribeWhiteboardPush(push(facade.emulator), timeout=10))
        for _ in range(count)
    ]
    await wait_until(lambda: facade.emulator.stats()["DescribeWhiteboardPush"].accepted >= count)
    return held


async def test_a_slot_beyond_the_deadline_fails_at_once(start_facade: StartFacade) -> None:
    facade = await start_facade(TIW_RATE_LIMIT="2", **CALLS_ONLY)
    held = await hold_tokens(facade, 2, 1.0)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await facade.stub.DescribeWhiteboardPush(push(facade.emulator), timeout=0.8)
    # Refused at once, not after waiting: a call that waited for its deadline would end
    # DEADLINE_EXCEEDED (no wall-clock window asserted, which a loaded machine could miss).
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    found = details(caught.value)
    retry = found["RetryInfo"]
    quota = found["QuotaFailure"]
    assert isinstance(retry, error_details_pb2.RetryInfo) and isinstance(
        quota, error_details_pb2.QuotaFailure
    )
    assert retry.retry_delay.ToTimedelta().total_seconds() >= 0.9  # no token is back before answer + 1 s
    assert quota.violations[0].subject == "action:DescribeWhiteboardPush"
    await asyncio.gather(*held)
    rejected = samples(await scrape(facade), "tiw_limiter_rejected_total")
    assert rejected[(("action", "DescribeWhiteboardPush"), ("reason", "deadline"))] == 1


async def test_a_caller_with_time_waits_for_its_slot(start_facade: StartFacade) -> None:
    facade = await start_facade(TIW_RATE_LIMIT="2", **CALLS_ONLY)
    held = await hold_tokens(facade, 2, 0.3)
    started = time.monotonic()
    request = push(facade.emulator)
    answer = await facade.stub.DescribeWhiteboardPush(request, timeout=5)
    waited = time.monotonic() - started
    assert answer.task_id == request.task_id
    assert waited >= 1.0, "the token came back 1 s after the answer that freed it"
    await asyncio.gather(*held)
    assert facade.emulator.stats()["DescribeWhiteboardPush"].throttled == 0


async def test_longest_wait_is_bounded(start_facade: StartFacade) -> None:
    facade = await start_facade(TIW_RATE_LIMIT="1", TIW_MAX_QUEUE_WAIT="0.5", **CALLS_ONLY)
    held = await hold_tokens(facade, 1, 0.5)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await facade.stub.DescribeWhiteboardPush(
            push(facade.emulator)
        )  # no deadline: TIW_MAX_QUEUE_WAIT bounds it
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    info = details(caught.value)["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo) and info.metadata["limiter_reason"] == "max_wait"
    await asyncio.gather(*held)


async def test_a_full_queue_refuses_at_once(start_facade: StartFacade) -> None:
    facade = await start_facade(TIW_RATE_LIMIT="1", TIW_MAX_QUEUE_LENGTH="1", **CALLS_ONLY)
    held = await hold_tokens(facade, 1, 0.3)
    request = push(facade.emulator)
    waiting = asyncio.ensure_future(facade.stub.DescribeWhiteboardPush(request, timeout=10))
    await asyncio.sleep(0.05)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await facade.stub.DescribeWhiteboardPush(push(facade.emulator), timeout=10)
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    info = details(caught.value)["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo) and info.metadata["limiter_reason"] == "queue_full"
    assert (await waiting).task_id == request.task_id, "the caller already waiting is served"
    await asyncio.gather(*held)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


async def test_replicas_share_one_quota_through_redis(
    start_facade: StartFacade, redis_server: RedisServer
) -> None:
    replicas = [
        await start_facade(TIW_REDIS_URL=redis_server.url, TIW_EXPECTED_REPLICAS="3", **CALLS_ONLY)
        for _ in range(3)
    ]
    emulator = replicas[0].emulator
    calls = [
        replicas[i % 3].stub.DescribeWhiteboardPush(push(emulator), timeout=10) for i in range(3 * LIMIT)
    ]
    answers = await asyncio.gather(*calls)
    assert len(answers) == 3 * LIMIT
    assert_never_throttled(replicas[0].emulator, "DescribeWhiteboardPush", 3 * LIMIT)
    limiter = (await healthz(replicas[0]))["limiter"]
    assert isinstance(limiter, dict) and limiter["backend"] == "redis" and limiter["degraded"] is False


async def test_a_redis_outage_degrades_to_a_local_share_and_recovers(
    start_facade: StartFacade, redis_server: RedisServer
) -> None:
    replicas = [
        await start_facade(TIW_REDIS_URL=redis_server.url, TIW_EXPECTED_REPLICAS="2", **CALLS_ONLY)
        for _ in range(2)
    ]
    emulator = replicas[0].emulator
    await asyncio.gather(*(r.stub.DescribeWhiteboardPush(push(emulator), timeout=5) for r in replicas))
    redis_server.kill()
    # Every call is still answered, each replica keeping to its share (20 / 2) of the limit.
    calls = [
        replicas[i % 2].stub.DescribeVideoGenerationTask(video(emulator), timeout=10)
        for i in range(2 * LIMIT)
    ]
    assert len(await asyncio.gather(*calls)) == 2 * LIMIT
    assert_never_throttled(replicas[0].emulator, "DescribeVideoGenerationTask", 2 * LIMIT)
    for replica in replicas:
        assert (await healthz(replica))["limiter"]["degraded"] is True  # type: ignore[index]
        assert samples(await scrape(replica), "tiw_limiter_degraded")[()] == 1
    redis_server.start()
    end = time.monotonic() + 10
    while any([(await healthz(r))["limiter"]["degraded"] for r in replicas]):  # type: ignore[index]
        assert time.monotonic() < end, "shared mode did not come back"
        await asyncio.sleep(0.2)
    assert samples(await scrape(replicas[0]), "tiw_limiter_degraded")[()] == 0
    await asyncio.gather(*(r.stub.DescribeWhiteboardPush(push(emulator), timeout=5) for r in replicas))
