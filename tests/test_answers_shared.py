"""The shared answer store against a real redis-server: two stores on one Redis are two replicas."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from redis.asyncio import Redis
from support.proxy import DelayProxy
from support.redis_server import RedisServer
from tiw_facade import shared_redis
from tiw_facade.answers._entries import Entry, Key, Lifetimes, StoreUnavailable
from tiw_facade.answers._shared import RedisAnswerStore

A = "DescribeSnapshotTask"
B = "DescribeWhiteboardPush"
LONG = Lifetimes(terminal=3000.0, not_found=2000.0, changing=1000.0)
TIMEOUT = 0.5

Replica = Callable[..., RedisAnswerStore]


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
async def replica(redis_server: RedisServer) -> AsyncIterator[Replica]:
    """Stores of one account (a new one per test: the module's Redis outlives a test)."""
    account = f"AKID-{uuid.uuid4().hex}"
    stores: list[RedisAnswerStore] = []

    def make(url: str = redis_server.url, **kwargs: Any) -> RedisAnswerStore:
        options: dict[str, Any] = {"account": account, "lifetimes": LONG, **kwargs}
        client = shared_redis.connect(shared_redis.Target(url, TIMEOUT))
        stores.append(RedisAnswerStore(client, **options))
        return stores[-1]

    yield make
    for store in stores:
        await store.aclose()


def key(name: str, action: str = A) -> Key:
    return Key(action, name.encode() + b"\x00\xff")


def answer(at: float, **fields: Any) -> Entry:
    return Entry(answered_at=at, request_id=f"req-{at!r}", payload=b"\x08\x01", **fields)


async def soon(condition: Callable[[], Awaitable[bool]], within: float = 5.0) -> None:
    end = time.monotonic() + within
    while not await condition():
        if time.monotonic() > end:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(0.02)


async def test_every_field_survives_the_trip_to_another_replica(replica: Replica) -> None:
    writer, reader = replica(), replica()
    now = time.time()
    entries = {
        key("running"): Entry(now + 0.1 + 0.2, "请求-1", bytes(range(256)) * 3),
        key("done"): Entry(now - 1 / 3, "r2", b"\x00", terminal=True),
        key("gone"): Entry(now, "r3", error_code="InvalidParameter.TaskNotFound", error_message="任务 ✗"),
        key("bare"): Entry(now + 1e-6, ""),
    }
    for k, entry in entries.items():
        assert await writer.put(k, entry, asked_at=now - 10)
    for k, entry in entries.items():
        assert await reader.get(k) == entry
    names = [key("running"), key("missing"), key("gone"), key("done"), key("bare")]
    expected = [entries.get(k) for k in names]
    assert await reader.get_many(names) == expected
    assert await reader.get_many([]) == []


async def test_each_kind_is_kept_for_its_lifetime(replica: Replica, redis_client: Redis) -> None:
    store = replica()
    now = time.time()
    kinds = {
        key("changing"): (answer(now), LONG.changing),
        key("terminal"): (answer(now, terminal=True), LONG.terminal),
        key("error"): (Entry(now, "r", error_code="InvalidParameter.TaskNotFound"), LONG.not_found),
    }
    for k, (entry, _) in kinds.items():
        assert await store.put(k, entry, asked_at=now)
    for k, (_, lifetime) in kinds.items():
        ttl = await redis_client.pttl(store.entry_key(k))
        assert lifetime * 1000 - 60_000 < ttl <= lifetime * 1000
    # A lifetime counts from when TIW answered, not from when the answer was kept.
    assert await store.put(key("aged"), answer(now - 900), asked_at=now - 901)
    assert 0 < await redis_client.pttl(store.entry_key(key("aged"))) <= 100_000


@pytest.mark.slow
async def test_an_entry_expires_its_lifetime_after_tiw_answered(replica: Replica) -> None:
    store = replica(lifetimes=Lifetimes(terminal=60.0, not_found=60.0, changing=0.5))
    now = time.time()
    assert await store.put(key("old"), answer(now - 10), asked_at=now - 11)  # already past it
    assert await store.put(key("new"), answer(now), asked_at=now)
    assert await store.put(key("final"), answer(now, terminal=True), asked_at=now)
    assert await store.get(key("new")) is not None

    async def gone() -> bool:
        return await store.get(key("new")) is None

    await soon(gone)
    assert await store.get(key("old")) is None
    assert await store.get(key("final")) == answer(now, terminal=True)


async def test_an_invalidation_refuses_answers_to_requests_begun_before_it(replica: Replica) -> None:
    one, other = replica(), replica()
    t = time.time()
    k = key("push")
    assert await one.put(k, answer(t), asked_at=t - 1)
    await other.invalidate([k, key("never-kept")], at=t + 5)
    assert await one.get(k) is None
    assert not await one.put(k, answer(t + 6), asked_at=t + 4)  # begun before the change
    assert not await one.put(k, answer(t + 6), asked_at=t + 5)  # at the same instant: may predate it
    assert await one.get(k) is None
    assert await one.put(k, answer(t + 7), asked_at=t + 5.5)
    assert await other.get(k) == answer(t + 7)
    # An older invalidation arriving late does not lower the stamp.
    await other.invalidate([k], at=t + 1)
    assert not await one.put(k, answer(t + 8), asked_at=t + 4)


async def test_the_stamp_outlives_requests_in_flight(replica: Replica, redis_client: Redis) -> None:
    store = replica(lifetimes=Lifetimes(terminal=1.0, not_found=1.0, changing=1.0))
    await store.invalidate([key("k")], at=time.time())
    assert 55_000 < await redis_client.pttl(store.stamp_key(key("k"))) <= 60_000


async def test_answers_never_go_back_in_time(replica: Replica) -> None:
    one, other = replica(), replica()
    t = time.time()
    k = key("task")
    assert await one.put(k, answer(t + 2), asked_at=t)
    assert not await other.put(k, answer(t + 1), asked_at=t)  # a slower replica's older answer
    assert await one.get(k) == answer(t + 2)
    assert await other.put(k, answer(t + 3, terminal=True), asked_at=t)
    assert await one.get(k) == answer(t + 3, terminal=True)


async def test_a_lease_is_one_replicas_and_only_its_owner_gives_it_up(replica: Replica) -> None:
    one, other = replica(), replica()
    k = key("task")
    assert await one.lease(k, 30)
    assert not await other.lease(k, 30)
    assert not await one.lease(k, 30)  # not reentrant either: one fetch at a time
    await other.unlease(k)  # not its lease: no effect
    assert not await other.lease(k, 30)
    await one.unlease(k)
    assert await other.lease(k, 30)
    assert await one.lease(key("another"), 30)


async def test_a_lease_runs_out(replica: Replica) -> None:
    one, other = replica(), replica()
    assert await one.lease(key("task"), 0.2)

    async def free() -> bool:
        return await other.lease(key("task"), 30)

    await soon(free)


async def test_want_extends_and_never_shortens(replica: Replica) -> None:
    store = replica()
    t = time.time()
    k = key("watched")
    await store.want([k], until=t + 100)
    assert await store.put(k, answer(t - 5), asked_at=t - 6)
    await store.want([k], until=t + 10)
    assert await store.next_due(A, older_than=t, lease=30, now=t + 50) == k
    await store.unlease(k)
    await store.want([k], until=t + 200)
    assert await store.next_due(A, older_than=t, lease=30, now=t + 150) == k


async def test_next_due_takes_the_oldest_answer_first_and_never_a_key_without_one(
    replica: Replica,
) -> None:
    one, other = replica(), replica()
    t = time.time()
    recent, old, unanswered = key("recent"), key("old"), key("no-answer-yet")
    await one.want([recent, old, unanswered], until=t + 60)
    assert await one.put(recent, answer(t - 5), asked_at=t - 6)
    assert await one.put(old, answer(t - 20), asked_at=t - 21)
    due = [await other.next_due(A, older_than=t - 1, lease=30, now=t) for _ in range(3)]
    assert due == [old, recent, None]  # each leased in turn; a key never answered is its callers' to ask
    assert not await one.lease(old, 30)  # the lease next_due took is real


async def test_a_failed_refresh_is_postponed(replica: Replica) -> None:
    store = replica()
    t = time.time()
    first, second = key("failing"), key("healthy")
    await store.want([first, second], until=t + 60)
    assert await store.put(first, answer(t - 20), asked_at=t - 21)
    assert await store.put(second, answer(t - 10), asked_at=t - 11)
    assert await store.next_due(A, older_than=t - 1, lease=30, now=t) == first
    await store.unlease(first)
    await store.postpone(first, at=t)  # its refresh failed just now
    assert await store.next_due(A, older_than=t - 1, lease=30, now=t) == second  # now leased
    assert await store.next_due(A, older_than=t - 1, lease=30, now=t) is None  # not the failing one
    assert await store.next_due(A, older_than=t + 1, lease=30, now=t + 2) == first


async def test_next_due_respects_older_than(replica: Replica) -> None:
    store = replica()
    t = time.time()
    k = key("task")
    await store.want([k], until=t + 60)
    assert await store.put(k, answer(t - 5), asked_at=t - 6)
    assert await store.next_due(A, older_than=t - 5, lease=30, now=t) is None  # strictly older
    assert await store.next_due(A, older_than=t - 4.9, lease=30, now=t) == k


async def test_next_due_skips_leased_and_final_keys(replica: Replica) -> None:
    one, other = replica(), replica()
    t = time.time()
    leased, done, gone, due = key("leased"), key("done"), key("gone"), key("due")
    await one.want([leased, done, gone, due], until=t + 60)
    assert await one.put(leased, answer(t - 30), asked_at=t - 31)
    assert await one.put(done, answer(t - 30, terminal=True), asked_at=t - 31)
    assert await one.put(
        gone, Entry(t - 30, "r", error_code="InvalidParameter.TaskNotFound"), asked_at=t - 31
    )
    assert await one.put(due, answer(t - 10), asked_at=t - 11)
    assert await other.lease(leased, 30)
    assert await one.next_due(A, older_than=t, lease=30, now=t) == due
    assert await one.next_due(A, older_than=t, lease=30, now=t) is None
    # Wanted again, a final key still is not refreshed.
    await one.want([done, gone], until=t + 120)
    assert await one.next_due(A, older_than=t, lease=30, now=t) is None


async def test_a_key_whose_entry_ends_refreshes_does_not_come_back(replica: Replica) -> None:
    store = replica()
    t = time.time()
    k = key("task")
    await store.want([k], until=t + 60)
    assert await store.put(k, answer(t - 10), asked_at=t - 11)
    assert await store.put(k, answer(t - 5, terminal=True), asked_at=t - 6)
    assert await store.next_due(A, older_than=t, lease=30, now=t) is None


async def test_next_due_drops_keys_no_longer_wanted(replica: Replica, redis_client: Redis) -> None:
    store = replica()
    t = time.time()
    lapsed, wanted = key("lapsed"), key("wanted")
    await store.want([lapsed], until=t + 5)
    await store.want([wanted], until=t + 60)
    assert await store.put(lapsed, answer(t - 30), asked_at=t - 31)
    assert await store.put(wanted, answer(t - 10), asked_at=t - 11)
    assert await store.next_due(A, older_than=t, lease=1, now=t + 10) == wanted
    for name in (store.schedule_key(A), store.wanted_key(A)):
        assert await redis_client.zscore(name, lapsed.text()) is None
    assert await store.get(lapsed) is not None  # the entry itself stays for its lifetime


async def test_an_unwanted_answer_is_not_scheduled(replica: Replica, redis_client: Redis) -> None:
    store = replica()
    t = time.time()
    assert await store.put(key("nobody-asked"), answer(t - 30), asked_at=t - 31)
    # Not even for next_due to drop: most answers are never watched, and the schedule stays small.
    assert await redis_client.zcard(store.schedule_key(A)) == 0
    assert await store.next_due(A, older_than=t, lease=30, now=t) is None


async def test_an_invalidated_wanted_key_is_due_first(replica: Replica) -> None:
    store = replica()
    t = time.time()
    first, changed = key("first"), key("changed")
    await store.want([first, changed], until=t + 60)
    assert await store.put(first, answer(t - 30), asked_at=t - 31)
    assert await store.put(changed, answer(t - 1), asked_at=t - 2)
    await store.invalidate([changed], at=t)
    assert await store.next_due(A, older_than=t, lease=30, now=t) == changed


async def test_each_action_has_its_own_schedule(replica: Replica) -> None:
    store = replica()
    t = time.time()
    a, b = key("task", A), key("task", B)
    await store.want([a, b], until=t + 60)
    assert await store.put(b, answer(t - 30), asked_at=t - 31)
    assert await store.put(a, answer(t - 10), asked_at=t - 11)
    assert await store.next_due(A, older_than=t, lease=30, now=t) == a
    assert await store.next_due(A, older_than=t, lease=30, now=t) is None
    assert await store.next_due(B, older_than=t, lease=30, now=t) == b
    assert await store.next_due("DescribeVideoGenerationTask", older_than=t, lease=30, now=t) is None


def every_call(store: RedisAnswerStore) -> dict[str, Callable[[], Awaitable[object]]]:
    t = time.time()
    k = key("task")
    return {
        "get": lambda: store.get(k),
        "get_many": lambda: store.get_many([k, key("other")]),
        "put": lambda: store.put(k, answer(t), asked_at=t),
        "invalidate": lambda: store.invalidate([k], at=t),
        "lease": lambda: store.lease(k, 1),
        "unlease": lambda: store.unlease(k),
        "want": lambda: store.want([k], until=t + 60),
        "next_due": lambda: store.next_due(A, older_than=t, lease=1, now=t),
    }


async def test_a_dead_redis_is_unavailable_and_a_restarted_one_serves_again(replica: Replica) -> None:
    with RedisServer() as server:
        store = replica(server.url)
        calls = every_call(store)
        for call in calls.values():
            await call()
        server.kill()
        for name, call in calls.items():
            with pytest.raises(StoreUnavailable) as caught:
                await asyncio.wait_for(call(), 10 * TIMEOUT)  # fails, and soon: never hangs
            assert caught.value.__cause__ is not None, name
        server.start()
        for call in calls.values():
            await call()  # the scripts are loaded again, the pool reconnects
        assert await store.get(key("task")) is None  # it came back empty
        assert await store.put(key("task"), answer(time.time()), asked_at=time.time())


@pytest.mark.slow
async def test_a_redis_slower_than_the_timeout_is_unavailable(
    replica: Replica, redis_server: RedisServer
) -> None:
    async with DelayProxy(redis_server.port) as proxy:
        store = replica(proxy.url)
        calls = every_call(store)
        for call in calls.values():
            await call()
        proxy.delay = 20 * TIMEOUT
        for call in calls.values():
            with pytest.raises(StoreUnavailable):
                await asyncio.wait_for(call(), 10 * TIMEOUT)


async def test_an_entry_of_the_wrong_shape_is_dropped_and_a_key_of_the_wrong_type_mended(
    replica: Replica, redis_client: Redis
) -> None:
    store = replica()
    k = key("task")
    # A hash that is not an entry is never served: dropped (tests/test_store_tampering.py has the rest).
    await redis_client.hset(store.entry_key(k), mapping={"r": "no answered_at"})
    assert await store.get(k) is None
    assert not await redis_client.exists(store.entry_key(k))
    # A key of another type is bad data, not Redis failing: deleted, and the command run again.
    await redis_client.set(store.entry_key(k), "not a hash")
    assert await store.get_many([k]) == [None]
    assert not await redis_client.exists(store.entry_key(k))
    await redis_client.set(store.entry_key(k), "not a hash")
    assert await store.put(k, answer(time.time()), asked_at=time.time())
    assert await redis_client.type(store.entry_key(k)) == b"hash"
    t = time.time()
    await redis_client.zadd(store.schedule_key(A), {f"{A}:x": 0})  # not base64: leaves the schedule
    await redis_client.zadd(store.wanted_key(A), {f"{A}:x": t + 60})
    assert await store.next_due(A, older_than=t, lease=1, now=t) is None
    assert await redis_client.zscore(store.schedule_key(A), f"{A}:x") is None


async def test_a_key_another_replica_mended_meanwhile_is_not_an_outage(
    replica: Replica, redis_client: Redis
) -> None:
    """Two replicas meet the same key of the wrong type: one's script is refused, the other mends the
    key before the first gets to; the first finds nothing left to mend and must still run again
    (seen in CI: a put refused for the wanted set that a want had just mended, counted as Redis
    refusing)."""
    store = replica()
    k, t = key("task"), time.time()
    await store.want([k], until=t + 60)  # a put then reads the wanted set
    await redis_client.delete(store.wanted_key(A))
    await redis_client.rpush(store.wanted_key(A), "garbage")
    mend = store._mend

    async def mended_by_another_replica_first(**kwargs: Any) -> Any:
        await redis_client.delete(store.wanted_key(A))
        return await mend(**kwargs)

    store._mend = mended_by_another_replica_first  # type: ignore[assignment]  # the interleaving, which timing alone rarely makes
    assert await store.put(k, answer(t), asked_at=t)
    assert await store.get(k) == answer(t)
