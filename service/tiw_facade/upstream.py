"""The TIW client: admission, signing, sending through a transport, retries where safe, TIW's envelope.

Knows TIW's envelope, nothing of gRPC or of HTTP libraries: callers pass an absolute
``time.monotonic()`` deadline and a retry policy, and get back the decoded ``Response`` or one of
the failures module's exceptions.

Owns the credentials source (credentials.py: started and closed with the client) and the estimate
of Tencent's clock: every answer's ``Date`` header measures the offset; an answer of
``AuthFailure.SignatureExpire`` (our clock is over 5 minutes off) makes the client sign with the
measured offset from then on, and the refused attempt, never executed, is sent again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from tiw_facade import credentials as credentials_module
from tiw_facade.calls import CURRENT_SHARE
from tiw_facade.failures import (
    FacadeError,
    Outcome,
    RateLimited,
    ShuttingDown,
    TiwError,
    UpstreamFailure,
    UpstreamHttpError,
    UpstreamMalformed,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from tiw_facade.limiter import LimiterClosed, QuotaExceeded
from tiw_facade.metrics import Metrics
from tiw_facade.signing import SIGNATURE_EXPIRE, Credentials, Signer
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
# TIW's error codes: dotted words (InvalidParameter.TaskNotFound). A code of another shape or length
# is not one TIW sends (underscores are allowed: other Tencent Cloud APIs use them).
TIW_CODE = re.compile(r"[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
MAX_TIW_CODE_LENGTH = 128
# A RequestId is kept for the caller and the logs only when it is one: printable ASCII, not too long.
REQUEST_ID = re.compile(r"[!-~]{1,128}")


class NoSpareQuota(Exception):
    """A call that may use only spare quota (a refresh) found none: nothing was sent. Not a failure
    any caller sees: whoever asked for spare quota only asks again later."""


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
        self._weights = dict(settings.caller_weights)  # TIW_CALLER_WEIGHTS, for the limiter's fair share
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
        # Tencent's clock minus ours: measured from every answer, signed with once TIW says we are off.
        self._clock_offset = 0.0
        self._measured_offset: float | None = None
        self._last_date = ""
        self._credentials = credentials_module.from_settings(settings, self._metrics, clock=self.tencent_time)
        self._signer: Signer | None = None  # for the credentials it was made for
        self._signer_credentials: Credentials | None = None
        # Calls seen through past their caller (see_through): aclose waits for them, then closes
        # what they use (close_after) before the transport.
        self._seen_through: set[asyncio.Task[Any]] = set()
        self._closers: list[Callable[[], Awaitable[None]]] = []

    @property
    def settings(self) -> Settings:
        return self._settings

    @property
    def metrics(self) -> Metrics:
        return self._metrics

    async def start(self) -> None:
        await self._transport.start()
        await self._credentials.start()

    async def aclose(self) -> None:
        if self._seen_through:
            log.info("waiting for calls whose callers went away", extra={"calls": len(self._seen_through)})
            # Each has at most one attempt left, of TIW_UPSTREAM_TIMEOUT; the lease's hold is longer.
            _, late = await asyncio.wait(self._seen_through, timeout=self._settings.upstream_timeout + 1)
            for task in late:
                task.cancel()
        for close in reversed(self._closers):
            await close()
        await self._credentials.aclose()
        await self._transport.aclose()

    def close_after(self, close: Callable[[], Awaitable[None]]) -> None:
        """Call ``close`` in aclose, once the calls seen through have ended (they may use it)."""
        self._closers.append(close)

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
        anyone reads its answer). Pair with ``call(..., see_through=True)``.
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
        return time.time() + self._clock_offset

    async def call(
        self,
        action: str,
        params: Mapping[str, Any],
        *,
        deadline: float | None,
        policy: RetryPolicy = NEVER_RESEND,
        decode: Callable[[dict[str, Any]], T] = _as_is,  # type: ignore[assignment]
        see_through: bool = False,
        spare: bool = False,
        admitted: Callable[[], None] | None = None,
    ) -> T:
        """Send ``action`` with ``params``; return ``decode`` of TIW's ``Response`` (without ``Error``).

        ``decode`` runs inside the attempt, so an answer it rejects (``ValueError``) counts as the
        failed upstream request it is (``UPSTREAM_MALFORMED``), not as a success.

        ``see_through``: ``deadline`` bounds the wait for a slot and when an attempt may start; an
        attempt once sent waits for TIW's answer for TIW_UPSTREAM_TIMEOUT whatever the deadline.

        ``admitted``: called when an attempt gets its slot (it is sent next).

        ``spare``: take only quota that direct calls leave (``Limiter.try_spare``, keeping
        TIW_REFRESH_RESERVE slots free); without any, raise ``NoSpareQuota`` at once.
        """
        budget_end = deadline if deadline is not None else time.monotonic() + self._settings.upstream_timeout
        body = encode(params)
        answer_lost = False
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._attempt(
                    action, body, budget_end, decode, see_through=see_through, spare=spare, admitted=admitted
                )
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
        self,
        action: str,
        body: bytes,
        budget_end: float,
        decode: Callable[[dict[str, Any]], T],
        *,
        see_through: bool = False,
        spare: bool = False,
        admitted: Callable[[], None] | None = None,
    ) -> T:
        remaining = budget_end - time.monotonic()
        if remaining < MIN_ATTEMPT_TIME:
            raise UpstreamTimeout(
                "the deadline was spent before the request was sent", outcome=Outcome.NOT_SENT
            )
        # Before admission: a call without credentials must not spend a rate-limit token.
        signer = await self._current_signer()
        # Seen through, a sent attempt has TIW_UPSTREAM_TIMEOUT whatever the deadline: its lease's
        # hold must cover that long, as a request TIW may receive that late.
        hold = self._settings.upstream_timeout if see_through else remaining
        lease = await (self._admit_spare(action, hold) if spare else self._admit(action, budget_end, hold))
        # One attempt may take TIW_UPSTREAM_TIMEOUT at most, so a lost request on a long caller
        # deadline still leaves time to try again where that is safe.
        remaining = min(budget_end - time.monotonic(), self._settings.upstream_timeout)
        if remaining < MIN_ATTEMPT_TIME:  # the wait for a slot used the time up: nothing is sent
            lease.release()
            raise UpstreamTimeout(
                "the deadline was spent waiting for a rate-limit slot", outcome=Outcome.NOT_SENT
            )
        if admitted is not None:
            admitted()
        if see_through:  # the caller's deadline no longer cuts it: see the docstring of call()
            remaining = self._settings.upstream_timeout
        code = "CANCELLED"  # unless the attempt ends otherwise: the caller went away mid-flight
        started = time.perf_counter()
        # Whether we know TIW saw the request no later than now (answered, refused, never sent). When
        # we do not (time-out, cancellation) the token is left to come back when its hold ends.
        settled = False
        try:
            headers = signer.headers(action, body, int(self.tencent_time()))  # fresh for every attempt
            status, raw, date = await self._transport.post(body, headers, remaining)
            settled = True
            self._observe_clock(date)
            answer = _parse(status, raw)
            if "Error" in answer:
                error = _tiw_error(answer)
                if isinstance(error, TiwError) and error.code == SIGNATURE_EXPIRE:
                    self._correct_clock()
                raise error
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

    async def _current_signer(self) -> Signer:
        """The signer of the current credentials (made anew when they change: it caches their key)."""
        try:
            credentials = await self._credentials.get()
        except credentials_module.CredentialsError as exc:
            raise UpstreamUnreachable(f"no valid Tencent Cloud credentials: {exc}") from exc
        if credentials is not self._signer_credentials or self._signer is None:
            settings = self._settings
            self._signer = Signer(
                credentials, settings.upstream_host, region=settings.region, language=settings.language
            )
            self._signer_credentials = credentials
        return self._signer

    def _observe_clock(self, date: str | None) -> None:
        """Measure Tencent's clock from an answer's Date header (once per new value: once a second)."""
        if not date or date == self._last_date:
            return
        self._last_date = date
        stamp = credentials_module.parse_http_date(date)
        if stamp is None:
            return
        # The header has whole seconds: Tencent's time was, on average, half a second later.
        self._measured_offset = stamp + 0.5 - time.time()
        self._metrics.upstream_clock_offset.set(self._measured_offset)

    def _correct_clock(self) -> None:
        """TIW refused the timestamp: sign with the measured offset from now on."""
        measured = self._measured_offset
        if measured is None or abs(measured - self._clock_offset) < 1:
            return  # nothing new to go by: the retry (if any) is signed as before
        log.warning(
            "TIW refused the signature as expired: this host's clock is off; signing by Tencent's clock",
            extra={"clock_offset_seconds": round(measured, 1), "previous_offset_seconds": self._clock_offset},
        )
        self._clock_offset = measured

    async def _admit(self, action: str, budget_end: float, remaining: float) -> Lease:
        """A token for one attempt; the limiter's refusals become the failures module's."""
        try:
            # Keyed on the share, not the claimed name: invented names must not each get a turn.
            share = CURRENT_SHARE.get()
            return await self._limiter.acquire(
                action,
                # A slot that leaves no time to send would spend a token for nothing.
                deadline=budget_end - MIN_ATTEMPT_TIME,
                hold=min(remaining, self._settings.upstream_timeout) + UNANSWERED_HOLD,
                caller=share,
                weight=self._weights.get(share, 1),
            )
        except QuotaExceeded as exc:
            raise RateLimited(exc.action, exc.reason, exc.retry_after) from exc
        except LimiterClosed as exc:
            raise ShuttingDown() from exc

    async def _admit_spare(self, action: str, remaining: float) -> Lease:
        """A token direct calls leave over, or ``NoSpareQuota``."""
        try:
            lease = await self._limiter.try_spare(
                action,
                hold=min(remaining, self._settings.upstream_timeout) + UNANSWERED_HOLD,
                reserve=self._settings.refresh_reserve,
            )
        except LimiterClosed as exc:
            raise ShuttingDown() from exc
        if lease is None:
            raise NoSpareQuota(action)
        return lease

    @staticmethod
    def _decode(decode: Callable[[dict[str, Any]], T], answer: dict[str, Any]) -> T:
        try:
            return decode(answer)
        except ValueError as exc:  # e.g. translate.MalformedAnswer: a field of the wrong JSON type
            raise UpstreamMalformed(
                f"TIW's answer does not fit the contract: {exc}", request_id=_request_id(answer)
            ) from exc


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Take a finished task's exception, which nobody else will: asyncio would log it as lost."""
    if not task.cancelled():
        task.exception()


