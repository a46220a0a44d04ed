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
tokens other replicas hand back unused. This module is the admission; what else a replica tells
Redis, and the mode switches, are ``_link``'s; when it looks at Redis, ``_watch``'s.
docs/limiter.md gives the whole argument for exactness.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import random
import time
from typing import TYPE_CHECKING, Any

from tiw_facade import shared_redis
from tiw_facade.limiter import CallerObserver, Lease
from tiw_facade.limiter._ledger import BACK, Clock, Ledger
from tiw_facade.limiter._link import RedisLink, SharedLease
from tiw_facade.limiter._modes import Machine, Mode
from tiw_facade.limiter._queue import Granted, Outlook, QueuedLimiter, RetryAt, Taken
from tiw_facade.limiter._store import (
    STORE_ERRORS,
    Admitted,
    EpochLost,
    Full,
    RedisStore,
    Settling,
    Store,
    Tuning,
)
from tiw_facade.limiter._watch import Watcher
from tiw_facade.shared_redis import Target

if TYPE_CHECKING:
    from tiw_facade.metrics import Metrics

__all__ = ["RedisLimiter", "SharedLease"]


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
# every _watch.SUSPECT_RETRY, each up to the time-out), so one slow reply or one stall of this
# process never degrades it; callers wait meanwhile, which costs them at most this long.
SUSPICION = 0.5
# Between Redis being back and every degraded replica having seeded: event-loop lag (a busy or
# CPU-starved replica pings late) and the seed's round trip.
HOLD_OFF_MARGIN = 0.5
# A registration not refreshed for this long belongs to a replica that may be cut off from Redis
# (heartbeats go every probe interval, so a live replica misses several before it looks silent).
SILENT_AFTER = 1.0
# A silent registration is dropped after this long (a crashed replica's share comes back); a
# replica cut off that long has stopped admitting by then.
LIFETIME = 120.0


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
        self._poll_interval = poll_interval
        self._probe_interval = probe_interval
        self._suspicion = suspicion
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
        self._views: dict[str, Outlook] = {}  # what Redis last said about each action
        self._autowatch = watch  # False: the caller drives look() (virtual-time tests)
        facts: dict[str, object] = {
            "where": self._where,
            "share": degraded_limit,
            "window": window,
            "hold_off": self._hold_off,
            "error": "",
        }
        self._machine = Machine(gauge=self._metrics.limiter_degraded, wake=self._wake, facts=facts)
        self._link = RedisLink(
            store=self.store,
            machine=self._machine,
            tuning=tuning,
            timeout=timeout,
            suspicion=suspicion,
            where=self._where,
            clock=clock,
            metrics=self._metrics,
            ledgers=self._ledgers,
            wake=self._wake,
            returned=self._returned,
            closed=lambda: self._closed,
        )
        self._watcher = Watcher(
            machine=self._machine,
            clock=clock,
            probe_interval=probe_interval,
            look=self.look,
            closed=lambda: self._closed,
        )

    @property
    def degraded(self) -> bool:
        return self._machine.effective(self._clock()).degraded

    @property
    def mode(self) -> Mode:
        return self._machine.effective(self._clock())

    def _lease(self, action: str, hold: float, now: float, *, member: str, in_redis: bool) -> Granted:
        ledger = self._ledgers[action]
        expires_at = now + hold + self._window
        lease = SharedLease(
            ledger, expires_at, link=self._link, action=action, member=member, in_redis=in_redis
        )
        return Granted(ledger.add(lease))

    # --- admission ---

    async def _take(self, action: str, hold: float, now: float, reserve: int = 0) -> Taken:
        if not self._watcher.started and self._autowatch:
            self._watch_from_now()
        mode = self._machine.settle(now)
        if not mode.admits:
            return RetryAt(now + self._suspicion)  # the watcher's verdict wakes the pumps sooner
        ledger = self._ledgers[action]
        member = f"{self.store.replica}:{next(self._serial)}"
        if mode.local_share:
            not_yet = self._local_room(mode, ledger, hold, now, reserve)
            if not_yet is not None:
                return not_yet
            if not mode.asks_redis:
                return self._lease(action, hold, now, member=member, in_redis=False)
        link = self._link
        if not link.epoch:  # first use: register and learn the epoch
            try:
                await link.beat("")
            except STORE_ERRORS as exc:
                link.failed(exc)
                return RetryAt(self._clock())
            now = self._clock()
        asking = (
            self.store.spare(action, member, hold, link.epoch, reserve)
            if reserve
            else self.store.acquire(action, member, hold, link.epoch)
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
            ghost = SharedLease(ledger, now, link=link, action=action, member=member, in_redis=True)
            ghost.state = BACK
            link.unsynced[member] = ghost
            link.failed(exc)
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
            link.malformed_epoch()
        link.lose_epoch(now)
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
            returning, in_flight = self._ledgers[action].outlook(now)
            not_before = self._machine.stamps.local_from
            if not mode.asks_redis and self._machine.stamps.local_until < now + self._window:
                not_before = now + self._window  # stopped until Redis is back: a guess
            return Outlook(self._share, returning, in_flight, not_before)
        return self._views.get(action) or Outlook(self._limit, (), 0)

    def _discard(self, action: str, lease: Lease) -> None:
        assert isinstance(lease, SharedLease)
        self._ledgers[action].discard(lease)
        if lease.in_redis:
            self._link.sync(lease)

    def _orphaned(self, action: str, member: str, call: asyncio.Future[Any]) -> None:
        if call.cancelled() or call.exception() is not None:
            return
        if isinstance(call.result(), Admitted) and not self._closed:
            self._link.spawn(self._forget(action, member))

    async def _forget(self, action: str, member: str) -> None:
        try:
            await self.store.forget(action, member)
        except STORE_ERRORS as exc:
            self._link.failed(exc)
        else:
            self._returned(action)

    def _returned(self, action: str) -> None:
        """A token is back in Redis out of schedule (handed back unused): our pump may take it now,
        rather than when it next polls."""
        state = self._states.get(action)
        if state is not None:
            state.poke()

    def pause(self, action: str, seconds: float = 1.0) -> None:
        super().pause(action, seconds)
        if self._machine.mode.tells_redis and not self._closed:
            self._link.spawn(self._link.call(self.store.pause(action, seconds)))

    # --- the watcher ---

    def _wake(self) -> None:
        for state in self._states.values():
            state.poke()
        self._watcher.wake()

    def _watch_from_now(self) -> None:
        """Start the watcher (first use), or make it look at the mode now."""
        if self._closed:
            return
        if not self._watcher.started and self._autowatch:
            self._watcher.start()
        else:
            self._wake()

    async def look(self, mode: Mode) -> None:
        """One step of the watcher: heartbeat, or ping and recover, or finish a recovery."""
        await self._link.look(mode)

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
        await self._watcher.stop()
        await self._link.aclose()
