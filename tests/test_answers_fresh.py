"""Fresh means fresh: a call shares only a request TIW read its state for after the call's bound
reaches back to, and every age counts from when the request was sent, not from when TIW answered.

Through real gRPC channels and the emulator over HTTP. A push task stays PREPARED until a test
moves it to PUSHING, right after TIW (the emulator) has read it for a request whose answer it then
holds back (the latency fault): every expected state is certain, whatever the machine's speed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
from support.answers import describe, upstream
from support.facade import Facade, StartFacade
from support.pages import samples, scrape
from support.redis_server import RedisServer
from support.tiw import SDK_APP_ID
from support.waiting import wait_until
from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as pb
from tiw_facade.emulator import Emulator, Fault, FaultKind

pytestmark = pytest.mark.slow  # real seconds of answer age, and the latency faults that hold answers back

PUSH = "DescribeWhiteboardPush"
DELAY = 3.0  # how long TIW holds back its answer to the first request, after reading the state
LONG = 3600.0  # a push prepared this long moves only when the test moves it
# Refreshes never get a slot (the reserve exceeds the quota): every request to TIW is a caller's.
NO_REFRESHES = "1000"
DEFAULT_BOUND_MS = 2000  # TIW_MAX_STALENESS


@dataclasses.dataclass(frozen=True)
class Answer:
    status: str
    request_id: str
    source: str
    age_ms: int
    took_ms: float  # from before the call was made until its answer was in hand, on the test's clock


async def ask(facade: Facade, task_id: str, *, max_age_ms: int | None = None) -> Answer:
    metadata = () if max_age_ms is None else (("tiw-max-age-ms", str(max_age_ms)),)
    request = pb.DescribeWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=task_id)
    began = time.monotonic()
    call = facade.stub.DescribeWhiteboardPush(request, metadata=metadata, timeout=15)
    response = await call
    took_ms = 1000 * (time.monotonic() - began)
    initial = {key: str(value) for key, value in await call.initial_metadata()}
    return Answer(
        response.status, response.request_id, initial["tiw-source"], int(initial["tiw-age-ms"]), took_ms
    )


def assert_shared_the_first(answered: Answer, patient: Answer) -> None:
    """``answered`` is the first request's: TIW's state when it was sent, and as old as that when it
    came back. ``patient``, whose bound reaches back to before that send, shared it and learned its
    true age."""
    assert (answered.status, answered.source) == ("PREPARED", "upstream")
    assert answered.age_ms >= 1000 * DELAY
    assert (patient.status, patient.source, patient.request_id) == (
        "PREPARED",
        "coalesced",
        answered.request_id,
    )
    assert patient.age_ms >= 1000 * DELAY


def assert_no_older_than_the_call(answer: Answer) -> None:
    """TIW read the state after the call was made: the age is within the call's own duration."""
    assert answer.age_ms <= answer.took_ms, answer


def held_back_push(emulator: Emulator) -> str:
    """A PREPARED push whose next Describe TIW answers DELAY seconds after reading it."""
    task = emulator.add_push_task(sdk_app_id=SDK_APP_ID, prepare_seconds=LONG)
    emulator.add_fault(Fault(FaultKind.LATENCY, action=PUSH, count=1, delay=DELAY))
    return task


async def read_then_start_pushing(emulator: Emulator, task_id: str) -> None:
    """Once TIW has read the push for the first request (its answer held back), it starts pushing."""
    await wait_until(lambda: upstream(emulator, PUSH) == 1)
    emulator.tasks.pushes[SDK_APP_ID, task_id].starts = time.time()


