"""The answer store every replica of one account shares: Redis, each rule one atomic Lua script.

Per account, every key under one prefix ``tiw:{<account hash>}:answers:`` (the {hash tag} keeps an
account's keys in one Redis Cluster slot, so the scripts, which name some keys themselves, stay
valid on a Cluster):

``...e:<key>``        hash: the entry (``a`` answered_at as repr, ``r`` RequestId, ``p`` payload,
                      ``t`` present if terminal, ``c``/``m`` a kept error; empty fields left out);
                      expires its lifetime after its request was sent, as the in-process store's do.
``...i:<key>``        the invalidation stamp: the latest ``at`` the key was invalidated at; kept
                      long after any request begun before it could still answer.
``...l:<key>``        the lease: the token of the store instance that holds it.
``...w:<action>``     sorted set of wanted keys, score = until when they are wanted.
``...s:<action>``     the refresh schedule: sorted set of wanted keys whose entry is neither
                      terminal nor an error, score = its answered_at (0: no entry yet).

``<key>`` is ``Key.text()``. Times are the callers' wall clocks (``time.time()``), as floats:
Redis keeps scores as doubles and prints them exactly, so answered_at survives the trip unchanged.
answered_at is ``Entry.answered_at``: when the request TIW answered was sent, not when its answer
came. (Entries written by an older facade, same format, carry the arrival: they read a round trip
younger than they are until they expire.)

Nothing read from Redis is trusted (docs/answers.md, "Checked before use"): an entry is served only
if ``_entries.invalid`` finds nothing wrong with it as the answer of its key; one that fails is
deleted (unless rewritten meanwhile), counted in ``tiw_store_invalid_total{role="answers"}`` and
logged. The scripts treat a held answered_at or stamp that is not a plausible time (not a number,
NaN, later than the writer's clock plus ``CLOCK_TOLERANCE``) as absent, so a good answer replaces it.
The format is unchanged: entries of older releases read the same.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, TypeVar, cast

from tiw_facade import shared_redis
from tiw_facade.answers._entries import (
    CLOCK_TOLERANCE,
    FIELDS,
    TIME,
    Entry,
    Key,
    Lifetimes,
    StoreUnavailable,
    invalid,
)

if TYPE_CHECKING:
    from tiw_facade.metrics import Metrics

T = TypeVar("T")

log = logging.getLogger("tiw_facade.answers")

STORE_ERRORS = shared_redis.ERRORS
# A reply that does not parse is as much "not answering properly" as a lost connection.
SHAPE_ERRORS = (ValueError, KeyError, TypeError, IndexError, AttributeError)
# next_due looks at this many of the schedule's oldest members at most: each call stays O(log n)
# even when many of the oldest are leased by other replicas.
SCAN = 64
# An invalidation stamp must outlive every request begun before it; the longest such request is
# bounded by what the facade waits for TIW, far below this.
MIN_STAMP_LIFETIME = 60.0
# One warning per this many seconds about invalid data read from Redis: an attacker (or a broken
# writer) can make every read fail, and the log must not grow with the traffic. The metric counts all.
INVALID_WARN_EVERY = 60.0
# What else can be invalid (tiw_store_invalid_total{role="answers", what}): an invalidation stamp
# that is no plausible time, and a schedule member that is no key of its action.
STAMP, SCHEDULE = "stamp", "schedule"
INVALID_WHATS = (TIME, FIELDS, "payload", "key", STAMP, SCHEDULE)

# A number the caller wrote (an answered_at, a stamp) or nil: nil for anything else, NaN, or later
# than ARGV's ``latest`` (the caller's clock plus CLOCK_TOLERANCE). tonumber accepts 'nan' and 'inf'.
_PLAUSIBLE = """
local function plausible(value, latest)
  local n = tonumber(value)
  if n == nil or n ~= n or n > latest then return nil end
  return n
end
"""

# KEYS: entry, stamp, schedule, wanted. ARGV: asked_at, answered_at (the send), lifetime (ms), '1' if
# the entry ends refreshes (terminal or error), the key's member, latest plausible time, then the
# entry's fields as pairs. An answer to a request sent before the one held is refused: answers never
# go back in time. A held time or stamp that is no plausible time is dropped, not obeyed (a forged
# one would refuse every answer for as long as it is kept). Reply: {kept, what was dropped...}.
PUT_SCRIPT = (
    _PLAUSIBLE
    + """
