"""What is read from Redis is checked before use: a real facade over real gRPC, the emulator as TIW,
a real redis-server whose entries a test tampers with. Each bad value is dropped, counted, and
replaced by a correct answer from TIW; a malformed limiter epoch is re-born, not a refusal."""

from __future__ import annotations

import asyncio
import math
import time
from typing import cast

import pytest
from redis.asyncio import Redis
from support.answers import describe, snapshot_request
from support.facade import Facade, StartFacade
from support.redis_server import RedisServer
from support.tiw import SDK_APP_ID
from tiw_facade import shared_redis
from tiw_facade.answers._entries import Key
from tiw_facade.emulator import DEMO_SECRET_ID

# A real redis-server, and every case waits out real 1 s windows (4 s for the limiter's keys).
pytestmark = pytest.mark.slow

A = "DescribeSnapshotTask"


def entry_key(task: str) -> str:
    request = snapshot_request(task).SerializeToString(deterministic=True)
    return f"{shared_redis.prefix('answers', DEMO_SECRET_ID)}:e:{Key(A, request).text()}"


def invalid(facade: Facade, role: str, what: str) -> float:
    value = facade.server.metrics.registry.get_sample_value(
        "tiw_store_invalid_total", {"role": role, "what": what}
    )
    assert value is not None, "primed at start-up"
    return value


async def answered(facade: Facade, redis: Redis, task: str) -> str:
    """One answer of ``task`` kept in Redis; its entry's key."""
    response, _ = await describe(facade, task)
    assert response.task_id == task
    name = entry_key(task)
    assert await redis.exists(name)
    return name


async def text(redis: Redis, name: str, field: str) -> str:
    value = await redis.hget(name, field)
    return value.decode() if isinstance(value, bytes) else ""


async def assert_good_entry(redis: Redis, name: str, task: str) -> None:
    """The entry now held is TIW's answer of ``task``, with a plausible time and a lifetime."""
    from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as pb

    fields = cast("dict[bytes, bytes]", await redis.hgetall(name))
    at = float(fields[b"a"])
    assert math.isfinite(at) and at <= time.time() + 1
    assert pb.DescribeSnapshotTaskResponse.FromString(fields[b"p"]).task_id == task
    assert await redis.pttl(name) > 0


async def test_a_garbage_payload_is_dropped_and_replaced(
    start_facade: StartFacade, redis_server: RedisServer, redis_client: Redis
) -> None:
    facade = await start_facade(TIW_REDIS_URL=redis_server.url)
    task = facade.emulator.add_snapshot_task(sdk_app_id=SDK_APP_ID, run_seconds=60)
    name = await answered(facade, redis_client, task)
    await redis_client.hset(name, "p", b"\x00garbage, not protobuf")
    response, metadata = await describe(facade, task)
    assert response.task_id == task and response.status
    assert metadata["tiw-source"] == "upstream"
    assert invalid(facade, "answers", "payload") == 1
    await assert_good_entry(redis_client, name, task)


@pytest.mark.parametrize("forged", ["nan", "9e15"])
async def test_an_implausible_time_is_not_fresh_and_a_new_answer_replaces_it(
    start_facade: StartFacade, redis_server: RedisServer, redis_client: Redis, forged: str
) -> None:
    facade = await start_facade(TIW_REDIS_URL=redis_server.url)
    task = facade.emulator.add_snapshot_task(sdk_app_id=SDK_APP_ID, run_seconds=60)
    name = await answered(facade, redis_client, task)
    first = await text(redis_client, name, "r")
    await redis_client.hset(name, "a", forged)
    await redis_client.persist(name)
    response, metadata = await describe(facade, task, max_age_ms=0)
    assert metadata["tiw-source"] == "upstream"
    assert response.task_id == task and response.request_id != first
    assert invalid(facade, "answers", "time") >= 1
    await assert_good_entry(redis_client, name, task)
    # Later answers keep replacing it: the entry is not stuck at a forged time.
    again, metadata = await describe(facade, task, max_age_ms=0)
    assert metadata["tiw-source"] == "upstream" and again.request_id != response.request_id
    assert await text(redis_client, name, "r") == again.request_id


async def test_another_tasks_answer_copied_under_a_key_is_not_served(
    start_facade: StartFacade, redis_server: RedisServer, redis_client: Redis
) -> None:
    facade = await start_facade(TIW_REDIS_URL=redis_server.url)
    mine = facade.emulator.add_snapshot_task(sdk_app_id=SDK_APP_ID, run_seconds=60)
    other = facade.emulator.add_snapshot_task(sdk_app_id=SDK_APP_ID, run_seconds=60)
    name = await answered(facade, redis_client, mine)
    copied = await redis_client.hget(entry_key(other), "p") or b""
    if not copied:
        await answered(facade, redis_client, other)
        copied = await redis_client.hget(entry_key(other), "p") or b""
    await redis_client.hset(name, "p", copied)
    response, metadata = await describe(facade, mine)
    assert response.task_id == mine
    assert metadata["tiw-source"] == "upstream"
    assert invalid(facade, "answers", "key") == 1
    await assert_good_entry(redis_client, name, mine)


