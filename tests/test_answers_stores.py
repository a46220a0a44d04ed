"""The process's store and Redis's together (answers/_stores.py), against a real redis-server: two
``Stores`` on one Redis are two replicas. Another replica's newer answer is read, kept and told to
watchers; an answer older than this replica's own stop is not trusted; while Redis is out of reach
the process's store serves; once it answers again, the stops and lease releases it missed are
written before it is used.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from support.clock import VirtualClock
from support.proxy import DelayProxy
from support.redis_server import RedisServer, free_port
from tiw_facade import shared_redis
from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as pb
from tiw_facade.answers._entries import Entry, Key, Lifetimes
from tiw_facade.answers._local import LocalStore
from tiw_facade.answers._shared import RedisAnswerStore
from tiw_facade.answers._stores import Stores

PUSH = "DescribeWhiteboardPush"
LIFETIMES = Lifetimes(terminal=3600.0, not_found=2.0, changing=30.0)
KEY = Key.of(PUSH, pb.DescribeWhiteboardPushRequest(sdk_app_id=1400000001, task_id="push"))


class Replica:
    """One replica's stores, and the answers they told its watchers."""

    def __init__(self, url: str, account: str, clock: VirtualClock) -> None:
        self.published: list[tuple[Key, Entry]] = []
        client = shared_redis.connect(shared_redis.Target(url, 0.5))
        shared = RedisAnswerStore(client, account=account, lifetimes=LIFETIMES, clock=clock, where=url)
        local = LocalStore(LIFETIMES, max_entries=100, clock=clock)
        self.shared = shared
        self.stores = Stores(local, shared, publish=self._publish, clock=clock)

    def _publish(self, key: Key, entry: Entry) -> None:
        self.published.append((key, entry))


def pushing(at: float) -> Entry:
    response = pb.DescribeWhiteboardPushResponse(task_id="push", status="PUSHING", request_id=f"req-{at}")
    return Entry(answered_at=at, request_id=f"req-{at}", payload=response.SerializeToString())


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock.at_wall_time()  # Redis checks answers' times against the writer's clock


@pytest.fixture
async def replicas() -> AsyncIterator[list[Replica]]:
    """The replicas a test makes (``replica``), closed at its end."""
    made: list[Replica] = []
    yield made
    for replica in made:
        if replica.stores.shared is not None:
            await replica.stores.shared.aclose()


def replica(made: list[Replica], url: str, clock: VirtualClock, account: str = "AKID-test") -> Replica:
    """Another replica of ``account`` (each test its own: the module's Redis outlives a test)."""
    made.append(Replica(url, account, clock))
    return made[-1]


async def test_another_replicas_newer_answer_is_read_kept_and_told_to_watchers(
    redis_server: RedisServer, replicas: list[Replica], clock: VirtualClock
) -> None:
    account = f"AKID-{uuid.uuid4().hex}"
    a, b = (replica(replicas, redis_server.url, clock, account) for _ in range(2))
    entry = pushing(clock())
    assert await a.stores.keep(KEY, entry, asked_at=clock())
    assert await b.stores.lookup(KEY) == entry
    assert b.stores.local.peek(KEY) == entry, "kept in the process too: the fall-back"
    assert b.published == [(KEY, entry)]
    assert await b.stores.lookup(KEY) == entry
    assert len(b.published) == 1, "told once: not newer the second time"


async def test_an_answer_older_than_this_replicas_own_stop_is_not_trusted(
    redis_server: RedisServer, replicas: list[Replica], clock: VirtualClock
) -> None:
    account = f"AKID-{uuid.uuid4().hex}"
    a, b = (replica(replicas, redis_server.url, clock, account) for _ in range(2))
    # b stopped the push at +1 s and Redis lost the stop; a writes an answer asked for before it.
    await b.stores.local.invalidate([KEY], at=clock() + 1.0)
    assert await a.stores.keep(KEY, pushing(clock()), asked_at=clock())
    assert await b.stores.lookup(KEY) is None


async def test_while_redis_is_out_of_reach_the_process_store_serves(
    replicas: list[Replica], clock: VirtualClock
) -> None:
    nowhere = replica(replicas, f"redis://127.0.0.1:{free_port()}/0", clock)
    entry = pushing(clock())
    assert await nowhere.stores.keep(KEY, entry, asked_at=clock())
    assert not nowhere.stores.usable
    assert await nowhere.stores.lookup(KEY) == entry
    assert nowhere.stores.schedule() is nowhere.stores.local


async def test_the_stops_and_releases_missed_are_written_before_redis_is_used_again(
    redis_server: RedisServer, replicas: list[Replica], clock: VirtualClock
) -> None:
    account = f"AKID-{uuid.uuid4().hex}"
    other_key = Key(PUSH, b"another")
    async with DelayProxy(redis_server.port) as proxy:
        cut_off = replica(replicas, proxy.url, clock, account)
        other = replica(replicas, redis_server.url, clock, account)
        await cut_off.stores.contact.beat()  # its marker: Redis is known to it
        assert await cut_off.shared.lease(other_key, 60.0)
        await proxy.cut()
        stopped_at = clock()
        await cut_off.stores.invalidate(KEY, at=stopped_at)  # a stop Redis did not get
        await cut_off.stores.unlease(other_key)  # nor this release
        assert not cut_off.stores.usable
        # The other replica, not knowing of the stop, writes an answer asked for before it.
        assert await other.stores.keep(KEY, pushing(stopped_at - 0.5), asked_at=stopped_at - 0.5)
        await proxy.restore()
        clock.advance(0.1)
        await cut_off.stores.contact.beat()
        assert cut_off.stores.usable
    assert await other.stores.lookup(KEY) is None, "the stop, written again, dropped it"
    assert not await other.stores.keep(KEY, pushing(stopped_at - 0.2), asked_at=stopped_at - 0.2)
    assert await other.shared.lease(other_key, 60.0), "the lease was given up"