def _parse(status: int, raw: bytes) -> dict[str, Any]:
    """TIW's ``Response`` object, or the failure that says why there is none."""
    if status != 200:  # redirects too: TIW answers 200 to everything it processes
        raise UpstreamHttpError(status)
    try:
        envelope = json.loads(raw, parse_constant=_not_json)
    # RecursionError: nested deeper than the parser's stack (a hostile answer; 1 MB of "[" is enough).
    # ValueError: not JSON, NaN or Infinity, an integer too long to convert.
    except (ValueError, RecursionError):
        raise UpstreamMalformed("TIW's answer is not JSON") from None
    answer = envelope.get("Response") if isinstance(envelope, dict) else None
    if not isinstance(answer, dict):
        raise UpstreamMalformed("TIW's answer is not a TIW envelope (no Response object)")
    if "Error" in answer and not isinstance(answer["Error"], dict):
        raise UpstreamMalformed(
            "TIW's answer has an Error that is not an object", request_id=_request_id(answer)
        )
    return answer


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def _tiw_error(answer: Mapping[str, Any]) -> TiwError | UpstreamMalformed:
    """The failure an error envelope stands for: TIW's error, or, when the envelope is not one TIW
    sends (a code of the wrong type or shape, a message that is not text, a RequestId that is not
    a string), UPSTREAM_MALFORMED. TIW's code becomes a metric label and the status's reason: an
    arbitrary string there would be a new Prometheus series, and a bloated trailer, per answer."""
    error = answer["Error"]
    code, message, request_id = error.get("Code"), error.get("Message"), answer.get("RequestId")
    if not isinstance(request_id, str | None):
        return UpstreamMalformed("TIW's error has a RequestId that is not a string")
    if not (isinstance(code, str) and len(code) <= MAX_TIW_CODE_LENGTH and TIW_CODE.fullmatch(code)):
        return UpstreamMalformed(
            f"TIW's error has no error code of TIW's shape ({_kind(code)})", request_id=_request_id(answer)
        )
    if not isinstance(message, str | None):
        return UpstreamMalformed("TIW's error has a Message that is not text", request_id=_request_id(answer))
    # JSON may carry lone surrogates ("\ud800"), which no UTF-8 encoder (protobuf's, gRPC's) takes.
    readable = (message or "").encode(errors="replace").decode()
    return TiwError(code, readable, _request_id(answer))


def _kind(code: Any) -> str:
    """How a rejected code is described: never the code itself, which may be anything."""
    if isinstance(code, str):
        return f"a string of {len(code)} characters" if code else "an empty string"
    return "missing" if code is None else f"a JSON {type(code).__name__}"


def _request_id(answer: Mapping[str, Any]) -> str:
    """TIW's RequestId, when it looks like one (TIW's are UUIDs): it goes into trailers and logs."""
    request_id = answer.get("RequestId")
    return request_id if isinstance(request_id, str) and REQUEST_ID.fullmatch(request_id) else ""


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
