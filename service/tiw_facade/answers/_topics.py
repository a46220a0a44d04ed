"""What watchers wait on: the newest answer of each watched key, and one wake-up for all its watchers."""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Generator
from typing import Any

from tiw_facade.answers import _policy
from tiw_facade.answers._entries import Entry, Key
from tiw_facade.failures import ShuttingDown, TiwError

# A wait whose deadline is this close (seconds of the loop's clock) ends with the others due: the
# loop's timers fire to the millisecond (uvloop's), a little before the deadline as often as after.
DEADLINE_RESOLUTION = 0.001


class Wait:
    """One watcher's wait for the next wake of its topic: ``future`` is set True at that wake, or
    False once ``deadline`` (the loop's clock) passed first. Given back with ``Topic.forget``."""

    __slots__ = ("deadline", "future")

    def __init__(self, future: asyncio.Future[bool]) -> None:
        self.future: asyncio.Future[bool] | None = future  # None: ended, let go
        self.deadline: float | None = None  # while in the deadlines' heap

    def __lt__(self, other: Wait) -> bool:  # the order of the deadlines' heap, whose waits have one
        return self.deadline < other.deadline  # type: ignore[operator]

    def __await__(self) -> Generator[Any, None, bool]:
        """Whether the topic woke (True) before the deadline passed (False)."""
        assert self.future is not None, "awaited after it ended"
        return self.future.__await__()


