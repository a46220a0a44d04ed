"""What the shared limiter keeps in Redis, and the only code that talks to Redis.

Per account (one Redis Cluster slot: every key carries the same {hash tag}):

``...:<action>``        sorted set of leases: member = one attempt, score = the Redis time (integer
                        microseconds) at which its token comes back.
``...:<action>:pause``  a flag whose TTL is what is left of a pause TIW asked for.
``...:replicas``        sorted set of registered replicas: score = the Redis time of the last
                        heartbeat that landed. Silent ones (no heartbeat for ``silent_after``) may be
                        cut off from Redis and admitting their local share: admissions through Redis
                        leave room for that share. Entries silent for ``lifetime`` are dropped.
``...:epoch``           hash {id, born}: which incarnation of this state Redis holds. Missing or
                        different from what a replica was told: Redis lost its state (a restart).
                        Malformed (no id, ``born`` not an integer time no later than Redis's clock
                        allows, not a hash), or another key of the account's of the wrong type
                        (which would fail every script with WRONGTYPE): deleted and treated as
                        lost, so that every replica re-seeds and a new epoch is born; never a
                        reason to refuse admissions.

Every decision reads Redis's clock (``TIME``) inside a script, never a replica's: replicas' clocks
differ, and a skewed one would over-issue. Replies are parsed here into the types below.
See docs/limiter.md for why each rule keeps the fleet at or under the limit.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Sequence
from typing import Protocol, cast

from tiw_facade import shared_redis
from tiw_facade.limiter._ledger import Clock

STORE_ERRORS = shared_redis.ERRORS

US = 1_000_000

# Scores are integer microseconds of Redis's clock: exact in a Lua number (a double), and formatted
# with %.0f because Lua's default number formatting keeps only 14 digits.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function us(x) return string.format('%.0f', x) end
"""

# Redis's clock may step back a little (NTP) between the epoch's birth and now; a birth later than
# this was not written by a heartbeat (a forged one would hold every admission off until then).
BORN_TOLERANCE_US = 5 * US
# The epoch as (id, born), or nil after deleting it when malformed (third value true): a heartbeat
# then creates a new one, and every replica re-seeds as after a restart. tonumber(nil) comparisons
# would otherwise fail the script on every call, or a garbage birth refuse admissions forever.
_EPOCH = f"""
local function read_epoch(key)
  local kind = redis.call('TYPE', key)['ok']
  if kind == 'none' then return nil, nil, false end
  if kind == 'hash' then
    local e = redis.call('HMGET', key, 'id', 'born')
    local born = tonumber(e[2])
    if e[1] and e[1] ~= '' and born and born == math.floor(born) and born >= 0
        and born <= now + {BORN_TOLERANCE_US} then
      return e[1], born, false
    end
  end
  redis.call('DEL', key)
  return nil, nil, true
end
-- Each of ``keys`` absent or of its type in ``types`` ('zset', 'string'); else it is deleted, with
-- the epoch (``epoch``): the state is not what the scripts wrote, so it counts as lost.
local function well_typed(epoch, keys, types)
  local ok = true
  for i = 1, #keys do
    local kind = redis.call('TYPE', keys[i])['ok']
    if kind ~= 'none' and kind ~= types[i] then
      redis.call('DEL', keys[i])
      ok = false
    end
  end
  if not ok then redis.call('DEL', epoch) end
  return ok
end
"""

