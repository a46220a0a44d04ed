"""The refresh schedule in virtual time: spare quota spent on the answers callers want, oldest first,
once 90% of TIW_MAX_STALENESS old and not sooner, for TIW_REFRESH_INTEREST after the last call; a
failing refresh put off a refresh interval; nothing refreshed that no caller had answered.

The refresher is stepped by hand (``tell()``, then ``once(action)``: one refresh at most, and the
pause it asks for), so each step's outcome is exact. The same through the emulator and real time:
tests/test_answers.py.
"""

from __future__ import annotations

import asyncio

import pytest
from support.clock import turns_until
from support.virtual_answers import DESCRIBE, VirtualAnswers, build
from tiw_facade.answers._refresh import IDLE, NO_SPARE
from tiw_facade.failures import TiwError


async def step(facade: VirtualAnswers) -> float:
    """One step of the refresher of DESCRIBE: the pause it asks for (0: it refreshed a key)."""
    await facade.answers.refresher.tell()
    return await facade.answers.refresher.once(DESCRIBE)


def refreshed(facade: VirtualAnswers) -> list[str]:
    """The tasks refreshed so far, in order."""
    return [call.task_id for call in facade.tiw.calls if call.spare]


async def test_wanted_answers_are_refreshed_oldest_first_once_90_percent_of_the_bound_old() -> None:
    facade = build(max_staleness=1.0)
    for task in ("a", "b", "c"):
        facade.tiw.states[task] = "Running"
        await facade.describe(task)
        facade.wall.advance(0.01)
    assert await step(facade) == IDLE, "all younger than 0.9 s: nothing spent on them"
    facade.wall.advance(0.885)  # a is 0.915 s old, b 0.905 s, c 0.895 s
    assert [await step(facade) for _ in range(3)] == [0.0, 0.0, IDLE]
    assert refreshed(facade) == ["a", "b"]
    answer = await facade.describe("a", max_age=1.5)
    assert (answer.source, answer.age) == ("cache", 0.0), "the refresh's answer, sent just now"
    assert facade.counted("tiw_refreshes_total", action=DESCRIBE, outcome="ok") == 2


async def test_a_failing_refresh_is_put_off_a_refresh_interval() -> None:
    facade = build(max_staleness=1.0)
    facade.tiw.states["task"] = "Running"
    await facade.describe("task")
    facade.wall.advance(1.0)
    facade.tiw.fail(TiwError("FailedOperation", "try again", "request-x"))
    assert await step(facade) == 0.0
    assert facade.counted("tiw_refreshes_total", action=DESCRIBE, outcome="failed") == 1
    assert await step(facade) == IDLE, "not sent again in a loop"
    facade.wall.advance(0.95)
    assert await step(facade) == 0.0
    assert facade.counted("tiw_refreshes_total", action=DESCRIBE, outcome="ok") == 1


async def test_without_spare_quota_nothing_is_sent_and_the_answer_stays_due() -> None:
    facade = build(max_staleness=1.0)
    facade.tiw.states["task"] = "Running"
    await facade.describe("task")
    facade.wall.advance(1.0)
    facade.tiw.no_spare = True
    assert await step(facade) == NO_SPARE
    facade.tiw.no_spare = False
    assert await step(facade) == 0.0, "its lease was given up: due at once"
    assert facade.counted("tiw_refreshes_total", action=DESCRIBE, outcome="ok") == 1


async def test_interest_ends_refresh_interest_after_the_last_call() -> None:
    facade = build(max_staleness=1.0, refresh_interest=3.0)
    facade.tiw.states["task"] = "Running"
    await facade.describe("task")
    facade.wall.advance(2.5)
    assert await step(facade) == 0.0
    facade.wall.advance(1.0)  # 3.5 s after the call; a refresh is no call
    assert await step(facade) == IDLE
    assert refreshed(facade) == ["task"]


async def test_an_answer_nobody_got_is_not_refreshed_nor_a_final_one() -> None:
    facade = build(max_staleness=1.0)
    facade.tiw.states.update(failing="Running", finished="Finished")
    facade.tiw.fail(TiwError("FailedOperation", "try again", "request-x"))
    with pytest.raises(TiwError):
        await facade.describe("failing")
    await facade.describe("finished")
    await facade.describe("unknown")  # a kept TaskNotFound
    facade.wall.advance(5.0)
    assert await step(facade) == IDLE, "their callers ask TIW themselves, or never need to"
    assert refreshed(facade) == []


async def test_an_answer_a_caller_is_fetching_is_not_fetched_again() -> None:
    facade = build(max_staleness=1.0)
    facade.tiw.states["task"] = "Running"
    await facade.describe("task")
    facade.wall.advance(1.0)
    facade.tiw.slot = asyncio.Event()
    caller = asyncio.create_task(facade.describe("task", max_age=0.0))
    await turns_until(lambda: facade.tiw.asked() == 2)
    assert await step(facade) == 0.0, "due, but its caller's request will do"
    assert refreshed(facade) == []
    facade.tiw.slot.set()
    assert (await caller).source == "upstream"
