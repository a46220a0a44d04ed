"""What watchers wait on: the newest answer of each watched key, and one wake-up for all its watchers."""

from __future__ import annotations

import asyncio

from tiw_facade.answers import _policy
from tiw_facade.answers._entries import Entry, Key


class Topic:
    """The newest answer of one key, for its watchers: each publish wakes them all at once."""

    __slots__ = ("_changed", "_content", "_content_of", "latest", "watchers")

    def __init__(self) -> None:
        self.latest: Entry | None = None
        self.watchers = 0
        self._changed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._content_of: Entry | None = None
        self._content = b""

    def publish(self, entry: Entry) -> None:
        if self.latest is not None and entry.answered_at <= self.latest.answered_at:
            return
        self.latest = entry
        self.wake()

    def wake(self) -> None:
        changed, self._changed = self._changed, asyncio.get_running_loop().create_future()
        changed.set_result(None)

    async def changed(self) -> None:
        # asyncio.wait, not ``await future``: a watcher cancelled while waiting would cancel the
        # future that every other watcher of the key waits on.
        await asyncio.wait((self._changed,))

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
            topic = self._topics[key] = Topic()
        topic.watchers += 1
        return topic

    def leave(self, key: Key, topic: Topic) -> None:
        topic.watchers -= 1
        if topic.watchers == 0 and self._topics.get(key) is topic:
            del self._topics[key]

    def publish(self, key: Key, entry: Entry) -> None:
        topic = self._topics.get(key)
        if topic is not None:
            topic.publish(entry)

    def wake_all(self) -> None:
        for topic in self._topics.values():
            topic.wake()

    def watched(self) -> list[Key]:
        return list(self._topics)
