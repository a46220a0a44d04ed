"""Three facades on a Sentinel-watched Redis whose primary crashes under load: the shared rate limit,
the idempotency records and the dropped answers of a stopped push all survive the failover."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support.facade import StartFacade
from support.failover_load import Failing, environment, invariants_hold_through
from support.redis_failover import SentinelTopology


@pytest.fixture
def topology() -> Iterator[SentinelTopology]:
    # Requested before start_facade by the test, so torn down after the facades stop.
    with SentinelTopology() as formed:
        yield formed


@pytest.mark.slow
async def test_the_invariants_hold_through_a_sentinel_failover(
    topology: SentinelTopology, start_facade: StartFacade
) -> None:
    settings = environment(TIW_REDIS_SENTINELS=topology.addresses, TIW_REDIS_SENTINEL_MASTER=topology.name)
    facades = [await start_facade(**settings) for _ in range(3)]
    failing = Failing(
        name="Sentinel",
        primary_offset=topology.primary_offset,
        caught_up=topology.replica_caught_up,
        kill=topology.primary.kill,
        promoted=lambda: topology.master_port() == topology.replica.port,
    )
    await invariants_hold_through(failing, facades)
