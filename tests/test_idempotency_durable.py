"""TIW_IDEMPOTENCY_REPLICAS: a key's claim is on a replica before the create is sent, so a failover
cannot lose it. Real processes: a primary redis-server, a replica (``--replicaof``) that is killed
and restarted, the facade, and the emulator counting the creates it receives."""

from __future__ import annotations

import logging
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import cast

import grpc
import pytest
import yaml
from redis.asyncio import Redis
from support.facade import Facade, StartFacade
from support.idempotency import create, creates, lost_errors, lost_total, refused
from support.redis_server import RedisServer
from support.rich_status import reason
from tiw_facade import idempotency, settings
from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as pb
from tiw_facade.emulator import DEMO_SECRET_ID

pytestmark = pytest.mark.slow  # a primary and a replica redis-server, killed and restarted


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


# --- the durable Redis restarts -------------------------------------------------------------------

PRODUCTION = Path(__file__).resolve().parent.parent / "k8s" / "overlays" / "production"
# Where a pod's Redis listens and keeps its files, not how: the test's RedisServer sets these itself.
PLACE_OPTIONS = {"port", "bind", "dir", "unixsocket", "logfile", "pidfile", "daemonize", "tls-port"}
NO_PERSISTENCE = ("--appendonly", "no", "--save", "")


def production_durable_redis_args() -> tuple[str, ...]:
    """The redis-server options that k8s/overlays/production/redis.yaml gives the Redis that
    TIW_REDIS_URL names there (the limiter's and the idempotency records'), less the place options."""
    literals = yaml.safe_load((PRODUCTION / "kustomization.yaml").read_text())["configMapGenerator"][0]
    url = dict(literal.split("=", 1) for literal in literals["literals"])["TIW_REDIS_URL"]
    host = urllib.parse.urlsplit(url).hostname
    (statefulset,) = [
        doc
        for doc in yaml.safe_load_all((PRODUCTION / "redis.yaml").read_text())
        if doc and doc["kind"] == "StatefulSet" and doc["metadata"]["name"] == host
    ]
    (redis,) = [c for c in statefulset["spec"]["template"]["spec"]["containers"] if c["name"] == "redis"]
    command, *args = redis["args"]
    assert command == "redis-server", redis["args"]
    names, values = args[::2], args[1::2]
    assert len(names) == len(values) and all(name.startswith("--") for name in names), args
    return tuple(
        item
        for name, value in zip(names, values, strict=True)
        if name[2:] not in PLACE_OPTIONS
        for item in (name, value)
    )


@pytest.fixture(
    params=[
        pytest.param((), id="production"),
        # The negative control: the same test, the same options but no persistence. Must fail
        # (strictly, and on an assertion: the retry is refused IDEMPOTENCY_RECORDS_LOST).
        pytest.param(
            NO_PERSISTENCE,
            id="without-persistence",
            marks=pytest.mark.xfail(
                strict=True, raises=AssertionError, reason="a Redis without persistence restarts empty"
            ),
        ),
    ]
)
def production_redis(request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    # Requested before start_facade by the test, so torn down after the facades stop.
    with RedisServer(args=(*production_durable_redis_args(), *request.param)) as server:
        yield server


async def test_a_key_is_not_sent_twice_because_the_durable_redis_restarted(
    start_facade: StartFacade, production_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tiw_facade.idempotency")
    # A long loss window: a loss noticed after the restart would refuse every new key for it.
    facade = await start_facade(TIW_REDIS_URL=production_redis.url, TIW_IDEMPOTENCY_LOSS_WINDOW="600")
    first, _ = await create(facade, "durable-order-1")
    assert creates(facade.emulator) == 1

    production_redis.kill()  # SIGKILL: no shutdown, no last save
    production_redis.start()  # the same dir: what it finds there is all it has

    outcome = await attempt(facade, "durable-order-1")
    assert not isinstance(outcome, grpc.aio.AioRpcError), f"the retry was refused: {reason(outcome)}"
    again, metadata = outcome
    assert again.task_id == first.task_id and metadata["tiw-source"] == "replay"
    assert creates(facade.emulator) == 1
    # No loss noticed: not logged, not counted, and a new key is created as usual.
    assert not lost_errors(caplog) and lost_total(facade) == 0
    fresh = await attempt(facade, "durable-order-2")
    assert not isinstance(fresh, grpc.aio.AioRpcError), f"a new key was refused: {reason(fresh)}"
    assert fresh[0].task_id != first.task_id and creates(facade.emulator) == 2


async def attempt(
    facade: Facade, key: str
) -> tuple[pb.CreateSnapshotTaskResponse, dict[str, str]] | grpc.aio.AioRpcError:
    """A keyed create's answer and metadata, or its refusal."""
    try:
        return await create(facade, key)
    except grpc.aio.AioRpcError as error:
        return error
