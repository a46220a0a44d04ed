"""Idempotency keys on CreateSnapshotTask, and creates seen through past their caller: a real gRPC
channel, the facade, real HTTP to the emulator, and a real redis-server for two replicas."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator

import grpc
import pytest
from google.rpc import error_details_pb2
from support.facade import Facade, StartFacade
from support.idempotency import CREATE, create, creates, keyed, refused
from support.redis_server import RedisServer
from support.rich_status import details, reason
from support.tiw import create_request
from support.waiting import wait_until
from tiw_facade import idempotency, shared_redis
from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as pb
from tiw_facade.emulator import Emulator, Fault, FaultKind


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


async def test_replay_has_the_same_task_and_request_id_and_says_so(facade: Facade) -> None:
    first, first_metadata = await create(facade, "order-1")
    again, again_metadata = await create(facade, "order-1")
    assert again.task_id == first.task_id and again.request_id == first.request_id
    assert "tiw-source" not in first_metadata
    assert again_metadata["tiw-source"] == "replay"
    assert creates(facade.emulator) == 1
    other, _ = await create(facade, "order-2")  # another key is another request
    assert other.task_id != first.task_id and creates(facade.emulator) == 2


@pytest.mark.slow
async def test_a_create_slower_than_the_deadline_is_seen_through_and_replayed(facade: Facade) -> None:
    facade.emulator.add_fault(Fault(FaultKind.LATENCY, action=CREATE, count=1, delay=1.5))
    error = await refused(facade, "slow", timeout=0.5)
    assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert creates(facade.emulator) == 1  # executed; its answer is on its way
    # The retry arrives while the first is still in flight: it waits for that answer.
    response, metadata = await create(facade, "slow", timeout=10)
    assert metadata["tiw-source"] == "replay" and response.task_id
    described = await facade.stub.DescribeSnapshotTask(
        pb.DescribeSnapshotTaskRequest(task_id=response.task_id, sdk_app_id=create_request().sdk_app_id),
        timeout=5,
    )
    assert described.task_id == response.task_id
    again, _ = await create(facade, "slow")
    assert again.task_id == response.task_id and again.request_id == response.request_id
    assert creates(facade.emulator) == 1


@pytest.mark.slow
async def test_a_waiting_retry_whose_deadline_passes_is_told_the_first_is_in_flight(facade: Facade) -> None:
    facade.emulator.add_fault(Fault(FaultKind.LATENCY, action=CREATE, count=1, delay=2.0))
    first = asyncio.ensure_future(create(facade, "busy", timeout=5))
    await wait_until(lambda: creates(facade.emulator) == 1)
    error = await refused(facade, "busy", timeout=0.5)
    assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert reason(error) == "IDEMPOTENCY_IN_FLIGHT"
    response, _ = await first
    assert (await create(facade, "busy"))[0].task_id == response.task_id
    assert creates(facade.emulator) == 1


@pytest.mark.slow
async def test_a_create_without_a_key_is_seen_through_and_its_task_logged(
    facade: Facade, caplog: pytest.LogCaptureFixture
) -> None:
    facade.emulator.add_fault(Fault(FaultKind.LATENCY, action=CREATE, count=1, delay=1.0))
    caplog.set_level(logging.INFO, logger="tiw_facade.handler")
    error = await refused(facade, None, timeout=0.4)
    assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED

    def logged() -> list[logging.LogRecord]:
        return [r for r in caplog.records if getattr(r, "task_id", "")]

    await wait_until(lambda: bool(logged()))
    (line,) = logged()
    assert line.levelname == "INFO" and line.action == CREATE  # type: ignore[attr-defined]
    assert creates(facade.emulator) == 1


async def test_a_reused_key_with_another_request_is_refused(facade: Facade) -> None:
    await create(facade, "reused")
    other = create_request()
    other.room_id += 1
    error = await refused(facade, "reused", request=other)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert reason(error) == "IDEMPOTENCY_KEY_REUSED"
    info = details(error)["ErrorInfo"]
    assert info.metadata["idempotency_key_sha256"] == idempotency.key_hash("reused")  # type: ignore[attr-defined]
    assert "reused" not in (error.details() or "")  # the key itself is never echoed
    assert creates(facade.emulator) == 1


@pytest.mark.slow
async def test_a_refusal_by_tiw_releases_the_key(start_facade: StartFacade) -> None:
    facade = await start_facade(TIW_MAX_ATTEMPTS="1")  # the client would retry RequestLimitExceeded
    facade.emulator.add_fault(
        Fault(FaultKind.ERROR_CODE, action=CREATE, count=1, code="RequestLimitExceeded")
    )
    error = await refused(facade, "limited")
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    await asyncio.sleep(1.1)  # the client holds the action for a window after TIW's refusal
    response, metadata = await create(facade, "limited")
    assert response.task_id and "tiw-source" not in metadata
    assert creates(facade.emulator) == 1


async def test_invalid_input_takes_no_key(facade: Facade) -> None:
    invalid = create_request()
    invalid.sdk_app_id = 0
    error = await refused(facade, "fix-and-retry", request=invalid)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT and reason(error) == "INVALID_REQUEST"
    response, _ = await create(facade, "fix-and-retry")  # the corrected request, same key
    assert response.task_id and creates(facade.emulator) == 1


async def test_an_error_tiw_executed_is_replayed_as_that_error(facade: Facade) -> None:
    code = "ResourceUnavailable.NotRegistered"
    facade.emulator.add_fault(Fault(FaultKind.ERROR_CODE, action=CREATE, count=1, code=code))
    first = await refused(facade, "unavailable")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        call = facade.stub.CreateSnapshotTask(create_request(), metadata=keyed("unavailable"), timeout=5)
        try:
            await call
        finally:
            metadata = dict(await call.initial_metadata())
    again = caught.value
    assert again.code() is first.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert reason(again) == reason(first) == code
    infos = [details(failure)["ErrorInfo"] for failure in (again, first)]
    assert all(isinstance(info, error_details_pb2.ErrorInfo) for info in infos)
    assert infos[0].metadata["request_id"] == infos[1].metadata["request_id"]  # type: ignore[attr-defined]
    assert metadata["tiw-source"] == "replay"
    assert facade.emulator.stats()[CREATE].faulted == 1  # sent once


async def test_an_unknown_outcome_is_never_sent_again(facade: Facade) -> None:
    facade.emulator.add_fault(Fault(FaultKind.DROP, action=CREATE, count=1))
    first = await refused(facade, "dropped")
    assert first.code() is grpc.StatusCode.UNAVAILABLE  # UPSTREAM_CONNECTION_LOST, outcome unknown
    again = await refused(facade, "dropped")
    assert again.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert reason(again) == "OUTCOME_UNKNOWN"
    assert "new key only if" in (again.details() or "")
    assert creates(facade.emulator) == 1


@pytest.mark.parametrize("key", ["", "x" * 256])
async def test_an_invalid_key_is_refused(facade: Facade, key: str) -> None:
    error = await refused(facade, key)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    (violation,) = details(error)["BadRequest"].field_violations  # type: ignore[attr-defined]
    assert violation.field == "idempotency-key"
    assert creates(facade.emulator) == 0


async def test_other_methods_ignore_a_key(facade: Facade) -> None:
    request = pb.DescribeWhiteboardPushRequest(sdk_app_id=1400000001, task_id="ghucnligqtgtvk2624mb")
    # tiw-max-age-ms 0: each call must reach TIW (not the answer cache), so a replay would show.
    metadata = (*keyed("k"), ("tiw-max-age-ms", "0"))
    for _ in range(2):
        call = facade.stub.DescribeWhiteboardPush(request, metadata=metadata, timeout=5)
        await call
        assert dict(await call.initial_metadata())["tiw-source"] == "upstream"  # not "replay"
    assert facade.emulator.stats()["DescribeWhiteboardPush"].accepted == 2


@pytest.mark.slow
async def test_two_replicas_given_one_key_at_once_send_one_create(
    start_facade: StartFacade, redis_server: RedisServer, emulator: Emulator
) -> None:
    replicas = [await start_facade(TIW_REDIS_URL=redis_server.url) for _ in range(2)]
    emulator.add_fault(Fault(FaultKind.LATENCY, action=CREATE, count=1, delay=0.5))
    key = f"both-{time.time_ns()}"  # the module's redis-server outlives one test
    answers = await asyncio.gather(*(create(replica, key) for replica in replicas))
    (task_ids,) = {tuple({response.task_id for response, _ in answers})}
    assert len(task_ids) == 1 and task_ids[0]
    assert sorted(metadata.get("tiw-source", "") for _, metadata in answers) == ["", "replay"]
    assert creates(emulator) == 1
    # Each replica replays it; the in-process store of neither is involved.
    for replica in replicas:
        response, metadata = await create(replica, key)
        assert response.task_id == task_ids[0] and metadata["tiw-source"] == "replay"
    assert creates(emulator) == 1


async def test_an_in_flight_claim_whose_replica_died_is_an_unknown_outcome(
    start_facade: StartFacade, redis_server: RedisServer
) -> None:
    facade = await start_facade(TIW_REDIS_URL=redis_server.url)
    key = f"orphan-{time.time_ns()}"
    store = idempotency.RedisStore(shared_redis.connect(shared_redis.Target(redis_server.url, 1.0)))
    try:
        fingerprint = idempotency.fingerprint(CREATE, create_request().SerializeToString(deterministic=True))
        orphan = idempotency.Record(
            fingerprint, idempotency.State.IN_FLIGHT, token="t", until=time.time() - 1
        )
        assert (
            await store.claim(facade.server.settings.account, idempotency.key_hash(key), orphan, 60) is None
        )
    finally:
        await store.aclose()
    error = await refused(facade, key)
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION and reason(error) == "OUTCOME_UNKNOWN"
    assert creates(facade.emulator) == 0


@pytest.mark.slow
async def test_a_stop_waits_for_a_create_seen_through(start_facade: StartFacade, emulator: Emulator) -> None:
    facade = await start_facade()
    emulator.add_fault(Fault(FaultKind.LATENCY, action=CREATE, count=1, delay=1.0))
    await refused(facade, "stopping", timeout=0.3)
    await facade.server.stop(0)  # the caller is gone; the create is still on its way
    assert creates(emulator) == 1


def test_the_process_store_forgets_the_oldest_key_beyond_its_bound() -> None:
    async def scenario() -> None:
        store = idempotency.MemoryStore(max_keys=2)
        records = [idempotency.Record(f"f{i}", idempotency.State.ANSWERED, token=str(i)) for i in range(3)]
        for i, record in enumerate(records):
            assert await store.claim("account", f"k{i}", record, 60) is None
        assert await store.get("account", "k0") is None
        assert await store.get("account", "k1") == records[1]
        assert await store.get("account", "k2") == records[2]
        assert await store.claim("account", "k2", records[0], 60) == records[2]

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("key", "valid"), [("a", True), ("~" * 255, True), ("with space", True), ("", False), ("é", False)]
)
def test_key_rules(key: str, valid: bool) -> None:
    assert (idempotency.key_violation(key) is None) is valid
