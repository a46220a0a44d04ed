"""The shared limiter against real redis-server processes: replicas sharing one quota, Redis's clock,
and what happens when Redis dies and comes back."""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections.abc import AsyncIterator, Iterator
from typing import cast

import pytest
from redis.asyncio import Redis
from support import LoopLag, SimulatedTiw, count_between, eventually, max_in_window, saturate, wake_delays
from support.redis_server import RedisServer
from tiw_facade.limiter import QuotaExceeded, create_limiter
from tiw_facade.limiter.shared import ACQUIRE_SCRIPT, RELEASE_SCRIPT, SEED_SCRIPT, RedisLimiter, redact
from tiw_facade.metrics import Metrics
from tiw_facade.settings import Settings

A = "CreateSnapshotTask"
ACCOUNT = "AKIDexampleaccount"


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


def replica(url: str, *, limit: int = 20, window: float = 1.0, **kwargs: object) -> RedisLimiter:
    options: dict[str, object] = {
        "account": ACCOUNT,
        "limit": limit,
        "degraded_limit": max(1, limit // 3),
        "window": window,
        # Generous: on this shared 2-core machine other processes can stall us for a while, and
        # these tests are about sharing, not outages (a killed Redis is noticed at once anyway).
        "timeout": 1.0,
        "probe_interval": 0.2,
    }
    options.update(kwargs)
    return RedisLimiter(url=url, **options)  # type: ignore[arg-type]


def ago(redis_time: tuple[int, int]) -> float:
    return redis_time[0] + redis_time[1] / 1e6


async def scores(client: Redis, key: str) -> list[tuple[bytes, float]]:
    return cast("list[tuple[bytes, float]]", await client.zrange(key, 0, -1, withscores=True))


@pytest.mark.slow
async def test_three_replicas_share_one_real_window_of_20(redis_server: RedisServer) -> None:
    metrics = [Metrics("test") for _ in range(3)]
    # A long poll interval: tokens must be taken on Redis's schedule, not found by polling.
    replicas = [replica(redis_server.url, metrics=m, poll_interval=0.25) for m in metrics]
    upstream = SimulatedTiw(seed=7)  # one TIW, seen by all replicas
    stalls = asyncio.create_task(upstream.stalls(every=(0.3, 0.9), length=(0.02, 0.12)))
    lag = LoopLag()
    lagging = asyncio.create_task(lag.measure())
    duration = 4.0
    start = time.monotonic()
    until = start + duration
    await asyncio.gather(*(saturate(r, A, upstream, callers=12, until=until) for r in replicas))
    stalls.cancel()
    lagging.cancel()
    for r in replicas:
        assert not r.degraded
        await r.aclose()

    assert max_in_window(upstream.arrivals) <= 20
    first = min(upstream.admissions)
    used = count_between(upstream.arrivals, first, first + duration)
    assert used >= 0.97 * 20 * duration, used
    delays = wake_delays(upstream.admissions, upstream.answers, limit=20, window=1.0, until=until)
    assert len(delays) >= 20 * (duration - 1.5)
    assert min(delays) >= 0
    # Polling every 0.25 s would leave tokens idle 125 ms (median); what remains here is the release's
    # round trip, the fairness jitter and, on a busy machine, the OS scheduling of two processes.
    assert statistics.median(delays) < 0.04 + 2 * lag.mean, (statistics.median(delays), lag.mean)
    admitted = [sample(m, "tiw_limiter_admitted_total", action=A) for m in metrics]
    assert sum(admitted) == len(upstream.admissions)
    # Replicas race for each returning token; a little jitter makes the races fair: none starves.
    assert min(admitted) >= 0.15 * sum(admitted), admitted
    for m in metrics:
        assert sample(m, "tiw_limiter_backend_errors_total") == 0


async def test_scores_are_in_redis_time_never_the_replicas(
    redis_server: RedisServer, redis_client: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scripts read TIME themselves, and no replica clock is sent: with this process's wall
    clock a day off, leases still sit at Redis-now + hold + window."""
    assert all("redis.call('TIME')" in script for script in (ACQUIRE_SCRIPT, RELEASE_SCRIPT, SEED_SCRIPT))
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 86_400)
    rate = replica(redis_server.url, window=1.0)
    leases_key = rate.keys(A)[0]
    async with redis_client.monitor() as monitor:
        lease = await rate.acquire(A, deadline=None, hold=2.0)
        taken = ago(await redis_client.time())
        ((_, provisional),) = await scores(redis_client, leases_key)
        assert abs(provisional / 1e6 - (taken + 3.0)) < 0.05
        lease.release()
        await asyncio.sleep(0.05)
        released = ago(await redis_client.time())
        ((_, back),) = await scores(redis_client, leases_key)
        assert abs(back / 1e6 - (released + 1.0)) < 0.1
        await redis_client.echo("that is all")
        commands = []
        async for entry in monitor.listen():
            if entry["command"] == "ECHO that is all":
                break
            commands.append((entry["client_type"], entry["command"]))
    await rate.aclose()
    assert ("lua", "TIME") in commands
    for _, command in commands:
        if command.startswith("EVALSHA"):
            # sha, key count, keys, then limit, hold_us, window_us, member: nothing like a timestamp
            for word in command.split():
                assert not (word.isdigit() and int(word) > 10**9), command


async def test_at_once_refusal_and_estimate_from_redis(redis_server: RedisServer) -> None:
    rate = replica(redis_server.url, limit=2)
    held = [await rate.acquire(A, deadline=None, hold=5) for _ in range(2)]
    started = time.monotonic()
    with pytest.raises(QuotaExceeded) as refused:
        await rate.acquire(A, deadline=started + 0.5, hold=5)
    assert time.monotonic() - started < 0.15  # one round trip to Redis, not a wait
    assert refused.value.reason == "deadline"
    assert 0.9 < refused.value.retry_after <= 1.0
    for lease in held:
        lease.release()
    await rate.aclose()


async def test_a_token_taken_by_one_replica_is_back_for_another_a_window_after_release(
    redis_server: RedisServer,
) -> None:
    # No polling to speak of: the waiting replica must wake on Redis's schedule alone.
    first = replica(redis_server.url, limit=1, window=0.5, poll_interval=10)
    second = replica(redis_server.url, limit=1, window=0.5, poll_interval=10)
    lease = await first.acquire(A, deadline=None, hold=5)
    waiting = asyncio.create_task(second.acquire(A, deadline=None, hold=5))
    await asyncio.sleep(0.1)
    released = time.monotonic()
    lease.release()
    (await waiting).release()
    assert 0.495 < time.monotonic() - released < 0.6
    for r in (first, second):
        await r.aclose()


async def test_a_crashed_replicas_lease_frees_after_hold_plus_window(redis_server: RedisServer) -> None:
    crashed, survivor = (
        replica(redis_server.url, limit=1, window=0.2),
        replica(redis_server.url, limit=1, window=0.2),
    )
    await crashed.acquire(A, deadline=None, hold=0.3)  # never released
    started = time.monotonic()
    lease = await survivor.acquire(A, deadline=None, hold=1)
    assert 0.49 < time.monotonic() - started < 0.65
    lease.release()
    for r in (crashed, survivor):
        await r.aclose()


async def test_pause_holds_every_replica(redis_server: RedisServer) -> None:
    metrics = Metrics("test")
    throttled, other = replica(redis_server.url, limit=5, metrics=metrics), replica(redis_server.url, limit=5)
    throttled.pause(A, 0.4)
    await asyncio.sleep(0.02)  # the pause reaches Redis in the background
    started = time.monotonic()
    with pytest.raises(QuotaExceeded) as refused:
        await other.acquire(A, deadline=started + 0.1, hold=1)
    assert refused.value.reason == "deadline"
    assert 0.3 < refused.value.retry_after <= 0.4
    lease = await other.acquire(A, deadline=None, hold=1)
    assert 0.3 < time.monotonic() - started < 0.5
    lease.release()
    assert sample(metrics, "tiw_limiter_pauses_total", action=A) == 1
    for r in (throttled, other):
        await r.aclose()


async def test_cancelled_callers_leave_no_token_taken(redis_server: RedisServer, redis_client: Redis) -> None:
    rate = replica(redis_server.url, limit=1, window=0.1)
    leases_key = rate.keys(A)[0]
    # Cancelled while its admission is on its way to Redis: Redis admits, the token is handed back.
    for _ in range(5):
        caller = asyncio.create_task(rate.acquire(A, deadline=None, hold=5))
        await asyncio.sleep(0)
        caller.cancel()
        await asyncio.gather(caller, return_exceptions=True)
    await asyncio.sleep(0.05)
    assert await redis_client.zcard(leases_key) == 0
    # Cancelled while queued: the next waiter gets the token on its return.
    held = await rate.acquire(A, deadline=None, hold=5)
    leaving = asyncio.create_task(rate.acquire(A, deadline=None, hold=5))
    staying = asyncio.create_task(rate.acquire(A, deadline=None, hold=5))
    await asyncio.sleep(0.02)
    leaving.cancel()
    released = time.monotonic()
    held.release()
    (await staying).release()
    assert time.monotonic() - released < 0.25
    await rate.aclose()


@pytest.mark.slow
async def test_redis_outage_degrades_to_a_local_share_and_recovers(caplog: pytest.LogCaptureFixture) -> None:
    """Kill redis-server under load: every replica keeps admitting, at most rate/replicas each;
    restart it: all return to shared limiting, and then the 20 per window hold again."""
    caplog.set_level(logging.INFO, logger="tiw_facade.limiter")
    password = "s3cret-redis-password"
    with RedisServer(password=password) as server:
        settings = Settings(
            # A kill is noticed at once (connection refused); a short time-out would only add
            # spurious outages when other processes starve this machine's CPU.
            secret_id=ACCOUNT,
            secret_key="k",
            redis_url=server.url,
            redis_timeout=1.0,
            expected_replicas=3,
        )
        assert settings.degraded_rate_limit == 6
        metrics = [Metrics("test") for _ in range(3)]
        replicas = [
            replica(
                server.url,
                metrics=m,
                degraded_limit=settings.degraded_rate_limit,
                timeout=settings.redis_timeout,
            )
            for m in metrics
        ]
        upstreams = [SimulatedTiw(seed=n) for n in range(3)]
        start = time.monotonic()
        until = start + 4.0
        load = asyncio.gather(
            *(saturate(r, A, u, callers=10, until=until) for r, u in zip(replicas, upstreams, strict=True))
        )

        await asyncio.sleep(1.0)
        killed = time.monotonic()
        server.kill()
        await asyncio.sleep(0.3)
        for r, m in zip(replicas, metrics, strict=True):
            assert r.degraded
            health = r.health()
            assert health["degraded"] is True
            assert "unreachable" in str(health["detail"])
            assert password not in str(health["detail"])
            assert sample(m, "tiw_limiter_degraded") == 1
            assert sample(m, "tiw_limiter_backend_errors_total") >= 1
        await asyncio.sleep(1.3)

        restarted = time.monotonic()
        server.start()
        await eventually(lambda: not any(r.degraded for r in replicas))
        recovered = time.monotonic()
        await load
        await eventually(lambda: not any(r.degraded for r in replicas))
        for r, m in zip(replicas, metrics, strict=True):
            assert r.health()["degraded"] is False
            assert sample(m, "tiw_limiter_degraded") == 0
            await r.aclose()

    for upstream in upstreams:
        during = [t for t in upstream.arrivals if killed + 0.1 <= t < restarted]
        assert max_in_window(during) <= 6  # never more than the local share
        assert count_between(during, restarted - 1, restarted) >= 5  # and still using it
    after = [t for upstream in upstreams for t in upstream.arrivals if t >= recovered]
    assert max_in_window(after) <= 20
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3  # one line per replica, not one per failed call
    assert sum("reachable again" in r.getMessage() for r in caplog.records) == 3
    assert password not in caplog.text


async def test_factory_builds_the_shared_limiter_from_settings() -> None:
    settings = Settings(
        secret_id=ACCOUNT, secret_key="k", redis_url="redis://:pw@127.0.0.1:1/0", expected_replicas=4
    )
    rate = create_limiter(settings)
    assert isinstance(rate, RedisLimiter)
    assert rate.health() == {
        "backend": "redis",
        "degraded": False,
        "detail": "shared through Redis at redis://127.0.0.1:1/0: 20 per 1s per action",
    }
    await rate.aclose()


async def test_unreachable_redis_at_start_degrades_at_once(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics("test")
    settings = Settings(
        secret_id=ACCOUNT, secret_key="k", redis_url="redis://:pw@127.0.0.1:9/0", expected_replicas=2
    )
    rate = create_limiter(settings, metrics)
    started = time.monotonic()
    leases = [await rate.acquire(A, deadline=None, hold=1) for _ in range(10)]  # the local share
    assert time.monotonic() - started < 0.5
    assert rate.degraded
    with pytest.raises(QuotaExceeded):
        await rate.acquire(A, deadline=time.monotonic() + 0.1, hold=1)
    for lease in leases:
        lease.release()
    assert sample(metrics, "tiw_limiter_degraded") == 1
    assert "pw@" not in caplog.text
    await rate.aclose()


# Keeps Redis busy for ARGV[1] microseconds: commands queue behind it and run afterwards.
BUSY_SCRIPT = """
local t = redis.call('TIME')
local start = t[1] * 1000000 + t[2]
local now = start
while now - start < tonumber(ARGV[1]) do
  t = redis.call('TIME')
  now = t[1] * 1000000 + t[2]
end
return 0
"""


async def test_an_admission_that_timed_out_is_settled_in_redis_on_recovery(
    redis_server: RedisServer, redis_client: Redis
) -> None:
    """A slow Redis runs our script after we gave up waiting: it holds a member we never heard
    back about. The replica used the same name for its local lease, so on recovery Redis learns
    that attempt ended, instead of keeping its token for the whole hold."""
    rate = replica(redis_server.url, limit=2, window=0.1, timeout=0.1, probe_interval=0.1)
    (await rate.acquire("warm-up", deadline=None, hold=1)).release()  # connected, scripts loaded
    await redis_client.ping()
    stall = asyncio.ensure_future(redis_client.eval(BUSY_SCRIPT, 0, "300000"))
    await asyncio.sleep(0.01)
    lease = await rate.acquire(A, deadline=None, hold=5)  # times out; admitted locally instead
    assert rate.degraded
    lease.release()  # back (locally) 0.1 s later: long before Redis is reachable again
    await stall
    await eventually(lambda: not rate.degraded)
    redis_now = ago(await redis_client.time())
    # Gone, or at its real return; not kept for its provisional hold of 5 s.
    assert all(back / 1e6 < redis_now + 0.1 for _, back in await scores(redis_client, rate.keys(A)[0]))
    for lease in [await rate.acquire(A, deadline=time.monotonic() + 0.25, hold=1) for _ in range(2)]:
        lease.release()
    await rate.aclose()


def test_logged_redis_addresses_carry_no_credentials() -> None:
    assert redact("redis://:pw@redis:6379/0") == "redis://redis:6379/0"
    assert redact("rediss://user:pw@cache.example:6380/1?password=x") == "rediss://cache.example:6380/1"
    assert redact("unix:///run/redis.sock?password=x&db=0") == "unix:///run/redis.sock"
    assert redact("redis://[::1]:6379/2") == "redis://[::1]:6379/2"
