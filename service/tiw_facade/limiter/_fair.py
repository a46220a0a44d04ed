"""Who gets the next token of one action: waiting calls, served by caller in weighted round robin.

Deficit round robin (Shreedhar and Varghese) with every call costing one token: callers with waiting
calls form a ring; the caller at the front gets ``weight`` turns, one token each, then goes to the back.
Each caller's own calls are served in arrival order. A caller alone in the ring gets every token; a
caller that starts waiting joins at the back, so it waits at most one turn of each other caller.

Only the order changes: how many tokens there are, and when they come back, is the backend's business.

A caller's sub-queue exists only while it has calls waiting: per-caller state is bounded by the
number of waiting calls, whatever the number of callers that come and go.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque

from tiw_facade.limiter import Lease


class Waiter:
    """One queued call: its future, the longest its attempt may take, and whose it is."""

    __slots__ = ("caller", "future", "hold")

    def __init__(self, future: asyncio.Future[Lease], hold: float, caller: Caller) -> None:
        self.future = future
        self.hold = hold
        self.caller = caller


class Caller:
    """One caller's waiting calls of one action, in arrival order, and what is left of its turn."""

    __slots__ = ("credit", "live", "name", "queue", "weight")

    def __init__(self, name: str, weight: int) -> None:
        self.name = name
        self.weight = weight
        # Calls that left (timed out, cancelled: future done) stay until they reach an end of the
        # deque, so leaving is O(1); `live` counts the others.
        self.queue: deque[Waiter] = deque()
        self.live = 0
        self.credit = 0  # tokens left in its current turn

    def head(self) -> Waiter | None:
        queue = self.queue
        while queue and queue[0].future.done():
            queue.popleft()
        return queue[0] if queue else None

    def pop_newest(self) -> Waiter | None:
        queue = self.queue
        while queue and queue[-1].future.done():
            queue.pop()
        return queue.pop() if queue else None

    @property
    def backlog(self) -> float:
        """Waiting calls per unit of weight: how long this caller's queue is, for its share."""
        return self.live / self.weight


class FairQueue:
    """The waiting calls of one action, by caller; ``choose`` names the call the next token is for."""

    __slots__ = ("live", "ring")

    def __init__(self) -> None:
        # Callers with waiting calls, in round-robin order: the first one's turn is now.
        self.ring: OrderedDict[str, Caller] = OrderedDict()
        self.live = 0

    def join(self, name: str, weight: int, future: asyncio.Future[Lease], hold: float) -> Waiter:
        caller = self.ring.get(name)
        if caller is None:
            caller = self.ring[name] = Caller(name, weight)  # at the back of the ring
        caller.weight = weight
        waiter = Waiter(future, hold, caller)
        caller.queue.append(waiter)
        caller.live += 1
        self.live += 1
        return waiter

    def left(self, waiter: Waiter) -> None:
        """``waiter`` leaves without a token (its future is, or is about to be, done)."""
        self._count_out(waiter.caller)

    def choose(self) -> Waiter | None:
        """The call the next token is for (it stays queued until ``granted``); None if nobody waits."""
        while self.ring:
            caller = next(iter(self.ring.values()))
            waiter = caller.head()
            if waiter is None:  # not expected (`live` counts waiting calls), but never spin on it
                self._drop(caller)
                continue
            if caller.credit <= 0:
                caller.credit = caller.weight  # its turn starts
            return waiter
        return None

    def granted(self, waiter: Waiter) -> None:
        """``waiter`` (the last ``choose``) gets its token; its caller has one turn fewer left."""
        caller = waiter.caller
        # Nothing is added before a caller's head, so the chosen call is still first.
        if caller.queue and caller.queue[0] is waiter:
            caller.queue.popleft()
        caller.credit -= 1
        self._count_out(caller)
        if caller.live and caller.credit <= 0 and self.ring.get(caller.name) is caller:
            self.ring.move_to_end(caller.name)

    def position(self, name: str, weight: int) -> int:
        """How many tokens go to others before a new call of ``name`` (weight ``weight``) gets one.

        Conservative for the calls waiting now: the new call is served in round ``k // weight`` of
        its caller (k: its calls already waiting), and every other caller is counted with its full
        turns up to and including that round, however the ring is ordered. Calls that arrive later
        can still overtake it (a new caller joins the round robin), as they could not in FIFO.
        """
        mine = self.ring.get(name)
        ahead = mine.live if mine is not None else 0
        rounds = ahead // weight + 1
        for caller in self.ring.values():
            if caller is not mine:
                ahead += min(caller.live, rounds * caller.weight)
        return ahead

    def victim_for(self, name: str, weight: int) -> Waiter | None:
        """The queue is full and ``name`` wants in: the newest call of the caller most over its share
        (longest queue for its weight), when that is someone else's and longer than ``name``'s would
        be; removed from the queue. None: ``name`` itself is the one to refuse."""
        if not self.ring:
            return None
        heaviest = max(self.ring.values(), key=lambda caller: caller.backlog)
        mine = self.ring.get(name)
        if heaviest is mine or heaviest.backlog <= ((mine.live if mine else 0) + 1) / weight:
            return None
        waiter = heaviest.pop_newest()
        if waiter is not None:
            self._count_out(heaviest)
        return waiter

    def waiting(self) -> list[Waiter]:
        """Every call still waiting (for shutting down)."""
        return [
            waiter for caller in self.ring.values() for waiter in caller.queue if not waiter.future.done()
        ]

    def clear(self) -> None:
        self.ring.clear()
        self.live = 0

    def _count_out(self, caller: Caller) -> None:
        caller.live -= 1
        self.live -= 1
        if caller.live == 0:
            self._drop(caller)

    def _drop(self, caller: Caller) -> None:
        # A caller that comes back later starts afresh at the back, with no credit left over.
        caller.queue.clear()
        if self.ring.get(caller.name) is caller:
            del self.ring[caller.name]