# KEYS: leases, pause, replicas, epoch.
# ARGV: limit, hold_us, window_us, member, epoch, hold_off_us, share, expected, silent_us, lifetime_us,
# reserve (admit only if that many tokens stay free after this one: spare grants; 0 for callers).
# Reply: {1} admitted; {2} epoch lost; {4} epoch malformed (deleted: lost too); {3, us until the
# epoch is settled}; or {0, pause_left_us, occupied, capacity (without the reserve), us until each
# known return...}.
ACQUIRE_SCRIPT = (
    _NOW
    + _EPOCH
    + """
local limit, hold, window = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if not well_typed(KEYS[4], {KEYS[1], KEYS[2], KEYS[3]}, {'zset', 'string', 'zset'}) then return {4} end
local id, born, malformed = read_epoch(KEYS[4])
if malformed then return {4} end
if id ~= ARGV[5] then return {2} end
local settled = born + tonumber(ARGV[6])
if now < settled then return {3, settled - now} end
-- Room for the local share of every replica that may be cut off: registered but silent, and
-- while a registration lost with Redis's state could still be in use, every expected one unseen.
local share, expected = tonumber(ARGV[7]), tonumber(ARGV[8])
local silent_us, lifetime_us = tonumber(ARGV[9]), tonumber(ARGV[10])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. us(now - lifetime_us))
local registered = redis.call('ZCARD', KEYS[3])
local away = registered - redis.call('ZCOUNT', KEYS[3], us(now - silent_us), '+inf')
if now - born < lifetime_us and expected - registered > 0 then
  away = away + expected - registered
end
local capacity = limit - share * away
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', us(now))
local occupied = redis.call('ZCARD', KEYS[1])
local paused = redis.call('PTTL', KEYS[2])
if paused < 0 then paused = 0 end
if paused == 0 and occupied < capacity - tonumber(ARGV[11]) then
  redis.call('ZADD', KEYS[1], us(now + hold + window), ARGV[4])
  local ttl = math.ceil((hold + window) / 1000) + 1000
  if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
  return {1}
end
local reply = {0, paused * 1000, occupied, capacity}
local soon = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', us(now + window),
  'WITHSCORES', 'LIMIT', 0, limit)
for i = 2, #soon, 2 do reply[#reply + 1] = tonumber(soon[i]) - now end
return reply
"""
)

# KEYS: leases. ARGV: member, window_us. The answer came: the token is back one window from now,
# never later than its provisional time (a late release must not extend it).
RELEASE_SCRIPT = (
    _NOW
    + """
if redis.call('TYPE', KEYS[1])['ok'] ~= 'zset' then return 0 end  -- gone, or ACQUIRE's to mend
local back = now + tonumber(ARGV[2])
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) > back then
  redis.call('ZADD', KEYS[1], 'XX', us(back), ARGV[1])
  return 1
end
return 0
"""
)

# KEYS: pause flag. ARGV: ms. The flag's TTL is the pause left; a pause never shortens another.
PAUSE_SCRIPT = """
local ms = tonumber(ARGV[1])
if redis.call('PTTL', KEYS[1]) < ms then redis.call('SET', KEYS[1], '1', 'PX', ms) end
return 0
"""

# KEYS: leases. ARGV: member, us from now until its token comes back (<= 0: already back), ...
# After an outage: what this replica holds or released meanwhile, in Redis's clock.
SEED_SCRIPT = (
    _NOW
    + """
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'zset' and kind ~= 'none' then return 0 end  -- ACQUIRE's to mend (the epoch goes too)
local longest = 0
for i = 1, #ARGV, 2 do
  local delay = tonumber(ARGV[i + 1])
  if delay > 0 then
    redis.call('ZADD', KEYS[1], us(now + delay), ARGV[i])
    if delay > longest then longest = delay end
  else
    redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
local ttl = math.ceil(longest / 1000) + 1000
if longest > 0 and redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return 0
"""
)

# KEYS: replicas, epoch. ARGV: replica, epoch (what the replica was told; '' to adopt whatever Redis
# has, creating it as ARGV[3] if missing), new epoch id, lifetime_us, refresh_until (Redis us; 0: no
# limit). Registers the replica unless the call runs after refresh_until (a call its replica gave
# up on must not register it later than the replica can know). Reply: {epoch id, registered, now,
# 1 if a malformed epoch was deleted}.
HEARTBEAT_SCRIPT = (
    _NOW
    + _EPOCH
    + """
local typed = well_typed(KEYS[2], {KEYS[1]}, {'zset'})
local id, born, malformed = read_epoch(KEYS[2])
local dropped = (malformed or not typed) and 1 or 0
if ARGV[2] == '' then
  if not id then
    id = ARGV[3]
    redis.call('HSET', KEYS[2], 'id', id, 'born', us(now))
  end
elseif id ~= ARGV[2] then
  return {id or '', 0, us(now), dropped}
end
local until_us = tonumber(ARGV[5])
if until_us > 0 and now > until_us then return {id, 0, us(now), dropped} end
redis.call('ZADD', KEYS[1], us(now), ARGV[1])
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[4]) / 1000) + 1000)
return {id, 1, us(now), dropped}
"""
)


