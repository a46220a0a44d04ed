"""The TIW client: admission, signing, sending through a transport, retries where safe, TIW's envelope.

Knows TIW's envelope, nothing of gRPC or of HTTP libraries: callers pass an absolute
``time.monotonic()`` deadline and a retry policy, and get back the decoded ``Response`` or one of
the failures module's exceptions.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from tiw_facade.failures import (
    Outcome,
    RateLimited,
    ShuttingDown,
    TiwError,
    UpstreamFailure,
    UpstreamHttpError,
    UpstreamMalformed,
    UpstreamTimeout,
)
from tiw_facade.limiter import LimiterClosed, QuotaExceeded
from tiw_facade.metrics import Metrics
from tiw_facade.signing import Credentials, Signer
from tiw_facade.transport import AiohttpTransport, Transport

if TYPE_CHECKING:  # the client is handed these; it needs only their types
    from tiw_facade.limiter import Lease, Limiter
    from tiw_facade.settings import Settings

log = logging.getLogger("tiw_facade.upstream")

T = TypeVar("T")

BACKOFF_BASE = 0.05
BACKOFF_CAP = 1.0
# Below this much time left, an attempt cannot usefully complete: a round trip to TIW takes longer.
# Sending anyway would likely time out, spending a token on a request whose arrival we never learn.
MIN_ATTEMPT_TIME = 0.05
# A request that timed out (or whose caller went away) may still reach TIW after we stop waiting:
# its token is not returned a window after giving up, as an answered one is, but held this much
# longer, so that a late arrival cannot share a 1-second window with the token's next request.
UNANSWERED_HOLD = 1.0
THROTTLE_WINDOW = 1.0
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


def encode(params: Mapping[str, Any]) -> bytes:
    """The exact bytes sent and signed: compact JSON, UTF-8, integers as integers."""
    return json.dumps(params, separators=(",", ":"), ensure_ascii=False).encode()


def _as_is(answer: dict[str, Any]) -> dict[str, Any]:
    return answer


class TiwClient:
    def __init__(
        self,
        settings: Settings,
        limiter: Limiter,
        metrics: Metrics | None = None,
        transport: Transport | None = None,
    ) -> None:
        self._settings = settings
        self._limiter = limiter
        self._metrics = metrics or Metrics.unobserved()
        self._transport = transport or AiohttpTransport(
            settings.endpoint + "/",
            max_answer_bytes=settings.max_answer_bytes,
            connect_timeout=settings.connect_timeout,
            # The limiter already bounds calls in flight (a token per attempt); this only guards
            # against a misconfiguration opening unbounded sockets.
            pool_limit=max(100, settings.rate_limit * 10),
        )
        self._signer = Signer(
            Credentials(settings.secret_id, settings.secret_key, settings.session_token),
            settings.upstream_host,
            region=settings.region,
            language=settings.language,
        )

    async def start(self) -> None:
        await self._transport.start()

    async def aclose(self) -> None:
        await self._transport.aclose()

    async def call(
        self,
        action: str,
        params: Mapping[str, Any],
        *,
        deadline: float | None,
        policy: RetryPolicy = NEVER_RESEND,
        decode: Callable[[dict[str, Any]], T] = _as_is,  # type: ignore[assignment]
    ) -> T:
        """Send ``action`` with ``params``; return ``decode`` of TIW's ``Response`` (without ``Error``).

        ``decode`` runs inside the attempt, so an answer it rejects (``ValueError``) counts as the
        failed upstream request it is (``UPSTREAM_MALFORMED``), not as a success.
        """
        budget_end = deadline if deadline is not None else time.monotonic() + self._settings.upstream_timeout
        body = encode(params)
        answer_lost = False
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._attempt(action, body, budget_end, decode)
            except TiwError as exc:
                if answer_lost and exc.code == policy.success_after_lost_answer:
                    log.info("earlier attempt succeeded; its answer was lost", extra={"action": action})
                    return self._decode(decode, {"RequestId": exc.request_id})
                if exc.code.startswith("RequestLimitExceeded"):
                    # Someone else on the account used the quota: hold this action for a window.
                    self._limiter.pause(action, THROTTLE_WINDOW)
                reason = _retry_reason(exc, policy)
                failure: TiwError | UpstreamFailure = exc
            except UpstreamFailure as exc:
                reason = _retry_reason(exc, policy)
                failure = exc
            if reason is None or attempt >= self._settings.max_attempts:
                raise failure
            delay = random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempt - 1)))
            if time.monotonic() + delay + MIN_ATTEMPT_TIME >= budget_end:
                raise failure
            answer_lost = answer_lost or failure.outcome is Outcome.UNKNOWN
            self._metrics.action(action).retried(reason).inc()
            log.debug("retrying", extra={"action": action, "reason": reason, "attempt": attempt})
            await asyncio.sleep(delay)

    async def _attempt(
        self, action: str, body: bytes, budget_end: float, decode: Callable[[dict[str, Any]], T]
    ) -> T:
        remaining = budget_end - time.monotonic()
        if remaining < MIN_ATTEMPT_TIME:
            raise UpstreamTimeout(
                "the deadline was spent before the request was sent", outcome=Outcome.NOT_SENT
            )
        lease = await self._admit(action, budget_end, remaining)
        # One attempt may take TIW_UPSTREAM_TIMEOUT at most, so a lost request on a long caller
        # deadline still leaves time to try again where that is safe.
        remaining = min(budget_end - time.monotonic(), self._settings.upstream_timeout)
        if remaining < MIN_ATTEMPT_TIME:  # the wait for a slot used the time up: nothing is sent
            lease.release()
            raise UpstreamTimeout(
                "the deadline was spent waiting for a rate-limit slot", outcome=Outcome.NOT_SENT
            )
        code = "CANCELLED"  # unless the attempt ends otherwise: the caller went away mid-flight
        started = time.perf_counter()
        # Whether we know TIW saw the request no later than now (answered, refused, never sent). When
        # we do not (time-out, cancellation) the token is left to come back when its hold ends.
        settled = False
        try:
            headers = self._signer.headers(action, body, int(time.time()))  # fresh for every attempt
            status, raw = await self._transport.post(body, headers, remaining)
            settled = True
            answer = _parse(status, raw)
            if "Error" in answer:
                error = answer["Error"]
                raise TiwError(
                    str(error.get("Code") or "Unknown"),
                    str(error.get("Message") or ""),
                    str(answer.get("RequestId") or ""),
                )
            result = self._decode(decode, answer)
            code = "OK"
            return result
        except (TiwError, UpstreamFailure) as exc:
            code = exc.reason
            settled = settled or exc.outcome is Outcome.NOT_SENT
            raise
        finally:
            if settled:
                lease.release()
            series = self._metrics.action(action)
            series.upstream(code).inc()
            series.upstream_duration.observe(time.perf_counter() - started)

    async def _admit(self, action: str, budget_end: float, remaining: float) -> Lease:
        """A token for one attempt; the limiter's refusals become the failures module's."""
        try:
            # A slot that leaves no time to send would spend a token for nothing.
            return await self._limiter.acquire(
                action,
                deadline=budget_end - MIN_ATTEMPT_TIME,
                hold=min(remaining, self._settings.upstream_timeout) + UNANSWERED_HOLD,
            )
        except QuotaExceeded as exc:
            raise RateLimited(exc.action, exc.reason, exc.retry_after) from exc
        except LimiterClosed as exc:
            raise ShuttingDown() from exc

    @staticmethod
    def _decode(decode: Callable[[dict[str, Any]], T], answer: dict[str, Any]) -> T:
        try:
            return decode(answer)
        except ValueError as exc:  # e.g. translate.MalformedAnswer: a field of the wrong JSON type
            raise UpstreamMalformed(
                f"TIW's answer does not fit the contract: {exc}", request_id=_request_id(answer)
            ) from exc


def _parse(status: int, raw: bytes) -> dict[str, Any]:
    """TIW's ``Response`` object, or the failure that says why there is none."""
    if status != 200:  # redirects too: TIW answers 200 to everything it processes
        raise UpstreamHttpError(status)
    try:
        envelope = json.loads(raw)
    except ValueError:
        raise UpstreamMalformed("TIW's answer is not JSON") from None
    answer = envelope.get("Response") if isinstance(envelope, dict) else None
    if not isinstance(answer, dict):
        raise UpstreamMalformed("TIW's answer is not a TIW envelope (no Response object)")
    if "Error" in answer and not isinstance(answer["Error"], dict):
        raise UpstreamMalformed(
            "TIW's answer has an Error that is not an object", request_id=_request_id(answer)
        )
    return answer


def _request_id(answer: Mapping[str, Any]) -> str:
    request_id = answer.get("RequestId")
    return request_id if isinstance(request_id, str) else ""


def _retry_reason(exc: TiwError | UpstreamFailure, policy: RetryPolicy) -> str | None:
    """Why ``exc`` may be retried under ``policy``, or None when it must not be."""
    if isinstance(exc, TiwError):
        refused = next((family for family in NOT_EXECUTED if exc.code.startswith(family)), None)
        if refused is not None:
            return refused  # TIW refused without executing: safe for every action (one label per family)
        if exc.code.startswith("InternalError") and policy.resend_maybe_delivered:
            return "InternalError"
        return None
    if exc.outcome is Outcome.NOT_SENT:
        return exc.reason
    if isinstance(exc, UpstreamMalformed):
        return None  # TIW answered: the same request would most likely get the same answer
    if isinstance(exc, UpstreamHttpError) and not 500 <= exc.status <= 599:
        return None  # a redirect or a client error: sending again changes nothing
    return exc.reason if policy.resend_maybe_delivered else None