async def test_a_call_that_wants_it_fresh_waits_for_the_request_after_one_sent_before_it(
    start_facade: StartFacade,
) -> None:
    facade = await start_facade(TIW_REFRESH_RESERVE=NO_REFRESHES)
    task = held_back_push(facade.emulator)
    first = asyncio.ensure_future(ask(facade, task))
    await read_then_start_pushing(facade.emulator, task)
    await asyncio.sleep(1.0)  # the first request has been with TIW for a second
    later = await asyncio.gather(
        ask(facade, task, max_age_ms=0),
        ask(facade, task, max_age_ms=500),  # shorter than the first request has been in flight
        ask(facade, task, max_age_ms=0),
        ask(facade, task, max_age_ms=60_000),  # long enough to share the first request
    )
    *fresh, patient = later
    answered = await first

    assert_shared_the_first(answered, patient)
    # Bounds that do not: one request after the first lands, shared by all of them.
    assert {answer.status for answer in fresh} == {"PUSHING"}
    assert sorted(answer.source for answer in fresh) == ["coalesced", "coalesced", "upstream"]
    assert len({answer.request_id for answer in fresh} | {answered.request_id}) == 2
    for answer in fresh:
        assert_no_older_than_the_call(answer)
    assert upstream(facade.emulator, PUSH) == 2

    # The default bound then finds that newer answer kept; the first one is not offered again.
    kept = await ask(facade, task)
    assert (kept.status, kept.source, kept.request_id) == ("PUSHING", "cache", fresh[0].request_id)
    assert kept.age_ms <= DEFAULT_BOUND_MS
    assert upstream(facade.emulator, PUSH) == 2


async def test_an_answer_is_as_old_as_its_request_not_as_its_arrival(start_facade: StartFacade) -> None:
    facade = await start_facade(TIW_REFRESH_RESERVE=NO_REFRESHES)
    task = held_back_push(facade.emulator)
    first = asyncio.ensure_future(ask(facade, task))
    await read_then_start_pushing(facade.emulator, task)
    answered = await first
    assert (answered.status, answered.source) == ("PREPARED", "upstream")
    assert answered.age_ms >= 1000 * DELAY
    # It came back just now, but was sent DELAY (more than the default bound) ago: too old to give.
    again = await ask(facade, task)
    assert (again.status, again.source) == ("PUSHING", "upstream")
    assert again.request_id != answered.request_id
    assert_no_older_than_the_call(again)


async def test_calls_that_want_it_fresh_share_a_request_still_waiting_for_its_slot(
    start_facade: StartFacade,
) -> None:
    # One slot a second: once it is spent, the next request waits about a second for its own.
    facade = await start_facade(TIW_RATE_LIMIT="1", TIW_REFRESH_RESERVE=NO_REFRESHES)
    busy = facade.emulator.add_snapshot_task(sdk_app_id=SDK_APP_ID, run_seconds=60)
    task = facade.emulator.add_snapshot_task(sdk_app_id=SDK_APP_ID, run_seconds=60)
    await describe(facade, busy, max_age_ms=0)
    calls = [asyncio.ensure_future(describe(facade, task, max_age_ms=0)) for _ in range(4)]
    await waiting_on_a_shared_request(facade, 3)
    assert upstream(facade.emulator) == 1, "the shared request was still waiting for its slot"
    results = await asyncio.gather(*calls)
    assert sorted(metadata["tiw-source"] for _, metadata in results) == ["coalesced"] * 3 + ["upstream"]
    assert len({response.request_id for response, _ in results}) == 1
    assert upstream(facade.emulator) == 2


async def waiting_on_a_shared_request(facade: Facade, count: int) -> None:
    """Until ``count`` calls of DescribeSnapshotTask wait on a request another call began."""
    series = (("action", "DescribeSnapshotTask"),)
    for _ in range(500):
        if samples(await scrape(facade), "tiw_coalesced_waiters").get(series) == count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{count} calls never waited on a shared request")


async def test_another_replicas_answer_is_held_to_the_callers_bound(
    start_facade: StartFacade, redis_server: RedisServer
) -> None:
    # A generous Redis time-out: a busy machine's slow reply must not make a replica fetch alone.
    shared = {"TIW_REDIS_URL": redis_server.url, "TIW_EXPECTED_REPLICAS": "2", "TIW_REDIS_TIMEOUT": "1"}
    first, second = [await start_facade(TIW_REFRESH_RESERVE=NO_REFRESHES, **shared) for _ in range(2)]
    task = held_back_push(first.emulator)
    leased = asyncio.ensure_future(ask(first, task))  # the first replica holds the key's lease
    await read_then_start_pushing(first.emulator, task)
    await asyncio.sleep(0.5)
    fresh, patient = await asyncio.gather(
        ask(second, task, max_age_ms=0), ask(second, task, max_age_ms=60_000)
    )
    answered = await leased
    # The first replica's request was sent before both calls: it serves only the bound it fits.
    assert_shared_the_first(answered, patient)
    assert (fresh.status, fresh.source) == ("PUSHING", "upstream")
    assert_no_older_than_the_call(fresh)
    assert upstream(first.emulator, PUSH) == 2
