"""Shared answers of the Describe calls, through real gRPC channels and the emulator over HTTP:
coalescing, the cache and its age, stale answers under saturation, refreshes with spare quota."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from conftest import Facade, StartFacade
from test_rpcs import SDK_APP_ID, error_info
from test_server import samples, scrape
from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as pb
from tiw_facade.emulator import Emulator, Fault, FaultKind

pytestmark = pytest.mark.slow  # real refresh schedules and 1 s windows: most cases wait a second or more

DESCRIBE = "DescribeSnapshotTask"


def upstream(emulator: Emulator, action: str = DESCRIBE) -> int:
    """Requests of ``action`` TIW (the emulator) accepted so far."""
    return len(emulator.arrivals(action))


def snapshot_request(task_id: str) -> pb.DescribeSnapshotTaskRequest:
    return pb.DescribeSnapshotTaskRequest(task_id=task_id, sdk_app_id=SDK_APP_ID)


async def describe(
    facade: Facade, task_id: str, *, max_age_ms: int | None = None, deadline: float = 5.0
) -> tuple[pb.DescribeSnapshotTaskResponse, dict[str, str]]:
    """The answer and its initial metadata."""
    metadata = () if max_age_ms is None else (("tiw-max-age-ms", str(max_age_ms)),)
    call = facade.stub.DescribeSnapshotTask(snapshot_request(task_id), metadata=metadata, timeout=deadline)
    response = await call
    return response, {key: str(value) for key, value in await call.initial_metadata()}


async def test_identical_concurrent_calls_share_one_upstream_request(
    facade: Facade, emulator: Emulator
) -> None:
    task = emulator.add_snapshot_task(sdk_app_id=SDK_APP_ID, run_seconds=60)
    # TIW answers slowly, so that all 200 calls are in flight together.
    emulator.add_fault(Fault(FaultKind.LATENCY, action=DESCRIBE, count=1, delay=0.5))
    results = await asyncio.gather(*(describe(facade, task) for _ in range(200)))
    assert upstream(emulator) == 1
    request_ids = {response.request_id for response, _ in results}
    assert len(request_ids) == 1, "every caller gets the one answer, with TIW's RequestId"
    sources = sorted(metadata["tiw-source"] for _, metadata in results)
    assert sources.count("upstream") == 1
    assert sources.count("coalesced") == 199
    assert all(response.status == "Running" for response, _ in results)


async def test_a_cancelled_first_caller_does_not_fail_the_others(facade: Facade, emulator: Emulator) -> None:
    task = emulator.add_snapshot_task(sdk_app_id=SDK_APP_ID, run_seconds=60)
    emulator.add_fault(Fault(FaultKind.LATENCY, action=DESCRIBE, count=1, delay=0.5))
    first = facade.stub.DescribeSnapshotTask(snapshot_request(task), timeout=5)
    await asyncio.sleep(0.1)  # the first caller's request is on its way to TIW
    others = [asyncio.ensure_future(describe(facade, task)) for _ in range(20)]
    await asyncio.sleep(0.1)
    first.cancel()
    results = await asyncio.gather(*others)
    assert all(response.status == "Running" for response, _ in results)
    assert {metadata["tiw-source"] for _, metadata in results} == {"coalesced"}
    assert upstream(emulator) == 1


async def test_a_first_caller_past_its_deadline_does_not_fail_the_others(
    facade: Facade, emulator: Emulator
) -> None:
    task = emulator.add_snapshot_task(sdk_app_id=SDK_APP_ID, run_seconds=60)
    emulator.add_fault(Fault(FaultKind.LATENCY, action=DESCRIBE, count=1, delay=0.8))
    first = asyncio.ensure_future(describe(facade, task, deadline=0.4))
    await asyncio.sleep(0.1)
    rest = await asyncio.gather(*(describe(facade, task, deadline=5) for _ in range(5)))
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await first
    assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert all(response.status == "Running" for response, _ in rest)
    assert upstream(emulator) == 1


async def test_errors_are_shared_with_every_waiter(facade: Facade, emulator: Emulator) -> None:
    emulator.add_fault(Fault(FaultKind.LATENCY, action=DESCRIBE, count=1, delay=0.5))
    outcomes = await asyncio.gather(
        *(describe(facade, "no-such-task") for _ in range(10)), return_exceptions=True
    )
    assert all(isinstance(outcome, grpc.aio.AioRpcError) for outcome in outcomes)
    reasons = {
        error_info(outcome).reason for outcome in outcomes if isinstance(outcome, grpc.aio.AioRpcError)
    }
    assert reasons == {"InvalidParameter.TaskNotFound"}
    assert upstream(emulator) == 1, "an error is not a stampede: the waiters do not go one by one"


async def test_other_errors_are_not_kept(facade: Facade, emulator: Emulator) -> None:
    task = emulator.add_snapshot_task(sdk_app_id=SDK_APP_ID, run_seconds=60)
    emulator.add_fault(Fault(FaultKind.ERROR_CODE, action=DESCRIBE, count=1, code="FailedOperation"))
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await describe(facade, task)
    assert error_info(failed.value).reason == "FailedOperation"
    response, metadata = await describe(facade, task)
    assert response.status == "Running"
    assert metadata["tiw-source"] == "upstream"


async def test_a_finished_task_is_never_asked_again(facade: Facade, emulator: Emulator) -> None:
    task = emulator.add_snapshot_task(sdk_app_id=SDK_APP_ID, run_seconds=0)
    began = time.monotonic()
    first, metadata = await describe(facade, task)
    assert first.status == "Finished"
    assert metadata["tiw-source"] == "upstream"
    # As old as its request: sent after the call was made, so no older than the call took.
    assert int(metadata["tiw-age-ms"]) <= 1000 * (time.monotonic() - began)
    before = upstream(emulator)
    for max_age in (None, 0, 100_000):
        again, metadata = await describe(facade, task, max_age_ms=max_age)
        assert again == first, "the same answer, TIW's RequestId included"
        assert metadata["tiw-source"] == "cache"
    assert upstream(emulator) == before


async def test_a_fresh_enough_answer_comes_from_the_cache_with_its_age(
    facade: Facade, emulator: Emulator
) -> None:
    task = emulator.add_snapshot_task(sdk_app_id=SDK_APP_ID, run_seconds=60)
    first, _ = await describe(facade, task)
    await asyncio.sleep(0.3)
    again, metadata = await describe(facade, task, max_age_ms=60_000)
    assert metadata["tiw-source"] == "cache"
    assert again.request_id == first.request_id
    assert 300 <= int(metadata["tiw-age-ms"]) < 60_000
    assert upstream(emulator) == 1


async def test_max_age_zero_goes_upstream(facade: Facade, emulator: Emulator) -> None:
    task = emulator.add_snapshot_task(sdk_app_id=SDK_APP_ID, run_seconds=60)
    request_ids = set()
    for _ in range(3):
        began = time.monotonic()
        response, metadata = await describe(facade, task, max_age_ms=0)
        assert metadata["tiw-source"] == "upstream"
        assert int(metadata["tiw-age-ms"]) <= 1000 * (time.monotonic() - began)
        request_ids.add(response.request_id)
    assert len(request_ids) == 3
    assert upstream(emulator) == 3


async def test_a_task_that_finishes_is_seen_once_the_bound_passes(start_facade: StartFacade) -> None:
    facade = await start_facade(TIW_MAX_STALENESS="0.2")
    task = facade.emulator.add_snapshot_task(sdk_app_id=SDK_APP_ID, run_seconds=0.5)
    running, _ = await describe(facade, task)
    assert running.status == "Running"
    await asyncio.sleep(0.8)
    finished, metadata = await describe(facade, task)
    assert finished.status == "Finished"
    assert metadata["tiw-source"] in {"upstream", "cache"}  # the refresher may have been first


@pytest.mark.parametrize("value", ["-1", "soon", "1.5", "99999999999", " 5"])
async def test_a_bad_max_age_is_invalid_argument_and_costs_nothing(
    facade: Facade, emulator: Emulator, value: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await facade.stub.DescribeSnapshotTask(
            snapshot_request("anything"), metadata=(("tiw-max-age-ms", value),), timeout=5
        )
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tiw-max-age-ms" in (failed.value.details() or "")
    assert upstream(emulator) == 0


async def test_an_unknown_task_is_kept_briefly(start_facade: StartFacade) -> None:
    facade = await start_facade(TIW_CACHE_NOT_FOUND_TTL="0.5")
    calls = []
    for _ in range(3):
        call = facade.stub.DescribeSnapshotTask(snapshot_request("no-such-task"), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await call
        assert failed.value.code() == grpc.StatusCode.NOT_FOUND
        calls.append(dict(await call.initial_metadata()))
    assert [metadata["tiw-source"] for metadata in calls] == ["upstream", "cache", "cache"]
    assert upstream(facade.emulator) == 1
    await asyncio.sleep(0.6)
    with pytest.raises(grpc.aio.AioRpcError):
        await facade.stub.DescribeSnapshotTask(snapshot_request("no-such-task"), timeout=5)
    assert upstream(facade.emulator) == 2, "past TIW_CACHE_NOT_FOUND_TTL it is asked again"


async def test_under_saturation_a_cached_answer_is_given_with_its_true_age(start_facade: StartFacade) -> None:
    # One slot a second and no refreshes: the second call within a second finds no slot.
    facade = await start_facade(TIW_RATE_LIMIT="1", TIW_MAX_QUEUE_WAIT="0.05", TIW_REFRESH_RESERVE="1")
    task = facade.emulator.add_snapshot_task(sdk_app_id=SDK_APP_ID, run_seconds=60)
    first, _ = await describe(facade, task, max_age_ms=0)
    await asyncio.sleep(0.3)
    other = facade.emulator.add_snapshot_task(sdk_app_id=SDK_APP_ID, run_seconds=60)
    # The slot of this second is spent on another task...
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await describe(facade, other, max_age_ms=0)
        await describe(facade, other, max_age_ms=0)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, "nothing cached: refused"
    # ...so a call that wants a fresh answer of the first gets the one kept, and learns its age.
    started = time.monotonic()
    stale, metadata = await describe(facade, task, max_age_ms=0)
    assert stale.request_id == first.request_id
    assert metadata["tiw-source"] == "cache"
    assert 300 <= int(metadata["tiw-age-ms"]) <= 300 + 1000 * (time.monotonic() - started) + 1000


async def test_stale_answers_have_a_hard_bound(start_facade: StartFacade) -> None:
    facade = await start_facade(
        TIW_RATE_LIMIT="1",
        TIW_MAX_QUEUE_WAIT="0.05",
        TIW_MAX_STALE_ON_SATURATION="0.2",
        TIW_REFRESH_RESERVE="1",
    )
    task = facade.emulator.add_snapshot_task(sdk_app_id=SDK_APP_ID, run_seconds=60)
    await describe(facade, task, max_age_ms=0)
    await asyncio.sleep(0.3)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await describe(facade, task, max_age_ms=0)
        await describe(facade, task, max_age_ms=0)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_stop_then_describe_sees_stopped(facade: Facade, emulator: Emulator) -> None:
    task = emulator.add_push_task(sdk_app_id=SDK_APP_ID, prepare_seconds=0)
    request = pb.DescribeWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=task)
    pushing = await facade.stub.DescribeWhiteboardPush(request, timeout=5)
    assert pushing.status == "PUSHING"
    await facade.stub.StopWhiteboardPush(
        pb.StopWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=task), timeout=5
    )
    call = facade.stub.DescribeWhiteboardPush(request, timeout=5)
    stopped = await call
    assert stopped.status == "STOPPED"
    assert dict(await call.initial_metadata())["tiw-source"] == "upstream"


async def test_spare_quota_keeps_asked_answers_young(start_facade: StartFacade) -> None:
    facade = await start_facade(TIW_MAX_STALENESS="1.0")
    tasks = [facade.emulator.add_snapshot_task(sdk_app_id=SDK_APP_ID, run_seconds=60) for _ in range(3)]
    for task in tasks:
        await describe(facade, task)
    await asyncio.sleep(3.0)
    # Refreshed at 90% of TIW_MAX_STALENESS: each task about 3 times in 3 s, with nobody calling.
    assert 3 + 2 * 3 <= upstream(facade.emulator) <= 3 + 4 * 3
    for task in tasks:
        _, metadata = await describe(facade, task, max_age_ms=1500)
        assert metadata["tiw-source"] == "cache"
        assert int(metadata["tiw-age-ms"]) <= 1500


async def test_refreshes_never_refuse_a_caller(start_facade: StartFacade) -> None:
    """With the quota busy with refreshes, a new caller still gets a slot at once."""
    facade = await start_facade(TIW_RATE_LIMIT="4", TIW_MAX_STALENESS="0.05", TIW_MAX_QUEUE_WAIT="0.01")
    tasks = [facade.emulator.add_snapshot_task(sdk_app_id=SDK_APP_ID, run_seconds=60) for _ in range(4)]
    for task in tasks[:2]:
        await describe(facade, task)
    await asyncio.sleep(2.0)  # refreshes now take all the spare quota, every window
    refreshes = upstream(facade.emulator)
    assert refreshes >= 3, "refreshes use the slots above the reserve"
    # As many new callers at once as TIW_REFRESH_RESERVE (2) keeps slots for: none waits.
    answered = await asyncio.gather(*(describe(facade, task, max_age_ms=0) for task in tasks[2:]))
    for response, metadata in answered:
        assert metadata["tiw-source"] == "upstream"
        assert response.status == "Running"


async def test_a_failing_refresh_is_not_sent_again_in_a_loop(start_facade: StartFacade) -> None:
    facade = await start_facade(TIW_MAX_STALENESS="0.2")  # refreshed at 0.18 s of age
    task = facade.emulator.add_snapshot_task(sdk_app_id=SDK_APP_ID, run_seconds=60)
    await describe(facade, task)
    facade.emulator.add_fault(Fault(FaultKind.ERROR_CODE, action=DESCRIBE, code="FailedOperation"))
    await asyncio.sleep(2.0)
    # Each failure puts the task off by a refresh interval: about 2 s / 0.18 s, not one per loop.
    assert 3 <= facade.emulator.stats()[DESCRIBE].faulted <= 15


async def test_a_task_never_answered_is_not_refreshed(facade: Facade, emulator: Emulator) -> None:
    task = emulator.add_snapshot_task(sdk_app_id=SDK_APP_ID, run_seconds=60)
    emulator.add_fault(Fault(FaultKind.ERROR_CODE, action=DESCRIBE, count=1, code="FailedOperation"))
    with pytest.raises(grpc.aio.AioRpcError):
        await describe(facade, task)
    await asyncio.sleep(2.5)
    assert emulator.stats()[DESCRIBE].faulted == 1
    assert upstream(emulator) == 0, "its callers ask TIW themselves"


async def test_every_answer_series_exists_from_start_up_and_counts(
    facade: Facade, emulator: Emulator
) -> None:
    text = await scrape(facade)
    actions = ("DescribeSnapshotTask", "DescribeWhiteboardPush", "DescribeVideoGenerationTask")
    by_source = samples(text, "tiw_answers_total")
    assert {dict(labels)["source"] for labels in by_source} == {"upstream", "coalesced", "cache"}
    assert {dict(labels)["action"] for labels in by_source} == set(actions)
    assert set(by_source.values()) == {0.0}
    for name in ("tiw_answers_stale_total", "tiw_coalesced_waiters", "tiw_watches_active"):
        assert {dict(labels)["action"] for labels in samples(text, name)} == set(actions), name
    assert {dict(labels)["outcome"] for labels in samples(text, "tiw_refreshes_total")} == {"ok", "failed"}
    assert samples(text, "tiw_cache_entries") == {(): 0.0}
    assert {dict(labels)["reason"] for labels in samples(text, "tiw_cache_evictions_total")} == {
        "expired",
        "capacity",
        "invalidated",
    }
    assert len(samples(text, "tiw_answer_age_seconds_count")) == 3

    task = emulator.add_snapshot_task(sdk_app_id=SDK_APP_ID, run_seconds=0)
    for _ in range(3):
        await describe(facade, task)
    text = await scrape(facade)
    counted = {
        dict(labels)["source"]: value
        for labels, value in samples(text, "tiw_answers_total").items()
        if dict(labels)["action"] == DESCRIBE
    }
    assert counted == {"upstream": 1.0, "coalesced": 0.0, "cache": 2.0}
    assert samples(text, "tiw_cache_entries") == {(): 1.0}


async def test_a_describe_in_flight_across_a_stop_does_not_answer_with_the_old_state(
    facade: Facade, emulator: Emulator
) -> None:
    """A request TIW executed before the stop, answered after it: callers who asked after the stop
    (they may have joined it) get a state asked for after the stop."""
    task = emulator.add_push_task(sdk_app_id=SDK_APP_ID, prepare_seconds=0)
    request = pb.DescribeWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=task)
    emulator.add_fault(Fault(FaultKind.LATENCY, action="DescribeWhiteboardPush", count=1, delay=1.0))
    before = asyncio.ensure_future(facade.stub.DescribeWhiteboardPush(request, timeout=5))
    await asyncio.sleep(0.3)  # executed by TIW while PUSHING; its answer is on its way
    await facade.stub.StopWhiteboardPush(
        pb.StopWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=task), timeout=5
    )
    for metadata in ((), (("tiw-max-age-ms", "0"),)):
        after = await facade.stub.DescribeWhiteboardPush(request, timeout=5, metadata=metadata)
        assert after.status == "STOPPED"
    assert (await before).status in {"PUSHING", "STOPPED"}


async def test_a_short_deadline_refused_does_not_refuse_a_patient_caller(
    start_facade: StartFacade,
) -> None:
    facade = await start_facade(TIW_RATE_LIMIT="1", TIW_REFRESH_RESERVE="1")
    busy = facade.emulator.add_snapshot_task(sdk_app_id=SDK_APP_ID, run_seconds=60)
    task = facade.emulator.add_snapshot_task(sdk_app_id=SDK_APP_ID, run_seconds=60)
    await describe(facade, busy, max_age_ms=0)  # the one slot is out for the next second
    short = asyncio.ensure_future(describe(facade, task, deadline=0.3))
    await asyncio.sleep(0)  # the short call asks first: no slot within 0.3 s, refused at once
    patient, _ = await describe(facade, task, deadline=5)  # waits for its own slot
    assert patient.status == "Running"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await short
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert upstream(facade.emulator) == 2
