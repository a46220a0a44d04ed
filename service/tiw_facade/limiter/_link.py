"""The shared limiter's standing with Redis: what it says there besides asking for tokens.

Its registration (heartbeats, and Redis's epoch as last told), how its leases' ends reach Redis
(at once while the mode allows, else with the next seed), and the mode switches when Redis fails,
restarts or answers again, with the seed of every token held that recovery starts with. The
admission itself is ``shared``'s; docs/limiter.md gives the whole argument for exactness.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any

from tiw_facade import shared_redis
from tiw_facade.limiter._ledger import BACK, HELD, LATE, RELEASED, Clock, Ledger, LocalLease
from tiw_facade.limiter._modes import Machine, Mode
from tiw_facade.limiter._store import STORE_ERRORS, Beat, Store, Tuning

if TYPE_CHECKING:
    from tiw_facade.metrics import Metrics

log = logging.getLogger("tiw_facade.limiter")

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

    __slots__ = ("_link", "action", "in_redis", "member")

    def __init__(
        self,
        ledger: Ledger,
        expires_at: float,
        *,
        link: RedisLink,
        action: str,
        member: str,
        in_redis: bool,
    ) -> None:
        super().__init__(ledger, expires_at)
        self._link = link
        self.action = action
        self.member = member
        self.in_redis = in_redis  # taken through Redis, or told to Redis after an outage

    def release(self) -> None:
        if self.state == HELD:
            super().release()
            if self.in_redis:
                self._link.sync(self)


@dataclasses.dataclass(eq=False, kw_only=True)
class RedisLink:
    """One replica's registration in Redis and everything it tells Redis; see the module docstring.

    The limiter hands it what they share: the store, the mode machine, its ledgers (read for the
    seed), and how to wake its pumps (``wake``: all of them; ``returned``: one action's).
    """

    store: Store
    machine: Machine
    tuning: Tuning
    timeout: float
    suspicion: float
    where: str
    clock: Clock
    metrics: Metrics
    ledgers: Mapping[str, Ledger]
    wake: Callable[[], None]
    returned: Callable[[str], None]
    closed: Callable[[], bool]
    epoch: str = dataclasses.field(default="", init=False)  # Redis's epoch as last told ('' before joining)
    # Leases whose end Redis has not heard of.
    unsynced: dict[str, SharedLease] = dataclasses.field(default_factory=dict, init=False)
    _invalid_warned_at: float = dataclasses.field(default=-math.inf, init=False)
    # The latest moment a registration of ours may have landed in Redis (our clock), and when the
    # last one that did was sent: they bound when others leave room for us (docs/limiter.md).
    _beat_bound: float = dataclasses.field(default=-math.inf, init=False)
    _beat_sent: float = dataclasses.field(default=-math.inf, init=False)
    _tasks: set[asyncio.Task[None]] = dataclasses.field(default_factory=set, init=False)

    # --- telling Redis how leases ended ---

    def sync(self, lease: SharedLease) -> None:
        """Tell Redis the lease ended (released: back in a window; discarded: back now)."""
        if self.closed():
            return
        if not self.machine.mode.tells_redis:
            self.unsynced[lease.member] = lease  # told with the seed, on recovery
            return
        self.spawn(self._push(lease))

    async def _push(self, lease: SharedLease) -> None:
        try:
            if lease.state == BACK:
                await self.store.forget(lease.action, lease.member)
                self.returned(lease.action)
            else:
                await self.store.release(lease.action, lease.member)
        except STORE_ERRORS as exc:
            self.unsynced[lease.member] = lease
            self.failed(exc)

    async def call(self, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except STORE_ERRORS as exc:
            self.failed(exc)

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        # Release is synchronous for its callers; the Redis round trip runs here, referenced until done.
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- mode switches (docs/limiter.md) ---

    def failed(self, exc: BaseException) -> None:
        self.metrics.limiter_backend_errors.labels(kind=shared_redis.classify(exc)).inc()
        self.machine.facts["error"] = shared_redis.describe(exc)
        if self.closed():
            return
        now = self.clock()
        if self.machine.mode.asks_redis:
            self.machine.enter(Mode.SUSPECT, now, failing_since=now)
        stamps = self.machine.stamps
        if self.machine.mode is Mode.SUSPECT and (
            _connection_refused(exc) or now - stamps.failing_since >= self.suspicion
        ):
            # Others leave room for our share from a silence after our last registration; what
            # they took before that is back a window later (docs/limiter.md: "Partition").
            local_from = max(now, self._beat_bound + self.tuning.silent_after) + self.tuning.window
            self.machine.enter(
                Mode.DEGRADED,
                now,
                degraded_since=now,
                local_from=local_from,
                local_until=self._beat_sent + self.tuning.lifetime,
            )

    def malformed_epoch(self) -> None:
        """Redis held an epoch no heartbeat writes; the script deleted it: count it, and say so."""
        self.metrics.store_invalid.labels(role="limiter", what="epoch").inc()
        now = self.clock()
        if now >= self._invalid_warned_at + INVALID_WARN_EVERY:
            self._invalid_warned_at = now
            log.warning(
                "rate limiter: Redis at %s held a malformed epoch (see tiw_store_invalid_total); "
                "dropped it: every replica re-seeds as after a restart",
                self.where,
            )

    def lose_epoch(self, now: float) -> None:
        """Redis lost its state (restarted): re-seed it and re-join, as on recovery."""
        if self.machine.mode is not Mode.RECOVERING or self.machine.stamps.shared_at < math.inf:
            self.machine.enter(Mode.RECOVERING, now, failing_since=now, shared_at=math.inf)

    # --- registration, and recovery ---

    async def look(self, mode: Mode) -> None:
        """One step of the watcher: heartbeat, or ping and recover, or finish a recovery."""
        try:
            if mode is Mode.RECOVERING and self.machine.stamps.shared_at == math.inf:
                await self._rejoin()
            elif mode.beats:
                beat = await self.beat(self.epoch)
                if not beat.registered and beat.epoch != self.epoch:
                    self.lose_epoch(self.clock())
            else:
                await self.store.ping()
                self.machine.enter(Mode.RECOVERING, self.clock(), shared_at=math.inf)
                await self._rejoin()
        except STORE_ERRORS as exc:
            self.failed(exc)

    async def beat(self, epoch: str) -> Beat:
        """Refresh our registration (adopting Redis's epoch when ``epoch`` is '')."""
        sent = self.clock()
        try:
            beat = await self.store.heartbeat(epoch, sent_at=sent)
        except BaseException:
            self._beat_bound = max(self._beat_bound, sent + self.timeout)  # it may still land
            raise
        if beat.malformed:
            self.malformed_epoch()
        if beat.registered:
            self._beat_bound = max(self._beat_bound, self.clock())
            self._beat_sent = max(self._beat_sent, sent)
        if not epoch:
            self.epoch = beat.epoch
        return beat

    async def _rejoin(self) -> None:
        """Seed Redis with every token we hold, then register: in that order, so that nobody stops
        leaving room for our share before our tokens are counted. Then the hold-off."""
        await self._seed()
        known = self.epoch
        beat = await self.beat("")
        if self.machine.mode is not Mode.RECOVERING or not beat.registered:
            return  # a call failed meanwhile, or this one ran late: the watcher tries again
        now = self.clock()
        self.machine.stamps.shared_at = now + self.tuning.hold_off
        if known and beat.epoch != known:
            log.info(
                "rate limiter: Redis at %s lost its state (restarted?); told it what this replica holds; "
                "nobody is admitted through it for %.1fs while the others do the same",
                self.where,
                self.tuning.hold_off,
            )
        for lease in self.unsynced.values():  # ended while the seed was on its way
            self.spawn(self._push(lease))
        self.unsynced = {}
        self.wake()

    async def _seed(self) -> None:
        """Tell Redis every token this replica holds or released within a window, and which ended."""
        now = self.clock()
        leases: dict[str, SharedLease] = {}
        for ledger in self.ledgers.values():
            ledger.occupied(now)
            for lease in ledger.leases():
                assert isinstance(lease, SharedLease)
                leases[lease.member] = lease
        leases.update(self.unsynced)
        self.unsynced = {}
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
                self.unsynced.setdefault(member, lease)  # re-seeded next time
            raise

    async def aclose(self) -> None:
        """After the limiter closed: let releases land, leave Redis cleanly, close the connection."""
        if self._tasks:
            # Let releases in flight land, so the other replicas get those tokens back on time.
            await asyncio.wait(set(self._tasks), timeout=1.0)
        if self.epoch and self.machine.mode.tells_redis:
            # A clean exit leaves no silent registration behind (others would keep room for it).
            with contextlib.suppress(*STORE_ERRORS):
                await self.store.deregister()
        await self.store.aclose()
