"""The TIW client: one call is attempts, each admitted, signed and sent, retried where safe.

Knows TIW's actions, nothing of gRPC or of HTTP libraries. A caller hands ``call`` a ``Request``
(the action, its parameters, its retry policy and how to read its answer), an absolute
``time.monotonic()`` deadline and, when the call is not an ordinary one, how its attempts are
admitted (admission.py: the rate limiter's queue or spare quota, seen through or not); it gets back
the decoded ``Response`` or one of the failures module's exceptions. The layers, inside out:

- tencent_api.py: one signed exchange with TIW and the reading of its envelope (the same for STS);
- ``_attempt``: credentials, then a rate-limit slot, then that exchange, then the lease's fate and
  the ``tiw_upstream_requests_total`` count;
- retries.py: the attempts, by the action's ``RetryPolicy``, within the deadline.

The client is handed what it uses, open: a transport (transport.py), a credentials source
(credentials.py), the limiter; whoever built them (server.py) closes them after the client. It keeps
Tencent's clock (tencent_clock.py, shared with the credentials source, which stamps STS's calls by
it): every answer's ``Date`` header measures the offset; an answer of ``AuthFailure.SignatureExpire``
(our clock is over 5 minutes off) makes the client sign with the measured offset from then on, and
the refused attempt, never executed, is sent again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
import urllib.parse
from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from tiw_facade.admission import Admission, Queued, Spare
from tiw_facade.failures import (
    CredentialsError,
    FacadeError,
    Outcome,
    TiwError,
    UpstreamFailure,
    UpstreamMalformed,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from tiw_facade.metrics import Metrics
from tiw_facade.retries import NEVER_RESEND, RetryPolicy, retry_reason, retry_target
from tiw_facade.signing import DEFAULT_SERVICE, DEFAULT_VERSION, SIGNATURE_EXPIRE, Credentials
from tiw_facade.tencent_api import TencentApi, encode, request_id
from tiw_facade.tencent_clock import TencentClock
from tiw_facade.transport import Transport

if TYPE_CHECKING:  # the client is handed these; it needs only their types
    from tiw_facade.credentials import Source
    from tiw_facade.limiter import Limiter
    from tiw_facade.settings import Settings


log = logging.getLogger("tiw_facade.upstream")

T = TypeVar("T")

# Below this much time left, an attempt cannot usefully complete: a round trip to TIW takes longer.
# Sending anyway would likely time out, spending a token on a request whose arrival we never learn.
MIN_ATTEMPT_TIME = 0.05
# A request that timed out (or whose caller went away) may still reach TIW after we stop waiting:
# its token is not returned a window after giving up, as an answered one is, but held this much
# longer, so that a late arrival cannot share a 1-second window with the token's next request.
UNANSWERED_HOLD = 1.0
THROTTLE_WINDOW = 1.0


def _as_is(answer: dict[str, Any]) -> dict[str, Any]:
    return answer


@dataclasses.dataclass(frozen=True, slots=True)
class Request(Generic[T]):
    """One TIW action to call: what to send, what may be re-sent, and how to read the answer.

    ``decode`` runs inside the attempt, so an answer it rejects (``ValueError``) counts as the failed
    upstream request it is (``UPSTREAM_MALFORMED``), not as a success.
    """

    action: str
    params: Mapping[str, Any]
    policy: RetryPolicy = NEVER_RESEND
    decode: Callable[[dict[str, Any]], T] = _as_is  # type: ignore[assignment]


@dataclasses.dataclass(frozen=True, slots=True)
class ClientConfig:
    """Where TIW is and how the client calls it; seconds, unless named otherwise."""

    endpoint: str  # TIW_ENDPOINT: the base URL the transport posts to; the signed Host follows it
    region: str  # TENCENTCLOUD_REGION: sent as X-TC-Region
    language: str = ""  # TIW_LANGUAGE: X-TC-Language of TIW's error messages
    upstream_timeout: float = 10.0  # TIW_UPSTREAM_TIMEOUT: one attempt; the whole call without a deadline
    max_attempts: int = 3  # TIW_MAX_ATTEMPTS: where retrying is safe
    refresh_reserve: int = 2  # TIW_REFRESH_RESERVE: slots spare-quota attempts leave to direct calls
    caller_weights: tuple[tuple[str, int], ...] = ()  # TIW_CALLER_WEIGHTS: shares of the limiter's queue

    @classmethod
    def from_settings(cls, settings: Settings) -> ClientConfig:
        from tiw_facade.settings import configure

        return configure(cls, settings)

    @property
    def host(self) -> str:
        """The Host header and the signed host: the endpoint's, port included."""
        return urllib.parse.urlsplit(self.endpoint).netloc


