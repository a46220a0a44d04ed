"""TIW_IDEMPOTENCY_REPLICAS: a key's claim is on a replica before the create is sent, so a failover
cannot lose it. Real processes: a primary redis-server, a replica (``--replicaof``) that is killed
and restarted, the facade, and the emulator counting the creates it receives."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from typing import cast

import grpc
import pytest
from conftest import StartFacade
from redis.asyncio import Redis
from support.redis_server import RedisServer
from test_idempotency import create, creates, reason, refused
from tiw_facade import idempotency, settings
from tiw_facade.emulator import DEMO_SECRET_ID


@pytest.fixture
def primary() -> Iterator[RedisServer]:
    # The primary is the one that syncs its replicas: no delay before it starts (5 s by default).
    with RedisServer(args=("--repl-diskless-sync-delay", "0")) as server:
        yield server


@pytest.fixture
async def replica(primary: RedisServer) -> AsyncIterator[RedisServer]:
    server = RedisServer(args=("--replicaof", "127.0.0.1", str(primary.port)))
    try:
        await up(server, primary)
        yield server
    finally:
        server.close()


async def up(replica: RedisServer, primary: RedisServer, within: float = 10.0) -> None:
    """Start ``replica`` and return once it acknowledges the primary's writes (WAIT counts it).

    Not merely "online" in the primary's INFO: after a diskless sync Redis streams the writes only
    once the replica's first acknowledgement comes (its cron, up to a second later).
    """
    replica.start()
    client = Redis.from_url(primary.url)
    try:
        async with client.client() as pinned:  # WAIT counts its own connection's writes
            end = time.monotonic() + within
            while True:
                await pinned.set("test:replica-sync", time.time())
                if await pinned.wait(1, 100) >= 1:
                    return
                if time.monotonic() > end:
                    raise AssertionError(f"the replica did not sync: {await client.info('replication')}")
    finally:
        await client.aclose()


async def on(server: RedisServer, key: str) -> dict[bytes, bytes]:
    """The record of ``key`` as ``server`` holds it (empty: none)."""
    client = Redis.from_url(server.url)
    try:
        name = idempotency.RedisStore._name(DEMO_SECRET_ID, idempotency.key_hash(key))
        return cast(dict[bytes, bytes], await client.hgetall(name))
    finally:
        await client.aclose()


async def test_a_claim_is_on_the_replica_before_the_call_returns(
    start_facade: StartFacade, primary: RedisServer, replica: RedisServer
) -> None:
    facade = await start_facade(TIW_REDIS_URL=primary.url, TIW_IDEMPOTENCY_REPLICAS="1")
    response, _ = await create(facade, "durable")
    assert creates(facade.emulator) == 1
    # Read at once: the settle waited for the replica too, so the answer is there, not only the claim.
    record = idempotency.Record.parse(await on(replica, "durable"))
    assert record.state is idempotency.State.ANSWERED and record.request_id == response.request_id
    again, metadata = await create(facade, "durable")
    assert again.task_id == response.task_id and metadata["tiw-source"] == "replay"
    assert creates(facade.emulator) == 1


async def test_without_the_replica_a_keyed_create_is_refused_and_not_sent(
    start_facade: StartFacade, primary: RedisServer, replica: RedisServer
) -> None:
    facade = await start_facade(TIW_REDIS_URL=primary.url, TIW_IDEMPOTENCY_REPLICAS="1")
    replica.kill()
    error = await refused(facade, "no-replica")
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert reason(error) == "IDEMPOTENCY_UNAVAILABLE"
    assert "could not be made durable" in (error.details() or "")
    assert creates(facade.emulator) == 0
    assert await on(primary, "no-replica") == {}  # released: the key is free for the retry
    # A create without a key has nothing to make durable: it goes on.
    await create(facade, None)
    assert creates(facade.emulator) == 1

    await up(replica, primary)
    response, metadata = await create(facade, "no-replica")
    assert response.task_id and "tiw-source" not in metadata
    assert creates(facade.emulator) == 2
    assert (await on(replica, "no-replica"))[b"state"] == b"answered"


async def test_with_no_replicas_asked_a_missing_replica_changes_nothing(
    start_facade: StartFacade, primary: RedisServer, replica: RedisServer
) -> None:
    facade = await start_facade(TIW_REDIS_URL=primary.url)  # TIW_IDEMPOTENCY_REPLICAS defaults to 0
    replica.kill()  # with TIW_IDEMPOTENCY_REPLICAS=1 this create would be refused
    response, _ = await create(facade, "fast")
    assert response.task_id and creates(facade.emulator) == 1
    again, metadata = await create(facade, "fast")
    assert again.task_id == response.task_id and metadata["tiw-source"] == "replay"


def test_the_setting_is_a_count_and_excludes_cluster() -> None:
    base = {"TENCENTCLOUD_SECRET_ID": "id", "TENCENTCLOUD_SECRET_KEY": "key", "TENCENTCLOUD_REGION": "ap"}
    assert settings.load(base).idempotency_replicas == 0
    assert settings.load({**base, "TIW_IDEMPOTENCY_REPLICAS": "2"}).idempotency_replicas == 2
    with pytest.raises(settings.SettingsError, match="TIW_IDEMPOTENCY_REPLICAS"):
        settings.load({**base, "TIW_IDEMPOTENCY_REPLICAS": "-1"})
    with pytest.raises(settings.SettingsError, match="TIW_REDIS_CLUSTER"):
        settings.load(
            {
                **base,
                "TIW_IDEMPOTENCY_REPLICAS": "1",
                "TIW_REDIS_URL": "redis://r",
                "TIW_REDIS_CLUSTER": "true",
            }
        )
