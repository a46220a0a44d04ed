"""Admission to TIW: at most ``limit`` requests per action ARRIVE at TIW in any window, all replicas together.

Why not a plain token bucket: a bucket of N refilled at N/s admits 2N in one second. Why not a sliding
log of admission times: a request reaches TIW some time after it is admitted (queues, connection
set-up, five actions freeing their slots at the same instant), so admissions spaced by a window still
arrive closer than that (measured: 28 arrivals in one second with a 1.02 s log). What this package
builds instead: a bucket of ``limit`` tokens where each token comes back exactly one window after the
ANSWER to the call that took it (TIW saw the call before we saw its answer, so the next call on that
token arrives at least a window later, however the network jitters). A call whose answer never comes
keeps its token until its hold time-out, plus a window.

Waiting calls of one action are served by caller in weighted round robin (``_fair``): a caller
flooding the limiter delays the others by at most one turn of its own; see docs/limiter.md.

Two backends behind one interface: in-process (``memory``) for one replica, and Redis (``shared``)
for replicas sharing the quota, which falls back to a local share of the limit while Redis is down.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from tiw_facade.metrics import Metrics
    from tiw_facade.settings import Settings
    from tiw_facade.shared_redis import Target

Reason = Literal["deadline", "max_wait", "queue_full"]
UNIDENTIFIED = "unidentified"  # the caller of a call that names none (as ``identity.UNIDENTIFIED``)


class QuotaExceeded(Exception):
    """No slot for this call within its deadline, within the longest wait, or no room in the queue.

    Knows nothing of gRPC: the server maps it to RESOURCE_EXHAUSTED with RetryInfo and QuotaFailure.
    """

    def __init__(self, action: str, reason: Reason, retry_after: float) -> None:
        self.action = action
        self.reason: Reason = reason
        # Seconds until a slot is expected to be free: an optimistic estimate, never negative.
        self.retry_after = max(0.0, retry_after)
        super().__init__(f"{action}: rate limit ({reason}); a slot is expected in {self.retry_after:.3f}s")


class LimiterClosed(RuntimeError):
    """``acquire`` after (or while waiting during) ``aclose``: the service is shutting down."""


class Lease(Protocol):
    """One upstream attempt's token."""

    def release(self) -> None:
        """The attempt ended (answer received, or given up): the token comes back one window from now.

        Idempotent and synchronous; call it in ``finally`` around the attempt.
        """


class CallerObserver(Protocol):
    """What the limiter tells about each caller (for metrics by caller; the limiter keeps no labels).

    Called synchronously on the admission path: keep it cheap, and bound the label values there.
    """

    def admitted(self, action: str, caller: str, wait: float) -> None:
        """A call of ``caller`` got its token after waiting ``wait`` seconds."""

    def refused(self, action: str, caller: str, reason: Reason) -> None:
        """A call of ``caller`` was refused (``QuotaExceeded`` with ``reason``)."""


