"""Watches in virtual time (answers/_topics.py through ``Answers.watch``): the current answer first,
then each change of content (a new RequestId alone is no change), the end at a final answer; every
watcher of a task woken by one answer; a drain ends them all. The streams over gRPC:
tests/test_watch.py; the deadlines of waiting watchers: tests/test_watch_deadlines.py.
"""

from __future__ import annotations

import asyncio

import pytest
from support.virtual_answers import DESCRIBE, SDK_APP_ID, VirtualAnswers, build
from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as pb
from tiw_facade.answers._entries import Entry, Key
from tiw_facade.answers._topics import Topics, Watch
from tiw_facade.failures import ShuttingDown, TiwError


async def watch(facade: VirtualAnswers, task: str) -> Watch:
    request = pb.DescribeSnapshotTaskRequest(sdk_app_id=SDK_APP_ID, task_id=task)
    return await facade.answers.watch(DESCRIBE, request, deadline=None)


def status(entry: Entry | None) -> str | None:
    return None if entry is None else pb.DescribeSnapshotTaskResponse.FromString(entry.payload).status


async def asked_again(facade: VirtualAnswers, task: str) -> None:
    """A caller's fresh answer: published to the task's watchers as any answer is."""
    facade.wall.advance(0.5)
    await facade.describe(task, max_age=0.0)


async def test_a_watch_gives_the_current_answer_then_each_change_then_ends_at_the_final_one() -> None:
    facade = build()
    facade.tiw.states["task"] = "Running"
    stream = await watch(facade, "task")
    assert status(stream.next()) == "Running"
    assert stream.next() is None, "nothing new yet"
    await asked_again(facade, "task")
    assert stream.next() is None, "a new RequestId with the same state is no change"
    facade.tiw.states["task"] = "Finished"
    await asked_again(facade, "task")
    assert status(stream.next()) == "Finished"
    assert stream.over
    stream.close()


async def test_one_answer_wakes_every_watcher_of_the_task() -> None:
    facade = build()
    facade.tiw.states["task"] = "Running"
    streams = [await watch(facade, "task") for _ in range(3)]
    assert facade.tiw.asked() == 1, "one request for the three watches' first answer"
    for stream in streams:
        stream.next()
    waits = [stream.wait(None) for stream in streams]
    facade.tiw.states["task"] = "Finished"
    await asked_again(facade, "task")
    assert await asyncio.gather(*waits) == [True, True, True]
    assert [status(stream.next()) for stream in streams] == ["Finished"] * 3


async def test_a_watch_of_an_unknown_task_raises_its_error() -> None:
    facade = build()
    stream = await watch(facade, "no-such-task")
    with pytest.raises(TiwError) as unknown:
        stream.next()
    assert unknown.value.code == "InvalidParameter.TaskNotFound"


async def test_a_drain_ends_open_watches_and_refuses_new_ones() -> None:
    facade = build()
    facade.tiw.states["task"] = "Running"
    stream = await watch(facade, "task")
    stream.next()
    wait = stream.wait(None)
    facade.answers.begin_drain()
    assert await wait is True, "woken at once, not at its deadline"
    with pytest.raises(ShuttingDown):
        stream.next()
    with pytest.raises(ShuttingDown):
        await watch(facade, "task")


def test_a_topic_keeps_only_newer_answers_and_lives_while_watched() -> None:
    topics = Topics()
    key = Key(DESCRIBE, b"task")
    newer, older = Entry(answered_at=2.0, request_id="b"), Entry(answered_at=1.0, request_id="a")
    topics.publish(key, newer)  # nobody watches: nothing kept
    topic = topics.join(key)
    assert topic.latest is None
    topics.publish(key, newer)
    topics.publish(key, older)
    assert topic.latest is newer, "answers never go back in time"
    assert topics.join(key) is topic and topics.watched() == [key]
    topics.leave(topic)
    topics.leave(topic)
    assert topics.watched() == []
