"""The coalescer alone (answers/_coalesce.py): one flight per key, shared by every caller meanwhile,
owned by none of them; errors shared; a bound on how long before a caller a flight may have been
sent; a caller with more time asks again, once, after a flight given up unsent.

Each flight is held until the test answers it (a future the test sets); time is two VirtualClocks
(the wall clock of send times, the monotonic one of deadlines) that move only when the test moves
them. Nothing here waits for time to pass: a deadline is either far off or already here.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
from collections.abc import Callable

import pytest
from support.clock import VirtualClock, turns_until
from tiw_facade.answers._coalesce import MIN_LONGER, Coalescer, Flight, Late
from tiw_facade.failures import Outcome

KEY = "DescribeSnapshotTask:task"
BOUND = 2.0  # seconds: the oldest send a caller takes, before its arrival
CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("caller")


class Unsent(Exception):
    """A flight given up before it was sent (no rate-limit slot in time)."""


class Again(Exception):
    """A flight's failure nobody shares: its waiters start over (a refresh found no spare quota)."""


@dataclasses.dataclass
class Held:
    """One flight, held until the test answers it."""

    flight: Flight[str]
    answer: asyncio.Future[str]
    caller: str | None  # CALLER as the flight saw it


class Upstream:
    """The flights' function: records each flight and waits for the test's answer to it."""

    def __init__(self) -> None:
        self.held: list[Held] = []

    async def fly(self, flight: Flight[str]) -> str:
        held = Held(flight, asyncio.get_running_loop().create_future(), CALLER.get(None))
        self.held.append(held)
        return await held.answer

    def answer(self, index: int, value: str | BaseException) -> None:
        future = self.held[index].answer
        if isinstance(value, BaseException):
            future.set_exception(value)
        else:
            future.set_result(value)


@dataclasses.dataclass
class Setup:
    coalescer: Coalescer[str, str]
    upstream: Upstream
    wall: VirtualClock
    monotonic: VirtualClock
    waiting: dict[str, int]

    def call(
        self,
        *,
        deadline: float | None = None,
        bound: float = BOUND,
        accept: Callable[[str], bool] = lambda answer: True,
        context: contextvars.Context | None = None,
    ) -> asyncio.Task[tuple[str, bool]]:
        """A caller arriving now: its share of the flight of KEY, as a task of its own."""
        share = self.coalescer.share(
            KEY,
            self.upstream.fly,
            deadline=deadline,
            arrival=self.wall(),
            bound=bound,
            accept=accept,
            context=contextvars.Context if context is None else lambda: context,
        )
        return asyncio.create_task(share)

    async def flights(self, count: int, *, waiting: int = 0) -> None:
        """Until ``count`` flights were begun and ``waiting`` callers wait on another's."""
        await turns_until(lambda: len(self.upstream.held) == count and self.waiting[KEY] == waiting)


@pytest.fixture
def setup() -> Setup:
    wall, monotonic = VirtualClock(1000.0), VirtualClock(50.0)
    waiting: dict[str, int] = {KEY: 0}

    def count(key: str, delta: int) -> None:
        waiting[key] += delta

    coalescer: Coalescer[str, str] = Coalescer(
        unsent=lambda exc: isinstance(exc, Unsent),
        again=(Again,),
        waiting=count,
        clock=wall,
        monotonic=monotonic,
    )
    return Setup(coalescer, Upstream(), wall, monotonic, waiting)


async def test_callers_meanwhile_share_one_flight_and_its_answer(setup: Setup) -> None:
    callers = [setup.call() for _ in range(5)]
    await setup.flights(1, waiting=4)
    setup.upstream.answer(0, "Running")
    answers = await asyncio.gather(*callers)
    assert [answer for answer, _ in answers] == ["Running"] * 5
    assert [leader for _, leader in answers] == [True, False, False, False, False]
    assert setup.waiting[KEY] == 0
    assert KEY not in setup.coalescer, "a landed flight is nobody's to join: the next call asks again"


