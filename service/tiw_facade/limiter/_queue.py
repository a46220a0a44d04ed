"""What both backends share: per action a queue and a ledger, at-once refusals, the pump, pauses, metrics.

A backend only says whether a token can be taken now (and if not, when to ask again), how tokens are
expected to come back (for estimates), and how to hand back a token nobody used.

Waiting calls queue per action, by caller (``_fair``: weighted round robin among callers, each
caller's calls in arrival order). A call only takes a token itself when nobody is queued (the cheap,
common path); otherwise one pump task per action hands each token to the call the round robin names,
sleeping exactly until the backend says a token can come back. Waiters never poll.

Spare grants (``try_spare``) take the direct path only, with the backend asked to keep ``reserve``
tokens free, and only while nobody is queued: they never overtake a waiting call.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import functools
import logging
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tiw_facade.limiter import (
    UNIDENTIFIED,
    CallerObserver,
    Lease,
    Limiter,
    LimiterClosed,
    QuotaExceeded,
    Reason,
)
from tiw_facade.limiter._fair import FairQueue, Waiter
from tiw_facade.limiter._ledger import Clock, Ledger
from tiw_facade.metrics import Metrics

if TYPE_CHECKING:
    from tiw_facade.metrics import ActionSeries

log = logging.getLogger("tiw_facade.limiter")


@dataclasses.dataclass(frozen=True, slots=True)
class Outlook:
    """How a backend expects its tokens to come back, for estimating when a waiter gets one."""

    capacity: int
    returning: Sequence[float]  # known return times, ascending (monotonic seconds)
    in_flight: int  # held tokens: back no sooner than a window from now
    not_before: float = 0.0  # no token at all before this (a shared limiter's quarantine)


@dataclasses.dataclass(frozen=True, slots=True)
class Granted:
    """A backend's yes: the token."""

    lease: Lease


@dataclasses.dataclass(frozen=True, slots=True)
class RetryAt:
    """A backend's not yet: no token before ``when`` (the clock's seconds); ask again then."""

    when: float


Taken = Granted | RetryAt


class _Unobserved:
    """The observer of a limiter built without one."""

    def admitted(self, action: str, caller: str, wait: float) -> None:
        pass

    def refused(self, action: str, caller: str, reason: Reason) -> None:
        pass


class ActionState:
    """One action's queue and pump."""

    __slots__ = ("action", "metrics", "paused_until", "pump", "queue", "spare_at", "wake")

    def __init__(self, action: str, metrics: ActionSeries) -> None:
        self.action = action
        self.queue = FairQueue()
        self.pump: asyncio.Task[None] | None = None
        self.wake: asyncio.Future[None] | None = None  # the pump's current sleep
        self.paused_until = 0.0
        self.spare_at = 0.0  # when the backend last said to ask again for a spare token
        self.metrics = metrics

    @property
    def live(self) -> int:
        """Calls waiting."""
        return self.queue.live

    def counted(self) -> None:
        """The queue changed: show its depth."""
        self.metrics.depth.set(self.queue.live)

    def poke(self) -> None:
        """A token came back out of schedule (a discarded lease): let the pump look now."""
        if self.wake is not None and not self.wake.done():
            self.wake.set_result(None)


def wake(future: asyncio.Future[None]) -> None:
    """Resolve a sleeper's future (from ``call_later``), unless it is done already."""
    if not future.done():
        future.set_result(None)


