"""The TIW client: signed requests over one pooled keep-alive session, retried only where safe.

Knows HTTP and TIW's envelope, nothing of gRPC: callers pass an absolute ``time.monotonic()``
deadline and get back TIW's ``Response`` object or one of the exceptions below.

aiohttp rather than httpx: on this kind of machine httpx 0.28 costs 3-4x aiohttp's CPU per call and
slows down as calls in flight grow (../shared/reference/performance-notes.md; bench/ confirms it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import aiohttp
import yarl

from tiw_facade.signing import Credentials, Signer

if TYPE_CHECKING:  # the client is handed these; it needs only their types
    from prometheus_client import Counter, Histogram

    from tiw_facade.limiter import Limiter
    from tiw_facade.metrics import Metrics
    from tiw_facade.settings import Settings

log = logging.getLogger("tiw_facade.upstream")

# Connecting should be quick; a connect time-out proves the request never left, so even
# CreateSnapshotTask may be re-sent after one.
CONNECT_TIMEOUT = 2.0
BACKOFF_BASE = 0.05
BACKOFF_CAP = 1.0
# Below this much time left, an attempt cannot usefully complete: a round trip to TIW takes longer.
# Sending anyway would likely time out, spending a token on a request whose arrival we never learn.
MIN_ATTEMPT_TIME = 0.05
# A request that timed out (or whose caller went away) may still reach TIW after we stop waiting:
# its token is not returned a window after giving up, as an answered one is, but held this much
# longer, so that a late arrival cannot share a 1-second window with the token's next request.
UNANSWERED_HOLD = 1.0
# Idle keep-alive connections are dropped before a typical server-side idle time-out (60 s), so a
# request rarely meets a connection the server is closing — which would be an unsafe failure to
# retry for CreateSnapshotTask.
KEEPALIVE_TIMEOUT = 15.0
THROTTLE_WINDOW = 1.0


class TiwError(Exception):
    """TIW answered with an error envelope."""

    def __init__(self, code: str, message: str, request_id: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id


class TransportError(Exception):
    """No TIW answer could be read. ``reason`` is a short token (``HTTP_502``, ``ConnectionError``,
    ``MalformedResponse``); ``delivered`` says whether TIW may have received the request."""

    def __init__(self, reason: str, detail: str, *, delivered: bool) -> None:
        super().__init__(detail)
        self.reason = reason
        self.delivered = delivered


class UpstreamTimeout(TransportError):
    """The attempt or the caller's deadline ran out before TIW answered."""

    def __init__(self, detail: str, *, delivered: bool = True) -> None:
        super().__init__("Timeout", detail, delivered=delivered)


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """What may be re-sent for one action, by what TIW does on a duplicate."""

    # May a request be re-sent when TIW may already have executed it (time-out, reset, 5xx)?
    resend_maybe_delivered: bool
    # An error code that, after an attempt whose answer was lost, means the lost attempt succeeded.
    success_after_lost_answer: str | None = None


READS = RetryPolicy(resend_maybe_delivered=True)
POLICIES: Mapping[str, RetryPolicy] = {
    # No idempotency token: a duplicate snapshot task is worse than an error.
    "CreateSnapshotTask": RetryPolicy(resend_maybe_delivered=False),
    "StopWhiteboardPush": RetryPolicy(
        resend_maybe_delivered=True, success_after_lost_answer="UnsupportedOperation.TaskHasAlreadyStopped"
    ),
}


def encode(params: Mapping[str, Any]) -> bytes:
    """The exact bytes sent and signed: compact JSON, UTF-8, integers as integers."""
    return json.dumps(params, separators=(",", ":"), ensure_ascii=False).encode()


