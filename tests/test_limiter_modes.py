"""The shared limiter's mode transitions in virtual time: a clock the test moves, and a store whose
faults the test sets (a Redis that times out or refuses on cue cannot be had cheaply for real; the
Redis path itself is tested against real redis-server processes elsewhere). No sleeping: each step
is the limiter's own admission (``_take``) or one look of its watcher (``look``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from support.clock import VirtualClock
from tiw_facade.limiter._modes import Mode
from tiw_facade.limiter._queue import Granted, RetryAt, Taken
from tiw_facade.limiter._store import AcquireReply, Admitted, Beat, EpochLost, Full
from tiw_facade.limiter.shared import HOLD_OFF_MARGIN, SILENT_AFTER, SUSPICION, RedisLimiter
from tiw_facade.metrics import Metrics

A = "CreateSnapshotTask"
WINDOW = 1.0
TIMEOUT = 0.25
PROBE = 0.25


def refused() -> RedisConnectionError:
    exc = RedisConnectionError("Error 111 connecting")
    exc.__cause__ = ConnectionRefusedError(111, "Connection refused")
    return exc


class FakeStore:
    """Redis as the limiter sees it: tokens per action, an epoch, and a fault to raise on cue."""

    replica = "fake"

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.taken: dict[str, int] = {}
        self.epoch = "e1"
        self.fault: BaseException | None = None
        self.calls: list[str] = []
        self.seeded: dict[str, list[str]] = {}

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if self.fault is not None:
            raise self.fault

    async def acquire(self, action: str, member: str, hold: float, epoch: str) -> AcquireReply:
        return await self.spare(action, member, hold, epoch, 0)

    async def spare(self, action: str, member: str, hold: float, epoch: str, reserve: int) -> AcquireReply:
        self._call("acquire")
        if epoch != self.epoch:
            return EpochLost()
        if self.taken.get(action, 0) >= self.limit - reserve:
            return Full(0.0, self.limit, self.limit, ())
        self.taken[action] = self.taken.get(action, 0) + 1
        return Admitted()

    async def release(self, action: str, member: str) -> None:
        self._call("release")

    async def forget(self, action: str, member: str) -> None:
        self._call("forget")

    async def pause(self, action: str, seconds: float) -> None:
        self._call("pause")

    async def seed(self, action: str, returns: Sequence[tuple[str, float]]) -> None:
        self._call("seed")
        self.seeded.setdefault(action, []).extend(member for member, _ in returns)

    async def heartbeat(self, epoch: str, *, sent_at: float) -> Beat:
        self._call("heartbeat")
        if epoch and epoch != self.epoch:
            return Beat(self.epoch, False)
        return Beat(self.epoch, True)

    async def ping(self) -> None:
        self._call("ping")

    async def deregister(self) -> None:
        self._call("deregister")

    async def aclose(self) -> None:
        pass


class Replica:
    """One limiter on a virtual clock and a fake store, driven step by step."""

    def __init__(self, *, lifetime: float = 120.0) -> None:
        self.clock = VirtualClock()
        self.store = FakeStore(limit=20)
        self.metrics = Metrics("test")
        self.rate = RedisLimiter(
            url="redis://:pw@redis:6379/0",
            account="AKIDexample",
            limit=20,
            degraded_limit=6,
            expected_replicas=3,
            timeout=TIMEOUT,
            window=WINDOW,
            probe_interval=PROBE,
            lifetime=lifetime,
            metrics=self.metrics,
            clock=self.clock,
            store=self.store,
            watch=False,
        )

    async def take(self, hold: float = 1.0) -> Taken:
        return await self.rate._take(A, hold, self.clock())

    async def look(self) -> None:
        await self.rate.look(self.rate.mode)

    def mode(self) -> Mode:
        """The mode as the limiter sees it (a call: mypy must not narrow it across steps)."""
        return self.rate.mode

    def state(self) -> Mode:
        """The machine's own mode, which only a transition changes."""
        return self.rate._machine.mode

    @property
    def gauge(self) -> float:
        return self.metrics.registry.get_sample_value("tiw_limiter_degraded") or 0.0

    async def joined(self) -> float:
        """Registered (one heartbeat, answered at once in virtual time): when."""
        await self.look()
        assert self.rate._link.epoch == "e1"
        return self.clock()


