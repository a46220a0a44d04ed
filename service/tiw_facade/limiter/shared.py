"""The limiter replicas share through Redis, with a local share of the limit while Redis is away.

Per (account, action), Redis holds a sorted set of leases: member = one attempt, score = the Redis
time (integer microseconds) at which its token comes back. Taking a token adds a member with a
provisional score (now + hold + window: a replica that dies mid-call leaks nothing for good);
releasing it lowers the score to Redis-now + window. Every decision reads Redis's clock (``TIME``)
inside the script, never a replica's: replicas' clocks differ, and a skewed one would over-issue.

Within a replica, callers queue locally (see ``_queue``) so only the head asks Redis, and it asks
again exactly when the earliest token can come back (tokens released elsewhere come back no sooner
than a window after the reply, so the reply's schedule is exact), polling a little more often only
to notice tokens other replicas hand back unused.

Exact across mode switches. Count, at every instant, the calls whose token is not back yet (from
admission until a window after the answer). While that count never exceeds the limit, no window
sees more than the limit arrive: the calls then form at most ``limit`` chains of tokens, and on one
chain the next call is admitted a window after the previous one's answer, so after its arrival.
Redis keeps the count for every replica while it answers. Each replica also keeps a ledger of its
own tokens, whichever way it took them; the modes below keep the count when Redis does not answer:

SHARED      Every admission is Redis's decision (the script above).
SUSPECT     A call failed (time-out, refused, broken connection) and Redis has not answered since.
            One failure proves little (an event loop busy for a moment, one slow reply), so callers
            wait (their deadlines still apply) and nobody is admitted locally, while a watch task
            pings Redis every SUSPECT_RETRY. An answer leads to RECOVERING. Redis is declared
            unreachable when it has not answered for ``suspicion`` seconds, or at once when a
            connection is refused: nothing listens there, which load cannot cause (a busy loop, a
            busy Redis or a full accept queue all show as time-outs).
DEGRADED    Each replica keeps to ``degraded_limit`` (limit / expected replicas), counting every
            token of its ledger, those taken through Redis included. Tokens that OTHER replicas
            took through Redis and were answered in the last window are unknown here, so the share
            starts full: no admission for one window after entering (quarantine). After it, the
            replicas together hold at most expected x share <= limit. (Tokens of calls still
            unanswered at that moment belong to their replicas' shares: see the last paragraph.)
            The watch pings every ``probe_interval``; an answer leads to RECOVERING.
RECOVERING  Redis answers again. Replicas see that at different moments, each at its own next
            ping, and until then a degraded one keeps admitting locally, unseen by Redis. So this
            replica first tells Redis every token of its ledger (the seed; from then on its releases
            go to Redis too), then admits only when BOTH Redis and its local share allow, for
            ``hold_off`` = probe_interval + timeout + HOLD_OFF_MARGIN: every degraded replica starts
            a ping within ``probe_interval`` of Redis being back (or right after a failed one, which
            takes at most ``timeout``) and seeds one round trip later; the margin covers the round
            trips and a replica whose event loop runs late. No extra window is needed: a seed holds
            the tokens released in the last window too. Then Redis's count is complete: SHARED. A
            replica that was only suspecting takes this path too (others may have degraded
            meanwhile); so after a Redis restart the seeds also put back the tokens of every
            replica that noticed it. A failure on the way: SUSPECT again.

Even an idle replica pings every ``probe_interval`` while nothing else answered, so it notices any
outage long enough for another replica to admit locally and recovers through RECOVERING too.

Not exact (documented, not fixed): Redis reachable for some replicas but not others (they use the
full shared quota while the cut-off ones use their shares); a Redis restart so short that a replica
made no Redis call during it (that replica's tokens vanish from Redis unnoticed); calls admitted
before an outage that are still unanswered a window after another replica degraded and that reach
TIW only then (counted by their own replica, which may then hold more than its share).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import itertools
import logging
import math
import random
import time
import urllib.parse
import uuid
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, cast

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from tiw_facade.limiter import Lease
from tiw_facade.limiter._ledger import BACK, HELD, LATE, RELEASED, Ledger, LocalLease
from tiw_facade.limiter._queue import Outlook, QueuedLimiter, wake

if TYPE_CHECKING:
    from tiw_facade.metrics import Metrics

log = logging.getLogger("tiw_facade.limiter")

# Everything that means "Redis is not answering properly" (redis-py wraps socket errors, but a
# few OS-level ones can surface directly).
_REDIS_ERRORS = (RedisError, OSError)

# Scores are integer microseconds of Redis's clock: exact in a Lua number (a double), and formatted
# with %.0f because Lua's default number formatting keeps only 14 digits.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
"""

