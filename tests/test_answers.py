"""Shared answers end to end: through real gRPC channels, the facade's real limiter and client, and
the emulator over HTTP. What only the whole path shows: coalescing of gRPC calls (cancelled, past
their deadline), the tiw-source and tiw-age-ms metadata (on errors too), a bad tiw-max-age-ms, a stop
through the facade, the limiter's refusals served from the cache, refreshes leaving callers their
slots, and the metrics.

The logic behind them is tested alone, in virtual time: tests/test_coalescer.py (flights),
tests/test_answers_cache.py (ages, kept errors, stale answers, stops), tests/test_answers_refresh.py
(the refresh schedule), tests/test_answers_watch.py and tests/test_answers_stores.py.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from support.answers import DESCRIBE, describe, snapshot_request, upstream
from support.facade import Facade, StartFacade
from support.pages import samples, scrape
from support.rich_status import error_info
from support.tiw import SDK_APP_ID
from support.waiting import wait_until
from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as pb
from tiw_facade.emulator import Emulator, Fault, FaultKind


def waiters(facade: Facade) -> float:
    """Calls waiting now on a request another call began (tiw_coalesced_waiters)."""
    value = facade.server.metrics.registry.get_sample_value("tiw_coalesced_waiters", {"action": DESCRIBE})
    return value or 0.0


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
    await wait_until(lambda: upstream(emulator) == 1)  # the first caller's request is with TIW
    others = [asyncio.ensure_future(describe(facade, task)) for _ in range(20)]
    await wait_until(lambda: waiters(facade) == 20)
    first.cancel()
    results = await asyncio.gather(*others)
    assert all(response.status == "Running" for response, _ in results)
    assert {metadata["tiw-source"] for _, metadata in results} == {"coalesced"}
    assert upstream(emulator) == 1


async def test_a_first_caller_past_its_deadline_does_not_fail_the_others(
    facade: Facade, emulator: Emulator
) -> None:
    task = emulator.add_snapshot_task(sdk_app_id=SDK_APP_ID, run_seconds=60)
    emulator.add_fault(Fault(FaultKind.LATENCY, action=DESCRIBE, count=1, delay=0.5))
    first = asyncio.ensure_future(describe(facade, task, deadline=0.25))
    await wait_until(lambda: upstream(emulator) == 1)
    rest = await asyncio.gather(*(describe(facade, task, deadline=5) for _ in range(5)))
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await first
    assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert all(response.status == "Running" for response, _ in rest)
    assert upstream(emulator) == 1


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


async def test_an_unknown_task_is_not_found_and_kept_with_its_source(facade: Facade) -> None:
    calls = []
    for _ in range(3):
        call = facade.stub.DescribeSnapshotTask(snapshot_request("no-such-task"), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await call
        assert failed.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_info(failed.value).reason == "InvalidParameter.TaskNotFound"
        calls.append(dict(await call.initial_metadata()))
    assert [metadata["tiw-source"] for metadata in calls] == ["upstream", "cache", "cache"]
    assert upstream(facade.emulator) == 1


async def test_under_saturation_a_cached_answer_is_given_with_its_age(start_facade: StartFacade) -> None:
    # One slot a second and no refreshes: the second call within a second finds no slot.
    facade = await start_facade(TIW_RATE_LIMIT="1", TIW_MAX_QUEUE_WAIT="0.05", TIW_REFRESH_RESERVE="1")
    task = facade.emulator.add_snapshot_task(sdk_app_id=SDK_APP_ID, run_seconds=60)
    began = time.monotonic()
    first, _ = await describe(facade, task, max_age_ms=0)
    other = facade.emulator.add_snapshot_task(sdk_app_id=SDK_APP_ID, run_seconds=60)
    # The slot of this second is spent on another task...
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await describe(facade, other, max_age_ms=0)
        await describe(facade, other, max_age_ms=0)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, "nothing cached: refused"
    # ...so a call that wants a fresh answer of the first gets the one kept, and learns its age.
    stale, metadata = await describe(facade, task, max_age_ms=0)
    assert stale.request_id == first.request_id
    assert metadata["tiw-source"] == "cache"
    assert int(metadata["tiw-age-ms"]) <= 1000 * (time.monotonic() - began)


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


@pytest.mark.slow  # real refreshes, in real 1 s windows of the limiter
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
