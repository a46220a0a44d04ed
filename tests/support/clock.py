"""Time that moves only when a test moves it.

Components take their clock as an argument (a zero-argument callable returning seconds), so a test
passes a :class:`VirtualClock` and asserts on exact instants instead of sleeping and asserting a
window of wall-clock time that a loaded machine may miss.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class VirtualClock:
    """A clock at ``start`` that moves only by :meth:`advance` or :meth:`set`."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    @classmethod
    def at_wall_time(cls) -> VirtualClock:
        """Starting at the current wall-clock second: for code that compares it with real dates
        (HTTP ``Date`` headers, signed timestamps)."""
        return cls(float(int(time.time())))

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go back; use set() to model a clock step")
        self.now += seconds

    def set(self, now: float) -> None:
        """Jump to ``now``, backwards too: a wall clock corrected by NTP."""
        self.now = now


async def turns_until(condition: Callable[[], bool], *, turns: int = 1000) -> None:
    """Let the event loop run the other tasks, no time passing on any clock, until ``condition``
    holds: each turn is one pass over the loop's ready callbacks (``asyncio.sleep(0)`` sleeps for no
    time at all). Fails after ``turns`` passes: something the test waits for never happened."""
    for _ in range(turns):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"not so after {turns} turns of the event loop")