def most_in_a_window(arrivals: list[float], window: float = 1.0) -> int:
    arrivals = sorted(arrivals)
    return max((sum(1 for b in arrivals[i:] if b - a < window) for i, a in enumerate(arrivals)), default=0)


async def test_a_malformed_epoch_is_reborn_and_admissions_resume_within_the_limit(
    start_facade: StartFacade, redis_server: RedisServer, redis_client: Redis
) -> None:
    limit = 5
    facade = await start_facade(TIW_REDIS_URL=redis_server.url, TIW_RATE_LIMIT=str(limit))
    tasks = [facade.emulator.add_snapshot_task(sdk_app_id=SDK_APP_ID, run_seconds=60) for _ in range(15)]
    await describe(facade, tasks[0])  # joined: the epoch exists
    epoch = f"{shared_redis.prefix('limiter', DEMO_SECRET_ID)}:epoch"
    assert await redis_client.hget(epoch, "born")
    await redis_client.hset(epoch, "born", "garbage")
    # Admissions that did not resume would end these calls DEADLINE_EXCEEDED, at their 10 s.
    results = await asyncio.gather(*(describe(facade, task, max_age_ms=0, deadline=10) for task in tasks))
    assert [response.task_id for response, _ in results] == tasks
    assert most_in_a_window(facade.emulator.arrivals(A)) <= limit
    assert invalid(facade, "limiter", "epoch") >= 1
    born = await redis_client.hget(epoch, "born")
    assert born is not None and born.isdigit()
    assert facade.server._limiter is not None
    assert facade.server._limiter.health()["degraded"] is False


def refusals(facade: Facade, role: str) -> float:
    """Commands Redis answered with an error (WRONGTYPE is one); time-outs of a busy machine aside."""
    registry = facade.server.metrics.registry
    value = registry.get_sample_value("tiw_store_errors_total", {"role": role, "kind": "refused"})
    assert value is not None, "primed at start-up"
    return value


@pytest.mark.parametrize("part", ["e:", "i:", "l:", f"s:{A}", f"w:{A}", "used", "sizes", "bytes"])
async def test_an_answer_key_of_the_wrong_type_is_mended_not_an_outage(
    start_facade: StartFacade, redis_server: RedisServer, redis_client: Redis, part: str
) -> None:
    """Left as it is, a list where the store writes a hash (or a string, or a sorted set) fails every
    script that touches it with WRONGTYPE: the replica would take Redis for failing, and a lease
    without expiry would hold the key's callers until their deadlines, for ever."""
    facade = await start_facade(TIW_REDIS_URL=redis_server.url)
    task = facade.emulator.add_snapshot_task(sdk_app_id=SDK_APP_ID, run_seconds=60)
    name = await answered(facade, redis_client, task)
    prefix = f"{shared_redis.prefix('answers', DEMO_SECRET_ID)}:"
    key = name.removeprefix(f"{prefix}e:")
    tampered = prefix + (part + key if part.endswith(":") else part)
    await redis_client.delete(tampered)
    await redis_client.rpush(tampered, "garbage")
    for max_age_ms in (0, 0, None):
        response, _ = await describe(facade, task, max_age_ms=max_age_ms, deadline=3)
        assert response.task_id == task
    for _ in range(40):  # the wanted set is written in the background, once a second per key
        if await redis_client.type(tampered) != b"list":
            break
        await asyncio.sleep(0.1)
    assert (await redis_client.type(tampered)) != b"list"
    assert invalid(facade, "answers", "type") >= 1
    assert refusals(facade, "answers") == 0


@pytest.mark.parametrize("suffix", [f":{A}", f":{A}:pause", ":replicas"])
async def test_a_limiter_key_of_the_wrong_type_is_mended_not_a_refusal(
    start_facade: StartFacade, redis_server: RedisServer, redis_client: Redis, suffix: str
) -> None:
    """Left as it is, a list where a sorted set belongs fails every script with WRONGTYPE: the
    limiter would stay degraded (a local share) for as long as the key exists."""
    limit = 5
    facade = await start_facade(TIW_REDIS_URL=redis_server.url, TIW_RATE_LIMIT=str(limit))
    tasks = [facade.emulator.add_snapshot_task(sdk_app_id=SDK_APP_ID, run_seconds=60) for _ in range(12)]
    await describe(facade, tasks[0])
    name = f"{shared_redis.prefix('limiter', DEMO_SECRET_ID)}{suffix}"
    await redis_client.delete(name)
    await redis_client.rpush(name, "garbage")
    results = await asyncio.gather(*(describe(facade, task, max_age_ms=0, deadline=10) for task in tasks))
    assert [response.task_id for response, _ in results] == tasks
    assert most_in_a_window(facade.emulator.arrivals(A)) <= limit
    assert (await redis_client.type(name)) != b"list"
    assert invalid(facade, "limiter", "epoch") >= 1
    assert facade.server._limiter is not None
    assert facade.server._limiter.health()["degraded"] is False


def test_the_metric_primes_every_check_the_answer_store_makes() -> None:
    from tiw_facade.answers._shared import INVALID_WHATS
    from tiw_facade.metrics import STORE_INVALID

    assert {what for role, what in STORE_INVALID if role == "answers"} == set(INVALID_WHATS)
