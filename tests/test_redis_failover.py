"""Three facades on a Sentinel-watched Redis whose primary crashes under load: the shared rate limit,
the idempotency records and the dropped answers of a stopped push all survive the failover."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import grpc
import pytest
from conftest import Facade, StartFacade
from support import count_between, max_in_window
from support.redis_failover import SentinelTopology
from test_rpcs import SDK_APP_ID, create_request
from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as pb

LIMIT = 5
DESCRIBE = "DescribeSnapshotTask"
CREATE = "CreateSnapshotTask"
FRESH = (("tiw-max-age-ms", "0"),)  # never a cached answer: every admitted call goes upstream
REFUSED = {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE}
BEFORE = 2.0  # seconds of load before the kill
AFTER = 8.0  # and after it
LONGEST_REFUSAL = 10.0

T = TypeVar("T")


@pytest.fixture
def topology() -> Iterator[SentinelTopology]:
    # Requested before start_facade by the test, so torn down after the facades stop.
    with SentinelTopology() as formed:
        yield formed


async def retry(make: Callable[[], Awaitable[T]], within: float = 15.0) -> T:
    """``make()`` until served; a refusal (RESOURCE_EXHAUSTED/UNAVAILABLE, nothing else) is retried."""
    end = time.monotonic() + within
    while True:
        try:
            return await make()
        except grpc.aio.AioRpcError as error:
            assert error.code() in REFUSED, (error.code(), error.details())
            if time.monotonic() > end:
                raise
            await asyncio.sleep(0.2)


@dataclasses.dataclass
class Load:
    """Five times the limit each second of DescribeSnapshotTask, spread over the facades."""

    facades: list[Facade]
    served: list[float] = dataclasses.field(default_factory=list)  # time.time(): the emulator's clock
    refusals: list[grpc.aio.AioRpcError] = dataclasses.field(default_factory=list)
    others: list[grpc.aio.AioRpcError] = dataclasses.field(default_factory=list)

    async def call(self, facade: Facade) -> None:
        # A task of its own per call: identical calls at once would share one upstream request.
        task_id = facade.emulator.add_snapshot_task()
        task = pb.DescribeSnapshotTaskRequest(sdk_app_id=SDK_APP_ID, task_id=task_id)
        try:
            await facade.stub.DescribeSnapshotTask(task, metadata=FRESH, timeout=3)
            self.served.append(time.time())
        except grpc.aio.AioRpcError as error:
            (self.refusals if error.code() in REFUSED else self.others).append(error)

    async def run(self, seconds: float) -> None:
        until = time.monotonic() + seconds
        pending: list[asyncio.Task[None]] = []
        for index in itertools.count():
            if time.monotonic() >= until:
                break
            pending.append(asyncio.create_task(self.call(self.facades[index % len(self.facades)])))
            await asyncio.sleep(1 / (5 * LIMIT))
        await asyncio.gather(*pending)


async def describe_push(facade: Facade, task_id: str, metadata: tuple[tuple[str, str], ...] = ()) -> str:
    request = pb.DescribeWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=task_id)
    answer: pb.DescribeWhiteboardPushResponse = await retry(
        lambda: facade.stub.DescribeWhiteboardPush(request, metadata=metadata, timeout=5)
    )
    return str(answer.status)


async def create(facade: Facade, request: pb.CreateSnapshotTaskRequest, key: str) -> str:
    metadata = (("idempotency-key", key),)
    answer: pb.CreateSnapshotTaskResponse = await retry(
        lambda: facade.stub.CreateSnapshotTask(request, metadata=metadata, timeout=5)
    )
    return str(answer.task_id)


async def stop_push(facade: Facade, task_id: str) -> None:
    request = pb.StopWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=task_id)
    await retry(lambda: facade.stub.StopWhiteboardPush(request, timeout=5))


async def replica_caught_up(topology: SentinelTopology) -> None:
    """Replication is asynchronous and no facade waits for a replica (no WAIT): what the primary
    acknowledged but had not sent yet dies with it. To test the failover rather than that race, the
    kill comes only once the replica has applied everything written so far (the idempotency record,
    the dropped answers of the stopped push)."""
    written = topology.primary_offset()
    deadline = time.monotonic() + 5.0
    while not topology.replica_caught_up(written):
        assert time.monotonic() < deadline, "the replica did not catch up"
        await asyncio.sleep(0.01)


@pytest.mark.slow
async def test_the_invariants_hold_through_a_sentinel_failover(
    topology: SentinelTopology, start_facade: StartFacade
) -> None:
    environment = {
        "TIW_REDIS_SENTINELS": topology.addresses,
        "TIW_REDIS_SENTINEL_MASTER": topology.name,
        "TIW_RATE_LIMIT": str(LIMIT),
        "TIW_EXPECTED_REPLICAS": "3",
        # Refused (with when to retry) rather than kept waiting: the overload is refused, not timed out.
        "TIW_MAX_QUEUE_WAIT": "0.3",
        # Each call is to cost one request: no refresh of an answer may add its own.
        "TIW_REFRESH_INTEREST": "0.001",
    }
    facades = [await start_facade(**environment) for _ in range(3)]
    emulator = facades[0].emulator

    # (c) A keyed create before the failover.
    request = create_request()
    first = await create(facades[0], request, "failover-order-1")
    assert emulator.stats()[CREATE].tasks_created == 1
    # (d) A push every facade has seen PUSHING (an answer each may keep, or share), then stopped.
    push = emulator.add_push_task(prepare_seconds=0.0)
    for facade in facades:
        assert await describe_push(facade, push) == "PUSHING"
    await stop_push(facades[1], push)
    await replica_caught_up(topology)

    load = Load(facades)
    started = time.time()
    running = asyncio.create_task(load.run(BEFORE + AFTER))
    await asyncio.sleep(BEFORE)
    killed = time.time()
    topology.primary.kill()
    await running
    ended = time.time()
    failed_over = topology.master_port() == topology.replica.port

    # (a) The limit at TIW over the whole run; per second around the kill, for the report.
    arrivals = emulator.arrivals(DESCRIBE)
    per_second = {
        s: count_between(arrivals, killed + s, killed + s + 1) for s in range(-int(BEFORE), int(AFTER))
    }
    # (b) The longest stretch without a served call, the run's edges included.
    moments = [started, *sorted(load.served), ended]
    longest, since = max((b - a, a - killed) for a, b in itertools.pairwise(moments))
    print(
        f"\nfailed over: {failed_over}; served {len(load.served)}, refused {len(load.refusals)}, "
        f"other errors {len(load.others)}; longest gap without a served call {longest:.2f} s "
        f"(from kill{since:+.2f} s); arrivals per second from the kill: {per_second}; "
        f"most in any 1 s: {max_in_window(arrivals)}"
    )
    assert failed_over, "the sentinels promoted the replica"
    assert max_in_window(arrivals) <= LIMIT, sorted(arrivals)
    assert emulator.stats()[DESCRIBE].throttled == 0
    assert not load.others, [(error.code(), error.details()) for error in load.others]
    assert longest < LONGEST_REFUSAL, (longest, since)
    assert count_between(load.served, ended - 2.0, ended) > 0, "served again after the failover"

    # (c) The retry after the failover, on another facade: the first task, and no second create.
    assert await create(facades[2], request, "failover-order-1") == first
    assert emulator.stats()[CREATE].tasks_created == 1
    # (d) Stopped, on every facade, from a kept answer or fresh.
    for facade in facades:
        for metadata in ((), FRESH):
            assert await describe_push(facade, push, metadata) == "STOPPED", (facade.target, metadata)
