"""What watchers wait on: the newest answer of each watched key, and one wake-up for all its watchers."""

from __future__ import annotations

import asyncio

from tiw_facade.answers import _policy
from tiw_facade.answers._entries import Entry, Key


class Topic:
    """The newest answer of one key, for its watchers: each publish wakes them all at once."""

    __slots__ = ("_content", "_content_of", "_waiters", "key", "latest", "watchers")

    def __init__(self, key: Key) -> None:
        self.key = key  # the watchers' one copy of it: each stream's own would cost its bytes again
        self.latest: Entry | None = None
        self.watchers = 0
        # One future per waiting watcher, rather than one per topic awaited through asyncio.wait:
        # a cancelled watcher cancels only its own, and a plain future is the cheapest thing to
        # hold while waiting (asyncio.wait held a set, a second future and two callbacks: about
        # 1.4 KB per open stream).
        self._waiters: set[asyncio.Future[None]] = set()
        self._content_of: Entry | None = None
        self._content = b""

    def publish(self, entry: Entry) -> None:
        if self.latest is not None and entry.answered_at <= self.latest.answered_at:
            return
        self.latest = entry
        self.wake()

    def wake(self) -> None:
        waiters, self._waiters = self._waiters, set()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def waiter(self) -> asyncio.Future[None]:
        """A future set at the next wake. Pass it to ``forget`` when done with it, however it ended
        (a watcher cancelled meanwhile would leave it here until the next wake otherwise)."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        return waiter

    def forget(self, waiter: asyncio.Future[None]) -> None:
        self._waiters.discard(waiter)

    def content(self, action: str, entry: Entry) -> bytes:
        """The entry's content (without RequestId), computed once per entry for all watchers."""
        if entry is not self._content_of:
            self._content_of = entry
            self._content = (
                entry.error_code.encode() if entry.is_error else _policy.content(action, entry.payload)
            )
        return self._content


class Topics:
    """The topics of the keys watched in this process, each alive while it has a watcher."""

    def __init__(self) -> None:
        self._topics: dict[Key, Topic] = {}

    def join(self, key: Key) -> Topic:
        topic = self._topics.get(key)
        if topic is None:
            topic = self._topics[key] = Topic(key)
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
