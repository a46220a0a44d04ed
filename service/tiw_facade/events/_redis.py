"""The event log every replica of one account shares: a Redis Stream.

Keys, under ``shared_redis.prefix("events", account)``:

- ``:log``, the Stream: one entry per event (fields kind, app, type, task, ts, exp, body, at, and n,
  its counted size), its ID the event's cursor;
- ``:seen:<identity>``, one per event taken, expiring when TIW may no longer retry it: the dedupe;
- ``:meta``, a hash: ``birth``, the ID of the first entry of this Stream (a cursor before it was
  given out by a Stream since lost: Redis lost its data, or evicted it), ``floor``, the newest
  entry trimmed (every entry after it is held), and ``bytes``, the entries' counted sizes summed.

Appending is one script (``APPEND``): the dedupe, the XADD and the trimming together, so a retry
after a failure between them can neither lose the event nor take it twice. The script trims itself
(rather than XADD's MAXLEN/MINID) to know the newest entry it dropped, which needs no Redis 7
(``max-deleted-entry-id``) and covers both bounds at once. Reading is one script too (``READ``):
the check that the cursor is still held and the entries after it, so no trim can fall between them.

Followers do not each block on Redis: one task per log (the tail) blocks in XREAD on a client of its
own and wakes the followers when new entries come; each then reads what follows its cursor with
``READ`` on the shared client. A follower rides out Redis failures: it retries with backoff from the
last event it yielded, and gives up (EventLogUnavailable) only after ``give_up_after`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

from tiw_facade import background, shared_redis
from tiw_facade.events import (
    CursorExpired,
    Event,
    EventLogUnavailable,
    counted_bytes,
    format_cursor,
    parse_cursor,
    seen_seconds,
)
from tiw_facade.settings import DEFAULT_EVENTS_MAX_BYTES

if TYPE_CHECKING:
    from tiw_facade.metrics import Metrics

log = logging.getLogger("tiw_facade.events")

ORIGIN = "0-0"  # before every entry of every Stream
# The tail's XREAD blocks this long at most: its client's socket time-out must be longer (see
# ``reader_target``), or every quiet second would read as Redis timing out.
BLOCK_SECONDS = 1.0
# A follower looks again this often even when the tail did not wake it (the tail itself is failing).
POLL_SECONDS = 5.0
READ_BATCH = 100  # entries a follower reads at once
RETRY_FIRST, RETRY_MAX = 0.1, 2.0  # a follower's backoff while Redis fails, doubling
GIVE_UP_AFTER = 300.0  # seconds of failure after which a follower raises EventLogUnavailable

# Shared by both scripts: Stream IDs compared as numbers (their parts fit a double exactly below
# 2**53, far beyond any clock in milliseconds; a forged larger one only compares coarsely).
_IDS = """
local function parts(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function older(a, b)
  local am, as = parts(a)
  local bm, bs = parts(b)
  return am < bm or (am == bm and as < bs)
end
"""

# KEYS: log, seen, meta. ARGV: how long the identity is remembered (ms), the most entries kept, the
# retention (ms), the most bytes kept, then the entry's fields (its counted size among them, ``n``).
# The new entry's ID, or false for an identity already seen. The oldest entries are dropped while
# the log is over any bound: count, age (from the new entry's ID: Redis's clock, which made every
# ID) or bytes (``meta.bytes``, the sum of the entries' ``n``; an entry without one counts 0). Never
# the new entry: one event larger than the bound is kept alone.
APPEND = (
    _IDS
    + """
if not redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[1]) then
  return false
end
local born = redis.call('EXISTS', KEYS[1]) == 0
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 5))
if born then
  redis.call('HSET', KEYS[3], 'birth', id, 'bytes', 0)
  redis.call('HDEL', KEYS[3], 'floor')
end
local size = 0
for i = 5, #ARGV - 1, 2 do
  if ARGV[i] == 'n' then size = tonumber(ARGV[i + 1]) or 0 end
