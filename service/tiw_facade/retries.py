"""What may be sent to TIW again, and the loop that does it.

``retry_target`` is the loop, in the manner of google-api-core's: a target called until it succeeds,
a predicate on each failure (why it may be retried, or None), exponential back-off with full jitter,
an attempt cap, and a deadline no retry starts too close to. It knows nothing of TIW: its clock,
sleep and randomness are arguments, so a test drives it on virtual time.

``retry_reason`` is the predicate for Tencent's answers under a ``RetryPolicy``: what TIW provably
did not execute (refused, or never sent) may be sent again for any action, even CreateSnapshotTask;
what it may have executed only for an action declared safe to repeat.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tiw_facade.failures import Outcome, TiwError, UpstreamFailure, UpstreamHttpError, UpstreamMalformed

T = TypeVar("T")

# TIW's codes that say it refused the request without executing it: safe to re-send for every action.
NOT_EXECUTED = ("RequestLimitExceeded", "AuthFailure.SignatureExpire")


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """What may be re-sent for one action, by what TIW does on a duplicate."""

    # May a request be re-sent when TIW may already have executed it (time-out, reset, 5xx)?
    resend_maybe_delivered: bool
    # An error code that, after an attempt whose answer was lost, means the lost attempt succeeded.
    success_after_lost_answer: str | None = None


# The default for an action nobody declared safe: never re-send what TIW may have received.
NEVER_RESEND = RetryPolicy(resend_maybe_delivered=False)


def retry_reason(exc: BaseException, policy: RetryPolicy) -> str | None:
    """Why ``exc`` may be retried under ``policy`` (the retries metric's label), or None: it must not be."""
    if isinstance(exc, TiwError):
        refused = next((family for family in NOT_EXECUTED if exc.code.startswith(family)), None)
        if refused is not None:
            return refused  # TIW refused without executing: safe for every action (one label per family)
        if exc.code.startswith("InternalError") and policy.resend_maybe_delivered:
            return "InternalError"
        return None
    if not isinstance(exc, UpstreamFailure):
        return None  # the facade's own refusals (rate limit, shutting down): nothing to send again
    if exc.outcome is Outcome.NOT_SENT:
        return exc.reason
    if isinstance(exc, UpstreamMalformed):
        return None  # TIW answered: the same request would most likely get the same answer
    if isinstance(exc, UpstreamHttpError) and not 500 <= exc.status <= 599:
        return None  # a redirect or a client error: sending again changes nothing
    return exc.reason if policy.resend_maybe_delivered else None


@dataclasses.dataclass(frozen=True)
class Backoff:
    """The wait before retry ``n`` (1, 2, ...): uniform in [0, min(cap, base * 2**(n-1))]."""

    base: float = 0.05
    cap: float = 1.0

    def ceiling(self, retry: int) -> float:
        return min(self.cap, self.base * 2.0 ** (retry - 1))


async def retry_target(
    target: Callable[[], Awaitable[T]],
    reason: Callable[[Exception], str | None],
    *,
    deadline: float,
    max_attempts: int,
    attempt_time: float = 0.0,
    backoff: Backoff = Backoff(),  # frozen: one shared instance is safe
    on_retry: Callable[[Exception, str, int], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    uniform: Callable[[float, float], float] = random.uniform,
) -> T:
    """``await target()`` until it succeeds, at most ``max_attempts`` times.

    A failure is raised as it is when ``reason(failure)`` is None, when the attempts are spent, or
    when the wait and then ``attempt_time`` (the least an attempt can use) would reach ``deadline``
    (of ``clock``). Otherwise ``on_retry(failure, reason, attempt)`` is told, and the next attempt
    follows a jittered back-off.
    """
    attempt = 0
    while True:
        attempt += 1
        try:
            return await target()
        except Exception as exc:
            why = reason(exc)
            if why is None or attempt >= max_attempts:
                raise
            delay = uniform(0, backoff.ceiling(attempt))
            if clock() + delay + attempt_time >= deadline:
                raise
            if on_retry is not None:
                on_retry(exc, why, attempt)
        await sleep(delay)
