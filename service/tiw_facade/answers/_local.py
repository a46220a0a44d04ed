"""The in-process store of answers: a bounded LRU with per-kind lifetimes, plus the refresh schedule.

The store of a facade without Redis, and every facade's fallback while Redis is unreachable (then
each replica caches and refreshes on its own: more upstream requests, never a wrong answer, since
the limiter still bounds them). Synchronous inside; ``async`` only to match the ``Store`` protocol.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

from tiw_facade.answers._entries import Entry, Key, Lifetimes
from tiw_facade.metrics import Metrics

Clock = Callable[[], float]


class LocalStore:
    """Entries by key, least recently used dropped first beyond ``max_entries``."""

    def __init__(
        self,
        lifetimes: Lifetimes,
        *,
        max_entries: int,
        metrics: Metrics | None = None,
        clock: Clock = time.time,
    ) -> None:
        self._lifetimes = lifetimes
        self._max_entries = max_entries
        self._metrics = metrics or Metrics.unobserved()
        self._clock = clock
        self._entries: OrderedDict[Key, tuple[Entry, float]] = OrderedDict()  # entry, expires at
        self._invalidated: dict[Key, float] = {}  # answers to requests begun before this are refused
        self._leases: dict[Key, float] = {}  # until
        self._wanted: dict[str, dict[Key, float]] = {}  # by action: until
        # When a key is next due, if not by its entry: 0 once invalidated, or a failed refresh's time.
        self._postponed: dict[Key, float] = {}

    # --- entries ---

    def peek(self, key: Key) -> Entry | None:
        """``get`` without a coroutine: the hot path of a cache hit."""
        found = self._entries.get(key)
        if found is None:
            return None
        entry, expires = found
        if expires <= self._clock():
            self._drop(key, "expired")
            return None
        self._entries.move_to_end(key)
        return entry

    async def get(self, key: Key) -> Entry | None:
        return self.peek(key)

    async def get_many(self, keys: Sequence[Key]) -> list[Entry | None]:
        return [self.peek(key) for key in keys]

    def keep(self, key: Key, entry: Entry, *, asked_at: float) -> bool:
        """``put`` without a coroutine."""
        if self._invalidated.get(key, float("-inf")) >= asked_at:
            return False
        current = self._entries.get(key)
        if current is not None and current[0].answered_at > entry.answered_at:
            return False
        self._entries[key] = (entry, entry.answered_at + self._lifetimes.of(entry))
        self._entries.move_to_end(key)
        self._postponed.pop(key, None)
        if entry.terminal or entry.is_error:
            self._wanted.get(key.action, {}).pop(key, None)  # final (or kept briefly): nothing to refresh
        while len(self._entries) > self._max_entries:
            oldest = next(iter(self._entries))
            self._drop(oldest, "capacity")
        self._metrics.cache_entries.set(len(self._entries))
        return True

    async def put(self, key: Key, entry: Entry, *, asked_at: float) -> bool:
        return self.keep(key, entry, asked_at=asked_at)

    async def invalidate(self, keys: Iterable[Key], *, at: float) -> None:
        for key in keys:
            self._invalidated[key] = max(at, self._invalidated.get(key, at))
            if key in self._entries:
                self._drop(key, "invalidated")
                if key in self._wanted.get(key.action, {}):
                    self._postponed[key] = 0.0  # refreshed at once, for its watchers
        self._forget_old_invalidations()

    def invalidated_at(self, key: Key) -> float:
        """When ``key`` was last invalidated through this store (-inf: not recently)."""
        return self._invalidated.get(key, float("-inf"))

    def invalidations(self, *, since: float) -> list[tuple[Key, float]]:
        """Every (key, at) invalidated at or after ``since``: what a recovery writes to Redis again."""
        return [(key, at) for key, at in self._invalidated.items() if at >= since]

    def _forget_old_invalidations(self) -> None:
        # A stamp only matters while a request begun before it may still answer: drop old ones.
        if len(self._invalidated) > self._max_entries:
            horizon = self._clock() - 2 * self._lifetimes.changing
            self._invalidated = {key: at for key, at in self._invalidated.items() if at > horizon}

    def _drop(self, key: Key, reason: str) -> None:
        del self._entries[key]
        self._metrics.cache_evictions.labels(reason=reason).inc()
        self._metrics.cache_entries.set(len(self._entries))

    # --- leases and the refresh schedule ---

    async def postpone(self, key: Key, *, at: float) -> None:
        if key in self._entries or key in self._postponed:
            self._postponed[key] = at

    async def lease(self, key: Key, seconds: float) -> bool:
        now = self._clock()
        if self._leases.get(key, 0.0) > now:
            return False
        self._leases[key] = now + seconds
        return True

    async def unlease(self, key: Key) -> None:
        self._leases.pop(key, None)

    async def want(self, keys: Iterable[Key], *, until: float) -> None:
        for key in keys:
            wanted = self._wanted.setdefault(key.action, {})
            if wanted.get(key, 0.0) < until:
                wanted.pop(key, None)  # re-inserted last: each dict is in order of ``until``
                wanted[key] = until
            # Bounded like the entries: the key wanted the longest ago (first to expire) goes first.
            while len(wanted) > self._max_entries:
                del wanted[next(iter(wanted))]

    async def next_due(self, action: str, *, older_than: float, lease: float, now: float) -> Key | None:
        wanted = self._wanted.get(action)
        if not wanted:
            return None
        best: Key | None = None
        best_at = older_than
        for key, until in list(wanted.items()):
            if until < now:
                del wanted[key]
                continue
            if self._leases.get(key, 0.0) > now:
                continue
            found = self._entries.get(key)
            if found is not None and found[1] > now:
                if found[0].terminal or found[0].is_error:
                    del wanted[key]
                    continue
                answered_at = self._postponed.get(key, found[0].answered_at)
            elif key in self._postponed:  # invalidated while wanted (0: at once), or postponed
                answered_at = self._postponed[key]
            else:  # no answer to refresh: its callers ask TIW themselves
                continue
            if answered_at < best_at:
                best, best_at = key, answered_at
        if best is not None:
            self._leases[best] = now + lease
        # Expired leases would pile up for keys nobody asks about any more.
        if len(self._leases) > 4 * len(wanted) + 64:
            self._leases = {key: until for key, until in self._leases.items() if until > now}
        if len(self._postponed) > self._max_entries:
            self._postponed = {key: at for key, at in self._postponed.items() if key in self._entries}
        return best

    async def aclose(self) -> None:
        pass
