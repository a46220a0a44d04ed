"""Spare quota (``try_spare``): tokens for background refreshes, only when no caller can miss them.

The in-process limiter runs on a virtual clock (each step is exact); the shared one against a real
redis-server, including two replicas whose spare grants together keep the reserve free.
"""

from __future__ import annotations

import asyncio
import math
import random
import time

import pytest
from redis.asyncio import Redis
from support import SimulatedTiw, eventually, max_in_window
from support.clock import VirtualClock
from support.redis_server import RedisServer
from tiw_facade.limiter import Lease, QuotaExceeded, Reason
from tiw_facade.limiter.memory import MemoryLimiter
from tiw_facade.limiter.shared import RedisLimiter
from tiw_facade.metrics import Metrics

A = "DescribeSnapshotTask"
ACCOUNT = "AKIDexampleaccount"


class Observer:
    """The callers the limiter reports as admitted."""

    def __init__(self) -> None:
        self.callers: list[str] = []

    def admitted(self, action: str, caller: str, wait: float) -> None:
        self.callers.append(caller)

    def refused(self, action: str, caller: str, reason: Reason) -> None:
        pass


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def memory(limit: int, **kwargs: object) -> tuple[MemoryLimiter, VirtualClock]:
    clock = VirtualClock()
    return MemoryLimiter(limit=limit, window=1.0, clock=clock, **kwargs), clock  # type: ignore[arg-type]


async def at_once(rate: MemoryLimiter, clock: VirtualClock, caller: str = "c") -> Lease:
    """A caller's token only if one is free now (a deadline a hair away: refused, never queued)."""
    return await rate.acquire(A, deadline=clock() + 1e-6, hold=1.0, caller=caller)


# --- in-process ---


async def test_spare_granted_while_more_than_reserve_is_free_and_none_at_reserve() -> None:
    metrics = Metrics("test")
    observer = Observer()
    rate, clock = memory(5, metrics=metrics, observer=observer)
    held = [await at_once(rate, clock)]
    spare = [await rate.try_spare(A, hold=1.0, reserve=2) for _ in range(3)]
    # 4 free, then 3: granted; 2 free is the reserve: not for refreshes.
    assert [lease is not None for lease in spare] == [True, True, False]
    assert rate.spare_hint(A, reserve=2) > 0
    # The reserve is the callers': both get a token at once, then there is none.
    held += [await at_once(rate, clock), await at_once(rate, clock)]
    with pytest.raises(QuotaExceeded):
        await at_once(rate, clock)
    # Spare grants count as admitted tokens, but are nobody's admission.
    assert sample(metrics, "tiw_limiter_admitted_total", action=A) == 5
    assert observer.callers == ["c", "c", "c"]
    await rate.aclose()


async def test_reserve_zero_takes_the_last_free_token() -> None:
    rate, _ = memory(2)
    assert await rate.try_spare(A, hold=1.0, reserve=0) is not None
    assert rate.spare_hint(A, reserve=0) == 0
    assert await rate.try_spare(A, hold=1.0, reserve=0) is not None
    assert await rate.try_spare(A, hold=1.0, reserve=0) is None
    with pytest.raises(ValueError):
        await rate.try_spare(A, hold=1.0, reserve=-1)
    await rate.aclose()


async def test_no_spare_while_a_caller_of_the_action_is_queued() -> None:
    rate, clock = memory(2, max_queue_wait=30.0)
    for lease in [await at_once(rate, clock), await at_once(rate, clock)]:
        lease.release()
    waiting = asyncio.create_task(rate.acquire(A, deadline=None, hold=1.0))
    await eventually(lambda: rate._states[A].live == 1)
    # Both tokens are back (the pump has not woken yet, in real time): the queued call comes first.
    clock.advance(1.0)
    assert await rate.try_spare(A, hold=1.0, reserve=0) is None
    assert await rate.try_spare("DescribeWhiteboardPush", hold=1.0, reserve=0) is not None  # another action
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert await rate.try_spare(A, hold=1.0, reserve=0) is not None
    await rate.aclose()


async def test_no_spare_while_paused() -> None:
    rate, clock = memory(5)
    rate.pause(A, 2.0)
    assert await rate.try_spare(A, hold=1.0, reserve=0) is None
    assert rate.spare_hint(A, reserve=0) == pytest.approx(2.0)
    clock.advance(2.0)
    assert rate.spare_hint(A, reserve=0) == 0
    assert await rate.try_spare(A, hold=1.0, reserve=0) is not None
    await rate.aclose()


