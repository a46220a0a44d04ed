"""Three facades on a Redis Cluster (``TIW_REDIS_CLUSTER=1``) whose primary for the account's slot
crashes under load, and whose replica the cluster promotes: the shared rate limit, the idempotency
records and the dropped answers of a stopped push all survive the failover."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support.facade import StartFacade
from support.failover_load import Failing, environment, invariants_hold_through
from support.redis_cluster import RedisCluster
from tiw_facade import shared_redis

NODE_TIMEOUT_MS = 1000  # how long a primary may not answer before the others call it failed


@pytest.fixture
def cluster() -> Iterator[RedisCluster]:
    # Requested before start_facade by the test, so torn down after the facades stop.
    with RedisCluster(replicas=1, node_timeout_ms=NODE_TIMEOUT_MS) as formed:
        yield formed


@pytest.mark.slow
async def test_the_invariants_hold_through_a_cluster_failover(
    cluster: RedisCluster, start_facade: StartFacade
) -> None:
    settings = environment(TIW_REDIS_CLUSTER="1", TIW_REDIS_URL=cluster.url)
    facades = [await start_facade(**settings) for _ in range(3)]
    # Every key of the account is in one slot (its {hash tag}): the primary to kill is the one
    # serving it. The account is the facades' SecretId (conftest.facade_environment).
    slot = cluster.keyslot(shared_redis.prefix("limiter", facades[0].server.settings.account))
    primary = cluster.primary_of(slot)
    replica = cluster.replica_of(primary)
    failing = Failing(
        name=f"Cluster (slot {slot}, primary :{primary.port} -> replica :{replica.port})",
        primary_offset=lambda: cluster.primary_offset(primary),
        caught_up=lambda offset: cluster.caught_up(replica, offset),
        kill=primary.kill,
        promoted=lambda: cluster.is_primary(replica),
    )
    await invariants_hold_through(failing, facades)
