"""The in-process limiter: exact for one replica, needs nothing else."""

from __future__ import annotations

from tiw_facade.limiter import Lease
from tiw_facade.limiter._ledger import LocalLease
from tiw_facade.limiter._queue import Granted, Outlook, QueuedLimiter, RetryAt, Taken


class MemoryLimiter(QueuedLimiter):
    """``limit`` tokens per action; each comes back a window after the answer to the call that took it."""

    backend = "memory"

    @property
    def degraded(self) -> bool:
        return False

    async def _take(self, action: str, hold: float, now: float, reserve: int = 0) -> Taken:
        ledger = self._ledgers[action]
        back = ledger.room(now, self._limit - reserve)
        if back is not None:
            return RetryAt(back)
        return Granted(ledger.add(LocalLease(ledger, now + hold + self._window)))

    def _outlook(self, action: str, now: float) -> Outlook:
        returning, in_flight = self._ledgers[action].outlook(now)
        return Outlook(self._limit, returning, in_flight)

    def _discard(self, action: str, lease: Lease) -> None:
        assert isinstance(lease, LocalLease)
        self._ledgers[action].discard(lease)

    def health(self) -> dict[str, object]:
        return {
            "backend": self.backend,
            "degraded": False,
            "detail": f"in-process: {self._limit} per {self._window:g}s per action",
        }