async def test_a_caller_that_leaves_does_not_end_the_flight_for_the_others(setup: Setup) -> None:
    first = setup.call()
    await setup.flights(1)
    others = [setup.call() for _ in range(3)]
    await setup.flights(1, waiting=3)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    flight = setup.upstream.held[0]
    assert not flight.answer.cancelled() and not flight.flight.task.done()
    setup.upstream.answer(0, "Running")
    assert [answer for answer, _ in await asyncio.gather(*others)] == ["Running"] * 3
    assert len(setup.upstream.held) == 1


async def test_a_caller_past_its_deadline_learns_whether_the_request_was_sent(setup: Setup) -> None:
    patient = setup.call()
    await setup.flights(1)
    now = setup.monotonic()  # a deadline that is here: the caller leaves before any answer
    with pytest.raises(Late) as unsent:
        await setup.call(deadline=now)
    assert unsent.value.outcome is Outcome.NOT_SENT, "still waiting for a slot: a kept answer may stand in"
    setup.upstream.held[0].flight.mark_sent()
    with pytest.raises(Late) as sent:
        await setup.call(deadline=now)
    assert sent.value.outcome is Outcome.UNKNOWN, "TIW may have seen it"
    setup.upstream.answer(0, "Running")
    assert await patient == ("Running", True)
    assert len(setup.upstream.held) == 1


async def test_an_error_goes_to_every_waiter_and_is_not_kept(setup: Setup) -> None:
    callers = [setup.call() for _ in range(4)]
    await setup.flights(1, waiting=3)
    error = RuntimeError("TIW failed")
    setup.upstream.answer(0, error)
    outcomes = await asyncio.gather(*callers, return_exceptions=True)
    assert all(outcome is error for outcome in outcomes), "one error, shared: not one request per waiter"
    again = setup.call()
    await setup.flights(2)
    setup.upstream.answer(1, "Running")
    assert await again == ("Running", True)


async def test_a_flight_sent_before_a_callers_bound_is_waited_behind_then_the_next_is_shared(
    setup: Setup,
) -> None:
    first = setup.call()
    await setup.flights(1)
    setup.upstream.held[0].flight.mark_sent()  # sent at 1000
    setup.wall.advance(3.0)
    tolerant = setup.call(bound=5.0)  # takes a send 3 s before it came
    strict = [setup.call(bound=BOUND) for _ in range(3)]  # takes nothing sent before 1001
    await setup.flights(1, waiting=4)
    setup.upstream.answer(0, "old")
    assert await first == ("old", True)
    assert await tolerant == ("old", False)
    await setup.flights(2, waiting=2)  # the first to wake began the next flight; the others joined it
    setup.upstream.answer(1, "new")
    answers = await asyncio.gather(*strict)
    assert sorted(answers) == [("new", False), ("new", False), ("new", True)]


async def test_an_unsent_flight_is_joined_whatever_the_bound(setup: Setup) -> None:
    first = setup.call()
    await setup.flights(1)
    setup.wall.advance(60.0)
    zero = setup.call(bound=0.0)  # it will be sent after this caller came
    await setup.flights(1, waiting=1)
    setup.upstream.answer(0, "Running")
    assert (await first, await zero) == (("Running", True), ("Running", False))


async def test_an_error_worth_starting_over_for_is_not_shared(setup: Setup) -> None:
    callers = [setup.call() for _ in range(3)]
    await setup.flights(1, waiting=2)
    setup.upstream.answer(0, Again())
    await setup.flights(2, waiting=2)
    setup.upstream.answer(1, "Running")
    answers = await asyncio.gather(*callers)
    assert sorted(answers) == [("Running", False), ("Running", False), ("Running", True)]


