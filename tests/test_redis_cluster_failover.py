"""Three facades on a Redis Cluster (``TIW_REDIS_CLUSTER=1``) whose primary for the account's slot
crashes under load, and whose replica the cluster promotes: the shared rate limit, the idempotency
records and the dropped answers of a stopped push all survive the failover."""

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
from support.redis_cluster import RedisCluster
from support.redis_server import RedisServer
from test_rpcs import create_request
from tiw_facade import shared_redis

LIMIT = 5
BEFORE = 2.0  # seconds of load before the kill
AFTER = 8.0  # and after it
NODE_TIMEOUT_MS = 1000  # how long a primary may not answer before the others call it failed
LONGEST_REFUSAL = 10.0


@pytest.fixture
def cluster() -> Iterator[RedisCluster]:
    # Requested before start_facade by the test, so torn down after the facades stop.
    with RedisCluster(replicas=1, node_timeout_ms=NODE_TIMEOUT_MS) as formed:
        yield formed


async def promoted(cluster: RedisCluster, replica: RedisServer, within: float) -> float | None:
    """When (``time.time()``) ``replica`` first said it is a primary (polled every 50 ms); None: not
    within ``within`` seconds."""
    end = time.monotonic() + within
    while time.monotonic() < end:
        if await asyncio.to_thread(cluster.is_primary, replica):
            return time.time()
        await asyncio.sleep(0.05)
    return None


@pytest.mark.slow
async def test_the_invariants_hold_through_a_cluster_failover(
    cluster: RedisCluster, start_facade: StartFacade
) -> None:
    environment = {
        "TIW_REDIS_CLUSTER": "1",
        "TIW_REDIS_URL": cluster.url,
        "TIW_RATE_LIMIT": str(LIMIT),
        "TIW_EXPECTED_REPLICAS": "3",
        # Refused (with when to retry) rather than kept waiting: the overload is refused, not timed out.
        "TIW_MAX_QUEUE_WAIT": "0.3",
        # Each call is to cost one request: no refresh of an answer may add its own.
        "TIW_REFRESH_INTEREST": "0.001",
    }
    facades = [await start_facade(**environment) for _ in range(3)]
    emulator = facades[0].emulator
    # Every key of the account is in one slot (its {hash tag}): the primary to kill is the one
    # serving it. The account is the facades' SecretId (conftest.facade_environment).
    slot = cluster.keyslot(shared_redis.prefix("limiter", facades[0].server.settings.account))
    primary = cluster.primary_of(slot)
    replica = cluster.replica_of(primary)

    # (c) A keyed create before the failover.
    request = create_request()
    first = await create(facades[0], request, "failover-order-1")
    assert emulator.stats()[CREATE].tasks_created == 1
    # (d) A push every facade has seen PUSHING (an answer each may keep, or share), then stopped.
    push = emulator.add_push_task(prepare_seconds=0.0)
    for facade in facades:
        assert await describe_push(facade, push) == "PUSHING"
    await stop_push(facades[1], push)
    await replica_caught_up(
        lambda: cluster.primary_offset(primary), lambda offset: cluster.caught_up(replica, offset)
    )

    load = Load(facades, LIMIT)
    started = time.time()
    running = asyncio.create_task(load.run(BEFORE + AFTER))
    # (d) Asked all along, too: a kept PUSHING must not come back while the shared answers are away.
    watch = PushWatch(facades, push)
    watching = asyncio.create_task(watch.run(BEFORE + AFTER))
    await asyncio.sleep(BEFORE)
    killed = time.time()
    primary.kill()
    promotion = asyncio.create_task(promoted(cluster, replica, within=AFTER))
    await running
    await watching
    ended = time.time()
    promoted_at = await promotion

    # (a) The limit at TIW over the whole run; (b) the longest stretch without a served call.
    arrivals = emulator.arrivals(DESCRIBE)
    seen = AroundTheKill.measure(
        load, arrivals, started=started, killed=killed, ended=ended, before=BEFORE, after=AFTER
    )
    promoted_after = f"{promoted_at - killed:.2f} s after the kill" if promoted_at else "not promoted"
    print(
        f"\nCluster failover (slot {slot}, primary :{primary.port} -> replica :{replica.port}, "
        f"promoted {promoted_after}): {seen.report(load)}; the stopped push "
        f"described {len(watch.seen)} times ({len(watch.pushing())} PUSHING), refused {watch.refused}"
    )
    assert promoted_at is not None, "the cluster promoted the replica"
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