local latest = tonumber(ARGV[6])
local dropped = {}
local raw = redis.call('GET', KEYS[2])
local stamp = plausible(raw, latest)
if raw and not stamp then
  redis.call('DEL', KEYS[2])
  dropped[#dropped + 1] = 'stamp'
end
if stamp and stamp >= tonumber(ARGV[1]) then return {0, unpack(dropped)} end
local held = redis.call('HGET', KEYS[1], 'a')
if held and not plausible(held, latest) then
  dropped[#dropped + 1] = 'time'
elseif held and tonumber(held) > tonumber(ARGV[2]) then
  return {0, unpack(dropped)}
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 7))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if ARGV[4] == '1' then
  redis.call('ZREM', KEYS[3], ARGV[5])
  redis.call('ZREM', KEYS[4], ARGV[5])
elseif redis.call('ZSCORE', KEYS[4], ARGV[5]) then
  redis.call('ZADD', KEYS[3], ARGV[2], ARGV[5])
end
return {1, unpack(dropped)}
"""
)
# KEYS: (entry, stamp, schedule) per key. ARGV: at, the stamp's lifetime (ms), latest plausible time,
# each key's member. A wanted key left without an entry is due first (score 0); a later stamp is
# never lowered, but one that is no plausible time is replaced.
INVALIDATE_SCRIPT = (
    _PLAUSIBLE
    + """
local at = tonumber(ARGV[1])
local latest = tonumber(ARGV[3])
for i = 4, #ARGV do
  local n = (i - 4) * 3
  redis.call('DEL', KEYS[n + 1])
  local stamp = plausible(redis.call('GET', KEYS[n + 2]), latest)
  if not stamp or stamp < at then
    redis.call('SET', KEYS[n + 2], ARGV[1], 'PX', ARGV[2])
  end
  redis.call('ZADD', KEYS[n + 3], 'XX', 0, ARGV[i])
end
"""
)
# KEYS: (wanted, schedule, entry) per key. ARGV: until, latest plausible time, each key's member. A
# key with an entry joins the schedule unless the entry ended refreshes (terminal or error). One
# without an entry does not: its callers ask TIW themselves, and a request that keeps failing must
# not be re-sent in a loop. An entry whose time is no plausible time is due at once (score 0): the
# next read drops it, and a refresh replaces it.
WANT_SCRIPT = (
    _PLAUSIBLE
    + """
local latest = tonumber(ARGV[2])
for i = 3, #ARGV do
  local n = (i - 3) * 3
  local member = ARGV[i]
  redis.call('ZADD', KEYS[n + 1], 'GT', ARGV[1], member)
  if not redis.call('ZSCORE', KEYS[n + 2], member) then
    local entry = redis.call('HMGET', KEYS[n + 3], 'a', 't', 'c')
    if entry[1] and not entry[2] and not entry[3] then
      redis.call('ZADD', KEYS[n + 2], plausible(entry[1], latest) or 0, member)
    end
  end
end
"""
)
# KEYS: schedule. ARGV: at, the key's member. A scheduled key is next due as if answered at ``at``.
POSTPONE_SCRIPT = """
redis.call('ZADD', KEYS[1], 'XX', ARGV[1], ARGV[2])
"""
# KEYS: schedule, wanted. ARGV: now, older_than, lease (ms), our token, the leases' key prefix, SCAN.
# Keys no longer wanted leave both sets; the oldest free one is leased and returned.
NEXT_DUE_SCRIPT = """
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[1])
local older_than = tonumber(ARGV[2])
local members = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[6]) - 1, 'WITHSCORES')
for i = 1, #members, 2 do
  local member = members[i]
  if tonumber(members[i + 1]) >= older_than then return false end
  if not redis.call('ZSCORE', KEYS[2], member) then
    redis.call('ZREM', KEYS[1], member)
  elseif redis.call('SET', ARGV[5] .. member, ARGV[4], 'NX', 'PX', ARGV[3]) then
    return member
  end
end
return false
"""
# KEYS: entry, schedule. ARGV: the fields read as pairs (name, value), the key's member. Deletes the
# entry only if it still holds exactly what was read (a good answer written meanwhile stays), and
# makes a scheduled key due at once: its refresh writes the good answer.
DROP_SCRIPT = """
local held = redis.call('HGETALL', KEYS[1])
if #held ~= #ARGV - 1 then return 0 end
local read = {}
for i = 1, #ARGV - 1, 2 do read[ARGV[i]] = ARGV[i + 1] end
for i = 1, #held, 2 do
  if read[held[i]] ~= held[i + 1] then return 0 end
