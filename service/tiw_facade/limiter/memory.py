"""The in-process limiter: exact for one replica, needs nothing else."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from tiw_facade.limiter import CallerObserver, Lease
from tiw_facade.limiter._ledger import Clock, Ledger, LocalLease
from tiw_facade.limiter._queue import Granted, Outlook, QueuedLimiter, RetryAt, Taken

if TYPE_CHECKING:
    from tiw_facade.metrics import Metrics


class MemoryLimiter(QueuedLimiter):
    """``limit`` tokens per action; each comes back a window after the answer to the call that took it."""

    backend = "memory"

    def __init__(
        self,
        *,
        limit: int,
        window: float = 1.0,
        max_queue_wait: float = 5.0,
        max_queue_length: int = 1000,
        metrics: Metrics | None = None,
        observer: CallerObserver | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        super().__init__(
            limit=limit,
            window=window,
            max_queue_wait=max_queue_wait,
            max_queue_length=max_queue_length,
            metrics=metrics,
            observer=observer,
            clock=clock,
        )
        self._ledgers: dict[str, Ledger] = {}

    @property
    def degraded(self) -> bool:
        return False

    def _ledger(self, action: str) -> Ledger:
        ledger = self._ledgers.get(action)
        if ledger is None:
            ledger = self._ledgers[action] = Ledger(self._window, self._clock)
        return ledger

    async def _take(self, action: str, hold: float, now: float, reserve: int = 0) -> Taken:
        ledger = self._ledger(action)
        back = ledger.room(now, self._limit - reserve)
        if back is not None:
            return RetryAt(back)
        return Granted(ledger.add(LocalLease(ledger, now + hold + self._window)))

    def _outlook(self, action: str, now: float) -> Outlook:
        returning, in_flight = self._ledger(action).outlook(now)
        return Outlook(self._limit, returning, in_flight)

    def _discard(self, action: str, lease: Lease) -> None:
        assert isinstance(lease, LocalLease)
        self._ledger(action).discard(lease)

    def health(self) -> dict[str, object]:
        return {
            "backend": self.backend,
            "degraded": False,
            "detail": f"in-process: {self._limit} per {self._window:g}s per action",
        }
