"""Answers in virtual time: the cache and its ages, kept errors, stale answers under saturation, a
stop's invalidation, and whose share a shared request's rate-limit slot is queued under.

``Answers`` is built as a test builds it (a Config, no Settings, no Redis) around a stand-in for the
handler's fetch (``Tiw``: task states the test sets, requests it may hold back or fail). Time is
two VirtualClocks: ages are exact, and nothing waits for time to pass. The same behaviour through
real gRPC and the emulator: tests/test_answers.py.
"""

from __future__ import annotations

import asyncio

import pytest
from support.clock import turns_until
from support.virtual_answers import (
    DESCRIBE,
    NOT_FOUND,
    PUSH,
    SDK_APP_ID,
    MakeFacade,
    build,
)
from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as pb
from tiw_facade.answers import Served
from tiw_facade.call_record import CURRENT_SHARE, UNIDENTIFIED
from tiw_facade.failures import Outcome, RateLimited, TiwError, UpstreamTimeout


@pytest.fixture
def make() -> MakeFacade:
    return build


async def test_a_fresh_enough_answer_comes_from_the_cache_with_its_exact_age(make: MakeFacade) -> None:
    facade = make()
    facade.tiw.states["task"] = "Running"
    first = await facade.describe("task")
    assert (first.source, first.age) == ("upstream", 0.0)
    facade.wall.advance(0.3)
    again = await facade.describe("task", max_age=60.0)
    assert again.source == "cache"
    assert again.age == pytest.approx(0.3)
    assert again.entry.request_id == first.entry.request_id
    assert facade.tiw.asked() == 1


async def test_max_age_zero_goes_upstream_every_time(make: MakeFacade) -> None:
    facade = make()
    facade.tiw.states["task"] = "Running"
    served = []
    for _ in range(3):
        facade.wall.advance(0.001)  # the next call comes a millisecond later
        served.append(await facade.describe("task", max_age=0.0))
    assert [answer.source for answer in served] == ["upstream"] * 3
    assert len({answer.entry.request_id for answer in served}) == 3


async def test_a_task_that_finishes_is_seen_once_the_bound_passes(make: MakeFacade) -> None:
    facade = make(max_staleness=0.2)
    facade.tiw.states["task"] = "Running"
    assert (await facade.describe("task")).source == "upstream"
    facade.tiw.states["task"] = "Finished"
    facade.wall.advance(0.19)
    assert (await facade.describe("task")).source == "cache", "within the bound: the Running kept"
    facade.wall.advance(0.02)
    finished = await facade.describe("task")
    assert finished.source == "upstream"
    assert finished.entry.terminal


async def test_a_finished_task_is_never_asked_again(make: MakeFacade) -> None:
    facade = make()
    facade.tiw.states["task"] = "Finished"
    first = await facade.describe("task")
    facade.wall.advance(600.0)
    for max_age in (None, 0.0, 100.0):
        again = await facade.describe("task", max_age=max_age)
        assert (again.source, again.entry) == ("cache", first.entry)
    assert facade.tiw.asked() == 1


async def test_an_unknown_task_is_kept_only_briefly(make: MakeFacade) -> None:
    facade = make(not_found_ttl=0.5)
    served = [await facade.describe("no-such-task") for _ in range(3)]
    assert [answer.source for answer in served] == ["upstream", "cache", "cache"]
    assert all(answer.entry.error_code == NOT_FOUND for answer in served)
    facade.wall.advance(0.5)
    assert (await facade.describe("no-such-task")).source == "upstream", "past TIW_CACHE_NOT_FOUND_TTL"
    assert facade.tiw.asked() == 2


async def test_other_errors_are_not_kept(make: MakeFacade) -> None:
    facade = make()
    facade.tiw.states["task"] = "Running"
    facade.tiw.fail(TiwError("FailedOperation", "try again", "request-x"))
    with pytest.raises(TiwError):
        await facade.describe("task")
    assert (await facade.describe("task")).source == "upstream"


async def test_under_saturation_a_kept_answer_is_given_with_its_true_age(make: MakeFacade) -> None:
    facade = make()
    facade.tiw.states.update(task="Running", other="Running")
    first = await facade.describe("task", max_age=0.0)
    facade.wall.advance(0.3)
    facade.tiw.fail(RateLimited(DESCRIBE, "deadline", 0.5))
    with pytest.raises(RateLimited):
        await facade.describe("other", max_age=0.0)  # nothing kept: refused
    facade.tiw.fail(RateLimited(DESCRIBE, "deadline", 0.5))
    stale = await facade.describe("task", max_age=0.0)
    assert (stale.source, stale.entry) == ("cache", first.entry)
    assert stale.age == pytest.approx(0.3)
    assert facade.counted("tiw_answers_stale_total", action=DESCRIBE) == 1


async def test_a_stale_answer_has_a_hard_bound(make: MakeFacade) -> None:
    facade = make(max_stale_on_saturation=0.2)
    facade.tiw.states["task"] = "Running"
    await facade.describe("task")
    facade.wall.advance(0.3)
    facade.tiw.fail(RateLimited(DESCRIBE, "deadline", 0.5))
    with pytest.raises(RateLimited):
        await facade.describe("task", max_age=0.0)