end
local total = redis.call('HINCRBY', KEYS[3], 'bytes', size)
local length = redis.call('XLEN', KEYS[1])
local max_entries, max_bytes = tonumber(ARGV[2]), tonumber(ARGV[4])
local cutoff = parts(id) - tonumber(ARGV[3])
local drop, dropped, freed = nil, 0, 0
local from = '-'
while true do
  local batch = redis.call('XRANGE', KEYS[1], from, '+', 'COUNT', 64)
  local done = #batch == 0
  for _, entry in ipairs(batch) do
    local over = length - dropped > max_entries or total - freed > max_bytes or parts(entry[1]) < cutoff
    if entry[1] == id or not over then
      done = true
      break
    end
    local counted = 0
    for i = 1, #entry[2] - 1, 2 do
      if entry[2][i] == 'n' then counted = tonumber(entry[2][i + 1]) or 0 end
    end
    drop, dropped, freed = entry[1], dropped + 1, freed + counted
  end
  if done then break end
  from = '(' .. batch[#batch][1]
end
if drop then
  local dms, dseq = parts(drop)
  redis.call('XTRIM', KEYS[1], 'MINID', string.format('%d-%d', dms, dseq + 1))
  redis.call('HSET', KEYS[3], 'floor', drop)
  redis.call('HINCRBY', KEYS[3], 'bytes', -freed)
end
return id
"""
)

# KEYS: log, meta. ARGV: the cursor, the most entries to read. {entries after it} or {} when the log
# no longer holds what follows it ('expired' as the first element).
READ = (
    _IDS
    + """
local meta = redis.call('HMGET', KEYS[2], 'floor', 'birth')
local floor, birth = meta[1], meta[2]
if floor and older(ARGV[1], floor) then
  return {'expired'}
end
if ARGV[1] ~= '0-0' and not (birth and not older(ARGV[1], birth)) then
  return {'expired'}
end
return {'entries', redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', ARGV[2])}
"""
)


def reader_target(where: shared_redis.Target) -> shared_redis.Target:
    """The tail's Redis: the same, with a socket time-out longer than its XREAD blocks. The role's
    short time-out (TIW_REDIS_TIMEOUT) suits every other command; it would cut every blocking read."""
    return dataclasses.replace(where, timeout=BLOCK_SECONDS + max(where.timeout, 1.0))


def _fields(event: Event) -> list[str | bytes | int]:
    return [
        *("kind", event.kind),
        *("app", event.sdk_app_id),
        *("type", event.event_type),
        *("task", event.task_id),
        *("ts", event.timestamp),
        *("exp", event.expire_time),
        *("body", event.body),
        *("at", repr(event.received_at)),
        *("n", counted_bytes(event)),
    ]


def _event(entry_id: bytes, raw: Sequence[bytes]) -> Event:
    """The event of one Stream entry; ValueError (KeyError among them) if it is not one."""
    fields = dict(zip(raw[::2], raw[1::2], strict=True))
    try:
        return Event(
            kind=fields[b"kind"].decode(),
            sdk_app_id=int(fields[b"app"]),
            event_type=fields[b"type"].decode(),
            task_id=fields[b"task"].decode(),
            timestamp=int(fields[b"ts"]),
            expire_time=int(fields[b"exp"]),
            body=bytes(fields[b"body"]),
            received_at=float(fields[b"at"]),
            cursor=entry_id.decode(),
        )
    except KeyError as exc:
        raise ValueError(f"no field {exc}") from None


class RedisEventLog:
    """``EventLog`` on a Redis Stream shared by every replica of ``account``; see the module docstring.

    ``client``: the role's client (short time-outs); ``reader``: the tail's (``reader_target``).
    """

    def __init__(
        self,
        client: shared_redis.Client,
        reader: shared_redis.Client,
        *,
        account: str,
        retention: float,
        max_events: int,
        max_bytes: int = DEFAULT_EVENTS_MAX_BYTES,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        where: str = "(unnamed)",
        give_up_after: float = GIVE_UP_AFTER,
    ) -> None:
        self.where = where
        self._client = client
        self._reader = reader
        self._retention = retention
        self._max_events = max_events
        self._max_bytes = max_bytes
        self._errors = metrics.store_errors if metrics is not None else None
        self._clock = clock
        self._give_up_after = give_up_after
        prefix = shared_redis.prefix("events", account)
        self.stream_key = f"{prefix}:log"
        self.meta_key = f"{prefix}:meta"
        self._seen_prefix = f"{prefix}:seen:"
        self._append = client.register_script(APPEND)
        self._read = client.register_script(READ)
        self._changed = asyncio.Event()  # set, and replaced, when the tail sees new entries
        self._tail: asyncio.Task[None] | None = None
        self._closed = False

    # --- appending ---------------------------------------------------------------------------------

    async def append(self, event: Event) -> Event | None:
        if self._closed:
            raise EventLogUnavailable("the event log is closed")
        now = self._clock()
        keys = (self.stream_key, f"{self._seen_prefix}{event.identity}", self.meta_key)
        seen_ms = max(1, int(seen_seconds(event, now, self._retention) * 1000))
        args = (seen_ms, self._max_events, int(self._retention * 1000), self._max_bytes, *_fields(event))
        try:
            taken = await self._append(keys=keys, args=args)
        except shared_redis.ERRORS as exc:
            self._count(exc)
            raise EventLogUnavailable(f"Redis at {self.where} {shared_redis.describe(exc)}") from exc
        if taken is None:
            return None
        return dataclasses.replace(event, cursor=cast(bytes, taken).decode())

    def _count(self, exc: BaseException) -> None:
        if self._errors is not None:
            self._errors.labels(role="events", kind=shared_redis.classify(exc)).inc()

    # --- following ---------------------------------------------------------------------------------

    async def follow(self, after: str | None) -> AsyncGenerator[Event, None]:
        position = None if after is None else format_cursor(parse_cursor(after))
        failing_since: float | None = None
        delay = RETRY_FIRST
        while True:
            if self._closed:
                raise EventLogUnavailable("the event log is closed")
            self._start_tail()
            changed = self._changed  # taken before reading: new entries from now on set it
            try:
                if position is None:
                    position = await self._tip()
                entries = await self._entries_after(position)
            except shared_redis.ERRORS as exc:
                _cancelled_meanwhile()
                self._count(exc)
                now = time.monotonic()
                if failing_since is None:
                    failing_since = now
                    log.warning(
                        "events: Redis at %s %s; a subscriber waits for it (and will miss nothing)",
                        self.where,
                        shared_redis.describe(exc),
                    )
                elif now - failing_since > self._give_up_after:
                    raise EventLogUnavailable(
                        f"Redis at {self.where} {shared_redis.describe(exc)} for {self._give_up_after:g} s"
                    ) from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            if failing_since is not None:
                log.info("events: Redis at %s answers again; a subscriber resumes", self.where)
                failing_since, delay = None, RETRY_FIRST
            for event in entries:
                yield event
                position = event.cursor
            if len(entries) < READ_BATCH and changed is self._changed:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(POLL_SECONDS):
                        await changed.wait()

    async def _tip(self) -> str:
        """The newest entry's ID (trims never drop it), or ORIGIN when the Stream has none."""
        newest = cast("list[Any]", await self._client.xrevrange(self.stream_key, "+", "-", count=1))
        return cast(bytes, newest[0][0]).decode() if newest else ORIGIN

    async def _entries_after(self, position: str) -> list[Event]:
        keys = (self.stream_key, self.meta_key)
        reply = cast("list[Any]", await self._read(keys=keys, args=(position, READ_BATCH)))
        if reply[0] == b"expired":
            raise CursorExpired(f"the log no longer holds the events after {position}")
        events = []
        for entry_id, raw in reply[1]:
            try:
                events.append(_event(entry_id, raw))
            except (ValueError, UnicodeDecodeError) as exc:
                # Not written by this log's script: nothing to send. Skipped, so it blocks nobody.
                log.warning("events: skipped entry %s of %s, not an event (%s)", entry_id, self.where, exc)
        if not events and reply[1]:  # only skipped entries: move past them
            return await self._entries_after(cast(bytes, reply[1][-1][0]).decode())
        return events

    def _start_tail(self) -> None:
        if self._tail is None or self._tail.done():
            self._tail = asyncio.create_task(self._run_tail(), name="events-tail")

    async def _run_tail(self) -> None:
        """Block in XREAD for entries after the newest seen; wake the followers when some come."""
        last: str | None = None
        delay = RETRY_FIRST
        while not self._closed:
            try:
                if last is None:
                    last = await self._tip()
                block = int(BLOCK_SECONDS * 1000)
                reply = await self._reader.xread({self.stream_key: last}, count=READ_BATCH, block=block)
                delay = RETRY_FIRST
            except shared_redis.ERRORS:
                _cancelled_meanwhile()
                # The followers see the failure themselves (and count and log it): only wait here.
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            entries = _stream_entries(reply)
            if entries:
                last = cast(bytes, entries[-1][0]).decode()
                self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def aclose(self) -> None:
        """Followers end with EventLogUnavailable; appends are refused; the clients are closed."""
        self._closed = True
        self._wake()
        if self._tail is not None:
            await background.stop([self._tail])
        for client in (self._reader, self._client):
            with contextlib.suppress(*shared_redis.ERRORS):
                await client.aclose()


def _cancelled_meanwhile() -> None:
    """Raise CancelledError if this task was cancelled while a Redis command failed: redis-py's
    socket time-out can turn a cancellation into a TimeoutError (background.py), and a follower
    taking it for Redis being slow would retry for ever, its subscriber long gone."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _stream_entries(reply: Any) -> list[Any]:
    """The entries of XREAD's reply for one stream ([[key, entries]]; None when it timed out)."""
    return cast("list[Any]", reply[0][1]) if reply else []


def connect_log(
    where: shared_redis.Target,
    *,
    account: str,
    retention: float,
    max_events: int,
    max_bytes: int = DEFAULT_EVENTS_MAX_BYTES,
    metrics: Metrics | None,
) -> RedisEventLog:
    """The log on ``where``'s Redis, with its two clients (none connects before first use)."""
    return RedisEventLog(
        shared_redis.connect(where),
        shared_redis.connect(reader_target(where)),
        account=account,
        retention=retention,
        max_events=max_events,
        max_bytes=max_bytes,
        metrics=metrics,
        where=where.where,
    )
