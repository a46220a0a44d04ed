"""The tokens one process holds, and exactly when each comes back.

The in-process limiter admits against a ledger; the shared limiter keeps one too, mirroring its own
leases, so that when Redis goes away its local share starts from what it really has in flight, and
when Redis is back it can tell Redis what it took meanwhile.

All times are seconds of the limiter's clock (``time.monotonic`` unless a test injects another).
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import TypeVar

# A monotonic time source in seconds (model: envoyproxy/ratelimit's TimeSource): tests pass a
# virtual one to step through time instead of sleeping.
Clock = Callable[[], float]

# A lease's life. HELD: the attempt is running. LATE: released after its hold ran out; it still comes
# back at its expiry (as Redis does: a release never pushes a token's return later). RELEASED:
# answered; back one window later. BACK: the token is free again (returned, expired or discarded).
HELD, LATE, RELEASED, BACK = range(4)


class LocalLease:
    """A token taken from a ``Ledger``."""

    __slots__ = ("_ledger", "expires_at", "return_at", "state")

    def __init__(self, ledger: Ledger, expires_at: float) -> None:
        self._ledger = ledger
        # When the token comes back if the lease is never released: the hold time-out plus a window.
        self.expires_at = expires_at
        self.return_at = expires_at
        self.state = HELD

    def release(self) -> None:
        if self.state == HELD:
            self._ledger.release(self, self._ledger.clock())


L = TypeVar("L", bound=LocalLease)


class Ledger:
    """Leases in flight and tokens on their way back, for one action."""

    __slots__ = ("_expiries", "_returning", "_seq", "clock", "held", "window")

    def __init__(self, window: float, clock: Clock = time.monotonic) -> None:
        self.window = window
        self.clock = clock
        self.held = 0  # HELD and LATE leases: tokens whose return time is not final yet
        # Released leases, in release order, which is also return order: every release adds the
        # same window to a monotonic clock. That keeps release O(1) and the next return at [0].
        self._returning: deque[LocalLease] = deque()
        # Expiry of held leases, min-heap with lazy deletion: a released lease's entry is dropped
        # when it reaches the top. The sequence number breaks ties without comparing leases.
        self._expiries: list[tuple[float, int, LocalLease]] = []
        self._seq = itertools.count()

    def occupied(self, now: float) -> int:
        """Tokens not free at ``now`` (after forgetting those that came back)."""
        returning = self._returning
        while returning and returning[0].return_at <= now:
            returning.popleft().state = BACK
        expiries = self._expiries
        while expiries:
            expires_at, _, lease = expiries[0]
            if lease.state in (HELD, LATE):
                if expires_at > now:
                    break
                lease.state = BACK
                self.held -= 1
            heapq.heappop(expiries)
        return self.held + len(returning)

    def room(self, now: float, capacity: int) -> float | None:
        """None if a token is free at ``now``; else the earliest moment one can come back."""
        if self.occupied(now) < capacity:
            return None
        # A held lease comes back no sooner than a window after a release that has not happened
        # yet, i.e. after now + window, unless its hold runs out first. So this is exact: waking
        # here never misses a token, however the calls in flight end.
        soonest = now + self.window
        if self._returning:
            soonest = min(soonest, self._returning[0].return_at)
        if self._expiries:
            soonest = min(soonest, self._expiries[0][0])
        return soonest

    def add(self, lease: L) -> L:
        """Record ``lease`` (built on this ledger) as taken; the caller checked ``room``."""
        self.held += 1
        entry: tuple[float, int, LocalLease] = (lease.expires_at, next(self._seq), lease)
        heapq.heappush(self._expiries, entry)
        return lease

    def release(self, lease: LocalLease, now: float) -> None:
        back = now + self.window
        if back >= lease.expires_at:
            lease.state = LATE  # its expiry entry brings it back, no later than `back`
            return
        lease.state = RELEASED
        lease.return_at = back
        self.held -= 1
        self._returning.append(lease)

    def discard(self, lease: LocalLease) -> None:
        """The lease was never used (its caller left before sending): its token is free at once."""
        if lease.state in (HELD, LATE):
            lease.state = BACK
            self.held -= 1

    def outlook(self, now: float) -> tuple[list[float], int]:
        """When tokens come back: the known return times (ascending) and how many are still held."""
        self.occupied(now)
        return [lease.return_at for lease in self._returning], self.held

    def leases(self) -> Iterator[LocalLease]:
        """Every lease whose token is not back yet (as of the last ``occupied``)."""
        yield from self._returning
        for _, _, lease in self._expiries:
            if lease.state in (HELD, LATE):
                yield lease