async def test_closed_grants_none_and_hints_never() -> None:
    rate, _ = memory(5)
    await rate.aclose()
    assert await rate.try_spare(A, hold=1.0, reserve=0) is None
    assert rate.spare_hint(A, reserve=0) == math.inf


async def test_a_spare_lease_comes_back_a_window_after_release_or_after_hold_and_a_window() -> None:
    rate, clock = memory(1)
    lease = await rate.try_spare(A, hold=5.0, reserve=0)
    assert lease is not None
    assert await rate.try_spare(A, hold=5.0, reserve=0) is None
    clock.advance(0.5)
    lease.release()
    assert rate.spare_hint(A, reserve=0) == pytest.approx(1.0)
    clock.advance(0.999)
    assert await rate.try_spare(A, hold=5.0, reserve=0) is None
    clock.advance(0.001)
    unreleased = await rate.try_spare(A, hold=5.0, reserve=0)
    assert unreleased is not None
    clock.advance(5.999)
    assert await rate.try_spare(A, hold=5.0, reserve=0) is None
    clock.advance(0.001)
    assert await rate.try_spare(A, hold=5.0, reserve=0) is not None
    await rate.aclose()


@pytest.mark.parametrize("reserve", [2, 0])
async def test_a_greedy_refresher_never_keeps_the_reserve_from_a_burst_of_callers(reserve: int) -> None:
    """A refresher takes every spare token it can, releasing each after a random time; every now and
    then (when no caller's token is out) ``burst`` callers arrive together. With the reserve they
    all get a token at once; without it (the control) some find none."""
    limit, burst = 6, 2
    rate, clock = memory(limit)
    rng = random.Random(9)
    releases: list[tuple[float, Lease]] = []
    spare_back: list[float] = []  # when each spare token is free again (known once released)
    callers_back = 0.0
    granted = refused = 0
    for _ in range(400):
        clock.advance(0.013)
        now = clock()
        for entry in [entry for entry in releases if entry[0] <= now]:
            releases.remove(entry)
            entry[1].release()
        while (lease := await rate.try_spare(A, hold=2.0, reserve=reserve)) is not None:
            granted += 1
            release_at = now + rng.uniform(0.01, 0.3)
            releases.append((release_at, lease))
            spare_back.append(release_at + 1.0)
        out = sum(1 for back in spare_back if back > now)
        assert out <= limit - reserve
        if now >= callers_back and rng.random() < 0.2:
            for _ in range(burst):
                try:
                    lease = await at_once(rate, clock)
                except QuotaExceeded:
                    refused += 1
                else:
                    releases.append((now + 0.02, lease))
                    callers_back = now + 1.02
    assert granted >= 12  # the refresher had the spare quota (about 4 per 1.15 s)
    if reserve >= burst:
        assert refused == 0
    else:
        assert refused > 0  # the control: the test can fail
    await rate.aclose()


# --- shared through Redis ---


