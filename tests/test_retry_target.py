"""The retry loop (retries.retry_target) and TIW's retry predicate (retries.retry_reason) on their own.

The loop runs on a VirtualClock: its sleep advances the clock, its jitter is the back-off's ceiling,
so every attempt's instant is exact and nothing waits for real time.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from support.clock import VirtualClock
from tiw_facade.failures import (
    NoSpareQuota,
    Outcome,
    RateLimited,
    ShuttingDown,
    TiwError,
    UpstreamConnectionLost,
    UpstreamHttpError,
    UpstreamMalformed,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from tiw_facade.retries import NEVER_RESEND, Backoff, RetryPolicy, retry_reason, retry_target

READ = RetryPolicy(resend_maybe_delivered=True)
STOP = RetryPolicy(
    resend_maybe_delivered=True, success_after_lost_answer="UnsupportedOperation.TaskHasAlreadyStopped"
)


class Flaky(Exception):
    """A failure the test's predicate retries."""


class Fatal(Exception):
    """A failure the test's predicate does not retry."""


@dataclasses.dataclass
class Run:
    """A target failing with ``failures`` in turn, then answering "done"; what the loop did with it."""

    clock: VirtualClock
    failures: list[Exception]
    attempts: list[float] = dataclasses.field(default_factory=list)  # the clock at each attempt
    sleeps: list[float] = dataclasses.field(default_factory=list)
    ceilings: list[float] = dataclasses.field(default_factory=list)  # the jitter's upper bounds
    retried: list[tuple[str, str, int]] = dataclasses.field(default_factory=list)

    async def target(self) -> str:
        self.attempts.append(self.clock())
        if self.failures:
            raise self.failures.pop(0)
        return "done"

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.clock.advance(seconds)

    def uniform(self, low: float, high: float) -> float:
        assert low == 0
        self.ceilings.append(high)
        return high  # the longest wait the jitter allows: the worst case for the deadline

    def on_retry(self, failure: Exception, reason: str, attempt: int) -> None:
        self.retried.append((type(failure).__name__, reason, attempt))

    async def __call__(
        self, *, deadline: float = 1e9, max_attempts: int = 10, attempt_time: float = 0.05
    ) -> str:
        return await retry_target(
            self.target,
            lambda exc: "flaky" if isinstance(exc, Flaky) else None,
            deadline=deadline,
            max_attempts=max_attempts,
            attempt_time=attempt_time,
            on_retry=self.on_retry,
            clock=self.clock,
            sleep=self.sleep,
            uniform=self.uniform,
        )


def run(*failures: Exception) -> Run:
    return Run(VirtualClock(), list(failures))


async def test_retries_until_the_target_succeeds_with_a_growing_jittered_back_off() -> None:
    flaky = run(*(Flaky() for _ in range(7)))
    assert await flaky() == "done"
    # Doubling from 50 ms, capped at 1 s; each wait drawn from [0, ceiling].
    assert flaky.ceilings == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert flaky.sleeps == flaky.ceilings
    assert flaky.attempts == pytest.approx(
        [1000.0, 1000.05, 1000.15, 1000.35, 1000.75, 1001.55, 1002.55, 1003.55]
    )
    assert flaky.retried == [("Flaky", "flaky", n) for n in range(1, 8)]


async def test_a_failure_the_predicate_refuses_is_raised_at_once() -> None:
    fatal = run(Fatal())
    with pytest.raises(Fatal):
        await fatal()
    assert (len(fatal.attempts), fatal.sleeps, fatal.retried) == (1, [], [])


async def test_the_last_failure_is_raised_when_the_attempts_are_spent() -> None:
    last = Flaky("third")
    flaky = run(Flaky("first"), Flaky("second"), last)
    with pytest.raises(Flaky) as caught:
        await flaky(max_attempts=3)
    assert caught.value is last
    assert len(flaky.attempts) == 3 and len(flaky.sleeps) == 2


async def test_no_retry_starts_too_close_to_the_deadline() -> None:
    # At 1000.15 the next wait (0.2 s) and the least an attempt takes (0.05 s) would end at 1000.4,
    # past the deadline: the failure is raised then, without sleeping.
    flaky = run(*(Flaky() for _ in range(5)))
    with pytest.raises(Flaky):
        await flaky(deadline=1000.3)
    assert flaky.attempts == pytest.approx([1000.0, 1000.05, 1000.15])
    assert flaky.sleeps == pytest.approx([0.05, 0.1])
    assert flaky.clock() == pytest.approx(1000.15)


