"""The shared answers can never crowd out the rest of their Redis: their share is bounded by
TIW_SHARED_ANSWERS_MAX_BYTES, the least recently used answers evicted first. A real redis-server with
a small ``maxmemory`` and ``noeviction`` (the durable Redis's configuration): the store on its own,
then a real facade over real gRPC, the emulator as TIW, one Redis for the limiter, the idempotency
records and the answers."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import cast

import grpc
import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError
from support.facade import StartFacade
from support.idempotency import keyed
from support.pages import samples, scrape
from support.redis_server import RedisServer
from support.tiw import SDK_APP_ID, create_request
from tiw_facade import settings, shared_redis
from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as pb
from tiw_facade.answers._entries import Entry, Key, Lifetimes
from tiw_facade.answers._shared import RedisAnswerStore
from tiw_facade.emulator import DEMO_SECRET_ID, Emulator, EmulatorConfig
from tiw_facade.metrics import SHARED_EVICTION_REASON, Metrics

pytestmark = pytest.mark.slow  # fills a real redis-server to its bound, through real facades

A = "DescribeSnapshotTask"
LONG = Lifetimes(terminal=3000.0, not_found=2000.0, changing=1000.0)
BOUND = 1 << 20  # the store's bound in the store tests: ten times it does not fit in 4 MB
# What Redis may spend beyond the counted bytes: the script cache, client buffers (the counted
# bytes over-estimate the entries themselves).
SLACK = 128 << 10


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer(args=("--maxmemory", "4mb", "--maxmemory-policy", "noeviction")) as server:
        yield server


@pytest.fixture
def metrics() -> Metrics:
    return Metrics("test")


class Clock:
    """Wall-clock time passing 10 ms per reading: the store sees seconds pass between a test's reads
    (a read marks an entry used at most once a second), though they are milliseconds apart."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        self.now += 0.01
        return self.now


@pytest.fixture
async def store(redis_server: RedisServer, metrics: Metrics) -> AsyncIterator[RedisAnswerStore]:
    made = bounded(redis_server, BOUND, metrics=metrics)
    yield made
    await made.aclose()


def bounded(
    redis: RedisServer, max_bytes: int, *, lifetimes: Lifetimes = LONG, metrics: Metrics | None = None
) -> RedisAnswerStore:
    client = shared_redis.connect(shared_redis.Target(redis.url, 2.0))
    account = f"AKID-{uuid.uuid4().hex}"
    return RedisAnswerStore(
        client, account=account, lifetimes=lifetimes, max_bytes=max_bytes, metrics=metrics, clock=Clock()
    )


def key(number: int) -> Key:
    request = pb.DescribeSnapshotTaskRequest(task_id=f"task-{number:08d}", sdk_app_id=SDK_APP_ID)
    return Key(A, request.SerializeToString(deterministic=True))


def answer(number: int, *, size: int = 600, at: float = 1.7e9) -> Entry:
    """A valid terminal answer of ``key(number)`` with ``size`` bytes of padding."""
    response = pb.DescribeSnapshotTaskResponse(
        task_id=f"task-{number:08d}", status="Finished", request_id="x" * size
    )
    return Entry(at, f"req-{number}", response.SerializeToString(), terminal=True)


async def put(store: RedisAnswerStore, number: int, **kwargs: int) -> None:
    now = time.time()
    assert await store.put(key(number), answer(number, at=now, **kwargs), asked_at=now)


async def counted(redis: Redis, store: RedisAnswerStore) -> int:
    """The counted total, checked against the sum of the counted sizes."""
    _, _, sizes, total = store.accounting_keys()
    held = int(await redis.get(total) or 0)
    assert held == sum(int(size) for size in await redis.hvals(sizes))
    return held


def evictions(metrics: Metrics) -> float:
    value = metrics.registry.get_sample_value("tiw_cache_evictions_total", {"reason": SHARED_EVICTION_REASON})
    assert value is not None, "made with the store, at start-up"
    return value


async def used_memory(redis: Redis) -> int:
    await redis.memory_purge()
    return cast(int, (await redis.info("memory"))["used_memory"])


async def test_ten_times_the_bound_stays_within_it_least_recently_used_first(
    store: RedisAnswerStore, redis_client: Redis, metrics: Metrics
) -> None:
    assert evictions(metrics) == 0  # from start-up
    await put(store, 0)
    # Measured from here: a Redis's first keys and scripts cost it ~450 KB, once.
    baseline = await used_memory(redis_client)
    size = int(await redis_client.hget(store.accounting_keys()[2], key(0).text()) or 0)
    assert size > len(answer(0).payload)
    number = 1
    while number * size < 10 * BOUND:
        await put(store, number)  # never refused: Redis is never full
        if number % 100 == 0:
            assert await store.get(key(0)) is not None  # read now and then: used recently
        number += 1
    total = await counted(redis_client, store)
    grown = await used_memory(redis_client) - baseline
    live = await redis_client.zcard(store.accounting_keys()[0])
    print(
        f"\n{number} answers of {size} counted bytes put ({number * size} bytes): {live} kept, "
        f"{total} bytes counted of {BOUND}, used_memory +{grown}, {evictions(metrics):.0f} evicted"
    )
    assert BOUND - size < total <= BOUND  # full, and no more
    assert grown <= BOUND + SLACK
    assert evictions(metrics) == number - live  # every entry gone was evicted, counted once
    used = store.accounting_keys()[0]
    assert await store.get(key(0)) is not None
    marked = await redis_client.zscore(used, key(0).text())
    assert await store.get(key(0)) is not None
    assert await redis_client.zscore(used, key(0).text()) == marked  # within a second: no write
    kept, first, last = await store.get_many([key(0), key(1), key(number - 1)])
    assert kept is not None, "put first but read recently: kept"
    assert first is None, "put early, never read: among the first to go"
    assert last is not None