def test_each_mode_carries_its_policy() -> None:
    policies = {m: (m.asks_redis, m.local_share, m.tells_redis, m.beats, m.admits, m.degraded) for m in Mode}
    assert policies == {
        Mode.SHARED: (True, False, True, True, True, False),
        Mode.SUSPECT: (False, False, False, False, False, False),
        Mode.DEGRADED: (False, True, False, False, True, True),
        Mode.RECOVERING: (True, True, True, True, True, False),
    }


async def test_a_time_out_makes_suspect_and_persisting_failure_degrades_after_a_quarantine() -> None:
    r = Replica()
    joined = await r.joined()
    assert isinstance(await r.take(hold=5.0), Granted)
    r.clock.advance(0.1)
    r.store.fault = RedisTimeoutError("Timeout reading from socket")
    assert isinstance(await r.take(), RetryAt)
    assert r.mode() is Mode.SUSPECT and r.gauge == 0
    assert r.rate.health()["degraded"] is False
    # Suspect: nobody admitted, Redis not asked; the watcher's verdict is awaited.
    calls = len(r.store.calls)
    assert await r.take() == RetryAt(r.clock() + SUSPICION)
    assert len(r.store.calls) == calls
    r.clock.advance(SUSPICION - 0.01)
    await r.look()
    assert r.mode() is Mode.SUSPECT  # not yet failing for the whole suspicion period
    r.clock.advance(0.01)
    await r.look()
    assert r.mode() is Mode.DEGRADED and r.gauge == 1
    # Others leave room for this replica's share once its registration is silent; what they took
    # before that is back a window later. Only then the local share, which counts the held token.
    local_from = joined + SILENT_AFTER + WINDOW
    assert await r.take() == RetryAt(local_from)
    r.clock.set(local_from)
    granted = [await r.take() for _ in range(6)]
    assert [isinstance(t, Granted) for t in granted] == [True] * 5 + [False]
    assert r.rate.health()["degraded"] is True


async def test_a_refused_connection_degrades_at_once() -> None:
    r = Replica()
    await r.joined()
    r.clock.advance(2.0)  # registered long ago: the quarantine is one window from now
    r.store.fault = refused()
    assert isinstance(await r.take(), RetryAt)
    assert r.mode() is Mode.DEGRADED
    assert r.rate._machine.stamps.local_from == r.clock() + WINDOW


async def test_recovery_seeds_before_registering_then_holds_off_and_health_changes_nothing() -> None:
    r = Replica()
    await r.joined()
    shared = await r.take()
    assert isinstance(shared, Granted)
    r.store.fault = refused()
    await r.take()
    r.clock.advance(SILENT_AFTER + WINDOW)
    local = await r.take()
    assert isinstance(local, Granted)
    shared.lease.release()  # while degraded: told to Redis with the seed
    r.store.fault = None
    r.store.calls.clear()
    await r.look()
    assert r.store.calls == ["ping", "seed", "heartbeat"]  # tokens counted before we look alive
    assert len(r.store.seeded[A]) == 2
    assert r.mode() is Mode.RECOVERING and r.gauge == 0
    hold_off = PROBE + TIMEOUT + HOLD_OFF_MARGIN
    assert r.rate._machine.stamps.shared_at == r.clock() + hold_off
    r.clock.advance(hold_off)
    assert str(r.rate.health()["detail"]).startswith("shared through Redis")
    assert r.state() is Mode.RECOVERING  # health() looked, it did not switch
    assert isinstance(await r.take(), Granted)
    assert r.state() is Mode.SHARED