end
redis.call('DEL', KEYS[1])
redis.call('ZADD', KEYS[2], 'XX', 0, ARGV[#ARGV])
return 1
"""
# KEYS: schedule, wanted. ARGV: the member. A member that is no key of its action leaves both sets.
FORGET_SCRIPT = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
"""
# KEYS: the lease. ARGV: our token.
UNLEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
"""


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _fields(entry: Entry) -> list[str | bytes]:
    """The entry as hash fields, the empty ones left out (they are the defaults)."""
    fields: list[str | bytes] = ["a", repr(entry.answered_at)]
    for name, value in (
        ("r", entry.request_id),
        ("p", entry.payload),
        ("t", "1" if entry.terminal else ""),
        ("c", entry.error_code),
        ("m", entry.error_message),
    ):
        if value:
            fields += (name, value)
    return fields


def _parse(fields: dict[bytes, bytes]) -> Entry | str:
    """The entry the hash holds, or what is wrong with its fields (``_entries.TIME``, ``FIELDS``)."""
    try:
        answered_at = float(fields[b"a"])
    except (KeyError, ValueError):
        return TIME
    if fields.get(b"t", b"1") != b"1":  # written as "1" when terminal, else left out
        return FIELDS
    try:
        return Entry(
            answered_at=answered_at,
            request_id=fields.get(b"r", b"").decode(),
            payload=bytes(fields.get(b"p", b"")),
            terminal=b"t" in fields,
            error_code=fields.get(b"c", b"").decode(),
            error_message=fields.get(b"m", b"").decode(),
        )
    except UnicodeDecodeError:
        return FIELDS


class RedisAnswerStore:
    """``Store`` on Redis, shared by every replica of ``account``; see the module docstring."""

    def __init__(
        self,
        client: shared_redis.Client,
        *,
        account: str,
        lifetimes: Lifetimes,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._lifetimes = lifetimes
        self._clock = clock
        self._errors = metrics.store_errors if metrics is not None else None
        self._invalid = metrics.store_invalid if metrics is not None else None
        self._invalid_warned_at = float("-inf")
        self._invalid_unwarned = 0
        self._stamp_ms = _ms(max(MIN_STAMP_LIFETIME, 2 * lifetimes.changing))
        # Leases taken by this instance carry its token: only it gives them up early.
        self._token = secrets.token_hex(16)
        # Short time-outs (shared_redis.connect): the caller falls back to its own store rather than wait.
        self._client = client
        self._put = self._client.register_script(PUT_SCRIPT)
        self._invalidate = self._client.register_script(INVALIDATE_SCRIPT)
        self._want = self._client.register_script(WANT_SCRIPT)
        self._next_due = self._client.register_script(NEXT_DUE_SCRIPT)
        self._unlease = self._client.register_script(UNLEASE_SCRIPT)
        self._postpone = self._client.register_script(POSTPONE_SCRIPT)
        self._drop = self._client.register_script(DROP_SCRIPT)
        self._forget = self._client.register_script(FORGET_SCRIPT)
        self.prefix = shared_redis.prefix("answers", account) + ":"

    @contextmanager
    def _unavailable(self) -> Iterator[None]:
        """Every failure as StoreUnavailable, counted by kind (a reply that does not parse: refused)."""
        try:
            yield
        except STORE_ERRORS as exc:
            kind = shared_redis.classify(exc)
            self._count(kind)
            raise StoreUnavailable(shared_redis.describe(exc), kind) from exc
        except SHAPE_ERRORS as exc:
            self._count("refused")
            raise StoreUnavailable(f"answered nonsense ({type(exc).__name__}: {exc})", "refused") from exc

    def _count(self, kind: shared_redis.Kind) -> None:
        if self._errors is not None:
            self._errors.labels(role="answers", kind=kind).inc()

    def _latest(self) -> str:
        """The latest time a replica can have written now (beyond: forged, or a broken clock)."""
        return repr(self._clock() + CLOCK_TOLERANCE)

    def _rejected(self, what: str, action: str) -> None:
        """Count and (rate-limited) log something invalid read from Redis; never its content."""
        if self._invalid is not None:
            self._invalid.labels(role="answers", what=what).inc()
        now = time.monotonic()
        if now < self._invalid_warned_at + INVALID_WARN_EVERY:
            self._invalid_unwarned += 1
            return
        log.warning(
            "shared answers: dropped an invalid %s read from Redis (%s of %s), and %d more since the "
            "last warning; asking TIW instead (see tiw_store_invalid_total)",
            "invalidation stamp" if what == STAMP else "entry",
            what,
            action,
            self._invalid_unwarned,
        )
        self._invalid_warned_at = now
        self._invalid_unwarned = 0

    async def _checked(self, key: Key, fields: dict[bytes, bytes]) -> Entry | None:
        """The entry ``fields`` hold if it is valid as ``key``'s answer; else dropped and None."""
        if not fields:
            return None
        entry = _parse(fields)
        what = entry if isinstance(entry, str) else invalid(key, entry, self._clock())
        if what is None:
            assert isinstance(entry, Entry)
            return entry
        self._rejected(what, key.action)
        read = [part for pair in fields.items() for part in pair]
        await self._drop(keys=(self.entry_key(key), self.schedule_key(key.action)), args=(*read, key.text()))
        return None

    def entry_key(self, key: Key) -> str:
        return f"{self.prefix}e:{key.text()}"

    def stamp_key(self, key: Key) -> str:
        return f"{self.prefix}i:{key.text()}"

    def lease_key(self, key: Key) -> str:
        return f"{self.prefix}l:{key.text()}"

    def wanted_key(self, action: str) -> str:
        return f"{self.prefix}w:{action}"

    def schedule_key(self, action: str) -> str:
        return f"{self.prefix}s:{action}"

    async def _call(self, pending: Awaitable[T]) -> T:
        with self._unavailable():
            return await pending

    async def get(self, key: Key) -> Entry | None:
        # One command, not a pipeline of one: this is every non-terminal call's read.
        with self._unavailable():
            fields = cast("dict[bytes, bytes]", await self._client.hgetall(self.entry_key(key)))
            return await self._checked(key, fields)

    async def get_many(self, keys: Sequence[Key]) -> list[Entry | None]:
        if not keys:
            return []
        with self._unavailable():
            async with self._client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hgetall(self.entry_key(key))
                found = cast("list[dict[bytes, bytes]]", await pipe.execute())
            return [await self._checked(key, fields) for key, fields in zip(keys, found, strict=True)]

    async def put(self, key: Key, entry: Entry, *, asked_at: float) -> bool:
        keys = (
            self.entry_key(key),
            self.stamp_key(key),
            self.schedule_key(key.action),
            self.wanted_key(key.action),
        )
        final = "1" if entry.terminal or entry.is_error else "0"
        # An entry lives for its lifetime from when its request was sent (as the in-process store
        # keeps it), counted on our clock, which took answered_at, not on Redis's, which may be skewed.
        lifetime = _ms(self._lifetimes.of(entry) - entry.age(self._clock()))
        latest = self._latest()
        args = (repr(asked_at), repr(entry.answered_at), lifetime, final, key.text(), latest, *_fields(entry))
        with self._unavailable():
            reply = cast("list[int | bytes]", await self._put(keys=keys, args=args))
            for what in reply[1:]:
                self._rejected(cast(bytes, what).decode(), key.action)
            return reply[0] == 1

    async def invalidate(self, keys: Iterable[Key], *, at: float) -> None:
        keys = list(keys)
        if not keys:
            return
        names = [
            name
            for key in keys
            for name in (self.entry_key(key), self.stamp_key(key), self.schedule_key(key.action))
        ]
        args: list[str | int] = [repr(at), self._stamp_ms, self._latest(), *(key.text() for key in keys)]
        await self._call(self._invalidate(keys=names, args=args))

    async def postpone(self, key: Key, *, at: float) -> None:
        await self._call(self._postpone(keys=(self.schedule_key(key.action),), args=(repr(at), key.text())))

    async def lease(self, key: Key, seconds: float) -> bool:
        taken = await self._call(self._client.set(self.lease_key(key), self._token, nx=True, px=_ms(seconds)))
        return bool(taken)

    async def unlease(self, key: Key) -> None:
        await self._call(self._unlease(keys=(self.lease_key(key),), args=(self._token,)))

    async def want(self, keys: Iterable[Key], *, until: float) -> None:
        keys = list(keys)
        if not keys:
            return
        names = [
            name
            for key in keys
            for name in (self.wanted_key(key.action), self.schedule_key(key.action), self.entry_key(key))
        ]
        args = [repr(until), self._latest(), *(key.text() for key in keys)]
        await self._call(self._want(keys=names, args=args))

    async def next_due(self, action: str, *, older_than: float, lease: float, now: float) -> Key | None:
        keys = (self.schedule_key(action), self.wanted_key(action))
        args = (repr(now), repr(older_than), _ms(lease), self._token, f"{self.prefix}l:", SCAN)
        with self._unavailable():
            member = await self._next_due(keys=keys, args=args)
            if member is None:
                return None
            try:
                key = Key.from_text(cast(bytes, member).decode())
            except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
                key = None
            if key is None or key.action != action:
                # Not a key of this action: no refresh could be asked from it. Dropped, or it would
                # come back as the oldest every time.
                self._rejected(SCHEDULE, action)
                await self._forget(keys=keys, args=(member,))
                return None
            return key

    async def aclose(self) -> None:
        await self._call(self._client.aclose())