class TiwClient:
    """Calls to TIW through ``transport`` (started), signed by ``credentials`` (started), admitted by
    ``limiter``; ``clock``: Tencent's, shared with the credentials source (default: a clock of its own).
    """

    def __init__(
        self,
        config: ClientConfig,
        limiter: Limiter,
        *,
        transport: Transport,
        credentials: Source,
        clock: TencentClock | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._config = config
        self._limiter = limiter
        self._metrics = metrics or Metrics.unobserved()
        self._tiw = TencentApi(
            transport,
            name="TIW",
            host=config.host,
            service=DEFAULT_SERVICE,
            version=DEFAULT_VERSION,
            region=config.region,
            language=config.language,
        )
        self._clock = clock or TencentClock(self._metrics)
        self._credentials = credentials
        # TIW_CALLER_WEIGHTS, for the limiter's fair share.
        self._weights: Mapping[str, int] = dict(config.caller_weights)
        self._direct = Queued(limiter, self._weights)  # how a call's attempts are admitted unless told
        # Calls seen through past their caller (see_through): aclose waits for them.
        self._seen_through: set[asyncio.Task[Any]] = set()

    def queued(
        self, *, sees_through: bool = False, on_admitted: Callable[[], None] | None = None
    ) -> Admission:
        """Attempts that wait in the limiter's queue for the caller's share (admission.py)."""
        return Queued(self._limiter, self._weights, sees_through=sees_through, on_admitted=on_admitted)

    def spare(self, *, on_admitted: Callable[[], None] | None = None) -> Admission:
        """Attempts only on quota direct calls leave, else ``NoSpareQuota`` at once (admission.py)."""
        return Spare(self._limiter, self._config.refresh_reserve, on_admitted=on_admitted)

    async def aclose(self) -> None:
        """Wait for the calls seen through (``see_through``) to end. What they use (the transport,
        the credentials, the limiter, the idempotency keys they settle) is closed after this."""
        if self._seen_through:
            log.info("waiting for calls whose callers went away", extra={"calls": len(self._seen_through)})
            # Each has at most one attempt left, of TIW_UPSTREAM_TIMEOUT; the lease's hold is longer.
            _, late = await asyncio.wait(self._seen_through, timeout=self._config.upstream_timeout + 1)
            for task in late:
                task.cancel()

    async def see_through(
        self,
        work: Coroutine[Any, Any, T],
        deadline: float | None,
        overdue: Callable[[], FacadeError],
        late: Callable[[asyncio.Task[T]], None] | None = None,
    ) -> T:
        """``await work``, but ``work`` runs to its end whatever the caller does: past ``deadline``
        (``time.monotonic()``) this raises ``overdue()``, and if the caller is cancelled the
        cancellation stops here; either way ``late`` gets the task when it ends.

        For requests that must not be lost once sent (a create: TIW makes a task whether or not
        anyone reads its answer). Pair with a call admitted by ``queued(sees_through=True)``.
        """
        task = asyncio.ensure_future(work)
        self._seen_through.add(task)
        task.add_done_callback(self._seen_through.discard)
        abandoned = True
        try:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, _ = await asyncio.wait({task}, timeout=timeout)  # asyncio.wait never cancels the task
            if done:
                abandoned = False
                return task.result()
            raise overdue()
        finally:
            if abandoned:
                task.add_done_callback(late or _retrieve)

    def tencent_time(self) -> float:
        """Unix seconds by Tencent's clock, as far as the client knows it."""
        return self._clock.now()

    async def call(
        self, request: Request[T], deadline: float | None, admission: Admission | None = None
    ) -> T:
        """Send ``request`` until TIW answers it, or a failure may not be retried, by ``deadline``
        (``time.monotonic()``; None: TIW_UPSTREAM_TIMEOUT from now). Each attempt is admitted by
        ``admission``: the limiter's queue, nothing seen through, unless given (``queued``, ``spare``)."""
        admission = admission or self._direct
        budget_end = deadline if deadline is not None else time.monotonic() + self._config.upstream_timeout
        body = encode(request.params)
        answer_lost = False  # an attempt may have been executed without our learning its answer

        async def attempt() -> T:
            try:
                return await self._attempt(request, body, budget_end, admission)
            except TiwError as exc:
                if answer_lost and exc.code == request.policy.success_after_lost_answer:
                    log.info(
                        "earlier attempt succeeded; its answer was lost", extra={"action": request.action}
                    )
                    return self._decode(request.decode, {"RequestId": exc.request_id})
                if exc.code.startswith("RequestLimitExceeded"):
                    # Someone else on the account used the quota: hold this action for a window.
                    self._limiter.pause(request.action, THROTTLE_WINDOW)
                raise

        def retrying(failure: Exception, reason: str, attempts: int) -> None:
            nonlocal answer_lost
            answer_lost = answer_lost or getattr(failure, "outcome", None) is Outcome.UNKNOWN
            self._metrics.action(request.action).retried(reason).inc()
            log.debug("retrying", extra={"action": request.action, "reason": reason, "attempt": attempts})

        return await retry_target(
            attempt,
            functools.partial(retry_reason, policy=request.policy),
            deadline=budget_end,
            max_attempts=self._config.max_attempts,
            attempt_time=MIN_ATTEMPT_TIME,
            on_retry=retrying,
        )

    async def _attempt(self, request: Request[T], body: bytes, budget_end: float, admission: Admission) -> T:
        action = request.action
        upstream_timeout = self._config.upstream_timeout
        remaining = budget_end - time.monotonic()
        if remaining < MIN_ATTEMPT_TIME:
            raise UpstreamTimeout(
                "the deadline was spent before the request was sent", outcome=Outcome.NOT_SENT
            )
        # Before admission: a call without credentials must not spend a rate-limit token.
        credentials = await self._current_credentials()
        # Seen through, a sent attempt has TIW_UPSTREAM_TIMEOUT whatever the deadline: its lease's
        # hold must cover that long, as a request TIW may receive that late.
        hold = upstream_timeout if admission.sees_through else remaining
        lease = await admission.lease(
            action,
            # A slot that leaves no time to send would spend a token for nothing.
            deadline=budget_end - MIN_ATTEMPT_TIME,
            hold=min(hold, upstream_timeout) + UNANSWERED_HOLD,
        )
        # One attempt may take TIW_UPSTREAM_TIMEOUT at most, so a lost request on a long caller
        # deadline still leaves time to try again where that is safe.
        remaining = min(budget_end - time.monotonic(), upstream_timeout)
        if remaining < MIN_ATTEMPT_TIME:  # the wait for a slot used the time up: nothing is sent
            lease.release()
            raise UpstreamTimeout(
                "the deadline was spent waiting for a rate-limit slot", outcome=Outcome.NOT_SENT
            )
        admission.admitted()
        if admission.sees_through:  # the caller's deadline no longer cuts it
            remaining = upstream_timeout
        code = "CANCELLED"  # unless the attempt ends otherwise: the caller went away mid-flight
        started = time.perf_counter()
        # Whether we know TIW saw the request no later than now (answered, refused, never sent). When
        # we do not (time-out, cancellation) the token is left to come back when its hold ends.
        settled = False
        try:
            # Signed afresh for every attempt, by Tencent's clock as the client knows it.
            timestamp = int(self._clock.now())
            answer = await self._tiw.send(
                action, body, credentials=credentials, timestamp=timestamp, timeout=remaining
            )
            settled = True
            self._clock.observe(answer.date)
            result = self._decode(request.decode, self._tiw.read(answer))
            code = "OK"
            return result
        except (TiwError, UpstreamFailure) as exc:
            if isinstance(exc, TiwError) and exc.code == SIGNATURE_EXPIRE:
                self._correct_clock()
            code = exc.reason
            settled = settled or exc.outcome is Outcome.NOT_SENT
            raise
        finally:
            if settled:
                lease.release()
            series = self._metrics.action(action)
            series.upstream(code).inc()
            series.upstream_duration.observe(time.perf_counter() - started)

    async def _current_credentials(self) -> Credentials:
        try:
            return await self._credentials.get()
        except CredentialsError as exc:
            raise UpstreamUnreachable(f"no valid Tencent Cloud credentials: {exc}") from exc

    def _correct_clock(self) -> None:
        """TIW refused the signature's timestamp: sign by the measured offset from now on."""
        previous = self._clock.correct()
        if previous is None:
            return  # nothing new to go by: the retry (if any) is signed as before
        log.warning(
            "TIW refused the signature as expired: this host's clock is off; signing by Tencent's clock",
            extra={"clock_offset_seconds": round(self._clock.offset, 1), "previous_offset_seconds": previous},
        )

    @staticmethod
    def _decode(decode: Callable[[dict[str, Any]], T], answer: dict[str, Any]) -> T:
        try:
            return decode(answer)
        except ValueError as exc:  # e.g. translate.MalformedAnswer: a field of the wrong JSON type
            raise UpstreamMalformed(
                f"TIW's answer does not fit the contract: {exc}", request_id=request_id(answer)
            ) from exc


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Take a finished task's exception, which nobody else will: asyncio would log it as lost."""
    if not task.cancelled():
        task.exception()