async def test_a_slow_tiw_is_not_hidden_behind_a_kept_answer(make: MakeFacade) -> None:
    facade = make()
    facade.tiw.states["task"] = "Running"
    await facade.describe("task")
    facade.wall.advance(0.3)
    facade.tiw.fail(UpstreamTimeout("TIW is slow", outcome=Outcome.UNKNOWN))
    with pytest.raises(UpstreamTimeout):
        await facade.describe("task", max_age=0.0)


async def test_a_caller_past_its_deadline_gets_a_kept_answer_if_the_request_was_not_sent(
    make: MakeFacade,
) -> None:
    facade = make()
    facade.tiw.states["task"] = "Running"
    kept = await facade.describe("task")
    facade.wall.advance(0.5)
    facade.tiw.slot = asyncio.Event()  # the next request waits for a slot
    patient = asyncio.create_task(facade.describe("task", max_age=0.0))
    await turns_until(lambda: facade.tiw.asked() == 2)
    late = await facade.describe("task", max_age=0.0, deadline=facade.monotonic())
    assert (late.source, late.entry) == ("cache", kept.entry)
    facade.tiw.slot.set()
    assert (await patient).source == "upstream"


async def test_a_short_deadline_refused_does_not_refuse_a_patient_caller(make: MakeFacade) -> None:
    facade = make()
    facade.tiw.states["task"] = "Running"
    facade.tiw.slot = asyncio.Event()
    now = facade.monotonic()
    short = asyncio.create_task(facade.describe("task", deadline=now + 0.3))
    await turns_until(lambda: facade.tiw.asked() == 1)
    patient = asyncio.create_task(facade.describe("task", deadline=now + 5.0))
    await turns_until(lambda: facade.counted("tiw_coalesced_waiters", action=DESCRIBE) == 1)
    facade.tiw.fail(RateLimited(DESCRIBE, "deadline", 0.5))  # the short caller's request: no slot
    facade.tiw.slot.set()
    with pytest.raises(RateLimited):
        await short
    assert (await patient).source == "upstream", "its own request, with its own time"
    assert [call.deadline for call in facade.tiw.calls] == [now + 0.3, now + 5.0]


async def test_a_shared_request_is_queued_under_the_share_of_the_caller_that_started_it(
    make: MakeFacade,
) -> None:
    facade = make()
    facade.tiw.states["task"] = "Running"
    facade.tiw.slot = asyncio.Event()

    async def as_caller(share: str) -> Served:
        CURRENT_SHARE.set(share)  # what identity.CallerCheck sets for each RPC
        return await facade.describe("task")

    first = asyncio.create_task(as_caller("billing"))
    await turns_until(lambda: facade.tiw.asked() == 1)
    others = [asyncio.create_task(as_caller("classroom")) for _ in range(3)]
    await turns_until(lambda: facade.counted("tiw_coalesced_waiters", action=DESCRIBE) == 3)
    facade.tiw.slot.set()
    assert [served.source for served in await asyncio.gather(first, *others)] == [
        "upstream",
        "coalesced",
        "coalesced",
        "coalesced",
    ]
    assert [call.share for call in facade.tiw.calls] == ["billing"], "one slot, its starter's"
    # A refresh is nobody's call: its flight carries no share (spare slots are not queued).
    await facade.answers.refresher.tell()
    facade.wall.advance(10.0)
    facade.tiw.slot = None
    assert await facade.answers.refresher.once(DESCRIBE) == 0.0
    assert facade.tiw.calls[-1].spare and facade.tiw.calls[-1].share == UNIDENTIFIED


async def test_a_stop_drops_the_answers_it_made_stale(make: MakeFacade) -> None:
    facade = make()
    facade.tiw.states["push"] = "PUSHING"
    assert (await facade.describe("push", action=PUSH)).source == "upstream"
    facade.tiw.states["push"] = "STOPPED"
    await facade.answers.stopped(
        "StopWhiteboardPush", pb.StopWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id="push")
    )
    facade.wall.advance(0.001)
    after = await facade.describe("push", action=PUSH)
    assert after.source == "upstream"
    assert after.entry.terminal


async def test_a_describe_in_flight_across_a_stop_answers_with_a_state_asked_for_after_it(
    make: MakeFacade,
) -> None:
    """TIW read PUSHING before the stop, and answered after it: the callers who came after the stop
    (they joined that request) get a state asked for after the stop."""
    facade = make()
    facade.tiw.states["push"] = "PUSHING"
    facade.tiw.answer = asyncio.Event()
    before = asyncio.create_task(facade.describe("push", action=PUSH))
    await turns_until(lambda: facade.tiw.asked() == 1)  # TIW read PUSHING; its answer is held back
    facade.wall.advance(0.1)
    facade.tiw.states["push"] = "STOPPED"
    await facade.answers.stopped(
        "StopWhiteboardPush", pb.StopWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id="push")
    )
    facade.wall.advance(0.001)
    after = asyncio.create_task(facade.describe("push", action=PUSH))  # joins: sent within its bound
    await turns_until(lambda: facade.counted("tiw_coalesced_waiters", action=PUSH) == 1)
    facade.tiw.answer.set()
    facade.tiw.answer = None
    assert (await after).entry.terminal
    assert (await before).entry.terminal, "the first caller too: no answer from before the stop"
    assert facade.tiw.asked() == 2, "PUSHING, refused by the store as older than the stop, asked again"