async def test_invalidations_drops_and_expiries_leave_the_accounting(
    redis_server: RedisServer, redis_client: Redis
) -> None:
    # Terminal answers for 0.3 s; the bookkeeping outlives the longest lifetime, 5 s.
    short = Lifetimes(terminal=0.3, not_found=0.3, changing=5.0)
    store = bounded(redis_server, BOUND, lifetimes=short)
    try:
        for number in range(10):
            await put(store, number)
        one = await counted(redis_client, store) // 10
        await store.invalidate([key(0), key(1)], at=time.time())
        assert await counted(redis_client, store) == 8 * one
        await redis_client.hset(store.entry_key(key(2)), "p", b"\x00 not protobuf")
        assert await store.get(key(2)) is None  # dropped as invalid
        assert await counted(redis_client, store) == 7 * one
        await asyncio.sleep(0.4)  # the rest expire; the next put forgets them
        await put(store, 99)
        assert await counted(redis_client, store) == one
        assert await redis_client.zcard(store.accounting_keys()[0]) == 1
        for name in store.accounting_keys():  # and the bookkeeping goes when its last entry could
            assert 4000 < await redis_client.pttl(name) <= 5000
    finally:
        await store.aclose()


async def test_lost_bookkeeping_starts_again_and_never_loops(
    store: RedisAnswerStore, redis_client: Redis, metrics: Metrics
) -> None:
    for number in range(100):
        await put(store, number)
    used, _, sizes, total = store.accounting_keys()

    async def size(number: int) -> int:
        return int(await redis_client.hget(sizes, key(number).text()) or 0)

    await redis_client.delete(used)  # the index lost: nothing it held is counted any more
    await put(store, 1000)
    assert await counted(redis_client, store) == await size(1000)
    await redis_client.delete(total)  # the total lost: summed again from the sizes
    await put(store, 1001)
    assert await counted(redis_client, store) == await size(1000) + await size(1001)
    await redis_client.set(total, "not a number")  # nonsense: as lost
    await redis_client.hset(sizes, "junk", "junk")
    await put(store, 1002)
    one = await size(1002)
    await redis_client.delete(sizes)  # sizes lost: evicting frees nothing, until the index is empty
    for number in range(2000, 2000 + 2 * BOUND // one):  # and the bound holds on
        await put(store, number)
    assert await counted(redis_client, store) <= BOUND
    assert evictions(metrics) > 0


async def test_an_answer_larger_than_the_bound_is_not_shared(
    redis_server: RedisServer, redis_client: Redis
) -> None:
    store = bounded(redis_server, 64 << 10)
    try:
        await put(store, 1)
        await put(store, 1, size=100_000)
        assert await store.get(key(1)) is None  # the older answer went too
        assert await counted(redis_client, store) == 0
    finally:
        await store.aclose()


async def test_entries_of_older_releases_are_read_and_left_to_expire(
    store: RedisAnswerStore, redis_client: Redis
) -> None:
    entry = answer(7)
    fields = {"a": repr(entry.answered_at), "r": entry.request_id, "p": entry.payload, "t": "1"}
    await redis_client.hset(store.entry_key(key(7)), mapping=fields)  # type: ignore[arg-type]
    assert await store.get(key(7)) == entry
    assert await redis_client.zcard(store.accounting_keys()[0]) == 0  # not counted, not marked


async def test_a_redis_full_of_other_keys_still_answers_reads(
    store: RedisAnswerStore, redis_client: Redis
) -> None:
    await put(store, 1)
    entry = await store.get(key(1))
    assert entry is not None
    with pytest.raises(ResponseError, match="maxmemory"):  # someone else's keys fill it
        for filler in range(1000):
            await redis_client.set(f"junk:{filler}", b"x" * 10_000)
    assert await store.get(key(1)) == entry  # marking it used is best effort


# --- end to end: one Redis for everything, a facade, the emulator ---------------------------------

E2E_BOUND = 256 << 10  # TIW_SHARED_ANSWERS_MAX_BYTES
# The limiter's keys, the keyed creates' records and the bounded answers fit with room (Redis also
# counts its clients' buffers, which grow when a busy machine slows it: 1.5 MB spare here); twenty
# times the bound in answers (~4.6 MB spent) does not.
E2E_REDIS = ("--maxmemory", "4mb", "--maxmemory-policy", "noeviction")
FILL = 20  # times the bound, in distinct answers
CONCURRENCY = 32
KEYED_EVERY = 10  # one keyed create (and one other Describe) per this many answers


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    """TIW without its 20/s (the test is about memory, not the quota); tasks finished at once."""
    instance = Emulator(EmulatorConfig(rate_limit=1_000_000, snapshot_seconds=0.0))
    await instance.start("127.0.0.1", 0)
    yield instance
    await instance.stop()


def counter(text: str, name: str, **labels: str) -> float:
    return sum(
        value
        for found, value in samples(text, name).items()
        if all(dict(found).get(label) == wanted for label, wanted in labels.items())
    )


async def test_answers_filling_a_shared_redis_refuse_nothing_else(
    start_facade: StartFacade, emulator: Emulator
) -> None:
    with RedisServer(args=E2E_REDIS) as redis_server:
        facade = await start_facade(
            TIW_REDIS_URL=redis_server.url,
            TIW_SHARED_ANSWERS_MAX_BYTES=str(E2E_BOUND),
            TIW_RATE_LIMIT="100000",
            # What is measured is Redis refusing (OOM), not its speed: a CI machine busy beside other
            # work must not turn the default 0.25 s time-out into failures this test would count.
            TIW_REDIS_TIMEOUT="2",
        )
        push = emulator.add_push_task(sdk_app_id=SDK_APP_ID)
        refused: list[str] = []

        async def call(number: int, task: str) -> None:
            try:
                request = pb.DescribeSnapshotTaskRequest(task_id=task, sdk_app_id=SDK_APP_ID)
                response = await facade.stub.DescribeSnapshotTask(request, timeout=10)
                assert response.task_id == task
                if number % KEYED_EVERY == 0:
                    metadata = keyed(f"order-{number}")
                    await facade.stub.CreateSnapshotTask(create_request(), metadata=metadata, timeout=10)
                    other = pb.DescribeWhiteboardPushRequest(task_id=push, sdk_app_id=SDK_APP_ID)
                    await facade.stub.DescribeWhiteboardPush(other, timeout=10)
            except grpc.aio.AioRpcError as error:
                refused.append(f"{error.code().name}: {error.details()}")

        async def calls(first: int, count: int) -> list[str]:
            tasks = [emulator.add_snapshot_task(sdk_app_id=SDK_APP_ID) for _ in range(count)]
            numbers = iter(enumerate(tasks, first))

            async def worker() -> None:
                for number, task in numbers:
                    await call(number, task)

            await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
            return tasks

        async with Redis.from_url(redis_server.url) as redis:
            (task,) = await calls(0, 1)
            prefix = shared_redis.prefix("answers", DEMO_SECRET_ID)  # the facade's account
            request = pb.DescribeSnapshotTaskRequest(task_id=task, sdk_app_id=SDK_APP_ID)
            member = Key(A, request.SerializeToString(deterministic=True)).text()
            size = int(await redis.hget(f"{prefix}:sizes", member) or 0)
            assert size > 0
            needed = FILL * E2E_BOUND // size + 1
            began = time.monotonic()
            await calls(1, needed)
            took = time.monotonic() - began
            info = await redis.info("memory")
            total = int(await redis.get(f"{prefix}:bytes") or 0)
        text = await scrape(facade)
        evicted = counter(text, "tiw_cache_evictions_total", reason=SHARED_EVICTION_REASON)
        print(
            f"\n{needed + 1} answers of {size} counted bytes in {took:.1f} s, "
            f"{needed // KEYED_EVERY + 1} keyed creates: {total} bytes counted of {E2E_BOUND}, "
            f"used_memory {info['used_memory']} of {info['maxmemory']}, {evicted:.0f} evicted"
        )
        assert refused == []
        assert emulator.stats()["CreateSnapshotTask"].tasks_created == needed // KEYED_EVERY + 1
        # Refused is what a full Redis does (OOM); time-outs are the machine's, not the bound's.
        assert counter(text, "tiw_limiter_backend_errors_total", kind="refused") == 0
        assert counter(text, "tiw_store_errors_total", kind="refused") == 0
        assert evicted > 0
        assert total <= E2E_BOUND


def test_the_bound_is_a_byte_size_of_at_least_64_kib() -> None:
    base = {"TENCENTCLOUD_SECRET_ID": "AKID", "TENCENTCLOUD_SECRET_KEY": "k", "TENCENTCLOUD_REGION": "r"}
    assert settings.load(base).shared_answers_max_bytes == 128 << 20
    for raw, value in (("64Ki", 64 << 10), ("200Mi", 200 << 20), ("1Gi", 1 << 30), ("70000", 70000)):
        assert settings.load({**base, "TIW_SHARED_ANSWERS_MAX_BYTES": raw}).shared_answers_max_bytes == value
    for raw in ("63Ki", "1mb", "-1", "1.5Gi", "64 Ki"):
        with pytest.raises(settings.SettingsError, match="TIW_SHARED_ANSWERS_MAX_BYTES"):
            settings.load({**base, "TIW_SHARED_ANSWERS_MAX_BYTES": raw})
