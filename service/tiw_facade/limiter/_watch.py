"""When the shared limiter looks at Redis: the watcher's schedule, and the sleep a mode change cuts short.

Shared: a heartbeat every probe interval (even an idle replica notices an outage). Suspect: quick
retries. Degraded: a ping at a random point of each interval. Recovering: until the seed lands,
quick retries; then heartbeats, and a look when the hold-off ends. Each look is ``RedisLink.look``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
from collections.abc import Awaitable, Callable

from tiw_facade import background
from tiw_facade.limiter._ledger import Clock
from tiw_facade.limiter._modes import Machine, Mode
from tiw_facade.limiter._queue import wake

# How soon the watcher looks again while Redis is suspect, or while a recovery's seed is to land.
SUSPECT_RETRY = 0.05


@dataclasses.dataclass(eq=False, kw_only=True)
class Watcher:
    """The background task that calls ``look`` when the mode's schedule says; ``wake`` makes it
    look at the mode now (a transition may change when it is due)."""

    machine: Machine
    clock: Clock
    probe_interval: float
    look: Callable[[Mode], Awaitable[None]]
    closed: Callable[[], bool]
    _task: asyncio.Task[None] | None = dataclasses.field(default=None, init=False)
    _alarm: asyncio.Future[None] | None = dataclasses.field(default=None, init=False)  # the current sleep

    @property
    def started(self) -> bool:
        return self._task is not None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="limiter-redis-watch")

    def wake(self) -> None:
        if self._alarm is not None and not self._alarm.done():
            self._alarm.set_result(None)

    async def stop(self) -> None:
        if self._task is not None:
            await background.stop([self._task])
            self._task = None

    def _due(self, mode: Mode, last: float, gap: float) -> float:
        """When the watcher looks next (``last``: its last look)."""
        stamps = self.machine.stamps
        if mode is Mode.SUSPECT:
            return last + SUSPECT_RETRY
        if mode is Mode.DEGRADED:
            return last + gap
        if mode is Mode.RECOVERING and stamps.shared_at == math.inf:
            return last + SUSPECT_RETRY  # the seed is still to land
        if mode is Mode.RECOVERING:
            return min(last + self.probe_interval, stamps.shared_at)
        return last + self.probe_interval  # heartbeats: even an idle replica notices an outage

    async def _watch(self) -> None:
        last = -math.inf
        gap = self.probe_interval
        while not self.closed():
            now = self.clock()
            mode = self.machine.settle(now)
            due = self._due(mode, last, gap)
            if now < due:
                await self._nap(due - now)
                continue
            last = now
            # Degraded replicas probe at random points of the interval, never later than its end
            # (which RECOVERING's hold-off counts on): replicas that lost Redis together do not all
            # reconnect at the same instant.
            gap = self.probe_interval * random.uniform(0.5, 1.0)
            await self.look(mode)

    async def _nap(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        self._alarm = loop.create_future()
        handle = loop.call_later(seconds, wake, self._alarm)
        try:
            await self._alarm
        finally:
            handle.cancel()
            self._alarm = None