class Limiter(abc.ABC):
    """Admission per action for one account. See the module docstring for the invariant."""

    backend: str

    @property
    @abc.abstractmethod
    def degraded(self) -> bool:
        """True while a shared limiter cannot reach its backend and uses a local share of the limit."""

    @abc.abstractmethod
    async def acquire(
        self,
        action: str,
        *,
        deadline: float | None,
        hold: float,
        caller: str = UNIDENTIFIED,
        weight: int = 1,
    ) -> Lease:
        """Wait for a token of ``action``: callers in weighted round robin, each one's calls in order.

        ``caller``/``weight``: whose call this is and its share among the callers waiting (at least
        1); a caller alone gets every token.

        ``deadline``: absolute ``time.monotonic()`` by which the caller needs its answer, or None.
        ``hold``: the longest the attempt can take; a lease never released comes back after
        ``hold`` plus a window (a crashed replica cannot leak tokens for good).

        Raises ``QuotaExceeded`` at once when the expected slot lies beyond ``deadline`` or beyond
        the longest wait, or when the wait queue is full; and later if the deadline or the longest
        wait passes while waiting. A caller cancelled while waiting consumes nothing.
        """

    async def try_spare(self, action: str, *, hold: float, reserve: int) -> Lease | None:
        """A token for work nobody waits on (a background refresh), only if it costs no caller anything.

        A lease at once, never queued, only when the limiter is open, ``action`` is not paused, no
        call of ``action`` waits in this process, and more than ``reserve`` tokens are free now (at
        least ``reserve`` stay free after this one; for a shared limiter, fleet-wide and atomically in
        Redis, or of the local share while Redis is away). Otherwise None, at once: never
        ``QuotaExceeded``, and None (not ``LimiterClosed``) once closed. The lease is like any other
        (``hold``, ``release``). Counted as admitted, but not reported to the ``CallerObserver``.

        This default grants nothing (always within the limit), for limiters that do not implement it.
        """
        return None

    def spare_hint(self, action: str, *, reserve: int) -> float:
        """Seconds until ``try_spare(action, reserve=reserve)`` may grant: 0 if it may now.

        Optimistic (tokens handed back unused, or another replica's, can free one sooner; callers
        arriving can take it first): ask then, and again after the next hint. ``math.inf`` once
        closed, and for limiters that never grant spare tokens.
        """
        return math.inf

    @abc.abstractmethod
    def pause(self, action: str, seconds: float = 1.0) -> None:
        """TIW answered RequestLimitExceeded: hold every admission of ``action`` for ``seconds``."""

    @abc.abstractmethod
    def health(self) -> dict[str, object]:
        """``{"backend": ..., "degraded": ..., "detail": ...}`` for /healthz."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Stop background work, refuse waiting callers with ``LimiterClosed``, return shared tokens."""


@dataclasses.dataclass(frozen=True, slots=True)
class LimiterConfig:
    """The quota and where it is kept; seconds, unless named otherwise."""

    rate_limit: int = 20  # TIW_RATE_LIMIT: requests per window per action, every replica together
    max_queue_wait: float = 5.0  # TIW_MAX_QUEUE_WAIT
    max_queue_length: int = 1000  # TIW_MAX_QUEUE_LENGTH: callers waiting per action
    redis: Target | None = None  # TIW_REDIS_URL (or Sentinel, Cluster); None: in process
    account: str = "default"  # whose quota (TIW_RATE_LIMIT_ACCOUNT, else the SecretId): with Redis
    expected_replicas: int = 1  # TIW_EXPECTED_REPLICAS: with Redis

    @classmethod
    def from_settings(cls, settings: Settings) -> LimiterConfig:
        from tiw_facade import shared_redis
        from tiw_facade.settings import configure

        return configure(cls, settings, redis=shared_redis.target(settings, "limiter"))

    @property
    def degraded_limit(self) -> int:
        """Per-replica limit while Redis is unreachable: never unlimited, never zero."""
        return max(1, self.rate_limit // self.expected_replicas)


def create_limiter(
    config: LimiterConfig,
    metrics: Metrics | None = None,
    *,
    window: float = 1.0,
    observer: CallerObserver | None = None,
) -> Limiter:
    """The limiter ``config`` asks for: in-process without a Redis, else shared through Redis.

    Needs no running event loop; a shared limiter connects on first use.
    """
    # Imported here: the backends import this module's interface.
    if config.redis is None:
        from tiw_facade.limiter.memory import MemoryLimiter

        return MemoryLimiter(
            limit=config.rate_limit,
            window=window,
            max_queue_wait=config.max_queue_wait,
            max_queue_length=config.max_queue_length,
            metrics=metrics,
            observer=observer,
        )
    from tiw_facade.limiter.shared import RedisLimiter

    return RedisLimiter(
        target=config.redis,
        account=config.account,
        limit=config.rate_limit,
        degraded_limit=config.degraded_limit,
        expected_replicas=config.expected_replicas,
        timeout=config.redis.timeout,
        window=window,
        max_queue_wait=config.max_queue_wait,
        max_queue_length=config.max_queue_length,
        metrics=metrics,
        observer=observer,
    )


__all__ = [
    "UNIDENTIFIED",
    "CallerObserver",
    "Lease",
    "Limiter",
    "LimiterClosed",
    "LimiterConfig",
    "QuotaExceeded",
    "Reason",
    "create_limiter",
]