def replica(url: str, *, limit: int, window: float = 1.0, **kwargs: object) -> RedisLimiter:
    options: dict[str, object] = {
        "account": ACCOUNT,
        "limit": limit,
        "degraded_limit": max(1, limit // 3),
        "window": window,
        "timeout": 1.0,  # generous: this is about sharing, not outages (see test_limiter_redis)
        "probe_interval": 0.2,
    }
    options.update(kwargs)
    return RedisLimiter(url=url, **options)  # type: ignore[arg-type]


async def warm(*replicas: RedisLimiter) -> None:
    """Join Redis and wait out a new epoch's hold-off."""
    for rate in replicas:
        (await rate.acquire("warm-up", deadline=None, hold=1)).release()


async def members(redis_server: RedisServer, rate: RedisLimiter) -> int:
    client = Redis.from_url(redis_server.url)
    try:
        key = f"{rate.store.prefix}:{A}"  # type: ignore[attr-defined]
        return int(await client.zcard(key))
    finally:
        await client.aclose()


@pytest.mark.slow
async def test_spare_on_one_replica_leaves_the_reserve_to_another_replicas_callers(
    redis_server: RedisServer,
) -> None:
    a, b = replica(redis_server.url, limit=5), replica(redis_server.url, limit=5)
    await warm(a, b)
    spare = [await a.try_spare(A, hold=5.0, reserve=2) for _ in range(4)]
    assert [lease is not None for lease in spare] == [True, True, True, False]
    assert a.spare_hint(A, reserve=2) > 0
    assert await b.try_spare(A, hold=5.0, reserve=2) is None  # fleet-wide, not per replica
    deadline = time.monotonic() + 2.0
    callers = [await b.acquire(A, deadline=deadline, hold=5.0) for _ in range(2)]
    assert await members(redis_server, a) == 5
    for lease in [*spare, *callers]:
        if lease is not None:
            lease.release()
    await a.aclose()
    await b.aclose()


@pytest.mark.slow
async def test_two_replicas_spare_grants_together_never_exceed_limit_less_reserve(
    redis_server: RedisServer,
) -> None:
    limit, reserve, window = 6, 2, 0.5
    metrics = [Metrics("test"), Metrics("test")]
    replicas = [replica(redis_server.url, limit=limit, window=window, metrics=m) for m in metrics]
    await warm(*replicas)
    upstream = SimulatedTiw(latency=(0.001, 0.03), seed=3)
    until = time.monotonic() + 3.0

    async def refresher(rate: RedisLimiter) -> None:
        while time.monotonic() < until:
            lease = await rate.try_spare(A, hold=2.0, reserve=reserve)
            if lease is None:
                await asyncio.sleep(max(0.002, min(rate.spare_hint(A, reserve=reserve), 0.05)))
            else:
                await upstream.call(lease)

    # As many refreshers as tokens on each replica: without the reserve they would take all of them.
    await asyncio.gather(*(refresher(rate) for rate in replicas for _ in range(limit)))
    for rate in replicas:
        assert not rate.degraded
        await rate.aclose()
    assert max_in_window(upstream.arrivals, window) <= limit - reserve
    assert len(upstream.arrivals) >= (limit - reserve) * 3.0 / window / 2  # and they used it
    admitted = [sample(m, "tiw_limiter_admitted_total", action=A) for m in metrics]
    assert min(admitted) > 0 and sum(admitted) == len(upstream.admissions), admitted


@pytest.mark.slow
async def test_a_caller_queued_during_the_spare_round_trip_gets_the_token(
    redis_server: RedisServer,
) -> None:
    """The spare's script ran (a token taken in Redis) while a caller queued here: the caller comes
    first. The token is handed back at once and the caller gets it, long before the next poll."""
    rate = replica(redis_server.url, limit=3, window=10.0, max_queue_wait=30.0, poll_interval=5.0)
    await warm(rate)
    held = await rate.acquire(A, deadline=None, hold=30.0)
    asked, gate = asyncio.Event(), asyncio.Event()
    real = rate.store.spare

    async def gated(*args: object) -> object:
        reply = await real(*args)  # type: ignore[arg-type]
        asked.set()
        await gate.wait()
        return reply

    rate.store.spare = gated  # type: ignore[method-assign,assignment]
    spare = asyncio.create_task(rate.try_spare(A, hold=30.0, reserve=1))
    await asyncio.wait_for(asked.wait(), 5.0)
    direct = await rate.acquire(A, deadline=time.monotonic() + 5.0, hold=30.0)  # the last token
    queued = asyncio.create_task(rate.acquire(A, deadline=None, hold=30.0))
    await eventually(lambda: rate._states[A].live == 1)
    gate.set()
    assert await asyncio.wait_for(spare, 5.0) is None
    lease = await asyncio.wait_for(queued, 3.0)
    for each in (held, direct, lease):
        each.release()
    await rate.aclose()


@pytest.mark.slow
async def test_degraded_spare_keeps_the_reserve_of_the_local_share(redis_server: RedisServer) -> None:
    rate = replica(redis_server.url, limit=20, degraded_limit=4, window=0.3, silent_after=0.1)
    await warm(rate)
    redis_server.kill()
    assert await rate.try_spare(A, hold=5.0, reserve=2) is None  # refused: degraded at once
    assert rate.degraded
    leases: list[Lease] = []

    async def first_spare() -> None:
        started = time.monotonic()
        while (lease := await rate.try_spare(A, hold=5.0, reserve=2)) is None:
            assert time.monotonic() - started < 3.0, "no local spare after the quarantine"
            await asyncio.sleep(max(0.005, rate.spare_hint(A, reserve=2)))
        leases.append(lease)

    await first_spare()
    # The share is 4: refreshes take 2, the other 2 stay free for callers.
    second = await rate.try_spare(A, hold=5.0, reserve=2)
    assert second is not None
    assert await rate.try_spare(A, hold=5.0, reserve=2) is None
    deadline = time.monotonic() + 0.2
    leases += [second, await rate.acquire(A, deadline=deadline, hold=5.0)]
    leases.append(await rate.acquire(A, deadline=time.monotonic() + 0.2, hold=5.0))
    with pytest.raises(QuotaExceeded):
        await rate.acquire(A, deadline=time.monotonic() + 0.2, hold=5.0)
    assert rate.degraded
    for lease in leases:
        lease.release()
    await rate.aclose()