async def test_a_wait_ending_exactly_at_the_deadline_is_not_started() -> None:
    flaky = run(Flaky(), Flaky())
    with pytest.raises(Flaky):
        await flaky(deadline=flaky.clock() + 0.05 + 0.05, attempt_time=0.05)  # the first wait would reach it
    assert flaky.attempts == [1000.0]


async def test_cancelled_while_waiting_to_retry_is_cancelled() -> None:
    clock = VirtualClock()
    attempts: list[float] = []

    async def failing() -> str:
        attempts.append(clock())
        raise Flaky()

    async def forever(seconds: float) -> None:
        await asyncio.Event().wait()

    task = asyncio.create_task(
        retry_target(failing, lambda exc: "flaky", deadline=1e9, max_attempts=5, sleep=forever)
    )
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(attempts) == 1


def test_the_back_off_is_capped() -> None:
    assert [Backoff().ceiling(n) for n in (1, 2, 3, 6, 7, 50)] == pytest.approx(
        [0.05, 0.1, 0.2, 1.0, 1.0, 1.0]
    )
    assert Backoff(base=0.5, cap=2.0).ceiling(3) == 2.0


# --- what may be sent to TIW again ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        # TIW refused without executing, or the request never left: safe even for CreateSnapshotTask.
        (TiwError("RequestLimitExceeded", "m", "r"), "RequestLimitExceeded"),
        (TiwError("RequestLimitExceeded.UinLimitExceeded", "m", "r"), "RequestLimitExceeded"),
        (TiwError("AuthFailure.SignatureExpire", "m", "r"), "AuthFailure.SignatureExpire"),
        (UpstreamUnreachable("refused"), "UPSTREAM_UNREACHABLE"),
        (UpstreamTimeout("no slot in time", outcome=Outcome.NOT_SENT), "UPSTREAM_TIMEOUT"),
        # TIW may have executed it: never for CreateSnapshotTask.
        (UpstreamTimeout("no answer"), None),
        (UpstreamConnectionLost("reset"), None),
        (UpstreamHttpError(503), None),
        (TiwError("InternalError", "m", "r"), None),
        (TiwError("InternalError.DbError", "m", "r"), None),
        # Answered: the same request would get the same answer.
        (UpstreamMalformed("not JSON"), None),
        (UpstreamHttpError(307), None),
        (TiwError("InvalidParameter.TaskNotFound", "m", "r"), None),
        # The facade's own refusals, and anything else.
        (RateLimited("CreateSnapshotTask", "deadline", 0.5), None),
        (ShuttingDown(), None),
        (NoSpareQuota("CreateSnapshotTask"), None),
        (ValueError("a bug"), None),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_what_is_never_resent_is_retried_only_when_tiw_provably_did_not_execute_it(
    failure: Exception, reason: str | None
) -> None:
    assert retry_reason(failure, NEVER_RESEND) == reason


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        (UpstreamTimeout("no answer"), "UPSTREAM_TIMEOUT"),
        (UpstreamConnectionLost("reset"), "UPSTREAM_CONNECTION_LOST"),
        (UpstreamHttpError(503), "UPSTREAM_HTTP_ERROR"),
        (UpstreamHttpError(599), "UPSTREAM_HTTP_ERROR"),
        (TiwError("InternalError.DbError", "m", "r"), "InternalError"),
        (TiwError("RequestLimitExceeded", "m", "r"), "RequestLimitExceeded"),
        (UpstreamHttpError(404), None),
        (UpstreamHttpError(600), None),
        (UpstreamMalformed("not JSON"), None),
        (TiwError("UnsupportedOperation.TaskHasAlreadyStopped", "m", "r"), None),
        (RateLimited("DescribeWhiteboardPush", "queue_full", 0.1), None),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_what_is_safe_to_repeat_is_also_retried_when_tiw_may_have_executed_it(
    failure: Exception, reason: str | None
) -> None:
    assert retry_reason(failure, READ) == reason
    assert retry_reason(failure, STOP) == reason  # its lost-answer code is the client's concern


async def test_a_create_that_may_have_reached_tiw_is_attempted_once() -> None:
    clock = VirtualClock()
    attempts = 0

    async def create() -> str:
        nonlocal attempts
        attempts += 1
        raise UpstreamConnectionLost("the connection broke after the request was written")

    async def sleep(seconds: float) -> None:
        clock.advance(seconds)

    with pytest.raises(UpstreamConnectionLost):
        await retry_target(
            create,
            lambda exc: retry_reason(exc, NEVER_RESEND),
            deadline=clock() + 60,
            max_attempts=10,
            clock=clock,
            sleep=sleep,
        )
    assert attempts == 1 and clock() == 1000.0
