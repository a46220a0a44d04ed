"""The deadlines of waiting watchers, all on one timer (answers._topics.Deadlines): each wait ends
at its topic's next wake or at its deadline, whichever comes first, and ended waits do not pile up
however often a watcher waits; and end to end, a stream that was sent changes still ends at its
deadline."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from support.facade import Facade
from support.tiw import SDK_APP_ID
from support.waiting import wait_until
from support.watching import active_watches, ended, watcher
from tiw_facade._proto.tiw.facade.v1 import watcher_pb2 as wpb
from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as pb
from tiw_facade.answers._entries import Key
from tiw_facade.answers._topics import Topic, Topics, Wait

FAR = 3600.0  # seconds: a deadline no test reaches


def topic_of(topics: Topics, name: str = "task") -> Topic:
    return topics.join(Key("DescribeSnapshotTask", name.encode()))


def now() -> float:
    return asyncio.get_running_loop().time()


def heap_size(topics: Topics) -> int:
    return len(topics._deadlines._heap)


async def test_a_wake_before_the_deadline_ends_the_wait_woken() -> None:
    topics = Topics()
    topic = topic_of(topics)
    wait = topic.wait(now() + FAR)
    asyncio.get_running_loop().call_soon(topic.wake)
    assert await wait is True
    topic.forget(wait)
    assert heap_size(topics) == 0  # the one place in the heap ended: taken out at once


async def test_the_deadline_ends_the_wait_not_woken_and_not_before() -> None:
    topics = Topics()
    topic = topic_of(topics)
    deadline = now() + 0.2
    wait = topic.wait(deadline)
    assert await wait is False
    assert now() >= deadline - 0.002  # the loop's timers are to the millisecond
    topic.forget(wait)
    topic.wake()  # a wake after the deadline finds nothing to wake
    assert heap_size(topics) == 0


async def test_a_passed_deadline_ends_the_wait_at_once() -> None:
    topics = Topics()
    topic = topic_of(topics)
    wait = topic.wait(now() - 1.0)
    assert await asyncio.wait_for(_awaited(wait), 1.0) is False
    topic.forget(wait)
    assert heap_size(topics) == 0


async def _awaited(wait: Wait) -> bool:
    return await wait


@pytest.mark.slow
async def test_each_wait_ends_at_its_own_deadline_in_order_whatever_order_they_came_in() -> None:
    topics = Topics()
    topic = topic_of(topics)
    start = now()
    offsets = [0.3, 0.1, 0.4, 0.2, 0.05]  # an earlier deadline after a later one: the timer moves
    ends: dict[float, float] = {}

    async def watcher_with(offset: float) -> None:
        wait = topic.wait(start + offset)
        try:
            assert await wait is False
            ends[offset] = now() - start
        finally:
            topic.forget(wait)

    await asyncio.gather(*(watcher_with(offset) for offset in offsets))
    assert sorted(ends, key=ends.__getitem__) == sorted(offsets)
    assert all(ends[offset] >= offset - 0.002 for offset in offsets)
    assert heap_size(topics) == 0


async def test_a_wait_without_deadline_ends_only_at_a_wake() -> None:
    topics = Topics()
    topic = topic_of(topics)
    wait = topic.wait(None)
    await asyncio.sleep(0.05)
    assert heap_size(topics) == 0
    topic.wake()
    assert await wait is True
    topic.forget(wait)


async def test_ended_waits_do_not_pile_up_in_the_heap() -> None:
    """A watcher woken at every change of a task whose deadline is far: its ended waits leave the
    heap (and let their futures go) as they end, rather than staying until the far deadline."""
    topics = Topics()
    topics_of = [topic_of(topics, f"task-{index}") for index in range(10)]
    waiting = [topic.wait(now() + FAR) for topic in topics_of]  # ten watchers that stay waiting
    for _ in range(1_000):
        topic = topics_of[0]
        wait = topic.wait(now() + FAR)
        topic.wake()
        assert await wait is True
        topic.forget(wait)
        assert wait.future is None  # let go at once
        assert heap_size(topics) <= 2 * len(waiting) + 1
    for topic, wait in zip(topics_of, waiting, strict=True):
        topic.forget(wait)  # cancelled watchers: their places go too
    assert heap_size(topics) == 0


async def test_a_cancelled_watcher_leaves_nothing_behind() -> None:
    topics = Topics()
    topic = topic_of(topics)

    async def watching() -> None:
        wait = topic.wait(now() + FAR)
        try:
            await wait
        finally:
            topic.forget(wait)

    task = asyncio.create_task(watching())
    await asyncio.sleep(0.01)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert heap_size(topics) == 0 and not topic._waits


# --- end to end ---------------------------------------------------------------------------------


@pytest.mark.slow
async def test_a_stream_sent_a_change_still_ends_at_its_deadline(facade: Facade) -> None:
    """The deadline bounds every wait of the stream, not only the first: the task changes (a second
    message), then never again, and the stream ends DEADLINE_EXCEEDED at its deadline."""
    task_id = facade.emulator.add_video_task(sdk_app_id=SDK_APP_ID, queue_seconds=FAR, process_seconds=FAR)
    describe = pb.DescribeVideoGenerationTaskRequest(sdk_app_id=SDK_APP_ID, task_id=task_id)
    started = time.monotonic()
    call = watcher(facade).WatchVideoGenerationTask(
        wpb.WatchVideoGenerationTaskRequest(request=describe), timeout=4.0
    )
    assert (await call.read()).status == "QUEUED"
    facade.emulator.tasks.videos[SDK_APP_ID, task_id].processing_from = time.time()
    assert (await call.read()).status == "PROCESSING"
    assert (await ended(call)).code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started >= 3.8  # its deadline, less the facade's margin (0.1 s)
    await wait_until(lambda: active_watches(facade) == 0)