class Deadlines:
    """The deadlines of the waits of every topic, on one timer of the loop's.

    A timer of each waiting watcher's own (``asyncio.timeout_at``: a Timeout and a TimerHandle,
    about 700 bytes) would be most of what a waiting stream holds besides grpc's own state; a place
    in this heap costs its ``Wait`` about 60 bytes. One event loop: no lock.
    """

    __slots__ = ("_ended", "_heap", "_timer")

    def __init__(self) -> None:
        self._heap: list[Wait] = []
        self._ended = 0  # waits in the heap that ended otherwise, taken out at the next compaction
        self._timer: asyncio.TimerHandle | None = None

    def add(self, wait: Wait, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        if deadline <= loop.time() + DEADLINE_RESOLUTION:
            _end(wait, False)
            return
        wait.deadline = deadline
        heapq.heappush(self._heap, wait)
        if self._heap[0] is wait:  # the earliest now: the timer goes off for it
            self._arm(loop)

    def ended(self, wait: Wait) -> None:
        """``wait`` is no longer waited for: its future is let go now, its place in the heap (if it
        has one) at the next compaction, so ended places never outnumber the waiting ones."""
        if wait.future is None:
            return
        wait.future = None
        if wait.deadline is None:  # never in the heap, or out of it
            return
        self._ended += 1
        if self._ended * 2 > len(self._heap):
            self._heap = [kept for kept in self._heap if kept.future is not None]
            heapq.heapify(self._heap)
            self._ended = 0
            if not self._heap and self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._timer.cancel()
        when: float = self._heap[0].deadline  # type: ignore[assignment]
        self._timer = loop.call_at(when, self._expire, loop)

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        due = loop.time() + DEADLINE_RESOLUTION
        heap = self._heap
        while heap and heap[0].deadline <= due:  # type: ignore[operator]
            wait = heapq.heappop(heap)
            wait.deadline = None
            if wait.future is None:
                self._ended -= 1
            else:
                _end(wait, False)
                wait.future = None  # its watcher holds it while it awaits it
        if heap:
            self._arm(loop)


def _end(wait: Wait, woken: bool) -> None:
    future = wait.future
    if future is not None and not future.done():
        future.set_result(woken)


class Topic:
    """The newest answer of one key, for its watchers: each publish wakes them all at once."""

    __slots__ = ("_content", "_content_of", "_deadlines", "_waits", "key", "latest", "watchers")

    def __init__(self, key: Key, deadlines: Deadlines) -> None:
        self.key = key  # the watchers' one copy of it: each stream's own would cost its bytes again
        self.latest: Entry | None = None
        self.watchers = 0
        # One future per waiting watcher, rather than one per topic awaited through asyncio.wait:
        # a cancelled watcher cancels only its own, and a plain future is the cheapest thing to
        # hold while waiting (asyncio.wait held a set, a second future and two callbacks: about
        # 1.4 KB per open stream).
        self._waits: set[Wait] = set()
        self._deadlines = deadlines
        self._content_of: Entry | None = None
        self._content = b""

    def publish(self, entry: Entry) -> None:
        if self.latest is not None and entry.answered_at <= self.latest.answered_at:
            return
        self.latest = entry
        self.wake()

    def wake(self) -> None:
        waits, self._waits = self._waits, set()
        for wait in waits:
            _end(wait, True)

    def wait(self, deadline: float | None) -> Wait:
        """A wait whose future is set True at the next wake, or False at ``deadline`` (the loop's
        clock; None: none) if that comes first. Pass it to ``forget`` when done with it, however it
        ended (a watcher cancelled meanwhile would leave it here until the next wake otherwise)."""
        wait = Wait(asyncio.get_running_loop().create_future())
        self._waits.add(wait)
        if deadline is not None:
            self._deadlines.add(wait, deadline)
        return wait

    def forget(self, wait: Wait) -> None:
        self._waits.discard(wait)
        self._deadlines.ended(wait)

    def content(self, action: str, entry: Entry) -> bytes:
        """The entry's content (without RequestId), computed once per entry for all watchers."""
        if entry is not self._content_of:
            self._content_of = entry
            self._content = (
                entry.error_code.encode() if entry.is_error else _policy.content(action, entry.payload)
            )
        return self._content


class Watch:
    """One stream's watch of its task's topic, made by ``Answers.watch`` at the task's current
    answer: the answer the stream is at, and the content it was last sent. The stream drives it::

        while not watch.over:
            entry = watch.next()
            if entry is not None:
                ...  # send it
            elif not watch.over:  # nothing new: wait for the topic's next wake
                wait = watch.wait(deadline)
                try:
                    woken = await wait  # False: the deadline passed first
                finally:
                    watch.forget(wait)
        watch.close()  # once, however it ended

    Not an async generator: a generator of each stream's own (its frame, the weak reference its
    loop keeps of it, the awaitable of each step) held about 480 bytes more while the stream waits.
    """

    __slots__ = ("_action", "_entry", "_fresh", "_sent", "_topics", "over", "topic")

    def __init__(self, topics: Topics, topic: Topic, action: str, entry: Entry) -> None:
        self._topics = topics
        self.topic = topic
        self._action = action
        self._entry = entry  # the newest answer seen
        self._fresh = True  # and not yet considered for sending
        self._sent: bytes | None = None  # the content last sent (without RequestId)
        self.over = False  # a terminal answer came: nothing ever follows

    def next(self) -> Entry | None:
        """The next answer to send: the newest, if its content differs from the last sent. None if
        there is none (until the topic's next wake; or ever, once ``over``). Raises TiwError for a
        kept error (never sent as a message), ShuttingDown once the facade drains."""
        entry = self._entry
        if self._fresh:
            self._fresh = False
        else:
            if self._topics.draining:
                raise ShuttingDown()
            latest = self.topic.latest
            if latest is None or latest is entry:
                return None
            entry = self._entry = latest
        if entry.is_error:
            raise TiwError(entry.error_code, entry.error_message, entry.request_id)
        self.over = entry.terminal
        content = self.topic.content(self._action, entry)
        if content == self._sent:
            return None
        self._sent = content
        return entry

    def wait(self, deadline: float | None) -> Wait:
        """``Topic.wait``: True at the topic's next wake, or False at ``deadline`` if it comes first."""
        return self.topic.wait(deadline)

    def forget(self, wait: Wait) -> None:
        self.topic.forget(wait)

    def close(self) -> None:
        self._topics.leave(self.topic)


class Topics:
    """The topics of the keys watched in this process, each alive while it has a watcher."""

    def __init__(self) -> None:
        self._topics: dict[Key, Topic] = {}
        self._deadlines = Deadlines()
        self.draining = False  # the facade stops: watches end with ShuttingDown, new ones are refused

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is watched here now."""
        return key in self._topics

    def drain(self) -> None:
        self.draining = True
        self.wake_all()

    def join(self, key: Key) -> Topic:
        topic = self._topics.get(key)
        if topic is None:
            topic = self._topics[key] = Topic(key, self._deadlines)
        topic.watchers += 1
        return topic

    def leave(self, topic: Topic) -> None:
        topic.watchers -= 1
        if topic.watchers == 0 and self._topics.get(topic.key) is topic:
            del self._topics[topic.key]

    def publish(self, key: Key, entry: Entry) -> None:
        topic = self._topics.get(key)
        if topic is not None:
            topic.publish(entry)

    def wake_all(self) -> None:
        for topic in self._topics.values():
            topic.wake()

    def watched(self) -> list[Key]:
        return list(self._topics)
