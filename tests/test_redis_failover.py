"""Three facades on a Sentinel-watched Redis whose primary crashes under load: the shared rate limit,
the idempotency records and the dropped answers of a stopped push all survive the failover."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from conftest import StartFacade
from support import count_between, max_in_window
from support.failover_load import (
    CREATE,
    DESCRIBE,
    FRESH,
    AroundTheKill,
    Load,
    PushWatch,
    create,
    describe_push,
    replica_caught_up,
    stop_push,
)
from support.redis_failover import SentinelTopology
from test_rpcs import create_request

LIMIT = 5
BEFORE = 2.0  # seconds of load before the kill
AFTER = 8.0  # and after it
LONGEST_REFUSAL = 10.0


@pytest.fixture
def topology() -> Iterator[SentinelTopology]:
    # Requested before start_facade by the test, so torn down after the facades stop.
    with SentinelTopology() as formed:
        yield formed


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
    await replica_caught_up(topology.primary_offset, topology.replica_caught_up)

    load = Load(facades, LIMIT)
    started = time.time()
    running = asyncio.create_task(load.run(BEFORE + AFTER))
    # (d) Asked all along, too: a kept PUSHING must not come back while the shared answers are away.
    watch = PushWatch(facades, push)
    watching = asyncio.create_task(watch.run(BEFORE + AFTER))
    await asyncio.sleep(BEFORE)
    killed = time.time()
    topology.primary.kill()
    await running
    await watching
    ended = time.time()
    failed_over = topology.master_port() == topology.replica.port

    # (a) The limit at TIW over the whole run; (b) the longest stretch without a served call.
    arrivals = emulator.arrivals(DESCRIBE)
    seen = AroundTheKill.measure(
        load, arrivals, started=started, killed=killed, ended=ended, before=BEFORE, after=AFTER
    )
    print(
        f"\nSentinel failover: failed over: {failed_over}; {seen.report(load)}; the stopped push "
        f"described {len(watch.seen)} times ({len(watch.pushing())} PUSHING), refused {watch.refused}"
    )
    assert failed_over, "the sentinels promoted the replica"
    assert max_in_window(arrivals) <= LIMIT, sorted(arrivals)
    assert emulator.stats()[DESCRIBE].throttled == 0
    assert not load.others, [(error.code(), error.details()) for error in load.others]
    assert seen.longest_gap < LONGEST_REFUSAL, seen
    assert count_between(load.served, ended - 2.0, ended) > 0, "served again after the failover"

    # (c) The retry after the failover, on another facade: the first task, and no second create.
    assert await create(facades[2], request, "failover-order-1") == first
    assert emulator.stats()[CREATE].tasks_created == 1
    # (d) Never PUSHING again, during the failover or after it; stopped on every facade, from a kept
    # answer or fresh.
    assert not watch.pushing(), watch.pushing()
    assert not watch.others, [(error.code(), error.details()) for error in watch.others]
    assert any(at > killed for at, _, _ in watch.seen), "the push was described after the kill"
    for facade in facades:
        for metadata in ((), FRESH):
            assert await describe_push(facade, push, metadata) == "STOPPED", (facade.target, metadata)
