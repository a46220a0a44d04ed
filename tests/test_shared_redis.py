"""shared_redis against real processes: Sentinel, a Redis per role, and errors told apart."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Redis
from support.facade import StartFacade
from support.redis_server import RedisSentinel, RedisServer, free_port
from support.tiw import create_request
from tiw_facade import settings, shared_redis
from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as pb
from tiw_facade.answers._entries import Key, Lifetimes, StoreUnavailable
from tiw_facade.answers._shared import RedisAnswerStore
from tiw_facade.limiter import QuotaExceeded
from tiw_facade.limiter.shared import RedisLimiter
from tiw_facade.metrics import Metrics

FULL = ("--maxmemory", "1mb", "--maxmemory-policy", "noeviction")


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[shared_redis.Client]:
    connected = shared_redis.connect(shared_redis.Target(redis_server.url, 1.0))
    yield connected
    await connected.aclose()


async def fill(client: shared_redis.Client) -> None:
    """Junk until Redis refuses to take more (noeviction), and no more from then on."""
    junk = "x" * 16384
    for n in range(10_000):
        try:
            await client.set(f"junk:{n}", junk)
        except shared_redis.ERRORS as exc:
            assert shared_redis.classify(exc) == "refused", exc
            # Whatever the refused command's buffers held is free again: stay full for small writes too.
            await client.config_set("maxmemory", "1")
            return
    raise AssertionError("Redis never filled up")


async def caught(work: object) -> BaseException:
    try:
        await work  # type: ignore[misc]
    except BaseException as exc:
        return exc
    raise AssertionError("no error")


# --- classification, with the exceptions real servers cause ---


async def test_a_full_redis_refuses_and_says_why() -> None:
    with RedisServer() as server:
        full = shared_redis.connect(shared_redis.Target(server.url, 1.0))
        try:
            await full.config_set("maxmemory", "1")
            await full.config_set("maxmemory-policy", "noeviction")
            exc = await caught(full.set("k", "v"))
        finally:
            await full.aclose()
    assert shared_redis.classify(exc) == "refused"
    assert shared_redis.describe(exc).startswith(
        "refused the command (OutOfMemoryError: command not allowed when used memory"
    )


async def test_a_replica_refuses_writes(redis_server: RedisServer) -> None:
    with RedisServer(args=("--replicaof", "127.0.0.1", str(redis_server.port))) as replica:
        client = shared_redis.connect(shared_redis.Target(replica.url, 1.0))
        try:
            exc = await caught(client.set("k", "v"))
        finally:
            await client.aclose()
    assert shared_redis.classify(exc) == "refused"
    assert shared_redis.describe(exc).startswith("refused the command (ReadOnlyError")


async def test_a_closed_port_is_unreachable() -> None:
    client = shared_redis.connect(shared_redis.Target(f"redis://127.0.0.1:{free_port()}/0", 1.0))
    try:
        exc = await caught(client.ping())
    finally:
        await client.aclose()
    assert shared_redis.classify(exc) == "unreachable"
    assert shared_redis.describe(exc).startswith("unreachable (ConnectionError")


async def test_a_server_that_never_answers_is_a_timeout() -> None:
    with socket.socket() as silent:  # accepts connections (the backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        client = shared_redis.connect(shared_redis.Target(url, 0.2))
        try:
            exc = await caught(client.ping())
        finally:
            await client.aclose()
    assert shared_redis.classify(exc) == "timeout"


def test_keys_of_every_role_share_the_account_hash_tag() -> None:
    prefixes = [shared_redis.prefix(role, "AKID") for role in shared_redis.ROLES]
    tag = "{" + hashlib.sha256(b"AKID").hexdigest()[:16] + "}"
    assert all(tag in prefix for prefix in prefixes)
    # The limiter's and the records' names are those of earlier releases: a rolling upgrade's two
    # releases share one set of tokens and see every record.
    assert prefixes == [
        f"tiw:limiter:{tag}",
        f"tiw:{tag}:answers",
        f"tiw-facade:idempotency:{tag}",
        f"tiw:{tag}:events",
    ]


# --- errors counted and logged by kind ---


async def test_the_answer_store_counts_a_refused_write() -> None:
    with RedisServer(args=FULL) as server:
        metrics = Metrics("test")
        client = shared_redis.connect(shared_redis.Target(server.url, 1.0))
        await fill(client)
        store = RedisAnswerStore(
            client, account="AKID", lifetimes=Lifetimes(60.0, 60.0, 60.0), metrics=metrics
        )
        try:
            with pytest.raises(StoreUnavailable) as failure:
                await store.lease(Key("DescribeSnapshotTask", b"k"), 1.0)
        finally:
            await store.aclose()
    assert failure.value.kind == "refused"
    assert sample(metrics, "tiw_store_errors_total", role="answers", kind="refused") == 1
    assert sample(metrics, "tiw_store_errors_total", role="answers", kind="unreachable") == 0


async def test_a_full_redis_is_refused_not_unreachable_for_the_limiter(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="tiw_facade.limiter")
    with RedisServer(args=FULL) as server:
        filler = shared_redis.connect(shared_redis.Target(server.url, 1.0))
        await fill(filler)
        await filler.aclose()
        metrics = Metrics("test")
        metrics.prime("tiw.v20190919.TiwService", ["DescribeSnapshotTask"], 20, "redis")
        rate = RedisLimiter(url=server.url, account="AKID-full", limit=20, degraded_limit=20, metrics=metrics)
        try:
            with contextlib.suppress(QuotaExceeded):
                lease = await rate.acquire("DescribeSnapshotTask", deadline=time.monotonic() + 0.3, hold=1.0)
                lease.release()
        finally:
            await rate.aclose()
    assert sample(metrics, "tiw_limiter_backend_errors_total", kind="refused") >= 1
    assert sample(metrics, "tiw_limiter_backend_errors_total", kind="unreachable") == 0
    said = [record.getMessage() for record in caplog.records]
    assert any("refused the command (OutOfMemoryError" in line for line in said), said
    assert not any("unreachable" in line for line in said), said


# --- a facade on Sentinel; a Redis per role ---


async def keys_of(url: str) -> list[str]:
    client = Redis.from_url(url, decode_responses=True)
    try:
        return sorted(str(key) for key in await client.keys("tiw*"))
    finally:
        await client.aclose()


async def describe_and_create(start_facade: StartFacade, **environment: str) -> str:
    """A keyed create and a Describe of its task through a new facade; the tag of its account's keys."""
    facade = await start_facade(**environment)
    request = create_request()
    task = await facade.stub.CreateSnapshotTask(request, metadata=(("idempotency-key", "k-1"),), timeout=5)
    query = pb.DescribeSnapshotTaskRequest(sdk_app_id=request.sdk_app_id, task_id=task.task_id)
    await facade.stub.DescribeSnapshotTask(query, timeout=5)
    return shared_redis.prefix("limiter", facade.server.settings.account).split(":")[2]


