"""TIW's events as the facade keeps them: each callback the intake verified (callbacks.py), in an
append-only log with a cursor, read by WatchEvents subscribers (event_watch.py) and by the answers'
hints. The log is a Redis Stream when the ``events`` role has a Redis (every replica sees every
event), else a bounded ring in this process (``_memory``, ``_redis``).

``Event`` is the one shape every piece passes around; ``EventLog`` is what the two logs offer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import AsyncGenerator
from typing import Protocol

# The kinds of event, by the intake's path (/callbacks/<kind>), and the Describe action that confirms
# each one's task.
KINDS: tuple[str, ...] = ("push", "snapshot", "video")
CONFIRMING_ACTION: dict[str, str] = {
    "push": "DescribeWhiteboardPush",
    "snapshot": "DescribeSnapshotTask",
    "video": "DescribeVideoGenerationTask",
}


@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    """One verified callback. ``body``: the JSON exactly as TIW sent it; the other fields are read
    from it (``task_id``: EventData's TaskId, or TaskID, "" if none; ``timestamp``: its Timestamp,
    0 if none). ``received_at``: this host's wall clock when the intake took it. ``cursor``: its
    place in the log ("" until appended): opaque to subscribers, increasing in the log's order."""

    kind: str
    sdk_app_id: int
    event_type: str
    task_id: str
    timestamp: int
    expire_time: int
    body: bytes
    received_at: float
    cursor: str = ""

    @property
    def identity(self) -> str:
        """What makes two deliveries one event (TIW delivers at least once, and a Sign can be
        replayed): SdkAppId, kind, EventType, TaskId and the event's Timestamp; the body's digest
        when it has no Timestamp."""
        when = str(self.timestamp) if self.timestamp else hashlib.sha256(self.body).hexdigest()
        text = "\x00".join((str(self.sdk_app_id), self.kind, self.event_type, self.task_id, when))
        return hashlib.sha256(text.encode()).hexdigest()


def counted_bytes(event: Event) -> int:
    """What an event counts against a log's bound in bytes (TIW_EVENTS_MAX_BYTES): its body and
    fields, and what keeping one costs besides (measured loosely; a bound, not an account)."""
    return len(event.body) + len(event.event_type) + len(event.task_id) + EVENT_OVERHEAD


# Keeping an event costs this much beyond its body and strings: the entry's other fields, its ID and
# the structure holding it (a Stream's listpack entry, or a tuple and a dataclass in process).
EVENT_OVERHEAD = 256


@dataclasses.dataclass(frozen=True, slots=True)
class Filter:
    """Which events a subscriber wants; an empty field matches any."""

    sdk_app_ids: frozenset[int] = frozenset()
    event_types: frozenset[str] = frozenset()
    kinds: frozenset[str] = frozenset()
    task_ids: frozenset[str] = frozenset()

    def matches(self, event: Event) -> bool:
        return (
            (not self.sdk_app_ids or event.sdk_app_id in self.sdk_app_ids)
            and (not self.event_types or event.event_type in self.event_types)
            and (not self.kinds or event.kind in self.kinds)
            and (not self.task_ids or event.task_id in self.task_ids)
        )


class CursorExpired(Exception):
    """The cursor names a place the log no longer holds (older than its retention, or trimmed to
    its bound): events after it may have been dropped."""


class InvalidCursor(ValueError):
    """The cursor is not one this log gave out."""


class EventLogUnavailable(Exception):
    """The log's Redis failed: nothing was taken (the intake answers 503, and TIW retries)."""


# A cursor is a Redis Stream entry ID, ``<ms>-<seq>``, in both logs (the memory log makes them the
# same way), so cursors look alike whichever log gave them out.
Position = tuple[int, int]
_CURSOR = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")  # ASCII digits: \d takes any script's
_MAX_PART = 2**64 - 2  # below 2**64 in a Stream ID; and a read after 2**64 - 1 overflows
# How long a callback's identity is remembered when its ExpireTime is already near or past: TIW's
# retries of it come within seconds, not at its ExpireTime.
MIN_SEEN_SECONDS = 60.0


def parse_cursor(cursor: str) -> Position:
    """The position ``cursor`` names; InvalidCursor when it is not of the logs' shape."""
    found = _CURSOR.fullmatch(cursor)
    if found is None:
        raise InvalidCursor(f"not a cursor of this log: {cursor[:40]!r}")
    ms, seq = int(found[1]), int(found[2])
    if ms > _MAX_PART or seq > _MAX_PART:
        raise InvalidCursor(f"not a cursor of this log: {cursor[:40]!r}")
    return ms, seq


def format_cursor(position: Position) -> str:
    return f"{position[0]}-{position[1]}"


def seen_seconds(event: Event, now: float, retention: float) -> float:
    """How long the log remembers ``event``'s identity: until its ExpireTime (a replay of its Sign
    is refused by the intake after that), at least ``MIN_SEEN_SECONDS``, at most ``retention``."""
    return min(max(event.expire_time - now, MIN_SEEN_SECONDS), retention)


class EventLog(Protocol):
    async def append(self, event: Event) -> Event | None:
        """Take ``event`` once: the event with its cursor, or None if one of its ``identity`` was
        taken within its ExpireTime (a replay, or TIW's retry). Raises EventLogUnavailable."""
        ...

    def follow(self, after: str | None) -> AsyncGenerator[Event, None]:
        """Every event after the cursor ``after`` (None: from now on), as they come, for ever.
        Raises CursorExpired, InvalidCursor, EventLogUnavailable (a Redis log keeps trying for a
        while before it gives up). A generator: ``aclose()`` it (``contextlib.aclosing``) when done."""
        ...

    async def aclose(self) -> None: ...
