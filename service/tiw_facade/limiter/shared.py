"""The limiter replicas share through Redis, with a local share of the limit while Redis is away.

Redis keeps every replica's tokens (``_store``); this replica asks it for each admission and keeps a
ledger of its own tokens too, whichever way it took them, so that it can carry on (and later tell
Redis what it did) while Redis does not answer. Its mode (``_modes``) says which of the two decides:

SHARED      Redis. SUSPECT: a call failed and Redis has not answered since: nobody is admitted while
the watcher pings. DEGRADED: Redis unreachable: the local share, within the limits that keep it
exact (a quarantine first, and only while this replica's registration in Redis keeps room for it).
RECOVERING: Redis answers again: tell it every token held, then both must agree for a hold-off.

Within a replica, callers queue locally (see ``_queue``) so only the head asks Redis, and it asks
again exactly when the earliest token can come back, polling a little more often only to notice
tokens other replicas hand back unused. docs/limiter.md gives the whole argument for exactness.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import math
import random
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from tiw_facade import background, shared_redis
from tiw_facade.limiter import CallerObserver, Lease
from tiw_facade.limiter._ledger import BACK, HELD, LATE, RELEASED, Clock, Ledger, LocalLease
from tiw_facade.limiter._modes import Machine, Mode
from tiw_facade.limiter._queue import Granted, Outlook, QueuedLimiter, RetryAt, Taken, wake
from tiw_facade.limiter._store import (
    STORE_ERRORS,
    Admitted,
    Beat,
    EpochLost,
    Full,
    RedisStore,
    Settling,
    Store,
    Tuning,
)
from tiw_facade.shared_redis import Target, redact

if TYPE_CHECKING:
    from tiw_facade.metrics import Metrics

__all__ = ["RedisLimiter", "SharedLease", "redact"]

log = logging.getLogger("tiw_facade.limiter")

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
# How long Redis must fail to answer before this replica degrades. Several attempts fit in it (one
# every SUSPECT_RETRY, each up to the time-out), so one slow reply or one stall of this process
# never degrades it; callers wait meanwhile, which costs them at most this long.
SUSPICION = 0.5
SUSPECT_RETRY = 0.05
# Between Redis being back and every degraded replica having seeded: event-loop lag (a busy or
# CPU-starved replica pings late) and the seed's round trip.
HOLD_OFF_MARGIN = 0.5
# A registration not refreshed for this long belongs to a replica that may be cut off from Redis
# (heartbeats go every probe interval, so a live replica misses several before it looks silent).
SILENT_AFTER = 1.0
# A silent registration is dropped after this long (a crashed replica's share comes back); a
# replica cut off that long has stopped admitting by then.
LIFETIME = 120.0
# One warning per this long about a malformed epoch in Redis (the metric counts every one): a
# tampered or broken Redis must not flood the log.
INVALID_WARN_EVERY = 60.0


def _connection_refused(exc: BaseException) -> bool:
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


class RedisLimiter(QueuedLimiter):
    """``limit`` tokens per (account, action) for all replicas, kept in Redis; see the module docstring."""

    backend = "redis"

    def __init__(
        self,
        *,
        url: str = "",
        target: Target | None = None,
        account: str,
        limit: int,
        degraded_limit: int,
        expected_replicas: int = 1,
        timeout: float = 0.25,
        window: float = 1.0,
        max_queue_wait: float = 5.0,
        max_queue_length: int = 1000,
        metrics: Metrics | None = None,
        observer: CallerObserver | None = None,
        poll_interval: float = POLL_INTERVAL,
        probe_interval: float = 0.25,
        suspicion: float = SUSPICION,
        silent_after: float = SILENT_AFTER,
        lifetime: float = LIFETIME,
        clock: Clock = time.monotonic,
        store: Store | None = None,
        watch: bool = True,
    ) -> None:
        super().__init__(
            limit=limit,
            window=window,
            max_queue_wait=max_queue_wait,
            max_queue_length=max_queue_length,
            metrics=metrics,
            observer=observer,
            clock=clock,
        )
        self._share = degraded_limit
        self._timeout = timeout
        self._poll_interval = poll_interval
        self._probe_interval = probe_interval
        self._suspicion = suspicion
        self._silent_after = silent_after
        self._lifetime = lifetime
        # RECOVERING lasts this long: every degraded replica pings within a probe interval of Redis
        # being back (or right after a failed ping, which takes at most the time-out) and seeds one
        # round trip later; the margin covers the round trips and a replica whose loop runs late.
        self._hold_off = probe_interval + timeout + HOLD_OFF_MARGIN
        where = target or Target(url, timeout)  # a bare URL: the common case, and the tests'
        self._where = where.where
        tuning = Tuning(
            limit, degraded_limit, expected_replicas, window, silent_after, lifetime, self._hold_off
        )
        self.store: Store = store or RedisStore(
            shared_redis.connect(where), account, tuning, timeout=timeout, clock=clock
        )
        self._serial = itertools.count()
        self._ledgers: dict[str, Ledger] = {}
        self._views: dict[str, Outlook] = {}  # what Redis last said about each action
        self._epoch = ""  # Redis's epoch as last told ('' before joining)
        self._invalid_warned_at = -math.inf
        # The latest moment a registration of ours may have landed in Redis (our clock), and when the
        # last one that did was sent: they bound when others leave room for us (docs/limiter.md).
        self._beat_bound = -math.inf
        self._beat_sent = -math.inf
        self._unsynced: dict[str, SharedLease] = {}  # leases whose end Redis has not heard of
        self._tasks: set[asyncio.Task[None]] = set()
        self._autowatch = watch  # False: the caller drives look() (virtual-time tests)
        self._watcher: asyncio.Task[None] | None = None
        self._alarm: asyncio.Future[None] | None = None  # the watcher's current sleep
        facts: dict[str, object] = {
            "where": self._where,
            "share": degraded_limit,
            "window": window,
            "hold_off": self._hold_off,
            "error": "",
        }
        self._machine = Machine(gauge=self._metrics.limiter_degraded, wake=self._wake, facts=facts)

    @property
    def degraded(self) -> bool:
        return self._machine.effective(self._clock()).degraded

    @property
    def mode(self) -> Mode:
        return self._machine.effective(self._clock())

    def _ledger(self, action: str) -> Ledger:
        ledger = self._ledgers.get(action)
        if ledger is None:
            ledger = self._ledgers[action] = Ledger(self._window, self._clock)
        return ledger

    def _lease(self, action: str, hold: float, now: float, *, member: str, in_redis: bool) -> Granted:
        ledger = self._ledger(action)
        expires_at = now + hold + self._window
        lease = SharedLease(ledger, expires_at, limiter=self, action=action, member=member, in_redis=in_redis)
        return Granted(ledger.add(lease))

    # --- admission ---

    async def _take(self, action: str, hold: float, now: float, reserve: int = 0) -> Taken:
        if self._watcher is None and self._autowatch:
            self._watch_from_now()
        mode = self._machine.settle(now)
        if not mode.admits:
            return RetryAt(now + self._suspicion)  # the watcher's verdict wakes the pumps sooner
        ledger = self._ledger(action)
        member = f"{self.store.replica}:{next(self._serial)}"
        if mode.local_share:
            not_yet = self._local_room(mode, ledger, hold, now, reserve)
            if not_yet is not None:
                return not_yet
            if not mode.asks_redis:
                return self._lease(action, hold, now, member=member, in_redis=False)
        if not self._epoch:  # first use: register and learn the epoch
            try:
                await self._beat("")
            except STORE_ERRORS as exc:
                self._failed(exc)
                return RetryAt(self._clock())
            now = self._clock()
        asking = (
            self.store.spare(action, member, hold, self._epoch, reserve)
            if reserve
            else self.store.acquire(action, member, hold, self._epoch)
        )
        call = asyncio.ensure_future(asking)
        try:
            # Shielded: if our caller is cancelled mid-call, Redis may still admit; the callback
            # then hands that token back instead of leaving it taken for nobody until its hold ends.
            reply = await asyncio.shield(call)
        except asyncio.CancelledError:
            call.add_done_callback(functools.partial(self._orphaned, action, member))
            raise
        except STORE_ERRORS as exc:
            # A time-out may come after the script ran: Redis may hold this member. Note it as
            # ended, so that the seed on recovery removes it.
            ghost = SharedLease(ledger, now, limiter=self, action=action, member=member, in_redis=True)
            ghost.state = BACK
            self._unsynced[member] = ghost
            self._failed(exc)
            return RetryAt(self._clock())  # ask again: the mode says what happens now
        now = self._clock()
        ledger.occupied(now)  # keep the mirror short
        if isinstance(reply, Admitted):
            return self._lease(action, hold, now, member=member, in_redis=True)
        if isinstance(reply, Full):
            return RetryAt(self._not_yet(action, reply, now, reserve))
        if isinstance(reply, Settling):
            # Estimates for the callers that queue meanwhile: nothing before the state settles.
            self._views[action] = Outlook(self._limit, (), 0, now + reply.ready_in)
            return RetryAt(now + reply.ready_in)
        if isinstance(reply, EpochLost) and reply.malformed:
            self._malformed_epoch()
        self._lose_epoch(now)
        return RetryAt(now + self._hold_off)  # the rejoin wakes the pumps

    def _local_room(
        self, mode: Mode, ledger: Ledger, hold: float, now: float, reserve: int
    ) -> RetryAt | None:
        stamps = self._machine.stamps
        if now < stamps.local_from:
            return RetryAt(stamps.local_from)
        if not mode.asks_redis and now + hold + self._window > stamps.local_until:
            # Our registration lapses before this token would be back: others stop leaving room
            # for us then. Nothing locally until Redis answers (the watcher wakes the pumps).
            return RetryAt(now + self._probe_interval)
        back = ledger.room(now, self._share - reserve)
        return None if back is None else RetryAt(back)

    def _not_yet(self, action: str, reply: Full, now: float, reserve: int) -> float:
        """Note what Redis said about a full (or paused) action; when to ask again."""
        returning = [now + delay for delay in reply.returning]
        capacity = max(1, reply.capacity)
        self._views[action] = Outlook(capacity, returning, reply.occupied - len(returning))
        again = now
        if reply.pause_left > 0:
            # Another replica was throttled by TIW: honour its pause locally too, without asking.
            state = self._state(action)
            again = max(state.paused_until, now + reply.pause_left)
            state.paused_until = again
        excess = reply.occupied - (reply.capacity - reserve)
        if excess >= 0:
            again = max(again, returning[excess] if excess < len(returning) else now + self._window)
        return max(now + MIN_POLL, min(again, now + self._poll_interval)) + random.uniform(0, FAIR_JITTER)

    def _outlook(self, action: str, now: float) -> Outlook:
        mode = self._machine.effective(now)
        if mode.local_share:
            returning, in_flight = self._ledger(action).outlook(now)
            not_before = self._machine.stamps.local_from
            if not mode.asks_redis and self._machine.stamps.local_until < now + self._window:
                not_before = now + self._window  # stopped until Redis is back: a guess
            return Outlook(self._share, returning, in_flight, not_before)
        return self._views.get(action) or Outlook(self._limit, (), 0)

    def _discard(self, action: str, lease: Lease) -> None:
        assert isinstance(lease, SharedLease)
        self._ledger(action).discard(lease)
        if lease.in_redis:
            self._sync(lease)

    def _orphaned(self, action: str, member: str, call: asyncio.Future[Any]) -> None:
        if call.cancelled() or call.exception() is not None:
            return
        if isinstance(call.result(), Admitted) and not self._closed:
            self._spawn(self._forget(action, member))

    async def _forget(self, action: str, member: str) -> None:
        try:
            await self.store.forget(action, member)
        except STORE_ERRORS as exc:
            self._failed(exc)
        else:
            self._returned(action)

    # --- telling Redis how leases ended, and pauses ---

    def _sync(self, lease: SharedLease) -> None:
        """Tell Redis the lease ended (released: back in a window; discarded: back now)."""
        if self._closed:
            return
        if not self._machine.mode.tells_redis:
            self._unsynced[lease.member] = lease  # told with the seed, on recovery
            return
        self._spawn(self._push(lease))

    async def _push(self, lease: SharedLease) -> None:
        try:
            if lease.state == BACK:
                await self.store.forget(lease.action, lease.member)
                self._returned(lease.action)
            else:
                await self.store.release(lease.action, lease.member)
        except STORE_ERRORS as exc:
            self._unsynced[lease.member] = lease
            self._failed(exc)

    def _returned(self, action: str) -> None:
        """A token is back in Redis out of schedule (handed back unused): our pump may take it now,
        rather than when it next polls."""
        state = self._states.get(action)
        if state is not None:
            state.poke()

    def pause(self, action: str, seconds: float = 1.0) -> None:
        super().pause(action, seconds)
        if self._machine.mode.tells_redis and not self._closed:
            self._spawn(self._call(self.store.pause(action, seconds)))

    async def _call(self, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except STORE_ERRORS as exc:
            self._failed(exc)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        # Release is synchronous for its callers; the Redis round trip runs here, referenced until done.
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- mode switches (docs/limiter.md) ---

    def _failed(self, exc: BaseException) -> None:
        self._metrics.limiter_backend_errors.labels(kind=shared_redis.classify(exc)).inc()
        self._machine.facts["error"] = shared_redis.describe(exc)
        if self._closed:
            return
        now = self._clock()
        if self._machine.mode.asks_redis:
            self._machine.enter(Mode.SUSPECT, now, failing_since=now)
        stamps = self._machine.stamps
        if self._machine.mode is Mode.SUSPECT and (
            _connection_refused(exc) or now - stamps.failing_since >= self._suspicion
        ):
            # Others leave room for our share from a silence after our last registration; what
            # they took before that is back a window later (docs/limiter.md: "Partition").
            local_from = max(now, self._beat_bound + self._silent_after) + self._window
            self._machine.enter(
                Mode.DEGRADED,
                now,
                degraded_since=now,
                local_from=local_from,
                local_until=self._beat_sent + self._lifetime,
            )

    def _malformed_epoch(self) -> None:
        """Redis held an epoch no heartbeat writes; the script deleted it: count it, and say so."""
        self._metrics.store_invalid.labels(role="limiter", what="epoch").inc()
        now = self._clock()
        if now >= self._invalid_warned_at + INVALID_WARN_EVERY:
            self._invalid_warned_at = now
            log.warning(
                "rate limiter: Redis at %s held a malformed epoch (see tiw_store_invalid_total); "
                "dropped it: every replica re-seeds as after a restart",
                self._where,
            )

    def _lose_epoch(self, now: float) -> None:
        """Redis lost its state (restarted): re-seed it and re-join, as on recovery."""
        if self._machine.mode is not Mode.RECOVERING or self._machine.stamps.shared_at < math.inf:
            self._machine.enter(Mode.RECOVERING, now, failing_since=now, shared_at=math.inf)

    def _wake(self) -> None:
        for state in self._states.values():
            state.poke()
        if self._alarm is not None and not self._alarm.done():
            self._alarm.set_result(None)

    def _watch_from_now(self) -> None:
        """Start the watcher (first use), or make it look at the mode now."""
        if self._closed:
            return
        if self._watcher is None and self._autowatch:
            self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="limiter-redis-watch")
        else:
            self._wake()

    def _due(self, mode: Mode, last: float, gap: float) -> float:
        """When the watcher looks next (``last``: its last look)."""
        stamps = self._machine.stamps
        if mode is Mode.SUSPECT:
            return last + SUSPECT_RETRY
        if mode is Mode.DEGRADED:
            return last + gap
        if mode is Mode.RECOVERING and stamps.shared_at == math.inf:
            return last + SUSPECT_RETRY  # the seed is still to land
        if mode is Mode.RECOVERING:
            return min(last + self._probe_interval, stamps.shared_at)
        return last + self._probe_interval  # heartbeats: even an idle replica notices an outage

    async def _watch(self) -> None:
        last = -math.inf
        gap = self._probe_interval
        while not self._closed:
            now = self._clock()
            mode = self._machine.settle(now)
            due = self._due(mode, last, gap)
            if now < due:
                await self._nap(due - now)
                continue
            last = now
            # Degraded replicas probe at random points of the interval, never later than its end
            # (which RECOVERING's hold-off counts on): replicas that lost Redis together do not all
            # reconnect at the same instant.
            gap = self._probe_interval * random.uniform(0.5, 1.0)
            await self.look(mode)

    async def look(self, mode: Mode) -> None:
        """One step of the watcher: heartbeat, or ping and recover, or finish a recovery."""
        try:
            if mode is Mode.RECOVERING and self._machine.stamps.shared_at == math.inf:
                await self._rejoin()
            elif mode.beats:
                beat = await self._beat(self._epoch)
                if not beat.registered and beat.epoch != self._epoch:
                    self._lose_epoch(self._clock())
            else:
                await self.store.ping()
                self._machine.enter(Mode.RECOVERING, self._clock(), shared_at=math.inf)
                await self._rejoin()
        except STORE_ERRORS as exc:
            self._failed(exc)

    async def _nap(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        self._alarm = loop.create_future()
        handle = loop.call_later(seconds, wake, self._alarm)
        try:
            await self._alarm
        finally:
            handle.cancel()
            self._alarm = None

    async def _beat(self, epoch: str) -> Beat:
        """Refresh our registration (adopting Redis's epoch when ``epoch`` is '')."""
        sent = self._clock()
        try:
            beat = await self.store.heartbeat(epoch, sent_at=sent)
        except BaseException:
            self._beat_bound = max(self._beat_bound, sent + self._timeout)  # it may still land
            raise
        if beat.malformed:
            self._malformed_epoch()
        if beat.registered:
            self._beat_bound = max(self._beat_bound, self._clock())
            self._beat_sent = max(self._beat_sent, sent)
        if not epoch:
            self._epoch = beat.epoch
        return beat

    async def _rejoin(self) -> None:
        """Seed Redis with every token we hold, then register: in that order, so that nobody stops
        leaving room for our share before our tokens are counted. Then the hold-off."""
        await self._seed()
        known = self._epoch
        beat = await self._beat("")
        if self._machine.mode is not Mode.RECOVERING or not beat.registered:
            return  # a call failed meanwhile, or this one ran late: the watcher tries again
        now = self._clock()
        self._machine.stamps.shared_at = now + self._hold_off
        if known and beat.epoch != known:
            log.info(
                "rate limiter: Redis at %s lost its state (restarted?); told it what this replica holds; "
                "nobody is admitted through it for %.1fs while the others do the same",
                self._where,
                self._hold_off,
            )
        for lease in self._unsynced.values():  # ended while the seed was on its way
            self._spawn(self._push(lease))
        self._unsynced = {}
        self._wake()

    async def _seed(self) -> None:
        """Tell Redis every token this replica holds or released within a window, and which ended."""
        now = self._clock()
        leases: dict[str, SharedLease] = {}
        for ledger in self._ledgers.values():
            ledger.occupied(now)
            for lease in ledger.leases():
                assert isinstance(lease, SharedLease)
                leases[lease.member] = lease
        leases.update(self._unsynced)
        self._unsynced = {}
        by_action: dict[str, list[tuple[str, float]]] = {}
        for lease in leases.values():
            if lease.state in (HELD, LATE):
                back = lease.expires_at
            elif lease.state == RELEASED:
                back = lease.return_at
            else:
                back = now  # already back: remove it
            by_action.setdefault(lease.action, []).append((lease.member, back - now))
            lease.in_redis = True  # from now on its release goes to Redis
        try:
            for action, returns in by_action.items():
                await self.store.seed(action, returns)
        except BaseException:
            for member, lease in leases.items():
                self._unsynced.setdefault(member, lease)  # re-seeded next time
            raise

    # --- reporting and shutdown ---

    def health(self) -> dict[str, object]:
        now = self._clock()
        mode = self._machine.effective(now)
        stamps = self._machine.stamps
        error = self._machine.facts["error"]
        share = f"{self._share} per {self._window:g}s per action"
        if mode is Mode.DEGRADED:
            stopped = (
                "; stopped: no registration in Redis keeps room for it"
                if stamps.local_until < now + self._window
                else ""
            )
            detail = (
                f"Redis at {self._where} failing for {now - stamps.degraded_since:.0f}s, last "
                f"{error}; local share: {share}{stopped}"
            )
        elif mode is Mode.SUSPECT:
            silence = now - stamps.failing_since
            detail = f"Redis at {self._where} failing for {silence:.1f}s, last {error}; callers wait"
        elif mode is Mode.RECOVERING:
            detail = (
                f"Redis at {self._where} reachable again; local share ({share}) until every replica "
                "has told it what it holds"
            )
        else:
            detail = f"shared through Redis at {self._where}: {self._limit} per {self._window:g}s per action"
        return {"backend": self.backend, "degraded": mode.degraded, "detail": detail}

    async def aclose(self) -> None:
        await super().aclose()
        if self._watcher is not None:
            await background.stop([self._watcher])
            self._watcher = None
        if self._tasks:
            # Let releases in flight land, so the other replicas get those tokens back on time.
            await asyncio.wait(set(self._tasks), timeout=1.0)
        if self._epoch and self._machine.mode.tells_redis:
            # A clean exit leaves no silent registration behind (others would keep room for it).
            with contextlib.suppress(*STORE_ERRORS):
                await self.store.deregister()
        await self.store.aclose()
