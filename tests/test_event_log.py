"""The two event logs, by the same tests: the ring in process, and the Redis Stream on a real
redis-server (two logs on one Redis are two replicas)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing, suppress
from typing import Any

import pytest
from support.events import event
from support.redis_server import RedisServer
from tiw_facade import shared_redis
from tiw_facade.events import (
    CursorExpired,
    Event,
    EventLog,
    EventLogUnavailable,
    InvalidCursor,
    counted_bytes,
)
from tiw_facade.events._memory import MemoryEventLog
from tiw_facade.events._redis import RedisEventLog, connect_log
from tiw_facade.metrics import Metrics

WAIT = 5.0  # seconds a test waits for what must come (never a bound on how fast it comes)

MakeLog = Callable[..., EventLog]


@pytest.fixture(scope="module")
def shared_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(params=["memory", "redis"])
async def make_log(request: pytest.FixtureRequest) -> AsyncIterator[MakeLog]:
    """Logs of one account (each call a replica of it: for Redis, on the same Stream)."""
    logs: list[EventLog] = []
    account = f"AKID-{uuid.uuid4().hex}"

    def make(retention: float = 3600.0, max_events: int = 1000, **options: Any) -> EventLog:
        if request.param == "memory":
            made: EventLog = MemoryEventLog(retention=retention, max_events=max_events, **options)
        else:
            server = request.getfixturevalue("shared_server")
            where = shared_redis.Target(server.url, 0.5)
            made = connect_log(
                where, account=account, retention=retention, max_events=max_events, metrics=None, **options
            )
        logs.append(made)
        return made

    yield make
    for made in logs:
        await made.aclose()


async def take(events: AsyncIterator[Event], count: int) -> list[Event]:
    async with asyncio.timeout(WAIT):
        return [await anext(events) for _ in range(count)]


async def nothing_yet(events: AsyncIterator[Event]) -> asyncio.Future[Event]:
    """The next event, not come after a moment (nothing must come): awaited later, or cancelled.
    Never a time-out around ``anext``: cancelling it would end the follower for good."""
    pending = asyncio.ensure_future(anext(events))
    done, _ = await asyncio.wait({pending}, timeout=0.2)
    assert not done, f"an event came: {pending.result()}"
    return pending


async def dropped(pending: asyncio.Future[Event]) -> None:
    pending.cancel()
    with suppress(asyncio.CancelledError, StopAsyncIteration):
        await pending


async def test_append_gives_a_cursor_and_takes_each_event_once(make_log: MakeLog) -> None:
    log = make_log()
    first = await log.append(event(1))
    assert first is not None and first.cursor
    assert first == event(
        1, cursor=first.cursor, received_at=first.received_at, expire_time=first.expire_time
    )
    # TIW's retry: another delivery of the same event (its body may differ; its identity does not).
    assert await log.append(event(1, body=b'{"again": true}')) is None
    second = await log.append(event(2))
    assert second is not None
    assert tuple(map(int, second.cursor.split("-"))) > tuple(map(int, first.cursor.split("-")))


async def test_resuming_from_a_cursor_gets_exactly_what_was_missed(make_log: MakeLog) -> None:
    log = make_log()
    taken = [await log.append(event(n)) for n in range(1, 6)]
    cursors = [e.cursor for e in taken if e is not None]
    async with aclosing(log.follow(cursors[1])) as events:
        assert [e.timestamp for e in await take(events, 3)] == [3, 4, 5]
        pending = await nothing_yet(events)
        new = await log.append(event(6))
        async with asyncio.timeout(WAIT):
            assert await pending == new


async def test_a_follower_from_now_gets_only_new_events_and_wakes_on_append(make_log: MakeLog) -> None:
    log = make_log()
    await log.append(event(1))
    async with aclosing(log.follow(None)) as events:
        waiting = asyncio.ensure_future(take(events, 2))
        await asyncio.sleep(0.1)  # the follower is waiting by now (it would get them all the same)
        await log.append(event(2))
        await log.append(event(3))
        assert [e.timestamp for e in await waiting] == [2, 3]


async def test_every_field_survives_the_log(make_log: MakeLog) -> None:
    log = make_log()
    original = event(7, kind="video", task_id="任务-✓", body=bytes(range(256)), received_at=1700000000.123456)
    async with aclosing(log.follow(None)) as events:
        waiting = asyncio.ensure_future(take(events, 1))
        await asyncio.sleep(0.1)
        taken = await log.append(original)
        assert await waiting == [taken]
    assert taken is not None and taken == Event(**{**_fields(original), "cursor": taken.cursor})


def _fields(e: Event) -> dict[str, Any]:
    return {name: getattr(e, name) for name in Event.__dataclass_fields__}


async def test_beyond_max_events_the_oldest_are_dropped_and_their_cursors_expire(make_log: MakeLog) -> None:
    log = make_log(max_events=3)
    taken = [await log.append(event(n)) for n in range(1, 6)]  # 1 and 2 dropped
    cursors = [e.cursor for e in taken if e is not None]
    with pytest.raises(CursorExpired):
        await anext(log.follow(cursors[0]))
    async with aclosing(log.follow(cursors[1])) as events:  # the newest dropped: nothing after it lost
        assert [e.timestamp for e in await take(events, 3)] == [3, 4, 5]


async def test_beyond_max_bytes_the_oldest_are_dropped_and_a_flood_stops_there(make_log: MakeLog) -> None:
    """A leaked signature lets anyone post distinct events until it expires: the bytes kept stop at
    TIW_EVENTS_MAX_BYTES whatever the count, the oldest dropped first, a large one kept alone."""
    large = b"x" * 3000
    each = counted_bytes(event(0, body=large))
    log = make_log(max_bytes=each * 3)
    taken = [await log.append(event(n, body=large)) for n in range(10)]
    cursors = [item.cursor for item in taken if item is not None]
    async with aclosing(log.follow(cursors[6])) as newest:  # the last three are held
        assert [item.timestamp for item in await take(newest, 3)] == [7, 8, 9]
    with pytest.raises(CursorExpired):
        async with aclosing(log.follow(cursors[5])) as dropped_ones:
            await anext(dropped_ones)
    huge = await log.append(event(10, body=b"y" * (each * 4)))  # over the bound alone: kept alone
    assert huge is not None
    async with aclosing(log.follow(cursors[9])) as last:
        assert [item.timestamp for item in await take(last, 1)] == [10]
    small = await log.append(event(11))  # the huge one goes; the count stays right after it
    assert small is not None
    async with aclosing(log.follow(huge.cursor)) as after:
        assert [item.timestamp for item in await take(after, 1)] == [11]


async def test_events_older_than_the_retention_are_dropped(make_log: MakeLog) -> None:
    log = make_log(retention=0.2)
    old = await log.append(event(1))
    await log.append(event(2))
    await asyncio.sleep(0.3)
    await log.append(event(3))  # the one that trims (the Redis log trims as it appends)
    assert old is not None
    with pytest.raises(CursorExpired):
        await anext(log.follow(old.cursor))


@pytest.mark.parametrize(
    "cursor", ["", "abc", "1-", "-1", "1-2-3", "١٢-٣", "1.5-0", "99999999999999999999999-0"]
)
async def test_a_malformed_cursor_is_invalid(make_log: MakeLog, cursor: str) -> None:
    with pytest.raises(InvalidCursor):
        await anext(make_log().follow(cursor))


async def test_a_cursor_from_before_the_log_was_born_is_expired(make_log: MakeLog) -> None:
    """Another process's cursor for the ring; for Redis, one of a Stream it lost."""
    log = make_log()
    await log.append(event(1))
    with pytest.raises(CursorExpired):
        await anext(log.follow("1000-0"))