@dataclasses.dataclass(frozen=True, slots=True)
class Admitted:
    """Redis took the token."""


@dataclasses.dataclass(frozen=True, slots=True)
class Full:
    """No token now. Durations in seconds from the reply."""

    pause_left: float  # another replica was throttled by TIW
    occupied: int
    capacity: int  # the limit less the room kept for replicas that may be cut off
    returning: Sequence[float]  # when known tokens come back, ascending


@dataclasses.dataclass(frozen=True, slots=True)
class EpochLost:
    """Redis no longer holds the state this replica knew (it restarted): re-seed, re-join."""

    malformed: bool = False  # the epoch was not one a heartbeat writes: deleted (then lost too)


@dataclasses.dataclass(frozen=True, slots=True)
class Settling:
    """Redis's state is younger than the hold-off: replicas may still be re-seeding it."""

    ready_in: float


AcquireReply = Admitted | Full | EpochLost | Settling


@dataclasses.dataclass(frozen=True, slots=True)
class Beat:
    """A heartbeat's answer."""

    epoch: str  # Redis's epoch ('' if none)
    registered: bool  # False: the epoch was not ours (or the call ran too late)
    malformed: bool = False  # Redis held an epoch no heartbeat writes: deleted (a new one may be born)


@dataclasses.dataclass(frozen=True, slots=True)
class Tuning:
    """The numbers the scripts need besides the call's own."""

    limit: int
    share: int  # a replica's local share while cut off (degraded_limit)
    expected: int  # replicas expected to share the quota
    window: float
    silent_after: float  # a registration not refreshed for this long may be a cut-off replica
    lifetime: float  # ... and is dropped after this long
    hold_off: float  # a new epoch admits nothing for this long (replicas re-seed meanwhile)


class Store(Protocol):
    """What the shared limiter needs from Redis (a fake one in virtual-time tests)."""

    replica: str

    async def acquire(self, action: str, member: str, hold: float, epoch: str) -> AcquireReply: ...
    async def spare(self, action: str, member: str, hold: float, epoch: str, reserve: int) -> AcquireReply:
        """``acquire``, only if at least ``reserve`` tokens stay free (fleet-wide) after this one."""
        ...

    async def release(self, action: str, member: str) -> None: ...
    async def forget(self, action: str, member: str) -> None: ...
    async def pause(self, action: str, seconds: float) -> None: ...
    async def seed(self, action: str, returns: Sequence[tuple[str, float]]) -> None: ...
    async def heartbeat(self, epoch: str, *, sent_at: float) -> Beat: ...
    async def ping(self) -> None: ...
    async def deregister(self) -> None: ...
    async def aclose(self) -> None: ...


