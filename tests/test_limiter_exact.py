"""The two cases the shared limiter used to document as not exact, against a real redis-server: a
replica cut off from Redis while the others still reach it, and a Redis restart too short for a
replica to notice as an outage. In both, count arrivals at TIW across replicas in every sliding
1-second window."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from support import SimulatedTiw, count_between, eventually, max_in_window, saturate
from support.proxy import DelayProxy
from support.redis_server import RedisServer
from tiw_facade import shared_redis
from tiw_facade.limiter import Lease
from tiw_facade.limiter._modes import Mode
from tiw_facade.limiter.shared import RedisLimiter
from tiw_facade.metrics import Metrics

A = "CreateSnapshotTask"
ACCOUNT = "AKIDexampleaccount"


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def backend_errors(metrics: Metrics) -> float:
    """tiw_limiter_backend_errors_total, every kind."""
    return sum(sample(metrics, "tiw_limiter_backend_errors_total", kind=kind) for kind in shared_redis.KINDS)


def replica(url: str, **kwargs: object) -> RedisLimiter:
    options: dict[str, object] = {
        "account": ACCOUNT,
        "limit": 20,
        "degraded_limit": 6,
        "expected_replicas": 3,
        "timeout": 0.25,
    }
    options.update(kwargs)
    return RedisLimiter(url=url, **options)  # type: ignore[arg-type]


async def warm(*replicas: RedisLimiter) -> None:
    """Join Redis and wait out a new epoch's hold-off (a fresh Redis looks like one that restarted)."""
    for rate in replicas:
        (await rate.acquire("warm-up", deadline=None, hold=1)).release()


@pytest.mark.slow
async def test_a_replica_cut_off_from_redis_keeps_the_fleet_within_the_limit() -> None:
    """Replica 0 loses Redis (its proxy refuses it) while replicas 1 and 2 keep it, all saturated.
    Replica 0 degrades and admits its local share of 6; the others must leave room for it (its
    registration falls silent), so that 14 + 6 and never 20 + 6 arrive in a second."""
    with RedisServer() as server:
        async with (
            DelayProxy(server.port) as p0,
            DelayProxy(server.port) as p1,
            DelayProxy(server.port) as p2,
        ):
            metrics = [Metrics("test") for _ in range(3)]
            replicas = [replica(p.url, metrics=m) for p, m in zip((p0, p1, p2), metrics, strict=True)]
            await warm(*replicas)
            upstreams = [SimulatedTiw(seed=n) for n in range(3)]
            start = time.monotonic()
            until = start + 6.5
            load = asyncio.gather(
                *(
                    saturate(r, A, u, callers=10, until=until)
                    for r, u in zip(replicas, upstreams, strict=True)
                )
            )
            await asyncio.sleep(1.0)
            cut = time.monotonic()
            await p0.cut()
            await eventually(lambda: replicas[0].degraded, within=1.0)
            await asyncio.sleep(cut + 4.0 - time.monotonic())
            restored = time.monotonic()
            await p0.restore()
            await eventually(lambda: replicas[0].mode is Mode.SHARED, within=3.0)
            await load
            for r in replicas:
                await r.aclose()

    arrivals = [t for upstream in upstreams for t in upstream.arrivals]
    assert max_in_window(arrivals) <= 20, max_in_window(arrivals)
    # The hazard was real: replica 0 did admit locally while cut off, and the others flowed.
    assert count_between(upstreams[0].arrivals, cut + 1.0, restored) >= 5
    connected = upstreams[1].arrivals + upstreams[2].arrivals
    assert count_between(connected, cut + 2.5, restored) >= 10
    assert not replicas[1].degraded and not replicas[2].degraded
    assert backend_errors(metrics[0]) >= 1
    assert count_between(arrivals, until - 1.0, until) >= 12  # flowing again


@pytest.mark.slow
async def test_a_redis_restart_nobody_noticed_gives_no_token_out_twice(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Replica A holds all 20 tokens (long calls); Redis restarts empty between two of its calls, so
    A sees no error at all. Replica B then asks for tokens: Redis, empty, would grant 20 more. The
    epoch says Redis lost its state: nobody is admitted until A has told it what it holds."""
    caplog.set_level(logging.INFO, logger="tiw_facade.limiter")
    with RedisServer() as server:
        # Two replicas expected (else Redis keeps room for a third, unseen one).
        holder, other = (replica(server.url, degraded_limit=10, expected_replicas=2) for _ in range(2))
        await warm(holder, other)
        slow = SimulatedTiw(latency=(1.2, 1.5), seed=1)
        leases: list[Lease] = [await holder.acquire(A, deadline=None, hold=5) for _ in range(20)]
        calls = [asyncio.create_task(slow.call(lease)) for lease in leases]
        server.kill()
        server.start()
        restarted = time.monotonic()
        fast = SimulatedTiw(seed=2)
        await saturate(other, A, fast, callers=10, until=restarted + 3.2)
        await asyncio.gather(*calls)
        for r in (holder, other):
            await r.aclose()

    arrivals = slow.arrivals + fast.arrivals
    assert max_in_window(arrivals) <= 20, max_in_window(arrivals)
    # Not a frozen limiter: B got A's tokens as they came back (a window after their answers), and
    # not one before.
    assert not [t for t in fast.admissions if t < min(slow.answers) + 1.0]
    assert count_between(fast.arrivals, min(slow.answers) + 1.0, restarted + 3.2) >= 15
    assert "lost its state" in caplog.text
