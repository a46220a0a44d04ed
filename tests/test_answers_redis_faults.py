"""Right answers through Redis faults, on two replicas and a real redis-server: a stop acknowledged by
either replica is never followed by a PUSHING answer once Redis answers again, whether Redis stalled
(SIGSTOP) or restarted empty (SIGKILL and start) meanwhile, and a lease its holder could not give up
does not hold the other callers of its key back."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import grpc
import pytest
from support.facade import Facade, StartFacade
from support.redis_server import RedisServer
from support.tiw import SDK_APP_ID
from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as pb
from tiw_facade.emulator import Fault, FaultKind

DESCRIBE = "DescribeWhiteboardPush"
# The staleness a caller accepts by default here: long, so that only an invalidation (not an age)
# keeps a replica from serving the answer it had before the stop.
STALENESS = "30"
# After Redis answers again, each replica recovers within a heartbeat plus a Redis round trip; the
# checks below start this long after.
SETTLE = 0.5
FRESH = (("tiw-max-age-ms", "0"),)


@dataclasses.dataclass
class Seen:
    """Each answer (or error) on each replica, with the time (time.monotonic()) its call began."""

    answers: list[tuple[float, int, str, dict[str, str]]] = dataclasses.field(default_factory=list)
    errors: list[tuple[float, int, grpc.StatusCode]] = dataclasses.field(default_factory=list)
    slowest: float = 0.0

    def pushing_after(
        self, moment: float, replica: int | None = None
    ) -> list[tuple[float, int, str, dict[str, str]]]:
        return [
            seen
            for seen in self.answers
            if seen[0] >= moment and seen[2] == "PUSHING" and replica in (None, seen[1])
        ]


async def replicas(start_facade: StartFacade, redis: RedisServer) -> list[Facade]:
    return [
        await start_facade(
            TIW_REDIS_URL=redis.url,
            TIW_EXPECTED_REPLICAS="2",
            TIW_REDIS_TIMEOUT="0.2",
            TIW_MAX_STALENESS=STALENESS,
        )
        for _ in range(2)
    ]


async def poll(
    facades: list[Facade], request: pb.DescribeWhiteboardPushRequest, seen: Seen, until: float
) -> None:
    """Describe on every replica, one call after the other, until ``until``."""

    async def one(index: int, facade: Facade) -> None:
        while time.monotonic() < until:
            began = time.monotonic()
            call = facade.stub.DescribeWhiteboardPush(request, timeout=3)
            try:
                answer = await call
                metadata = {key: str(value) for key, value in await call.initial_metadata()}
                seen.answers.append((began, index, answer.status, metadata))
            except grpc.aio.AioRpcError as error:
                seen.errors.append((began, index, error.code()))
            seen.slowest = max(seen.slowest, time.monotonic() - began)
            await asyncio.sleep(0.02)

    await asyncio.gather(*(one(index, facade) for index, facade in enumerate(facades)))


async def pushing_everywhere(facades: list[Facade], request: pb.DescribeWhiteboardPushRequest) -> None:
    """Each replica has asked TIW (so each is registered with the shared limiter) and holds PUSHING."""
    for facade in facades:
        answer = await facade.stub.DescribeWhiteboardPush(request, metadata=FRESH, timeout=5)
        assert answer.status == "PUSHING"


InFlight = asyncio.Future[pb.DescribeWhiteboardPushResponse]


async def a_describe_in_flight(
    start_facade: StartFacade, redis: RedisServer, *, delay: float
) -> tuple[
    list[Facade], str, pb.DescribeWhiteboardPushRequest, asyncio.Future[pb.DescribeWhiteboardPushResponse]
]:
    """Two replicas that both hold a push as PUSHING, and replica 1 asking TIW about it again (it
    holds the key's lease; TIW answers ``delay`` seconds later)."""
    facades = await replicas(start_facade, redis)
    emulator = facades[0].emulator
    task = emulator.add_push_task(sdk_app_id=SDK_APP_ID, prepare_seconds=0)
    request = pb.DescribeWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=task)
    await pushing_everywhere(facades, request)
    emulator.add_fault(Fault(FaultKind.LATENCY, action=DESCRIBE, count=1, delay=delay))
    in_flight = asyncio.ensure_future(
        facades[0].stub.DescribeWhiteboardPush(request, metadata=FRESH, timeout=delay + 4)
    )
    await asyncio.sleep(0.2)  # its lease is taken, its request on the way
    return facades, task, request, in_flight


