"""A Redis that comes back empty must not make the facade send a keyed create twice: a real
redis-server (killed and started again without its data), real facades over real gRPC, the emulator."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest
from support.facade import Facade, StartFacade
from support.idempotency import create, creates, lost_errors, lost_total, refused
from support.redis_server import RedisServer
from support.rich_status import details, reason
from tiw_facade import idempotency
from tiw_facade.emulator import Emulator

pytestmark = pytest.mark.slow  # a redis-server killed and started again without its data

WINDOW = 2.0  # TIW_IDEMPOTENCY_LOSS_WINDOW: short, so a test can see it pass


async def start(start_facade: StartFacade, redis: RedisServer) -> Facade:
    return await start_facade(TIW_REDIS_URL=redis.url, TIW_IDEMPOTENCY_LOSS_WINDOW=str(WINDOW))


async def test_a_key_retried_after_redis_lost_its_records_is_refused_not_sent_again(
    start_facade: StartFacade,
    redis_server: RedisServer,
    emulator: Emulator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="tiw_facade.idempotency")
    facade = await start(start_facade, redis_server)
    assert lost_total(facade) == 0  # present from start-up, so an alert sees the first loss
    first, _ = await create(facade, "order-42")
    assert creates(emulator) == 1 and not lost_errors(caplog)  # a fresh, empty Redis is no loss

    redis_server.kill()
    redis_server.start()  # no persistence: empty

    error = await refused(facade, "order-42")
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert reason(error) == "IDEMPOTENCY_RECORDS_LOST"
    info = details(error)["ErrorInfo"]
    assert info.metadata["outcome"] == "not_sent"  # type: ignore[attr-defined]
    assert info.metadata["idempotency_key_sha256"] == idempotency.key_hash("order-42")  # type: ignore[attr-defined]
    assert "DescribeSnapshotTask" in (error.details() or "")
    assert creates(emulator) == 1  # the bug: a second task here
    (line,) = lost_errors(caplog)
    assert redis_server.url.split("//")[1].split("/")[0] in line.message  # names the Redis
    assert lost_total(facade) == 1

    # Within the window a key with no record is refused too: it may be another one sent before.
    assert reason(await refused(facade, "order-43")) == "IDEMPOTENCY_RECORDS_LOST"
    # A create without a key is not the facade's to vouch for: unaffected.
    keyless, _ = await create(facade, None)
    assert keyless.task_id and creates(emulator) == 2

    await asyncio.sleep(WINDOW + 0.2)
    fresh, metadata = await create(facade, "order-44")  # a new key after the window: as usual
    assert fresh.task_id not in (first.task_id, keyless.task_id) and "tiw-source" not in metadata
    again, metadata = await create(facade, "order-44")
    assert again.task_id == fresh.task_id and metadata["tiw-source"] == "replay"
    # The key refused during the window stays refused: the window must not let its retry through.
    assert reason(await refused(facade, "order-42")) == "IDEMPOTENCY_RECORDS_LOST"
    assert creates(emulator) == 3
    assert len(lost_errors(caplog)) == 1 and lost_total(facade) == 1  # once per loss


async def test_every_replica_refuses_after_one_of_them_noticed_the_loss(
    start_facade: StartFacade, redis_server: RedisServer, emulator: Emulator
) -> None:
    noticing, other = [await start(start_facade, redis_server) for _ in range(2)]
    await create(noticing, "seen-by-both")
    await create(other, "seen-by-both")  # a replay: the other replica has seen the marker too
    assert creates(emulator) == 1
    redis_server.kill()
    redis_server.start()
    assert reason(await refused(noticing, "seen-by-both")) == "IDEMPOTENCY_RECORDS_LOST"
    # The marker is back (written again by the first), but not the one the other replica saw.
    assert reason(await refused(other, "unknown-to-both")) == "IDEMPOTENCY_RECORDS_LOST"
    assert lost_total(noticing) == lost_total(other) == 1
    # A replica started after the loss (it never saw the old marker) still keeps the window.
    late = await start(start_facade, redis_server)
    assert reason(await refused(late, "never-seen")) == "IDEMPOTENCY_RECORDS_LOST"
    assert lost_total(late) == 0  # it did not witness the loss
    assert creates(emulator) == 1
