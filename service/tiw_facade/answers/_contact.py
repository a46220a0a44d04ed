"""This replica's contact with the shared answers' Redis, and what it owes Redis when contact returns.

What one replica writes to Redis for the others can be lost in three ways: Redis was unreachable
(a stall, a network cut) when it was to be written; Redis restarted empty; or a failover promoted a
replica that had not yet received it. Two writes matter for correctness, not only for cost:

- **An invalidation** (a push stopped through this replica). Lost, another replica may keep
  serving the answer from before the stop, and may even write it back from a request in flight.
- **The release of a lease.** Lost, the lease stays until it runs out, and every replica's callers
  of that key wait on a request that has long landed.

So contact is watched (a heartbeat every ``HEARTBEAT`` renews this replica's marker in Redis: an
error means contact is lost, a marker gone means Redis lost its data), and while it is lost the
process's own store serves, as before. Before this replica uses Redis again it *recovers*:

1. it writes again every invalidation it made within a stamp's lifetime (its own store keeps them),
   whether or not Redis still has them: after a failover or an empty restart nobody can tell;
2. it gives up the leases it could not release;
3. for ``GRACE`` seconds it does not trust a non-terminal answer read from Redis whose request was
   sent before recovery began, nor write one to Redis, for the actions a write invalidates (a
   push's Describe): such an answer may predate a stop made through another replica while contact
   was lost, which that replica writes again on its own recovery, within a heartbeat of Redis
   answering. After that, Redis holds every stop again (a re-established stop deletes the answers
   before it and refuses those begun before it), so trust returns. The cost is one upstream
   request per push asked about in that second; snapshot and video answers, which no write of
   ours invalidates, and terminal answers, which never change, are trusted throughout.

Every replica beats, so every one notices an outage of more than a heartbeat and recovers once
Redis answers; until it has, it serves from its own store (docs/answers.md, "When Redis is lost").
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from tiw_facade.answers._entries import Entry, Key, StoreUnavailable

if TYPE_CHECKING:
    from tiw_facade.answers._local import LocalStore
    from tiw_facade.answers._shared import RedisAnswerStore

log = logging.getLogger("tiw_facade.answers")

# How often contact is checked. A stop made elsewhere during an outage reaches this replica at most
# about this long (plus Redis's time-out) after Redis answers again: the recovering replica's own.
HEARTBEAT = 0.1
# While it stays unreachable, say so once a minute, not once a heartbeat.
WARN_EVERY = 60.0
# How long after a recovery answers begun before it are not trusted (step 3): the other replicas'
# own recoveries must have written their stops again by then: a heartbeat, Redis's time-out and a
# round trip, with room for an event loop that is busy.
GRACE = 1.0
# At most this many leases owed: beyond, the oldest are left to run out (each lease has an expiry).
MAX_OWED_LEASES = 10_000


class Contact:
    """Whether the shared store may be used now, and the recovery owed before it may again."""

    def __init__(
        self,
        shared: RedisAnswerStore | None,
        local: LocalStore,
        *,
        invalidated: frozenset[str],
        where: str,
        stamp_lifetime: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._shared = shared
        self._local = local
        self._where = where
        self._invalidated = invalidated  # the actions a write invalidates
        self._stamp_lifetime = stamp_lifetime
        self._clock = clock
        self._lost = False
        # Once the first beat has written the marker, its absence tells an emptied Redis.
        self._marked = False
        self._trust_from = float("-inf")
        self._owed_leases: dict[Key, None] = {}
        self._warned_at = float("-inf")
        self.recoveries = 0

    @property
    def usable(self) -> bool:
        return self._shared is not None and not self._lost

    def failed(self, exc: StoreUnavailable) -> None:
        """A call to the shared store failed: the process's store serves until recovery."""
        self._lost = True
        now = time.monotonic()
        if now >= self._warned_at + WARN_EVERY:
            self._warned_at = now
            log.warning(
                "the shared answer cache: Redis at %s %s; caching in this process until it answers",
                self._where,
                exc,
                extra={"kind": exc.kind},
            )

    def trusted(self, key: Key, entry: Entry) -> bool:
        """Whether an entry read from Redis may be served (see the module docstring, step 3)."""
        return entry.terminal or self.may_share(key, entry.answered_at)

    def may_share(self, key: Key, asked_at: float) -> bool:
        """Whether the answer of a request begun at ``asked_at`` may be read from or written to Redis."""
        return (
            asked_at >= self._trust_from
            or key.action not in self._invalidated
            or self._clock() >= self._trust_from + GRACE
        )

    def owe_lease(self, key: Key) -> None:
        """The lease of ``key`` could not be given up: give it up on recovery."""
        self._owed_leases[key] = None
        while len(self._owed_leases) > MAX_OWED_LEASES:
            del self._owed_leases[next(iter(self._owed_leases))]

    async def run(self) -> None:
        if self._shared is None:
            return
        while True:
            await asyncio.sleep(HEARTBEAT)
            await self.beat()

    async def beat(self) -> None:
        """Renew the marker; recover if contact was lost or Redis lost what it held."""
        assert self._shared is not None
        try:
            present = await self._shared.heartbeat(ttl=self._stamp_lifetime)
            if self._marked and not present:
                log.warning(
                    "the shared answer cache: Redis at %s no longer holds this replica's marker (it "
                    "restarted empty, failed over before receiving recent writes, or evicted it): "
                    "writing this replica's stops again and trusting only answers asked for from now",
                    self._where,
                )
                self._lost = True
            self._marked = True
            if self._lost:
                await self._recover()
        except StoreUnavailable as exc:
            self.failed(exc)

    async def _recover(self) -> None:
        assert self._shared is not None
        began = self._clock()
        by_time: dict[float, list[Key]] = {}
        for key, at in self._local.invalidations(since=began - self._stamp_lifetime):
            by_time.setdefault(at, []).append(key)
        for at, keys in by_time.items():
            await self._shared.invalidate(keys, at=at)
        for key in list(self._owed_leases):
            await self._shared.unlease(key)
            del self._owed_leases[key]
        self._trust_from = max(self._trust_from, began)
        self._lost = False
        self.recoveries += 1
        if self._warned_at > float("-inf"):
            log.info(
                "the shared answer cache: Redis at %s answers again; %d stops written again",
                self._where,
                sum(map(len, by_time.values())),
            )
