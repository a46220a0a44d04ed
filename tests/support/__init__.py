"""Helpers for tests that need real things (processes, ports, time) rather than fakes."""

from __future__ import annotations

import asyncio
import bisect
import random
import time
from collections.abc import Callable, Sequence

from tiw_facade.limiter import Lease, Limiter


class SimulatedTiw:
    """An upstream whose calls each ARRIVE at a random moment between admission and answer.

    That is what the limiter must be proof against: the arrival TIW counts is neither the admission
    nor the answer. ``stall()`` holds every answer for a while, so the tokens of all calls in
    flight come back at the same instant (and their next calls leave together).
    """

    def __init__(self, *, latency: tuple[float, float] = (0.001, 0.05), seed: int | None = None) -> None:
        self.latency = latency
        self.admissions: list[float] = []
        self.arrivals: list[float] = []
        self.answers: list[float] = []
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._rng = random.Random(seed)

    async def call(self, lease: Lease) -> None:
        self.admissions.append(time.monotonic())
        latency = self._rng.uniform(*self.latency)
        arrive = self._rng.uniform(0, latency)
        try:
            await asyncio.sleep(arrive)
            self.arrivals.append(time.monotonic())
            await asyncio.sleep(latency - arrive)
            await self._flowing.wait()
        finally:
            # Recorded before release: the limiter's own release time is no earlier.
            self.answers.append(time.monotonic())
            lease.release()

    async def stall(self, seconds: float) -> None:
        self._flowing.clear()
        try:
            await asyncio.sleep(seconds)
        finally:
            self._flowing.set()

    async def stalls(self, *, every: tuple[float, float], length: tuple[float, float]) -> None:
        """Stall now and then, until cancelled."""
        while True:
            await asyncio.sleep(self._rng.uniform(*every))
            await self.stall(self._rng.uniform(*length))


async def saturate(
    limiter: Limiter, action: str, upstream: SimulatedTiw, *, callers: int, until: float, hold: float = 5.0
) -> None:
    """``callers`` independent callers, each calling again as soon as its call ends, until ``until``."""

    async def caller() -> None:
        while time.monotonic() < until:
            lease = await limiter.acquire(action, deadline=None, hold=hold)
            await upstream.call(lease)

    await asyncio.gather(*(caller() for _ in range(callers)))


def max_in_window(times: Sequence[float], window: float = 1.0) -> int:
    """The most events in any half-open window [t, t + window)."""
    ordered = sorted(times)
    return max((bisect.bisect_left(ordered, t + window) - i for i, t in enumerate(ordered)), default=0)


def count_between(times: Sequence[float], start: float, end: float) -> int:
    return sum(1 for t in times if start <= t < end)


def wake_delays(
    admissions: Sequence[float], answers: Sequence[float], *, limit: int, window: float, until: float
) -> list[float]:
    """Under saturation, how long after each token came back it was taken again.

    The (limit + k)-th admission needs k tokens back, so it comes no earlier than the k-th return
    (answer + window): a negative delay is a token used before it was back. A large one is quota
    left idle.
    """
    taken = sorted(admissions)
    back = sorted(answer + window for answer in answers)
    delays = []
    for k, returned in enumerate(back):
        index = limit + k
        if index >= len(taken) or taken[index] > until:
            break
        delays.append(taken[index] - returned)
    return delays


async def eventually(condition: Callable[[], bool], *, within: float = 2.0) -> float:
    """Wait until ``condition()`` holds; how long it took. Fails after ``within`` seconds."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > within:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(0.005)
    return time.monotonic() - started


class LoopLag:
    """How late this event loop wakes up. On a shared machine other processes take the CPU now and
    then; every timed thing is then late by about this much, the limiter included."""

    def __init__(self) -> None:
        self.samples: list[float] = []

    async def measure(self, every: float = 0.01) -> None:
        """Until cancelled."""
        while True:
            started = time.monotonic()
            await asyncio.sleep(every)
            self.samples.append(time.monotonic() - started - every)

    @property
    def mean(self) -> float:
        return sum(self.samples) / len(self.samples) if self.samples else 0.0