class TiwClient:
    def __init__(self, settings: Settings, limiter: Limiter, metrics: Metrics | None = None) -> None:
        self._settings = settings
        self._limiter = limiter
        self._metrics = metrics
        # Parsed once: aiohttp would otherwise parse and normalise the URL on every request.
        self._url = yarl.URL(settings.endpoint + "/", encoded=True)
        self._signer = Signer(
            Credentials(settings.secret_id, settings.secret_key, settings.session_token),
            settings.upstream_host,
            region=settings.region,
            language=settings.language,
        )
        self._session: aiohttp.ClientSession | None = None
        self._children: dict[tuple[str, str], tuple[Counter, Histogram]] = {}

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            # The limiter already bounds calls in flight (a token per attempt); this only guards
            # against a misconfiguration opening unbounded sockets.
            limit=max(100, self._settings.rate_limit * 10),
            keepalive_timeout=KEEPALIVE_TIMEOUT,
            ttl_dns_cache=60,
        )
        # TIW sets no cookies: a dummy jar spares the cookie bookkeeping on every request.
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=True,
            raise_for_status=False,
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def call(self, action: str, params: Mapping[str, Any], *, deadline: float | None) -> dict[str, Any]:
        """Send ``action`` with ``params`` and return TIW's ``Response`` object (without ``Error``)."""
        budget_end = deadline if deadline is not None else time.monotonic() + self._settings.upstream_timeout
        policy = POLICIES.get(action, READS)
        body = encode(params)
        answer_lost = False
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._attempt(action, body, budget_end)
            except (TiwError, TransportError) as exc:
                if isinstance(exc, TiwError) and answer_lost and exc.code == policy.success_after_lost_answer:
                    log.info("earlier attempt succeeded; its answer was lost", extra={"action": action})
                    return {"RequestId": exc.request_id}
                reason = _retry_reason(exc, policy)
                if isinstance(exc, TiwError) and exc.code.startswith("RequestLimitExceeded"):
                    # Someone else on the account used the quota: hold this action for a window.
                    self._limiter.pause(action, THROTTLE_WINDOW)
                if reason is None or attempt >= self._settings.max_attempts:
                    raise
                delay = random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempt - 1)))
                if time.monotonic() + delay + MIN_ATTEMPT_TIME >= budget_end:
                    raise
                answer_lost = answer_lost or (isinstance(exc, TransportError) and exc.delivered)
                if self._metrics is not None:
                    self._metrics.upstream_retries.labels(action=action, reason=reason).inc()
                log.debug("retrying", extra={"action": action, "reason": reason, "attempt": attempt})
                await asyncio.sleep(delay)

    async def _attempt(self, action: str, body: bytes, budget_end: float) -> dict[str, Any]:
        remaining = budget_end - time.monotonic()
        if remaining < MIN_ATTEMPT_TIME:
            raise UpstreamTimeout("deadline exhausted before the request was sent", delivered=False)
        # A slot that leaves no time to send would spend a token for nothing.
        lease = await self._limiter.acquire(
            action,
            deadline=budget_end - MIN_ATTEMPT_TIME,
            hold=min(remaining, self._settings.upstream_timeout) + UNANSWERED_HOLD,
        )
        code = "Cancelled"  # unless the attempt ends otherwise: the caller went away mid-flight
        started = time.perf_counter()
        # Whether we know TIW saw the request no later than now (answered, refused, never sent). When
        # we do not (time-out, cancellation) the token is left to come back when its hold ends.
        settled = False
        try:
            # One attempt may take TIW_UPSTREAM_TIMEOUT at most, so a lost request on a long caller
            # deadline still leaves time to try again where that is safe.
            remaining = min(budget_end - time.monotonic(), self._settings.upstream_timeout)
            if remaining < MIN_ATTEMPT_TIME:
                raise UpstreamTimeout(
                    "deadline exhausted while waiting for a rate-limit slot", delivered=False
                )
            status, raw = await self._send(action, body, remaining)
            settled = True
            answer = _parse(status, raw)
            if "Error" in answer:
                error = answer["Error"]
                code = str(error.get("Code") or "Unknown")
                raise TiwError(code, str(error.get("Message") or ""), str(answer.get("RequestId") or ""))
            code = "OK"
            return answer
        except TransportError as exc:
            code = exc.reason
            settled = not (isinstance(exc, UpstreamTimeout) and exc.delivered)
            raise
        finally:
            if settled:
                lease.release()
            if self._metrics is not None:
                self._record(action, code, time.perf_counter() - started)

    def _record(self, action: str, code: str, seconds: float) -> None:
        """Count one attempt; the metric children are bound once per (action, code), not per call."""
        children = self._children.get((action, code))
        if children is None:
            assert self._metrics is not None
            children = self._children[(action, code)] = (
                self._metrics.upstream_requests.labels(action=action, code=code),
                self._metrics.upstream_duration.labels(action=action),
            )
        children[0].inc()
        children[1].observe(seconds)

    async def _send(self, action: str, body: bytes, timeout_seconds: float) -> tuple[int, bytes]:
        """One HTTP exchange, signed now so that a re-sent request carries a fresh timestamp."""
        session = self._session
        if session is None:
            raise RuntimeError("TiwClient.start() was not awaited")
        headers = self._signer.headers(action, body, int(time.time()))
        timeout = aiohttp.ClientTimeout(
            total=timeout_seconds, sock_connect=min(timeout_seconds, CONNECT_TIMEOUT)
        )
        try:
            async with session.post(self._url, data=body, headers=headers, timeout=timeout) as response:
                return response.status, await response.read()
        except aiohttp.ConnectionTimeoutError as exc:  # before ClientConnectorError: not a subclass
            raise TransportError(
                "ConnectionError", f"connecting to TIW timed out: {exc}", delivered=False
            ) from exc
        except aiohttp.ClientConnectorError as exc:
            raise TransportError(
                "ConnectionError", f"cannot connect to TIW: {exc.os_error}", delivered=False
            ) from exc
        except TimeoutError as exc:
            raise UpstreamTimeout(f"TIW did not answer {action} within {timeout_seconds:.3f}s") from exc
        except aiohttp.ClientError as exc:  # the connection broke: whatever arrived, arrived before
            raise TransportError(
                "ConnectionError", f"connection to TIW failed: {exc!r}", delivered=True
            ) from exc


def _parse(status: int, raw: bytes) -> dict[str, Any]:
    if status != 200:
        raise TransportError(f"HTTP_{status}", f"TIW answered HTTP {status}", delivered=True)
    try:
        envelope = json.loads(raw)
    except ValueError:
        envelope = None
    answer = envelope.get("Response") if isinstance(envelope, dict) else None
    if not isinstance(answer, dict) or ("Error" in answer and not isinstance(answer["Error"], dict)):
        raise TransportError("MalformedResponse", "TIW's answer is not a TIW JSON envelope", delivered=True)
    return answer


def _retry_reason(exc: TiwError | TransportError, policy: RetryPolicy) -> str | None:
    """Why ``exc`` may be retried under ``policy``, or None when it must not be."""
    if isinstance(exc, TiwError):
        if exc.code.startswith("RequestLimitExceeded") or exc.code == "AuthFailure.SignatureExpire":
            return exc.code  # TIW refused without executing: safe for every action
        if exc.code.startswith("InternalError") and policy.resend_maybe_delivered:
            return "InternalError"
        return None
    if not exc.delivered:
        return exc.reason
    if policy.resend_maybe_delivered and (
        isinstance(exc, UpstreamTimeout) or exc.reason == "ConnectionError" or exc.reason.startswith("HTTP_5")
    ):
        return exc.reason
    return None