async def test_two_replicas_share_one_redis_log(shared_server: RedisServer) -> None:
    where = shared_redis.Target(shared_server.url, 0.5)
    account = f"AKID-{uuid.uuid4().hex}"
    one, other = (
        connect_log(where, account=account, retention=3600.0, max_events=1000, metrics=None) for _ in range(2)
    )
    try:
        async with aclosing(other.follow(None)) as events:
            waiting = asyncio.ensure_future(take(events, 1))
            await asyncio.sleep(0.1)
            taken = await one.append(event(1))
            assert await other.append(event(1)) is None  # taken once across replicas
            assert await waiting == [taken]
    finally:
        await one.aclose()
        await other.aclose()


# --- Redis failing ----------------------------------------------------------------------------------


@pytest.fixture
def own_server() -> Iterator[RedisServer]:
    # Durable (AOF, fsync always), so that killing it loses nothing: the outage alone is tested.
    with RedisServer(args=("--appendonly", "yes", "--appendfsync", "always")) as server:
        yield server


@pytest.mark.slow
async def test_a_follower_rides_out_redis_down_and_misses_nothing(own_server: RedisServer) -> None:
    metrics = Metrics("test")
    where = shared_redis.Target(own_server.url, 0.25)
    account = f"AKID-{uuid.uuid4().hex}"
    log = connect_log(where, account=account, retention=3600.0, max_events=1000, metrics=None)
    other = connect_log(where, account=account, retention=3600.0, max_events=1000, metrics=metrics)
    try:
        async with aclosing(log.follow(None)) as events:
            waiting = asyncio.ensure_future(take(events, 1))
            await asyncio.sleep(0.1)
            await other.append(event(1))
            assert [e.timestamp for e in await waiting] == [1]

            own_server.kill()
            with pytest.raises(EventLogUnavailable):
                await other.append(event(2))
            pending = asyncio.ensure_future(take(events, 2))
            await asyncio.sleep(0.5)  # the follower meets the outage and keeps trying
            assert not pending.done()
            own_server.start()
            await other.append(event(2))
            await other.append(event(3))
            assert [e.timestamp for e in await pending] == [2, 3]
            await dropped(await nothing_yet(events))
            kinds = shared_redis.KINDS
            errors = [
                metrics.registry.get_sample_value("tiw_store_errors_total", {"role": "events", "kind": k})
                for k in kinds
            ]
            assert sum(found or 0 for found in errors) >= 1  # the refused append, counted
    finally:
        await log.aclose()
        await other.aclose()


@pytest.mark.slow
async def test_a_redis_that_lost_the_log_expires_the_cursors_of_before(own_server: RedisServer) -> None:
    where = shared_redis.Target(own_server.url, 0.25)
    log: RedisEventLog = connect_log(where, account="AKID-x", retention=3600.0, max_events=10, metrics=None)
    try:
        taken = await log.append(event(1))
        assert taken is not None
        own_server.stop()  # gone with its data (the AOF too)
        own_server.start()
        await log.append(event(2))
        with pytest.raises(CursorExpired):
            await anext(log.follow(taken.cursor))
    finally:
        await log.aclose()