# KEYS: leases, pause flag. ARGV: limit, hold_us, window_us, member.
# Reply: {1} admitted; or {0, pause_left_us, occupied, us until each known return (ascending)...}.
ACQUIRE_SCRIPT = (
    _NOW
    + """
local limit, hold, window = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now))
local occupied = redis.call('ZCARD', KEYS[1])
local paused = redis.call('PTTL', KEYS[2])
if paused < 0 then paused = 0 end
if paused == 0 and occupied < limit then
  redis.call('ZADD', KEYS[1], string.format('%.0f', now + hold + window), ARGV[4])
  local ttl = math.ceil((hold + window) / 1000) + 1000
  if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
  return {1}
end
local reply = {0, paused * 1000, occupied}
local soon = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now + window),
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
local back = now + tonumber(ARGV[2])
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) > back then
  redis.call('ZADD', KEYS[1], 'XX', string.format('%.0f', back), ARGV[1])
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
local longest = 0
for i = 1, #ARGV, 2 do
  local delay = tonumber(ARGV[i + 1])
  if delay > 0 then
    redis.call('ZADD', KEYS[1], string.format('%.0f', now + delay), ARGV[i])
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

# Ask Redis again at least this often while waiting: only tokens another replica hands back unused
# (its caller left) come back off the schedule Redis tells us.
POLL_INTERVAL = 0.05
# Never ask again sooner than this (Redis's and our clocks may disagree by a hair).
MIN_POLL = 0.001
# Replicas waiting for the same returning token all ask Redis at that instant; the first script to
# arrive wins. Without jitter that is always the same replica (the lowest round trip; measured: one
# of three got 45% of the tokens and its callers waited half as long). A random delay of up to this
# much makes each race a draw, at an expected idle cost of FAIR_JITTER / (replicas + 1) per token.
FAIR_JITTER = 0.002

# The replica's modes; the module docstring says why each exists and what it admits.
SHARED, SUSPECT, DEGRADED, RECOVERING = "shared", "suspect", "degraded", "recovering"
# How long Redis must fail to answer before this replica degrades. Several attempts fit in it (one
# every SUSPECT_RETRY, each up to the time-out), so one slow reply or one stall of this process
# never degrades it; callers wait meanwhile, which costs them at most this long.
SUSPICION = 0.5
SUSPECT_RETRY = 0.05
# Between Redis being back and every degraded replica having seeded: event-loop lag (a busy or
# CPU-starved replica pings late) and the seed's round trip.
HOLD_OFF_MARGIN = 0.5


def _refused(exc: BaseException) -> bool:
    """Whether the connection was refused (redis-py wraps the OSError; it stays in the chain)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class SharedLease(LocalLease):
    """A token of the shared limiter; mirrored in the replica's own ledger."""

    __slots__ = ("_limiter", "action", "in_redis", "member")

    def __init__(
        self,
        ledger: Ledger,
        expires_at: float,
        *,
        limiter: RedisLimiter,
        action: str,
        member: str,
        in_redis: bool,
    ) -> None:
        super().__init__(ledger, expires_at)
        self._limiter = limiter
        self.action = action
        self.member = member
        self.in_redis = in_redis  # taken through Redis, or told to Redis after an outage

    def release(self) -> None:
        if self.state == HELD:
            super().release()
            if self.in_redis:
                self._limiter._sync(self)


def redact(url: str) -> str:
    """The Redis URL without credentials or query (which may hold a password), for logs and health."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    try:
        if parts.port is not None:
            netloc += f":{parts.port}"
    except ValueError:
        pass
    return f"{parts.scheme}://{netloc}{parts.path}"


class RedisLimiter(QueuedLimiter):
    """``limit`` tokens per (account, action) for all replicas, kept in Redis; see the module docstring."""

    backend = "redis"

    def __init__(
        self,
        *,
        url: str,
        account: str,
        limit: int,
        degraded_limit: int,
        timeout: float = 0.25,
        window: float = 1.0,
        max_queue_wait: float = 5.0,
        max_queue_length: int = 1000,
        metrics: Metrics | None = None,
        poll_interval: float = POLL_INTERVAL,
        probe_interval: float = 0.25,
        suspicion: float = SUSPICION,
    ) -> None:
        super().__init__(
            limit=limit,
            window=window,
            max_queue_wait=max_queue_wait,
            max_queue_length=max_queue_length,
            metrics=metrics,
        )
        self._degraded_limit = degraded_limit
        self._poll_interval = poll_interval
        self._probe_interval = probe_interval
        self._suspicion = suspicion
        # See RECOVERING in the module docstring: by then every degraded replica has seeded.
        self._hold_off = probe_interval + timeout + HOLD_OFF_MARGIN
        self._window_us = round(window * 1_000_000)
        self._where = redact(url)
        # Short time-outs, connecting included: a slow call must not stall callers for long (a
        # failed call is retried, and only failures that persist degrade). One immediate retry on
        # a broken connection only (a pooled connection that died with a Redis restart); never on a
        # time-out, which would double the stall.
        self._client: Redis = Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1, (RedisConnectionError,)),
        )
        self._acquire_script = self._client.register_script(ACQUIRE_SCRIPT)
        self._release_script = self._client.register_script(RELEASE_SCRIPT)
        self._pause_script = self._client.register_script(PAUSE_SCRIPT)
        self._seed_script = self._client.register_script(SEED_SCRIPT)
        # Replicas of one account share keys. The account (a SecretId) is hashed: no need to
        # spell it out in Redis. The {hash tag} keeps an action's keys in one Redis Cluster slot.
        self._account_tag = hashlib.sha256(account.encode()).hexdigest()[:16]
        self._keys: dict[str, tuple[str, str]] = {}
        self._replica = uuid.uuid4().hex[:12]
        self._serial = itertools.count()
        self._ledgers: dict[str, Ledger] = {}
        self._views: dict[str, Outlook] = {}  # what Redis last said about each action
        self._mode = SHARED
        self._answered_at = 0.0  # the last reply from Redis (monotonic)
        self._failing_since = 0.0  # SUSPECT: the first failure since Redis last answered
        self._degraded_since = 0.0
        self._quarantine_until = 0.0  # no local admission before this (DEGRADED, RECOVERING)
        self._shared_at = 0.0  # RECOVERING: when Redis's count is complete again
        self._last_error = ""
        # Leases whose end Redis has not heard of (released or discarded while it was away).
        self._unsynced: dict[str, SharedLease] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._watcher: asyncio.Task[None] | None = None
        self._alarm: asyncio.Future[None] | None = None  # the watcher's current sleep
        if metrics is not None:
            metrics.limiter_degraded.set(0)

    @property
    def degraded(self) -> bool:
        return self._mode == DEGRADED

    def keys(self, action: str) -> tuple[str, str]:
        """The Redis keys of ``action``: its leases (sorted set) and its pause flag."""
        keys = self._keys.get(action)
        if keys is None:
            base = f"tiw:limiter:{{{self._account_tag}:{action}}}"
            keys = self._keys[action] = (base, base + ":pause")
        return keys

    def _ledger(self, action: str) -> Ledger:
        ledger = self._ledgers.get(action)
        if ledger is None:
            ledger = self._ledgers[action] = Ledger(self._window)
        return ledger

    def _lease(self, action: str, hold: float, now: float, *, member: str, in_redis: bool) -> SharedLease:
        ledger = self._ledger(action)
        lease = SharedLease(
            ledger, now + hold + self._window, limiter=self, action=action, member=member, in_redis=in_redis
        )
        return ledger.add(lease)

    # --- admission ---

    async def _take(self, action: str, hold: float, now: float) -> Lease | float:
        if self._watcher is None:
            self._watch_from_now()
        mode = self._current_mode(now)
        if mode == SUSPECT:
            # Wait for the watcher's verdict (it wakes the pumps); this is only a fallback.
            return now + self._suspicion
        ledger = self._ledger(action)
        member = f"{self._replica}:{next(self._serial)}"
        if mode != SHARED:
            # DEGRADED and RECOVERING: the local share, counting every token this replica holds.
            if now < self._quarantine_until:
                return self._quarantine_until
            back = ledger.room(now, self._degraded_limit)
            if back is not None:
                return back
            if mode == DEGRADED:
                return self._lease(action, hold, now, member=member, in_redis=False)
            # RECOVERING: Redis must agree too.
        call = asyncio.ensure_future(
            self._acquire_script(
                keys=self.keys(action), args=(self._limit, round(hold * 1_000_000), self._window_us, member)
            )
        )
        try:
            # Shielded: if our caller is cancelled mid-call, Redis may still admit; the callback
            # then hands that token back instead of leaving it taken for nobody until its hold ends.
            reply = cast("list[int]", await asyncio.shield(call))
        except asyncio.CancelledError:
            call.add_done_callback(functools.partial(self._orphaned, action, member))
            raise
        except _REDIS_ERRORS as exc:
            # A time-out may come after the script ran: Redis may hold this member. Note it as
            # ended, so that the seed on recovery removes it.
            ghost = SharedLease(ledger, now, limiter=self, action=action, member=member, in_redis=True)
            ghost.state = BACK
            self._unsynced[member] = ghost
            self._failed(exc)
            return time.monotonic()  # ask again: the mode says what happens now
        now = self._answered()
        ledger.occupied(now)  # keep the mirror short
        if reply[0] == 1:
            return self._lease(action, hold, now, member=member, in_redis=True)
        return self._not_yet(action, reply, now)

    def _not_yet(self, action: str, reply: list[int], now: float) -> float:
        """Note what Redis said about a full (or paused) action; when to ask again."""
        paused_us, occupied = reply[1], reply[2]
        returning = [now + delay / 1_000_000 for delay in reply[3:]]
        self._views[action] = Outlook(self._limit, returning, occupied - len(returning))
        again = now
        if paused_us > 0:
            # Another replica was throttled by TIW: honour its pause locally too, without asking.
            state = self._state(action)
            again = max(state.paused_until, now + paused_us / 1_000_000)
            state.paused_until = again
        if occupied >= self._limit:
            again = max(again, returning[0] if returning else now + self._window)
        return max(now + MIN_POLL, min(again, now + self._poll_interval)) + random.uniform(0, FAIR_JITTER)

    def _outlook(self, action: str, now: float) -> Outlook:
        if self._mode in (DEGRADED, RECOVERING):
            returning, in_flight = self._ledger(action).outlook(now)
            return Outlook(self._degraded_limit, returning, in_flight, self._quarantine_until)
        return self._views.get(action) or Outlook(self._limit, (), 0)

    def _discard(self, action: str, lease: Lease) -> None:
        assert isinstance(lease, SharedLease)
        self._ledger(action).discard(lease)
        if lease.in_redis:
            self._sync(lease)

    def _orphaned(self, action: str, member: str, call: asyncio.Future[Any]) -> None:
        if call.cancelled() or call.exception() is not None:
            return
        if call.result()[0] == 1 and not self._closed:
            self._spawn(self._forget(action, member))

    async def _forget(self, action: str, member: str) -> None:
        try:
            await self._client.zrem(self.keys(action)[0], member)
        except _REDIS_ERRORS as exc:
            self._failed(exc)

    # --- telling Redis how leases ended ---

    def _sync(self, lease: SharedLease) -> None:
        """Tell Redis the lease ended (released: back in a window; discarded: back now)."""
        if self._closed:
            return
        if self._mode in (SUSPECT, DEGRADED):
            self._unsynced[lease.member] = lease  # told with the seed, on recovery
            return
        self._spawn(self._push(lease))

    async def _push(self, lease: SharedLease) -> None:
        leases_key = self.keys(lease.action)[0]
        try:
            if lease.state == BACK:
                await self._client.zrem(leases_key, lease.member)
            else:
                await self._release_script(keys=(leases_key,), args=(lease.member, self._window_us))
        except _REDIS_ERRORS as exc:
            self._unsynced[lease.member] = lease
            self._failed(exc)
        else:
            self._answered()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        # Release is synchronous for its callers; the Redis round trip runs here, referenced until done.
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- pause ---

    def pause(self, action: str, seconds: float = 1.0) -> None:
        super().pause(action, seconds)
        if self._mode in (SHARED, RECOVERING) and not self._closed:
            self._spawn(self._pause_remote(action, seconds))

    async def _pause_remote(self, action: str, seconds: float) -> None:
        try:
            await self._pause_script(keys=(self.keys(action)[1],), args=(max(1, round(seconds * 1000)),))
        except _REDIS_ERRORS as exc:
            self._failed(exc)
        else:
            self._answered()

    # --- mode switches (see the module docstring) ---

    def _answered(self) -> float:
        now = time.monotonic()
        self._answered_at = now
        return now

    def _current_mode(self, now: float) -> str:
        if self._mode == RECOVERING and now >= self._shared_at:
            self._mode = SHARED
            log.debug("rate limiter: every replica has had time to seed Redis; shared limiting resumed")
            self._wake_pumps()  # Redis may allow more than the local share did
        return self._mode

    def _failed(self, exc: BaseException) -> None:
        if self._metrics is not None:
            self._metrics.limiter_backend_errors.inc()
        self._last_error = type(exc).__name__
        if self._closed:
            return
        now = time.monotonic()
        if self._mode in (SHARED, RECOVERING):
            self._mode = SUSPECT
            self._failing_since = now
            log.debug(
                "rate limiter: Redis at %s did not answer (%s); callers wait", self._where, self._last_error
            )
            self._watch_from_now()
        if self._mode == SUSPECT and (_refused(exc) or now - self._failing_since >= self._suspicion):
            self._degrade(now)

    def _degrade(self, now: float) -> None:
        self._mode = DEGRADED
        self._degraded_since = now
        self._quarantine_until = now + self._window
        if self._metrics is not None:
            self._metrics.limiter_degraded.set(1)
        log.warning(
            "rate limiter: Redis at %s unreachable (%s); limiting locally to %d per %gs per action "
            "until it is back, none for the first %gs (what other replicas took just now is unknown)",
            self._where,
            self._last_error,
            self._degraded_limit,
            self._window,
            self._window,
        )
        self._wake_pumps()
        self._watch_from_now()

    def _wake_pumps(self) -> None:
        for state in self._states.values():
            state.poke()

    def _watch_from_now(self) -> None:
        """Start the watcher (first use), or make it look at the mode now."""
        if self._closed:
            return
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="limiter-redis-watch")
        elif self._alarm is not None and not self._alarm.done():
            self._alarm.set_result(None)

    async def _watch(self) -> None:
        """Ping Redis: while it does not answer (to decide on degrading, then to see it back), and
        whenever nothing else has had an answer for ``probe_interval`` (so even an idle replica
        notices an outage)."""
        pinged = -math.inf
        gap = self._probe_interval
        while not self._closed:
            now = time.monotonic()
            mode = self._current_mode(now)
            if mode == SUSPECT:
                due = pinged + SUSPECT_RETRY
            elif mode == DEGRADED:
                due = pinged + gap
            else:
                due = max(pinged, self._answered_at) + self._probe_interval
                if mode == RECOVERING:
                    due = min(due, self._shared_at)  # then _current_mode switches to SHARED
            if now < due:
                await self._nap(due - now)
                continue
            pinged = now
            # Degraded replicas probe at random points of the interval, never later than its end
            # (which RECOVERING's hold-off counts on): replicas that lost Redis together do not all
            # reconnect at the same instant.
            gap = self._probe_interval * random.uniform(0.5, 1.0)
            try:
                await self._client.ping()
            except _REDIS_ERRORS as exc:
                self._failed(exc)
                continue
            self._answered()
            if self._mode in (SUSPECT, DEGRADED):
                await self._recover()

    async def _nap(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        self._alarm = loop.create_future()
        handle = loop.call_later(seconds, wake, self._alarm)
        try:
            await self._alarm
        finally:
            handle.cancel()
            self._alarm = None

    async def _recover(self) -> None:
        """Redis answers again: seed it, then keep to the local share for ``hold_off`` (RECOVERING)."""
        was = self._mode
        self._mode = RECOVERING
        self._shared_at = math.inf  # until the seed has landed
        if was == DEGRADED and self._metrics is not None:
            self._metrics.limiter_degraded.set(0)
        try:
            await self._seed()
        except _REDIS_ERRORS as exc:
            self._failed(exc)
            return
        if self._mode != RECOVERING:
            return  # another call failed meanwhile: suspect again; the watcher tries again
        now = self._answered()
        self._shared_at = now + self._hold_off
        if was == DEGRADED:
            log.info(
                "rate limiter: Redis at %s reachable again after %.1fs; shared limiting resumes in %.1fs",
                self._where,
                now - self._degraded_since,
                self._hold_off,
            )
        else:
            log.debug(
                "rate limiter: Redis at %s answers again after %.2fs; shared limiting resumes in %.1fs",
                self._where,
                now - self._failing_since,
                self._hold_off,
            )
        self._wake_pumps()

    async def _seed(self) -> None:
        """Tell Redis every token this replica holds or released within a window, and which ended."""
        now = time.monotonic()
        leases: dict[str, SharedLease] = {}
        for ledger in self._ledgers.values():
            ledger.occupied(now)
            for lease in ledger.leases():
                assert isinstance(lease, SharedLease)
                leases[lease.member] = lease
        leases.update(self._unsynced)
        self._unsynced = {}
        by_action: dict[str, list[str | int]] = {}
        for lease in leases.values():
            if lease.state in (HELD, LATE):
                back = lease.expires_at
            elif lease.state == RELEASED:
                back = lease.return_at
            else:
                back = now  # already back: remove it
            by_action.setdefault(lease.action, []).extend((lease.member, round((back - now) * 1_000_000)))
            # From now on its release goes to Redis (if this seed fails, it is re-seeded next time).
            lease.in_redis = True
        try:
            for action, args in by_action.items():
                await self._seed_script(keys=(self.keys(action)[0],), args=args)
        except BaseException:
            for member, lease in leases.items():
                self._unsynced.setdefault(member, lease)
            raise

    def health(self) -> dict[str, object]:
        now = time.monotonic()
        mode = self._current_mode(now)
        share = f"{self._degraded_limit} per {self._window:g}s per action"
        if mode == DEGRADED:
            detail = (
                f"Redis at {self._where} unreachable for {now - self._degraded_since:.0f}s "
                f"({self._last_error}); local share: {share}"
            )
        elif mode == SUSPECT:
            detail = (
                f"Redis at {self._where} not answering for {now - self._failing_since:.1f}s "
                f"({self._last_error}); callers wait"
            )
        elif mode == RECOVERING:
            detail = (
                f"Redis at {self._where} reachable again; local share ({share}) until every replica "
                "has told it what it holds"
            )
        else:
            detail = f"shared through Redis at {self._where}: {self._limit} per {self._window:g}s per action"
        return {"backend": self.backend, "degraded": mode == DEGRADED, "detail": detail}

    async def aclose(self) -> None:
        await super().aclose()
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
            self._watcher = None
        if self._tasks:
            # Let releases in flight land, so the other replicas get those tokens back on time.
            await asyncio.wait(set(self._tasks), timeout=1.0)
        await self._client.aclose()
