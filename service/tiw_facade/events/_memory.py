"""The event log of a replica without Redis: a bounded ring in this process, lost when it stops.

Its cursors are made as a Redis Stream makes its IDs (``<ms>-<seq>``: the clock's milliseconds, and a
sequence within one), so they look like the Redis log's. The log was born empty when the process
started: a cursor from before (another process's, or this one's trimmed away) is CursorExpired,
since the events after it may be gone; ``0-0``, before every event, is expired once any was dropped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable

from tiw_facade.events import (
    CursorExpired,
    Event,
    EventLogUnavailable,
    Position,
    counted_bytes,
    format_cursor,
    parse_cursor,
    seen_seconds,
)
from tiw_facade.settings import DEFAULT_EVENTS_MAX_BYTES

ORIGIN: Position = (0, 0)  # before every event of every log
# Identities remembered at most (besides those of the events held): the memory must be bounded, and
# forgetting the oldest early only lets a very late retry of an old callback through once more.
MIN_SEEN_KEPT = 10_000


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


class MemoryEventLog:
    """``EventLog`` in this process: at most ``max_events`` events and ``max_bytes`` of them
    (``events.counted_bytes``), none older than ``retention`` seconds. One event loop: no lock."""

    def __init__(
        self,
        *,
        retention: float,
        max_events: int,
        max_bytes: int = DEFAULT_EVENTS_MAX_BYTES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._retention = retention
        self._max_events = max_events
        self._max_bytes = max_bytes
        self._bytes = 0
        self._clock = clock
        self._events: deque[tuple[Position, Event]] = deque()
        # The log's birth: every cursor it gives out is after it.
        self._birth: Position = (_ms(clock()), 0)
        self._last = self._birth
        self._dropped: Position = ORIGIN  # the newest event dropped: every one after it is held
        self._seen: dict[str, float] = {}  # identity -> until when it is remembered
        self._seen_expiries: list[tuple[float, str]] = []  # a heap of the same, soonest first
        self._max_seen = max(max_events, MIN_SEEN_KEPT)
        self._appended = asyncio.Event()  # set, and replaced, on every append: wakes the followers
        self._closed = False

    async def append(self, event: Event) -> Event | None:
        if self._closed:
            raise EventLogUnavailable("the event log is closed")
        now = self._clock()
        self._forget_seen(now)
        identity = event.identity
        if identity in self._seen:
            return None
        until = now + seen_seconds(event, now, self._retention)
        self._seen[identity] = until
        heapq.heappush(self._seen_expiries, (until, identity))
        ms = _ms(now)
        self._last = (ms, 0) if ms > self._last[0] else (self._last[0], self._last[1] + 1)
        taken = dataclasses.replace(event, cursor=format_cursor(self._last))
        self._events.append((self._last, taken))
        self._bytes += counted_bytes(taken)
        self._trim(now)
        self._appended.set()
        self._appended = asyncio.Event()
        return taken

    async def follow(self, after: str | None) -> AsyncGenerator[Event, None]:
        position = self._last if after is None else parse_cursor(after)
        while True:
            if self._closed:
                raise EventLogUnavailable("the event log is closed")
            appended = self._appended  # taken before looking: an append from now on sets it
            self._trim(self._clock())
            self._check(position)
            for found, event in self._after(position):
                yield event
                position = found  # those dropped meanwhile were sent all the same: checked once all are
            if appended is self._appended:  # nothing came meanwhile
                await appended.wait()

    def _check(self, position: Position) -> None:
        if position < self._dropped or (position != ORIGIN and position < self._birth):
            raise CursorExpired(f"the log no longer holds the events after {format_cursor(position)}")

    def _after(self, position: Position) -> list[tuple[Position, Event]]:
        """The events after ``position``, oldest first (read from the newest: a follower is most often
        at the end)."""
        found: list[tuple[Position, Event]] = []
        for item in reversed(self._events):
            if item[0] <= position:
                break
            found.append(item)
        found.reverse()
        return found

    def _trim(self, now: float) -> None:
        oldest = (_ms(now - self._retention), 0)
        while self._events and (
            len(self._events) > self._max_events
            or (self._bytes > self._max_bytes and len(self._events) > 1)  # one too large is kept alone
            or self._events[0][0] < oldest
        ):
            self._dropped, dropped = self._events.popleft()
            self._bytes -= counted_bytes(dropped)

    def _forget_seen(self, now: float) -> None:
        expiries = self._seen_expiries
        while expiries and (expiries[0][0] <= now or len(self._seen) > self._max_seen):
            until, identity = heapq.heappop(expiries)
            if self._seen.get(identity) == until:
                del self._seen[identity]

    async def aclose(self) -> None:
        """Followers end with EventLogUnavailable; appends are refused."""
        self._closed = True
        self._appended.set()