class RedisStore:
    """``Store`` on a real Redis (redis-py asyncio)."""

    def __init__(
        self,
        client: shared_redis.Client,
        account: str,
        tuning: Tuning,
        *,
        timeout: float,
        clock: Clock = time.monotonic,
    ) -> None:
        self.replica = uuid.uuid4().hex[:12]
        self._clock = clock
        self._tuning = tuning
        self._timeout = timeout  # the client's (shared_redis.connect): bounds when a heartbeat lands
        self._client = client
        self._acquire = self._client.register_script(ACQUIRE_SCRIPT)
        self._release = self._client.register_script(RELEASE_SCRIPT)
        self._pause = self._client.register_script(PAUSE_SCRIPT)
        self._seed = self._client.register_script(SEED_SCRIPT)
        self._heartbeat = self._client.register_script(HEARTBEAT_SCRIPT)
        self.prefix = shared_redis.prefix("limiter", account)  # replicas of one account share keys
        self._replicas_key = self.prefix + ":replicas"
        self._epoch_key = self.prefix + ":epoch"
        # Redis's clock minus ours, as last measured (never more than the truth: Redis read its
        # clock before we received the reply). None until measured.
        self._offset: float | None = None
        t = tuning
        self._acquire_args = (
            round(t.window * US),
            round(t.hold_off * US),
            t.share,
            t.expected,
            round(t.silent_after * US),
            round(t.lifetime * US),
        )

    def leases_key(self, action: str) -> str:
        return f"{self.prefix}:{action}"

    async def acquire(self, action: str, member: str, hold: float, epoch: str) -> AcquireReply:
        return await self._admit(action, member, hold, epoch, 0)

    async def spare(self, action: str, member: str, hold: float, epoch: str, reserve: int) -> AcquireReply:
        return await self._admit(action, member, hold, epoch, reserve)

    async def _admit(self, action: str, member: str, hold: float, epoch: str, reserve: int) -> AcquireReply:
        window_us, hold_off_us, share, expected, silent_us, lifetime_us = self._acquire_args
        keys = (
            self.leases_key(action),
            self.leases_key(action) + ":pause",
            self._replicas_key,
            self._epoch_key,
        )
        args = (self._tuning.limit, round(hold * US), window_us, member, epoch, hold_off_us, share, expected)
        reply = cast(
            "list[int]", await self._acquire(keys=keys, args=(*args, silent_us, lifetime_us, reserve))
        )
        code = reply[0]
        if code == 1:
            return Admitted()
        if code == 2:
            return EpochLost()
        if code == 4:
            return EpochLost(malformed=True)
        if code == 3:
            return Settling(reply[1] / US)
        return Full(reply[1] / US, reply[2], reply[3], tuple(delay / US for delay in reply[4:]))

    async def release(self, action: str, member: str) -> None:
        await self._release(keys=(self.leases_key(action),), args=(member, round(self._tuning.window * US)))

    async def forget(self, action: str, member: str) -> None:
        await self._client.zrem(self.leases_key(action), member)

    async def pause(self, action: str, seconds: float) -> None:
        await self._pause(keys=(self.leases_key(action) + ":pause",), args=(max(1, round(seconds * 1000)),))

    async def seed(self, action: str, returns: Sequence[tuple[str, float]]) -> None:
        args: list[str | int] = []
        for member, delay in returns:
            args += (member, round(delay * US))
        await self._seed(keys=(self.leases_key(action),), args=args)

    async def heartbeat(self, epoch: str, *, sent_at: float) -> Beat:
        """Register (refresh) this replica, adopting Redis's epoch when ``epoch`` is ''.

        ``sent_at`` is the caller's clock as it sends: the registration must not land later than
        ``sent_at + timeout`` in the caller's clock, which Redis checks against its own clock
        through the measured offset (a time-out may leave the script queued in Redis).
        """
        if self._offset is None:
            await self._measure()
        assert self._offset is not None
        refresh_until = round((sent_at + self._timeout + self._offset) * US)
        keys = (self._replicas_key, self._epoch_key)
        args = (self.replica, epoch, uuid.uuid4().hex, round(self._tuning.lifetime * US), refresh_until)
        raw = cast("list[bytes | int]", await self._heartbeat(keys=keys, args=args))
        self._offset = int(raw[2]) / US - self._clock()
        epoch_id = raw[0].decode() if isinstance(raw[0], bytes) else str(raw[0])
        return Beat(epoch_id, raw[1] == 1, len(raw) > 3 and raw[3] == 1)

    async def _measure(self) -> None:
        seconds, micros = await self._client.time()
        self._offset = seconds + micros / US - self._clock()

    async def ping(self) -> None:
        # A command on one of the account's keys, not PING: on a Redis Cluster PING reaches any live
        # node, so while the primary of the account's slot is down it succeeded, and the degraded
        # limiter rejoined and fell back every ~0.1 s, its local share never admitting anything.
        await self._client.exists(self._epoch_key)

    async def deregister(self) -> None:
        await self._client.zrem(self._replicas_key, self.replica)

    async def aclose(self) -> None:
        await self._client.aclose()
