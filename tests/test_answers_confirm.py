"""TIW's callbacks as hints, in virtual time: a task a callback names is asked again at once (spare
quota first, a slot of its own share else), at most once per TIW_CALLBACK_CONFIRM_INTERVAL with the
last hint never lost; a hint costs nothing for a task nobody asked about or one already final; and
while callbacks come, TIW_REFRESH_AFTER_WITH_CALLBACKS slows the periodic refresh.

Across replicas, over real HTTP, gRPC and Redis: tests/test_callbacks_e2e.py.
"""

from __future__ import annotations

import asyncio

from support.clock import turns_until
from support.virtual_answers import DESCRIBE, SDK_APP_ID, VirtualAnswers, build
from tiw_facade.answers._flights import CALLBACKS_SHARE


def hint(facade: VirtualAnswers, task: str) -> None:
    facade.answers.changed(DESCRIBE, SDK_APP_ID, task, received_at=facade.wall(), here=True)


def confirms(facade: VirtualAnswers, outcome: str) -> float:
    return facade.counted("tiw_callback_confirms_total", action=DESCRIBE, outcome=outcome)


async def test_a_hint_asks_tiw_again_at_once_and_the_next_call_sees_the_change() -> None:
    facade = build()
    facade.tiw.states["task"] = "Running"
    await facade.describe("task")
    facade.wall.advance(0.3)
    facade.tiw.states["task"] = "Finished"
    hint(facade, "task")
    await turns_until(lambda: confirms(facade, "sent") == 1)
    spare = [call for call in facade.tiw.calls if call.spare]
    assert [call.task_id for call in spare] == ["task"], "one request, on spare quota"
    answer = await facade.describe("task")
    assert answer.source == "cache" and answer.age == 0.0
    assert answer.entry.terminal, "the changed state, without the caller asking TIW"
    assert facade.tiw.asked() == 1, "only the first call asked TIW itself"


async def test_without_spare_quota_a_hint_queues_as_a_share_of_its_own() -> None:
    facade = build()
    facade.tiw.states["task"] = "Running"
    await facade.describe("task")
    facade.tiw.no_spare = True
    hint(facade, "task")
    await turns_until(lambda: confirms(facade, "sent") == 1)
    last = facade.tiw.calls[-1]
    assert (last.spare, last.share) == (False, CALLBACKS_SHARE)


async def test_a_hint_about_a_task_nobody_asked_about_or_a_final_one_costs_nothing() -> None:
    facade = build()
    facade.tiw.states["done"] = "Finished"
    await facade.describe("done")
    calls = len(facade.tiw.calls)
    hint(facade, "done")  # final: it cannot change
    hint(facade, "unknown")  # a forged body may name any task: nothing kept, nobody watching
    await turns_until(lambda: not facade.answers._confirmations._waiting)
    for _ in range(10):
        await asyncio.sleep(0)
    assert len(facade.tiw.calls) == calls
    assert confirms(facade, "sent") == 0


async def test_hints_within_the_interval_make_one_more_request_at_its_end() -> None:
    facade = build(callback_confirm_interval=0.05)  # the turn's wait is real time; its end, virtual
    facade.tiw.states["task"] = "Running"
    await facade.describe("task")
    hint(facade, "task")
    await turns_until(lambda: confirms(facade, "sent") == 1)
    for _ in range(5):  # a flood under one signature: folded into one trailing confirmation
        hint(facade, "task")
    await turns_until(lambda: confirms(facade, "deferred") == 5)
    await asyncio.sleep(0.01)
    assert confirms(facade, "sent") == 1, "not before the turn ends"
    facade.monotonic.advance(0.05)
    await asyncio.sleep(0.06)  # the wait for the turn's end, in real time
    await turns_until(lambda: confirms(facade, "sent") == 2)
    assert sum(1 for call in facade.tiw.calls if call.spare) == 2, "the flood cost one request more"


async def test_while_callbacks_come_the_periodic_refresh_waits_longer() -> None:
    facade = build(max_staleness=1.0, refresh_after_with_callbacks=5.0)
    facade.tiw.states["task"] = "Running"
    facade.tiw.states["other"] = "Running"
    await facade.describe("task")
    hint(facade, "other")  # a callback of the action: its callbacks flow
    facade.wall.advance(1.0)
    await facade.answers.refresher.tell()
    assert await facade.answers.refresher.once(DESCRIBE) > 0, "1 s old: not refreshed yet"
    facade.wall.advance(4.5)
    assert await facade.answers.refresher.once(DESCRIBE) == 0.0, "5.5 s old: refreshed"
    facade.monotonic.advance(61.0)  # no callback for a minute: back to 90% of TIW_MAX_STALENESS
    facade.wall.advance(1.0)
    assert await facade.answers.refresher.once(DESCRIBE) == 0.0


async def test_an_answer_that_changed_is_counted_and_one_that_did_not_is_not() -> None:
    """tiw_answer_changes_total: what TiwFacadeCallbacksStopped reads as "tasks keep changing"."""
    facade = build()
    facade.tiw.states["task"] = "Running"
    await facade.describe("task")
    facade.wall.advance(1.0)
    await facade.describe("task", max_age=0)  # asked again: a new RequestId, the same answer
    assert len(facade.tiw.calls) == 2
    assert facade.counted("tiw_answer_changes_total", action=DESCRIBE) == 0
    facade.tiw.states["task"] = "Finished"
    facade.wall.advance(1.0)
    await facade.describe("task", max_age=0)
    assert facade.counted("tiw_answer_changes_total", action=DESCRIBE) == 1