async def stop(facade: Facade, task: str, within: float) -> float:
    """Stop ``task`` through ``facade``, retrying refusals (while Redis is away the limiter holds
    calls off for a moment); when the stop was acknowledged (time.monotonic())."""
    end = time.monotonic() + within
    while True:
        try:
            await facade.stub.StopWhiteboardPush(
                pb.StopWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=task), timeout=1
            )
            return time.monotonic()
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
            if time.monotonic() > end:
                raise
            await asyncio.sleep(0.1)


@pytest.mark.slow
async def test_a_stop_during_a_stall_is_seen_everywhere_once_redis_answers(
    start_facade: StartFacade, redis_server: RedisServer
) -> None:
    """Replica 1 has a Describe in flight (it holds the key's lease) when Redis stalls for a second;
    the push is stopped through replica 2 during the stall, so its invalidation cannot reach Redis."""
    facades, task, request, in_flight = await a_describe_in_flight(start_facade, redis_server, delay=2.0)
    second = facades[1]
    redis_server.pause()
    try:
        acknowledged = await stop(second, task, within=3.0)
        seen = Seen()
        stopper = asyncio.ensure_future(poll([second], request, seen, acknowledged + 1.0))
        await asyncio.sleep(0.5)
    finally:
        redis_server.resume()
    resumed = time.monotonic()
    await stopper
    await poll(facades, request, seen, resumed + 4.0)
    assert (await in_flight).status in {"PUSHING", "STOPPED"}  # asked before the stop

    # The replica that acknowledged the stop never contradicts it, stall or not.
    assert not seen.pushing_after(acknowledged, replica=1), seen.pushing_after(acknowledged, replica=1)
    # Neither does the other, once Redis answers again.
    assert not seen.pushing_after(resumed + SETTLE), seen.pushing_after(resumed + SETTLE)
    # Nobody waits for the lease replica 1 could not give up during the stall.
    assert not seen.errors, seen.errors
    assert seen.slowest < 2.0, seen.slowest


@pytest.mark.slow
async def test_a_stop_before_an_empty_restart_is_not_undone_by_a_request_in_flight(
    start_facade: StartFacade, redis_server: RedisServer
) -> None:
    """The stop's invalidation reached Redis, then Redis restarted empty; replica 1's request, begun
    before the stop, lands after the restart and must not bring PUSHING back."""
    facades, task, request, in_flight = await a_describe_in_flight(start_facade, redis_server, delay=1.2)
    second = facades[1]
    acknowledged = await stop(second, task, within=3.0)
    redis_server.kill()
    await asyncio.sleep(0.3)
    redis_server.start()
    restarted = time.monotonic()
    seen = Seen()
    await poll(facades, request, seen, restarted + 4.0)
    assert (await in_flight).status in {"PUSHING", "STOPPED"}

    assert not seen.pushing_after(acknowledged, replica=1), seen.pushing_after(acknowledged, replica=1)
    assert not seen.pushing_after(restarted + SETTLE), seen.pushing_after(restarted + SETTLE)
    assert not seen.errors, seen.errors
    # And the stop is in Redis again: a replica that knows nothing of it sees STOPPED.
    third = await start_facade(
        TIW_REDIS_URL=redis_server.url, TIW_EXPECTED_REPLICAS="2", TIW_MAX_STALENESS=STALENESS
    )
    assert (await third.stub.DescribeWhiteboardPush(request, timeout=5)).status == "STOPPED"