def roles(keys: list[str], tag: str) -> set[str]:
    """The roles with keys among ``keys``: each key is matched against each role's prefix for ``tag``."""
    starts = {role: shared_redis.prefix(role, "").replace(_EMPTY_TAG, tag) for role in shared_redis.ROLES}
    return {role for key in keys for role, start in starts.items() if key.startswith(start + ":")}


_EMPTY_TAG = "{" + hashlib.sha256(b"").hexdigest()[:16] + "}"


@pytest.mark.slow
async def test_a_facade_finds_its_redis_through_sentinel(start_facade: StartFacade) -> None:
    with RedisServer() as master, RedisSentinel(master) as sentinel:
        tag = await describe_and_create(
            start_facade,
            TIW_REDIS_SENTINELS=sentinel.address,
            TIW_REDIS_SENTINEL_MASTER=sentinel.name,
            TIW_RATE_LIMIT_ACCOUNT="sentinel-account",
        )
        assert roles(await keys_of(master.url), tag) == {"limiter", "answers", "idempotency"}


@pytest.mark.slow
async def test_each_role_uses_its_own_redis(start_facade: StartFacade, redis_server: RedisServer) -> None:
    with RedisServer() as answers:
        tag = await describe_and_create(
            start_facade,
            TIW_REDIS_URL=redis_server.url,
            TIW_ANSWERS_REDIS_URL=answers.url,
            TIW_RATE_LIMIT_ACCOUNT=f"per-role-{time.time_ns()}",
        )
        assert roles(await keys_of(answers.url), tag) == {"answers"}
        assert roles(await keys_of(redis_server.url), tag) == {"limiter", "idempotency"}


# --- settings ---


def test_sentinel_settings_parse_and_go_together() -> None:
    base = {"TENCENTCLOUD_SECRET_ID": "id", "TENCENTCLOUD_SECRET_KEY": "k", "TENCENTCLOUD_REGION": "r"}
    config = settings.load(
        {**base, "TIW_REDIS_SENTINELS": "s-0:26379, [::1]:26380", "TIW_REDIS_SENTINEL_MASTER": "m"}
    )
    assert config.redis_sentinels == (("s-0", 26379), ("::1", 26380))
    where = shared_redis.target(config, "answers")
    assert (
        where is not None
        and where.master == "m"
        and where.where == "sentinel master 'm' via s-0:26379,::1:26380"
    )
    with pytest.raises(settings.SettingsError, match="TIW_REDIS_SENTINELS"):
        settings.load({**base, "TIW_REDIS_SENTINELS": "s-0"})
    with pytest.raises(settings.SettingsError, match="go together"):
        settings.load({**base, "TIW_REDIS_SENTINELS": "s-0:26379"})


def test_a_role_url_overrides_the_default_for_that_role_only() -> None:
    config = settings.Settings(
        redis_url="redis://a:6379/0", idempotency_redis_url="redis://b:6379/0", redis_timeout=0.5
    )
    found = {role: shared_redis.target(config, role) for role in shared_redis.ROLES}
    assert {role: where.url for role, where in found.items() if where} == {
        "limiter": "redis://a:6379/0",
        "answers": "redis://a:6379/0",
        "idempotency": "redis://b:6379/0",
        "events": "redis://a:6379/0",
    }
    assert shared_redis.target(settings.Settings(), "limiter") is None
