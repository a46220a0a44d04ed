"""A fair share of the quota per caller: waiting calls of one action are served by caller in weighted
round robin, each caller's calls in order; the limit itself does not move. In-process, then two
replicas sharing a real redis-server."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
from support import SimulatedTiw, count_between, max_in_window, saturate
from support.redis_server import RedisServer
from tiw_facade.limiter import Lease, Limiter, QuotaExceeded, Reason
from tiw_facade.limiter.memory import MemoryLimiter
from tiw_facade.limiter.shared import RedisLimiter

A = "CreateSnapshotTask"


@dataclasses.dataclass
class Calls:
    """What one caller got: its waits (admitted calls) and refusals."""

    waits: list[float] = dataclasses.field(default_factory=list)
    refused: list[Reason] = dataclasses.field(default_factory=list)


async def steady(
    rate: Limiter,
    upstream: SimulatedTiw,
    caller: str,
    *,
    per_second: float,
    until: float,
    weight: int = 1,
    patience: float = 1.5,
) -> Calls:
    """``caller`` starting ``per_second`` calls a second, whatever became of the earlier ones."""
    calls = Calls()
    tasks: set[asyncio.Task[None]] = set()

    async def one() -> None:
        start = time.monotonic()
        try:
            lease = await rate.acquire(A, deadline=start + patience, hold=5, caller=caller, weight=weight)
        except QuotaExceeded as exc:
            calls.refused.append(exc.reason)
            return
        calls.waits.append(time.monotonic() - start)
        await upstream.call(lease)

    due = time.monotonic()
    while due < until:
        while due <= time.monotonic():  # catch up after a late wake-up
            task = asyncio.create_task(one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            due += 1 / per_second
        await asyncio.sleep(max(0.0, due - time.monotonic()))
    await asyncio.gather(*tasks)
    return calls


async def order_of_grants(rate: MemoryLimiter, calls: list[tuple[str, int]]) -> list[str]:
    """Queue ``calls`` (caller, weight) behind the one token, in this order, then let the token go
    round: the callers in the order they got it."""
    held = await rate.acquire(A, deadline=None, hold=5)
    got: list[str] = []

    async def call(n: int, caller: str, weight: int) -> None:
        lease = await rate.acquire(A, deadline=None, hold=5, caller=caller, weight=weight)
        got.append(f"{caller}{n}")
        lease.release()

    tasks = [asyncio.create_task(call(n, caller, weight)) for n, (caller, weight) in enumerate(calls)]
    for _ in range(3):
        await asyncio.sleep(0)
    assert rate._states[A].live == len(calls)  # all queued before the first grant
    held.release()
    await asyncio.gather(*tasks)
    return got


async def settle() -> None:
    """Let every task that can run, run (a task refused while queued ends a step later)."""
    for _ in range(5):
        await asyncio.sleep(0)


class Observer:
    """A ``CallerObserver`` that records."""

    def __init__(self) -> None:
        self.admissions: list[tuple[str, str, float]] = []
        self.refusals: list[tuple[str, str, Reason]] = []

    def admitted(self, action: str, caller: str, wait: float) -> None:
        self.admissions.append((action, caller, wait))

    def refused(self, action: str, caller: str, reason: Reason) -> None:
        self.refusals.append((action, caller, reason))


# --- in-process: the order ---


async def test_callers_take_turns_each_in_its_own_arrival_order() -> None:
    rate = MemoryLimiter(limit=1, window=0.005)
    calls = [("a", 1)] * 4 + [("b", 1)] * 3 + [("c", 1)]
    got = await order_of_grants(rate, calls)
    # FIFO would serve a0 a1 a2 a3 b4 b5 b6 c7.
    assert got == ["a0", "b4", "c7", "a1", "b5", "a2", "b6", "a3"]
    await rate.aclose()


async def test_weights_3_to_1_between_two_queued_callers() -> None:
    rate = MemoryLimiter(limit=1, window=0.005)
    calls = [("a", 3)] * 9 + [("c", 1)] * 5
    got = await order_of_grants(rate, calls)
    assert [name[0] for name in got] == list("aaac" * 3 + "cc")
    await rate.aclose()


async def test_a_light_caller_is_estimated_by_its_turn_not_behind_the_flood() -> None:
    """Refusals at once go by where the round robin puts the call: a flood that fills the longest
    wait does not get a light caller refused at once (in FIFO it would be)."""
    observer = Observer()
    rate = MemoryLimiter(limit=1, window=0.1, max_queue_wait=0.35, observer=observer)
    held = await rate.acquire(A, deadline=None, hold=5)  # back a window after it is released
    flood = [asyncio.create_task(rate.acquire(A, deadline=None, hold=5, caller="a")) for _ in range(3)]
    await asyncio.sleep(0)
    with pytest.raises(QuotaExceeded) as refused:  # the 4th of "a": 0.4 s away
        await rate.acquire(A, deadline=None, hold=5, caller="a")
    assert refused.value.reason == "max_wait"
    light = asyncio.create_task(rate.acquire(A, deadline=None, hold=5, caller="b"))  # 0.2 s away
    await asyncio.sleep(0)
    assert not light.done() and rate._states[A].live == 4  # queued (in FIFO: 0.4 s, refused at once)
    assert [(caller, reason) for _, caller, reason in observer.refusals] == [("a", "max_wait")]
    held.release()
    await rate.aclose()
    await asyncio.gather(*flood, light, return_exceptions=True)


async def test_a_full_queue_drops_the_newest_call_of_the_longest_queue() -> None:
    """The bound stays (TIW_MAX_QUEUE_LENGTH per action), but a flood cannot keep others out of it:
    the caller most over its share loses its newest call instead."""
    observer = Observer()
    rate = MemoryLimiter(limit=1, window=0.01, max_queue_length=4, observer=observer)
    held = await rate.acquire(A, deadline=None, hold=5)

    def queue(caller: str) -> asyncio.Task[Lease]:
        return asyncio.create_task(rate.acquire(A, deadline=None, hold=5, caller=caller))

    flood = [queue("a") for _ in range(4)]
    await settle()
    light = [queue("b")]
    await settle()
    assert flood[3].done() and isinstance(flood[3].exception(), QuotaExceeded)  # a's newest made room
    with pytest.raises(QuotaExceeded) as full:  # a again: a is the longest queue, so a is refused
        await rate.acquire(A, deadline=None, hold=5, caller="a")
    assert full.value.reason == "queue_full"
    light.append(queue("b"))  # b (1) < a (3): a's newest goes again
    await settle()
    assert flood[2].done() and isinstance(flood[2].exception(), QuotaExceeded)
    with pytest.raises(QuotaExceeded):  # 2 and 2: b's third would be longer than a's: b is refused
        await rate.acquire(A, deadline=None, hold=5, caller="b")
    assert rate._states[A].live == 4
    held.release()
    for granted in asyncio.as_completed([*flood[:2], *light]):
        (await granted).release()
    assert [(caller, reason) for _, caller, reason in observer.refusals] == [
        ("a", "queue_full"),
        ("a", "queue_full"),
        ("a", "queue_full"),
        ("b", "queue_full"),
    ]
    assert rate._states[A].queue.ring == {}  # per-caller state is gone with the calls
    await rate.aclose()


async def test_callers_that_leave_leave_no_state() -> None:
    rate = MemoryLimiter(limit=1, window=0.01)
    held = await rate.acquire(A, deadline=None, hold=5)
    waiting = [asyncio.create_task(rate.acquire(A, deadline=None, hold=5, caller=f"c{n}")) for n in range(50)]
    await asyncio.sleep(0)
    assert len(rate._states[A].queue.ring) == 50
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    assert rate._states[A].queue.ring == {} and rate._states[A].live == 0
    held.release()
    await rate.aclose()


# --- in-process: in real time ---


@pytest.mark.slow
async def test_a_flood_leaves_a_light_caller_every_call_within_a_window() -> None:
    """A asks 10x the quota, B 2 a second: every call of B gets its token within a window, A gets
    the rest, and the limit holds."""
    rate = MemoryLimiter(limit=20, window=1.0)
    upstream = SimulatedTiw(seed=3)
    duration = 4.0
    until = time.monotonic() + duration
    flood, light = await asyncio.gather(
        steady(rate, upstream, "a", per_second=200, until=until),
        steady(rate, upstream, "b", per_second=2, until=until),
    )
    await rate.aclose()
    assert light.refused == [] and len(light.waits) >= 2 * duration - 1
    assert max(light.waits) < 1.0, light.waits
    assert max_in_window(upstream.arrivals) <= 20
    first = min(upstream.admissions)
    used = count_between(upstream.arrivals, first, first + duration)
    assert used >= 0.9 * 20 * duration, used
    assert len(flood.waits) == len(upstream.admissions) - len(light.waits)
    assert len(flood.refused) > 0.5 * 200 * duration  # the rest of its flood was refused


@pytest.mark.slow
async def test_two_flooding_callers_share_3_to_1_and_one_alone_takes_it_all() -> None:
    rate = MemoryLimiter(limit=20, window=1.0)
    admitted: dict[str, list[float]] = {"a": [], "c": []}

    async def loop(caller: str, weight: int, until: float) -> None:
        while time.monotonic() < until:
            lease = await rate.acquire(A, deadline=None, hold=5, caller=caller, weight=weight)
            admitted[caller].append(time.monotonic())
            await upstream.call(lease)

    upstream = SimulatedTiw(seed=5)
    start = time.monotonic()
    until = start + 4.5
    await asyncio.gather(*(loop("a", 3, until) for _ in range(20)), *(loop("c", 1, until) for _ in range(20)))
    # The first window's tokens go to whoever asks first (no queue yet), and after `until` only the
    # calls still queued are served; in between, turns of 3 and 1.
    a, c = (count_between(admitted[caller], start + 0.5, until) for caller in ("a", "c"))
    assert c >= 15 and 2.5 <= a / c <= 3.5, (a, c)
    assert max_in_window(upstream.arrivals) <= 20

    alone = SimulatedTiw(seed=6)
    await asyncio.sleep(1.0)  # every token back
    start = time.monotonic()
    await saturate(rate, A, alone, callers=30, until=start + 2.0)  # the one caller "unidentified"
    assert count_between(alone.arrivals, start, start + 2.0) >= 0.95 * 20 * 2.0
    assert max_in_window(alone.arrivals) <= 20
    await rate.aclose()


# --- two replicas sharing Redis ---


@pytest.mark.slow
async def test_two_replicas_each_fair_to_its_light_caller(redis_server: RedisServer) -> None:
    """Each replica is fair among its own callers over the shared count: a flood on both replicas
    still leaves each replica's light caller every call within a window; the fleet keeps the limit."""
    replicas = [
        RedisLimiter(
            url=redis_server.url,
            account="fair",
            limit=20,
            degraded_limit=10,
            expected_replicas=2,
            timeout=1.0,
        )
        for _ in range(2)
    ]
    for rate in replicas:  # join, and wait out a new epoch's hold-off
        (await rate.acquire("warm-up", deadline=None, hold=1)).release()
    upstream = SimulatedTiw(seed=9)  # the one TIW both replicas call
    duration = 4.0
    until = time.monotonic() + duration
    results = await asyncio.gather(
        *(steady(rate, upstream, "a", per_second=100, until=until) for rate in replicas),
        *(steady(rate, upstream, "b", per_second=2, until=until) for rate in replicas),
    )
    for rate in replicas:
        assert not rate.degraded
        await rate.aclose()
    for light in results[2:]:
        assert light.refused == [] and len(light.waits) >= 2 * duration - 1
        assert max(light.waits) < 1.0, light.waits
    assert max_in_window(upstream.arrivals) <= 20
    first = min(upstream.admissions)
    assert count_between(upstream.arrivals, first, first + duration) >= 0.85 * 20 * duration
