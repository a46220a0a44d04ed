"""Which answers callers want kept fresh: the keys asked for lately, and the keys watched.

A caller's interest in a key lasts TIW_REFRESH_INTEREST seconds after its call; it is told to the
stores (the refresh schedule is theirs) in batches, at most once per key per WANT_EVERY, since
telling Redis on every call would be a write per call. A watched key stays wanted while watched, and
its answers other replicas got are read from Redis for its watchers (``keep_watched``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from tiw_facade.answers._entries import Key
from tiw_facade.answers._stores import Stores
from tiw_facade.answers._topics import Topics

# A caller's interest is told to the stores at most this often per key (every call would be a write).
WANT_EVERY = 1.0
# How often watched keys are read from Redis (answers other replicas fetched) and marked wanted.
WATCH_POLL = 0.25


class Interest:
    """Keys wanted until when, at most ``max_keys`` of them (those whose interest is oldest go first:
    an answer no longer kept has nothing to refresh anyway); what is not yet told to the stores."""

    def __init__(self, stores: Stores, *, lasts: float, max_keys: int) -> None:
        self._stores = stores
        self._lasts = lasts
        self._max_keys = max_keys
        self._wanted: dict[Key, float] = {}  # until; in order of until (re-inserted last)
        self._to_tell: set[Key] = set()

    def note(self, key: Key, now: float) -> None:
        """Someone asked for ``key`` at ``now``: keep it refreshed for ``lasts`` seconds."""
        until = now + self._lasts
        if until - self._wanted.get(key, 0.0) < WANT_EVERY:
            return
        self._wanted.pop(key, None)
        self._wanted[key] = until
        self._to_tell.add(key)
        # The dict is in order of ``until``, so the first key is also the first to expire: O(1) a call.
        while len(self._wanted) > self._max_keys:
            oldest = next(iter(self._wanted))
            del self._wanted[oldest]
            self._to_tell.discard(oldest)

    async def tell(self) -> None:
        """Tell the stores which keys are wanted, and until when, since the last time."""
        if not self._to_tell:
            return
        keys, self._to_tell = self._to_tell, set()
        by_until: dict[float, list[Key]] = {}
        for key in keys:
            by_until.setdefault(self._wanted[key], []).append(key)
        for until, group in by_until.items():
            await self._stores.want(group, until=until)

    async def keep_watched(self, topics: Topics, clock: Callable[[], float]) -> None:
        """Forever: watched keys stay wanted, and other replicas' answers of them reach their watchers."""
        while True:
            await asyncio.sleep(WATCH_POLL)
            await self.watched_once(topics, clock())

    async def watched_once(self, topics: Topics, now: float) -> None:
        keys = topics.watched()
        for key in keys:
            self.note(key, now)
        await self._stores.adopt_shared(keys)