class QueuedLimiter(Limiter):
    """A limiter whose backend answers "a token now, or ask again at t"; queueing is done here."""

    def __init__(
        self,
        *,
        limit: int,
        window: float = 1.0,
        max_queue_wait: float = 5.0,
        max_queue_length: int = 1000,
        metrics: Metrics | None = None,
        observer: CallerObserver | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        metrics = metrics or Metrics.unobserved()
        if limit < 1 or window <= 0:
            raise ValueError("limit must be >= 1 and window > 0")
        self._limit = limit
        self._window = window
        self._max_queue_wait = max_queue_wait
        self._max_queue_length = max_queue_length
        self._metrics = metrics
        self._observer: CallerObserver = observer or _Unobserved()
        self._clock = clock
        self._states: dict[str, ActionState] = {}
        # Each action's tokens, as the backend counts them (the shared one: its mirror of Redis).
        self._ledgers: defaultdict[str, Ledger] = defaultdict(functools.partial(Ledger, window, clock))
        self._closed = False
        metrics.limiter_backend.labels(backend=self.backend).set(1)

    # --- what a backend provides ---

    @abc.abstractmethod
    async def _take(self, action: str, hold: float, now: float, reserve: int = 0) -> Taken:
        """A token for an attempt of at most ``hold`` seconds, or when to ask again.

        ``reserve``: grant only if at least that many tokens stay free after this one (spare grants).
        """

    @abc.abstractmethod
    def _outlook(self, action: str, now: float) -> Outlook:
        """How the backend expects tokens of ``action`` to come back (best current knowledge)."""

    @abc.abstractmethod
    def _discard(self, action: str, lease: Lease) -> None:
        """Hand back a lease whose caller left before using it: its token is free at once."""

    # --- the interface ---

    def _state(self, action: str) -> ActionState:
        state = self._states.get(action)
        if state is None:
            state = self._states[action] = ActionState(action, self._metrics.action(action))
        return state

    async def acquire(
        self,
        action: str,
        *,
        deadline: float | None,
        hold: float,
        caller: str = UNIDENTIFIED,
        weight: int = 1,
    ) -> Lease:
        if self._closed:
            raise LimiterClosed("the rate limiter is closed")
        state = self._states.get(action) or self._state(action)
        now = self._clock()
        if deadline is not None and deadline <= now:
            raise self._refuse(state, caller, "deadline", self._estimate(state, 0, now) - now)
        hold = max(hold, 0.0)
        if state.live == 0 and now >= state.paused_until:
            # Nobody queued: take a token directly (there is no one to overtake).
            taken = await self._take(action, hold, now)
            if isinstance(taken, Granted):
                return self._hand_over(state, caller, taken.lease, deadline, since=now)
            now = self._clock()  # the backend may have awaited (Redis)
        return await self._wait(state, caller, max(1, weight), deadline=deadline, hold=hold, now=now)

    def _hand_over(
        self, state: ActionState, caller: str, lease: Lease, deadline: float | None, *, since: float
    ) -> Lease:
        """The lease, to a caller running again now; unless its deadline passed meanwhile.

        A grant can land after the deadline: a shared backend answers a round trip after it was
        asked, and a busy event loop resumes the caller late. A caller past its deadline sends
        nothing, and a token released unused would still be out for a whole window: a slot of the
        quota lost for every such grant. Handed back unused instead, it is free again at once.
        """
        now = self._clock()
        if deadline is not None and now >= deadline:
            self._discard(state.action, lease)
            state.poke()
            raise self._refuse(state, caller, "deadline", self._estimate(state, 0, now) - now)
        state.metrics.admitted.inc()
        state.metrics.wait.observe(now - since)
        self._observer.admitted(state.action, caller, now - since)
        return lease

    async def _wait(
        self, state: ActionState, caller: str, weight: int, *, deadline: float | None, hold: float, now: float
    ) -> Lease:
        limit_at = now + self._max_queue_wait
        reason: Reason = "max_wait"
        if deadline is not None and deadline <= limit_at:
            limit_at, reason = deadline, "deadline"
        # Where the round robin would put this call among those waiting now, not behind all of them.
        slot = self._estimate(state, state.queue.position(caller, weight), now)
        if state.live >= self._max_queue_length:
            if slot > limit_at:  # no call is dropped for one that would be refused anyway
                raise self._refuse(state, caller, "queue_full", slot - now)
            self._make_room(state, caller, weight, slot - now)
        if slot > limit_at:
            # Refuse at once rather than let the caller wait for nothing.
            raise self._refuse(state, caller, reason, slot - now)

        loop = asyncio.get_running_loop()
        future: asyncio.Future[Lease] = loop.create_future()
        waiter = state.queue.join(caller, weight, future, hold)
        state.counted()
        timer = loop.call_later(limit_at - now, self._expire, state, waiter, reason)
        if state.pump is None:
            state.pump = loop.create_task(self._pump(state), name=f"limiter-pump-{state.action}")
        try:
            lease = await future
        except asyncio.CancelledError:
            if future.cancelled():
                # The caller left while queued: it takes nothing; the pump skips it.
                state.queue.left(waiter)
                state.counted()
            elif future.exception() is None:
                # Granted in the same instant the caller was cancelled: nobody will send on this
                # token, so it is free at once, for the next waiter.
                self._discard(state.action, future.result())
                state.poke()
            raise
        finally:
            timer.cancel()
        return self._hand_over(state, caller, lease, deadline, since=now)

    async def try_spare(self, action: str, *, hold: float, reserve: int) -> Lease | None:
        if reserve < 0:
            raise ValueError("reserve must be >= 0")
        if self._closed:
            return None
        state = self._states.get(action) or self._state(action)
        now = self._clock()
        if state.live or now < state.paused_until:
            return None
        taken = await self._take(action, max(hold, 0.0), now, reserve)
        if isinstance(taken, RetryAt):
            state.spare_at = taken.when
            return None
        if self._closed or state.live or self._clock() < state.paused_until:
            # While the backend was asked (Redis), a caller queued or TIW paused us: they come
            # first. Handed back unused, the token is free again at once.
            self._discard(action, taken.lease)
            state.poke()
            return None
        # A token taken like any other, for nobody's call: admitted, but no caller's wait.
        state.metrics.admitted.inc()
        return taken.lease

    def spare_hint(self, action: str, *, reserve: int) -> float:
        if self._closed:
            return math.inf
        state = self._states.get(action) or self._state(action)
        now = self._clock()
        # Every queued call, then `reserve` more, get a token before a spare one is free.
        at = max(self._estimate(state, state.live + max(0, reserve), now), state.spare_at)
        return max(0.0, at - now)

    def _make_room(self, state: ActionState, caller: str, weight: int, retry_after: float) -> None:
        """The queue is full: the newest call of the caller most over its share leaves (longest queue
        drop), or, when that is this caller, this call is refused. A flood fills the bound, but
        cannot keep a light caller out of it."""
        victim = state.queue.victim_for(caller, weight)
        if victim is None:
            raise self._refuse(state, caller, "queue_full", retry_after)
        state.counted()
        now = self._clock()
        victim.future.set_exception(
            self._refuse(state, victim.caller.name, "queue_full", self._estimate(state, 0, now) - now)
        )

    def _expire(self, state: ActionState, waiter: Waiter, reason: Reason) -> None:
        """The waiter's deadline (or longest wait) passed before it got a token."""
        if waiter.future.done():
            return
        state.queue.left(waiter)
        state.counted()
        now = self._clock()
        refusal = self._refuse(state, waiter.caller.name, reason, self._estimate(state, 0, now) - now)
        waiter.future.set_exception(refusal)

    def _refuse(self, state: ActionState, caller: str, reason: Reason, retry_after: float) -> QuotaExceeded:
        state.metrics.rejected(reason).inc()
        self._observer.refused(state.action, caller, reason)
        return QuotaExceeded(state.action, reason, retry_after)

    def _estimate(self, state: ActionState, position: int, now: float) -> float:
        """Optimistic time at which the waiter at ``position`` (0: the next token's) gets a token.

        The k-th waiter gets roughly the k-th earliest token to come back; held tokens come back no
        sooner than a window from now; a token reused comes back a window after that at the least.
        """
        outlook = self._outlook(state.action, now)
        capacity = outlook.capacity
        cycles, index = divmod(position, capacity)
        # Tokens free now go first, then the known returns, then the held ones. (More occupied
        # than capacity happens when a shared limiter degrades to a smaller local share.)
        index -= capacity - len(outlook.returning) - outlook.in_flight
        if index < 0:
            slot = now
        elif index < len(outlook.returning):
            slot = max(now, outlook.returning[index])
        else:
            slot = now + self._window
        return max(slot + cycles * self._window, state.paused_until, outlook.not_before)

    async def _pump(self, state: ActionState) -> None:
        """Hand tokens to the calls the round robin names, while anyone waits."""
        try:
            while (waiter := state.queue.choose()) is not None:
                now = self._clock()
                if now < state.paused_until:
                    taken: Taken = RetryAt(state.paused_until)
                else:
                    taken = await self._take(state.action, waiter.hold, now)
                if isinstance(taken, RetryAt):
                    await self._sleep_until(state, taken.when)
                elif waiter.future.done():
                    # The chosen call left (cancelled, timed out) while the backend was asked.
                    self._discard(state.action, taken.lease)
                else:
                    state.queue.granted(waiter)
                    state.counted()
                    waiter.future.set_result(taken.lease)
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug, not an outage (backends absorb those). Waiters still leave at their time-outs;
            # the next one to queue starts a new pump.
            log.exception("rate limiter pump failed", extra={"action": state.action})
        finally:
            if state.pump is asyncio.current_task():
                state.pump = None

    async def _sleep_until(self, state: ActionState, when: float) -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        handle = loop.call_later(max(0.0, when - self._clock()), wake, future)
        state.wake = future
        try:
            await future
        finally:
            handle.cancel()
            state.wake = None

    def pause(self, action: str, seconds: float = 1.0) -> None:
        state = self._state(action)
        state.paused_until = max(state.paused_until, self._clock() + seconds)
        state.metrics.paused.inc()

    async def aclose(self) -> None:
        self._closed = True
        pumps = [state.pump for state in self._states.values() if state.pump is not None]
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        for state in self._states.values():
            for waiter in state.queue.waiting():
                waiter.future.set_exception(LimiterClosed("the rate limiter is closed"))
            state.queue.clear()
            state.counted()
