"""A facade on a real three-node Redis Cluster (``TIW_REDIS_CLUSTER=1``, the URL one seed node):
every role works through redis-py's cluster client, an account's keys sit in one slot, and two
facades on the cluster keep the shared rate limit."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import grpc
import pytest
from grpc_status import rpc_status
from redis.asyncio import Redis
from support import max_in_window
from support.facade import Facade, StartFacade
from support.pages import healthz, samples, scrape
from support.redis_cluster import RedisCluster, command
from support.rich_status import unpack_details
from support.tiw import SDK_APP_ID, create_request
from tiw_facade import shared_redis
from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as pb
from tiw_facade.answers._entries import Entry, Key, Lifetimes
from tiw_facade.answers._shared import RedisAnswerStore

pytestmark = pytest.mark.slow  # a three-node Redis Cluster of real processes

CREATE = "CreateSnapshotTask"
DESCRIBE = "DescribeSnapshotTask"


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    with RedisCluster() as formed:
        yield formed


def on_cluster(cluster: RedisCluster, **extra: str) -> dict[str, str]:
    # An account of its own per test: the module's cluster outlives a test.
    return {
        "TIW_REDIS_CLUSTER": "1",
        "TIW_REDIS_URL": cluster.url,
        "TIW_RATE_LIMIT_ACCOUNT": f"cluster-{uuid.uuid4().hex}",
        **extra,
    }


async def keys_of(cluster: RedisCluster, tag: str) -> dict[int, list[str]]:
    """The keys holding ``tag``, by the node that holds them: SCAN each node, as no single node
    (and no cluster-wide command) lists another's keys."""
    found: dict[int, list[str]] = {}
    for port in cluster.ports:
        node = Redis(port=port, decode_responses=True)
        try:
            keys = [str(key) async for key in node.scan_iter(match=f"*{tag}*")]
        finally:
            await node.aclose()
        if keys:
            found[port] = keys
    return found


def slots_of(cluster: RedisCluster, keys: list[str]) -> set[int]:
    # An integer reply, ":<slot>\r\n".
    return {int(command(cluster.ports[0], "CLUSTER", "KEYSLOT", key)[1:]) for key in keys}


def tag_of(facade: Facade) -> str:
    """The account's {hash tag}, as every role's prefix holds it."""
    start = shared_redis.prefix("limiter", facade.server.settings.account)
    return start[start.index("{") : start.index("}") + 1]


async def assert_used_the_cluster(facade: Facade) -> None:
    """No role fell back: the limiter shared, not degraded (whose local share would keep the limit
    too, hiding a cluster it cannot use), and no Redis error counted by any role."""
    limiter = (await healthz(facade))["limiter"]
    assert isinstance(limiter, dict) and limiter["backend"] == "redis" and limiter["degraded"] is False
    text = await scrape(facade)
    assert samples(text, "tiw_limiter_degraded")[()] == 0
    assert sum(samples(text, "tiw_limiter_backend_errors_total").values()) == 0
    assert sum(samples(text, "tiw_store_errors_total").values()) == 0


async def test_every_role_works_on_a_cluster_and_an_accounts_keys_share_one_slot(
    start_facade: StartFacade, cluster: RedisCluster
) -> None:
    facade = await start_facade(**on_cluster(cluster))
    request = create_request()
    key = (("idempotency-key", "cluster-order-1"),)
    first = await facade.stub.CreateSnapshotTask(request, metadata=key, timeout=5)
    again = await facade.stub.CreateSnapshotTask(request, metadata=key, timeout=5)
    assert again.task_id == first.task_id and again.request_id == first.request_id
    assert facade.emulator.stats()[CREATE].tasks_created == 1, "the retry was answered from the record"
    query = pb.DescribeSnapshotTaskRequest(sdk_app_id=request.sdk_app_id, task_id=first.task_id)
    described = await facade.stub.DescribeSnapshotTask(query, timeout=5)
    assert described.task_id == first.task_id

    tag = tag_of(facade)
    found = await keys_of(cluster, tag)
    keys = [key for keys in found.values() for key in keys]
    starts = {role: shared_redis.prefix(role, facade.server.settings.account) for role in shared_redis.ROLES}
    present = {role for role, start in starts.items() if any(key.startswith(start + ":") for key in keys)}
    assert present == {"limiter", "answers", "idempotency"}, keys
    # One slot, so one node: every script of the account runs where all its keys are.
    assert len(slots_of(cluster, keys)) == 1, keys
    assert len(found) == 1, found
    answers = [key for key in keys if key.startswith(starts["answers"] + ":")]
    assert any(first.task_id in key or DESCRIBE in key for key in answers), answers
    await assert_used_the_cluster(facade)