async def test_recovering_admits_only_what_both_redis_and_the_share_allow() -> None:
    r = Replica()
    await r.joined()
    r.store.fault = refused()
    await r.take()
    r.clock.advance(SILENT_AFTER + WINDOW)
    r.store.fault = None
    await r.look()
    assert r.mode() is Mode.RECOVERING
    taken = [await r.take() for _ in range(7)]
    assert [isinstance(t, Granted) for t in taken] == [True] * 6 + [False]
    r.store.taken[A] = 20  # and Redis full: nothing, even with room in the share
    r.clock.advance(WINDOW + 1.0 + 0.01)  # the six are back (hold + window)
    assert isinstance(await r.take(), RetryAt)


async def test_a_replica_cut_off_longer_than_its_registration_lives_stops_admitting() -> None:
    """Others drop a registration silent for ``lifetime``; every local token must be back by then."""
    r = Replica(lifetime=10.0)
    joined = await r.joined()
    r.store.fault = refused()
    await r.take()
    r.clock.set(joined + 8.5)
    assert isinstance(await r.take(hold=0.4), Granted)  # back by 9.9: before the registration lapses
    assert isinstance(await r.take(hold=1.0), RetryAt)  # would be back at 10.5: after
    r.clock.set(joined + 9.5)
    assert "stopped" in str(r.rate.health()["detail"])


async def test_a_replica_that_never_registered_admits_nothing_locally() -> None:
    r = Replica()
    r.store.fault = refused()
    assert isinstance(await r.take(), RetryAt)
    assert r.mode() is Mode.DEGRADED
    assert r.rate._machine.stamps.local_until == -math.inf
    r.clock.advance(60.0)
    assert isinstance(await r.take(hold=0.0), RetryAt)


async def test_a_changed_epoch_means_redis_lost_its_state_reseed_and_hold_off() -> None:
    r = Replica()
    await r.joined()
    held = await r.take()
    assert isinstance(held, Granted)
    r.store.epoch = "e2"  # restarted between two of our calls: no error was ever seen
    r.store.taken.clear()
    assert isinstance(await r.take(), RetryAt)
    assert r.mode() is Mode.RECOVERING and r.rate._machine.stamps.shared_at == math.inf
    r.store.calls.clear()
    await r.look()
    assert r.store.calls == ["seed", "heartbeat"]
    assert len(r.store.seeded[A]) == 1  # the token Redis forgot is back in it
    assert r.rate._link.epoch == "e2"
    assert r.rate._machine.stamps.shared_at < math.inf


async def test_a_heartbeat_finds_the_epoch_changed_too() -> None:
    r = Replica()
    await r.joined()
    r.store.epoch = "e2"
    r.clock.advance(PROBE)
    await r.look()
    assert r.mode() is Mode.RECOVERING
    await r.look()
    assert r.rate._link.epoch == "e2"


async def test_a_failed_seed_suspects_again_and_keeps_what_it_had_to_tell() -> None:
    r = Replica()
    await r.joined()
    r.store.fault = refused()
    await r.take()
    r.clock.advance(SILENT_AFTER + WINDOW)
    assert isinstance(await r.take(), Granted)

    r.store.fault = None
    original = r.store.seed

    async def failing(action: str, returns: Sequence[tuple[str, float]]) -> None:
        raise RedisTimeoutError("Timeout")

    r.store.seed = failing  # type: ignore[method-assign]
    await r.look()
    assert r.mode() is Mode.SUSPECT
    r.store.seed = original  # type: ignore[method-assign]
    await r.look()
    assert r.mode() is Mode.RECOVERING
    # The local lease, and the member of the admission that failed (Redis may hold it: removed).
    assert sorted(r.store.seeded[A]) == ["fake:0", "fake:1"]


@pytest.mark.parametrize("mode", [Mode.SUSPECT, Mode.DEGRADED])
async def test_releases_wait_for_the_seed_while_redis_is_away(mode: Mode) -> None:
    r = Replica()
    await r.joined()
    lease = await r.take()
    assert isinstance(lease, Granted)
    r.store.fault = RedisTimeoutError("Timeout") if mode is Mode.SUSPECT else refused()
    await r.take()
    assert r.mode() is mode
    r.store.calls.clear()
    lease.lease.release()
    assert r.store.calls == []  # nothing sent: kept for the seed
    assert lease.lease.member in r.rate._link.unsynced  # type: ignore[attr-defined]