async def test_a_flight_given_up_unsent_is_asked_again_once_by_a_caller_with_more_time(setup: Setup) -> None:
    now = setup.monotonic()
    short = setup.call(deadline=now + 1.0)
    await setup.flights(1)
    barely = setup.call(deadline=now + 1.0 + MIN_LONGER)  # not enough more time to be worth a request
    longer = setup.call(deadline=now + 2.0)
    patient = setup.call(deadline=now + 10.0)
    await setup.flights(1, waiting=3)
    setup.upstream.answer(0, Unsent())
    with pytest.raises(Unsent):
        await short
    with pytest.raises(Unsent):
        await barely
    # The first with more time to wake asks again with its own; the patient caller shares that.
    await setup.flights(2, waiting=1)
    assert setup.upstream.held[1].flight.deadline == now + 2.0
    setup.upstream.answer(1, Unsent())
    for caller in (longer, patient):
        with pytest.raises(Unsent):
            await caller
    assert len(setup.upstream.held) == 2, "once: the patient caller does not ask a third time"


async def test_a_flight_runs_in_a_context_of_its_own(setup: Setup) -> None:
    CALLER.set("first")  # the test's context, which the callers' tasks copy
    implicit = setup.call()
    await setup.flights(1)
    assert setup.upstream.held[0].caller is None, "nothing of the caller that started it goes along"
    setup.upstream.answer(0, "Running")
    await implicit
    chosen = contextvars.Context()
    chosen.run(CALLER.set, "chosen")
    explicit = setup.call(context=chosen)
    await setup.flights(2)
    assert setup.upstream.held[1].caller == "chosen"
    setup.upstream.answer(1, "Running")
    await explicit


async def test_an_answer_a_caller_does_not_accept_is_followed_by_the_next_flight(setup: Setup) -> None:
    caller = setup.call(accept=lambda answer: answer != "too old")
    await setup.flights(1)
    setup.upstream.answer(0, "too old")
    await setup.flights(2)
    setup.upstream.answer(1, "Running")
    assert await caller == ("Running", True)


async def test_waiting_callers_are_counted_until_they_leave(setup: Setup) -> None:
    setup.call()
    await setup.flights(1)
    joiners = [setup.call() for _ in range(3)]
    await setup.flights(1, waiting=3)
    joiners[0].cancel()
    await turns_until(lambda: setup.waiting[KEY] == 2)
    setup.upstream.answer(0, "Running")
    await asyncio.gather(*joiners[1:])
    assert setup.waiting[KEY] == 0


async def test_settle_waits_for_the_flights_in_the_air(setup: Setup) -> None:
    caller = setup.call()
    await setup.flights(1)
    settled = asyncio.create_task(setup.coalescer.settle(within=3600.0))
    await turns_until(lambda: setup.waiting[KEY] == 0)
    assert not settled.done()
    setup.upstream.answer(0, "Running")
    await settled
    await caller


def test_a_flight_is_as_new_as_its_latest_send() -> None:
    wall, monotonic = VirtualClock(1000.0), VirtualClock(50.0)
    flight: Flight[str] = Flight(None, clock=wall, monotonic=monotonic)
    assert not flight.sent and flight.sent_since(999.0) == 999.0, "unsent: no newer than its begin"
    assert flight.joinable(arrival=5000.0, bound=0.0), "an unsent flight is sent after anyone came"
    wall.advance(0.5)
    flight.mark_sent()
    assert flight.sent and flight.sent_at == 1000.5
    assert flight.sent_since(1000.0) == 1000.5
    assert flight.sent_since(1001.0) == 1001.0, "a retry begun later, not yet sent: as old as its begin"
    assert flight.joinable(arrival=1002.5, bound=2.0)
    assert not flight.joinable(arrival=1002.6, bound=2.0)


def test_a_caller_outlives_a_flight_only_with_more_time_still_ahead() -> None:
    monotonic = VirtualClock(50.0)
    bounded: Flight[str] = Flight(60.0, clock=VirtualClock(), monotonic=monotonic)
    assert bounded.outlived_by(None), "no deadline outlives any"
    assert bounded.outlived_by(60.0 + 2 * MIN_LONGER)
    assert not bounded.outlived_by(60.0 + MIN_LONGER / 2)
    monotonic.set(70.0)
    assert not bounded.outlived_by(65.0), "a deadline already past outlives nothing"
    unbounded: Flight[str] = Flight(None, clock=VirtualClock(), monotonic=monotonic)
    assert not unbounded.outlived_by(None) and not unbounded.outlived_by(1e9)