LIMIT = 5


async def test_two_facades_on_a_cluster_keep_one_rate_limit(
    start_facade: StartFacade, cluster: RedisCluster
) -> None:
    environment = on_cluster(
        cluster,
        TIW_RATE_LIMIT=str(LIMIT),
        TIW_EXPECTED_REPLICAS="2",
        # A call is refused (RESOURCE_EXHAUSTED, with when to retry) rather than kept waiting past
        # this, well within its deadline: the burst is refused, not timed out.
        TIW_MAX_QUEUE_WAIT="0.3",
        # Each call is to cost one request: no refresh of an answer may add its own.
        TIW_REFRESH_INTEREST="0.001",
    )
    replicas = [await start_facade(**environment) for _ in range(2)]
    emulator = replicas[0].emulator
    fresh = (("tiw-max-age-ms", "0"),)  # never from a cached answer: every admitted call goes upstream
    served: list[pb.DescribeSnapshotTaskResponse] = []  # answered by TIW, through the shared limit
    refusals: list[grpc.aio.AioRpcError] = []

    async def call(replica: Facade) -> None:
        # A task of its own per call: identical calls at once would share one upstream request.
        task = pb.DescribeSnapshotTaskRequest(sdk_app_id=SDK_APP_ID, task_id=emulator.add_snapshot_task())
        try:
            served.append(await replica.stub.DescribeSnapshotTask(task, metadata=fresh, timeout=3))
        except grpc.aio.AioRpcError as error:
            refusals.append(error)

    # Three times the limit each second, for 3 s, spread over both replicas.
    end = time.monotonic() + 3.0
    pending: list[asyncio.Task[None]] = []
    index = 0
    while time.monotonic() < end:
        pending += [asyncio.create_task(call(replicas[(index + i) % 2])) for i in range(3)]
        index += 1
        await asyncio.sleep(1 / LIMIT)  # 3 calls every 1/LIMIT s: 3 x LIMIT a second
    await asyncio.gather(*pending)

    arrivals = emulator.arrivals(DESCRIBE)
    assert max_in_window(arrivals) <= LIMIT, sorted(arrivals)
    stats = emulator.stats()[DESCRIBE]
    assert stats.throttled == 0 and stats.max_in_window <= LIMIT
    assert len(served) == len(arrivals) >= 2 * LIMIT, "the quota was used through the cluster"
    assert refusals, "a burst of three times the limit is partly refused"
    for error in refusals:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (error.code(), error.details())
        status = rpc_status.from_call(error)
        assert status is not None and "RetryInfo" in unpack_details(status)
    for replica in replicas:
        await assert_used_the_cluster(replica)


async def test_the_answer_stores_pipelined_read_works_on_a_cluster(cluster: RedisCluster) -> None:
    """get_many is the one multi-command call (a pipeline, which the cluster client routes per slot):
    not reached by the calls above, so checked on the store itself."""
    client = shared_redis.connect(shared_redis.Target(cluster.url, 1.0, cluster=True))
    store = RedisAnswerStore(
        client, account=f"cluster-{uuid.uuid4().hex}", lifetimes=Lifetimes(60.0, 60.0, 60.0)
    )
    try:
        now = time.time()
        keys = [Key(DESCRIBE, f"task-{n}".encode()) for n in range(3)]
        for n, key in enumerate(keys[:2]):
            assert await store.put(key, Entry(now, f"req-{n}", b"\x08\x01"), asked_at=now)
        found = await store.get_many(keys)
    finally:
        await store.aclose()
    assert [entry.request_id if entry else None for entry in found] == ["req-0", "req-1", None]
