"""Every way a call through the facade can fail, as one hierarchy of typed exceptions.

A leaf module: it imports nothing of the facade and knows nothing of gRPC or HTTP libraries. Each
class carries what a caller or an operator needs to know about the failure:

- ``reason``: a stable UPPER_SNAKE_CASE token naming the failure (TIW's own error code verbatim for
  ``TiwError``), used as ``ErrorInfo.reason``, as the access log's ``tiw_code`` and as the
  ``code`` label of ``tiw_upstream_requests_total``;
- ``outcome``: whether TIW may have executed the request (``unknown``) or provably never got it
  (``not_sent``, safe to send again); ``None`` where the question does not arise;
- ``request_id``: TIW's RequestId, when an answer carried one.

Foreign exceptions (aiohttp's, asyncio's) are mapped to these in one place, the transport; the
limiter's in one other, admission.py. errors.py maps these classes, by type, to gRPC
statuses.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence


class Outcome(enum.StrEnum):
    """What the facade knows about whether TIW received (and so may have executed) a request."""

    NOT_SENT = "not_sent"  # TIW never saw it: sending it again cannot duplicate anything
    UNKNOWN = "unknown"  # it may have been executed; its answer never arrived (or was unusable)


class FacadeError(Exception):
    """Base of every failure the facade answers a call with."""

    reason: str = "INTERNAL"
    outcome: Outcome | None = None
    request_id: str = ""

    def metadata(self) -> dict[str, str]:
        """What, besides the action, a caller gets in ``ErrorInfo.metadata``: only what is known."""
        found: dict[str, str] = {}
        if self.request_id:
            found["request_id"] = self.request_id
        if self.outcome is not None:
            found["outcome"] = self.outcome.value
        return found


class InvalidRequest(FacadeError):
    """The caller's request breaks the contract's rules; checked before anything is sent (no quota spent).

    ``violations`` are ``(field, description)`` pairs, the field named by its TIW path.
    """

    reason = "INVALID_REQUEST"

    def __init__(self, violations: Sequence[tuple[str, str]]) -> None:
        self.violations = tuple(violations)
        super().__init__("invalid request: " + "; ".join(f"{f} {d}" for f, d in self.violations))


class MalformedRequest(InvalidRequest):
    """The request's bytes are not the method's protobuf message: the caller's fault, like any
    invalid request, answered INVALID_ARGUMENT and nothing sent upstream."""

    reason = "MALFORMED_REQUEST"

    def __init__(self, message_name: str) -> None:
        FacadeError.__init__(self, f"the request is not a valid {message_name} (protobuf decoding failed)")
        self.violations = (("", f"is not a valid {message_name}"),)


class TiwError(FacadeError):
    """TIW answered with its error envelope: ``{"Response": {"Error": {"Code", "Message"}, "RequestId"}}``.

    ``reason`` is TIW's code verbatim (``InvalidParameter.TaskNotFound``).
    """

    def __init__(self, code: str, message: str, request_id: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = self.reason = code
        self.message = message
        self.request_id = request_id


class RateLimited(FacadeError):
    """The facade's own rate limiter refused the call: no slot within its deadline, within the longest
    wait allowed, or no room in the queue. Nothing was sent."""

    reason = "RATE_LIMITED"
    outcome = Outcome.NOT_SENT

    def __init__(self, action: str, limiter_reason: str, retry_after: float) -> None:
        super().__init__(f"{action}: rate limit ({limiter_reason}); retry in {retry_after:.3f}s")
        self.action = action
        self.limiter_reason = limiter_reason  # deadline, max_wait or queue_full
        self.retry_after = max(0.0, retry_after)


class ShuttingDown(FacadeError):
    """The facade is stopping and admits no more requests; the call should go to another replica."""

    reason = "SHUTTING_DOWN"
    outcome = Outcome.NOT_SENT

    def __init__(self) -> None:
        super().__init__("the facade is shutting down; retry on another replica")


class CursorExpired(FacadeError):
    """A WatchEvents cursor names a place the event log no longer holds: events after it may be
    gone (older than its retention, past its bound, or its Redis lost them)."""

    reason = "CURSOR_EXPIRED"
    outcome = Outcome.NOT_SENT

    def __init__(self) -> None:
        super().__init__(
            "the cursor is older than the events the log keeps (TIW_EVENTS_RETENTION, TIW_EVENTS_MAX), "
            "or the log lost them: subscribe without a cursor, and Describe the tasks you care about"
        )


class EventsUnavailable(FacadeError):
    """The event log could not be read for long (its Redis down): subscribe again, with the last
    cursor, later."""

    reason = "EVENTS_UNAVAILABLE"
    outcome = Outcome.NOT_SENT

    def __init__(self) -> None:
        super().__init__("the event log is unavailable; subscribe again, with the last cursor, later")


class TooManyWatches(FacadeError):
    """A watch stream over one of a replica's caps: the replica's own (TIW_MAX_WATCHES), or the
    caller's share of it (TIW_MAX_WATCHES_PER_CALLER, given ``caller``); watch from another, or later.

    ``ErrorInfo.metadata`` names the cap (``limit``, ``setting``), so a caller can tell a busy
    replica (another may take the stream) from its own streams being too many (close some).
    """

    reason = "TOO_MANY_WATCHES"
    outcome = Outcome.NOT_SENT
    REPLICA_CAP = "TIW_MAX_WATCHES"
    CALLER_CAP = "TIW_MAX_WATCHES_PER_CALLER"

    def __init__(self, limit: int, *, caller: str | None = None) -> None:
        self.limit = limit
        self.caller = caller
        self.setting = self.REPLICA_CAP if caller is None else self.CALLER_CAP
        if caller is None:
            text = f"this replica already serves {limit} watch streams ({self.setting}); retry later"
        else:
            text = (
                f"caller {caller!r} already holds {limit} watch streams on this replica ({self.setting}); "
                "end one, or retry later"
            )
        super().__init__(text)

    def metadata(self) -> dict[str, str]:
        found = {**super().metadata(), "limit": str(self.limit), "setting": self.setting}
        if self.caller is not None:
            found["caller"] = self.caller
        return found


class UpstreamFailure(FacadeError):
    """No usable answer came from TIW. Base of the transport-level failures below."""

    outcome = Outcome.UNKNOWN


class UpstreamUnreachable(UpstreamFailure):
    """No connection to TIW could be made (refused, DNS, connect time-out, TLS handshake): provably
    not sent."""

    reason = "UPSTREAM_UNREACHABLE"
    outcome = Outcome.NOT_SENT


class UpstreamTimeout(UpstreamFailure):
    """TIW did not answer within the attempt's time, or the call's deadline left no time to send.

    ``outcome`` is ``not_sent`` when the time ran out before the request left, else ``unknown``.
    """

    reason = "UPSTREAM_TIMEOUT"

    def __init__(self, message: str, *, outcome: Outcome = Outcome.UNKNOWN) -> None:
        super().__init__(message)
        self.outcome = outcome


class UpstreamConnectionLost(UpstreamFailure):
    """The connection broke after the request may have been written: TIW may have executed it."""

    reason = "UPSTREAM_CONNECTION_LOST"


class UpstreamHttpError(UpstreamFailure):
    """TIW (or a proxy before it) answered an HTTP status other than 200, redirects included: TIW
    answers 200 to everything it processes, errors too. ``api`` names the Tencent API that did."""

    reason = "UPSTREAM_HTTP_ERROR"

    def __init__(self, status: int, *, api: str = "TIW") -> None:
        super().__init__(f"{api} answered HTTP {status}")
        self.status = status

    def metadata(self) -> dict[str, str]:
        return {**super().metadata(), "http_status": str(self.status)}


class UpstreamMalformed(UpstreamFailure):
    """TIW answered 200 with something unusable: not JSON (NaN and Infinity, or nested past the
    parser's depth, included), not its envelope (an ``Error`` whose code is not of TIW's shape, or
    a message or RequestId that is not text), too large, or a ``Response`` that does not fit the
    contract's message. ``request_id`` is kept when readable."""

    reason = "UPSTREAM_MALFORMED"

    def __init__(self, message: str, *, request_id: str = "") -> None:
        super().__init__(message)
        self.request_id = request_id


class Unexpected(FacadeError):
    """A fault in the facade itself (a bug): logged with its traceback; the caller gets only its type."""

    reason = "INTERNAL"

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"unexpected failure: {type(cause).__name__}")


class CallerMismatch(FacadeError):
    """The ``tiw-caller`` metadata names another caller than the client certificate does (mutual TLS):
    a caller may not borrow another's name. Nothing was sent."""

    reason = "CALLER_MISMATCH"
    outcome = Outcome.NOT_SENT

    def __init__(self, claimed: str, verified: str) -> None:
        super().__init__(f"tiw-caller {claimed!r} is not the caller the client certificate names")
        self.claimed = claimed
        self.verified = verified

    def metadata(self) -> dict[str, str]:
        return {**super().metadata(), "caller": self.verified}


class NotAuthorized(FacadeError):
    """The authorization policy (TIW_AUTHZ_POLICY_FILE) does not let this caller make this call: a
    deny rule matched (``rule`` names it) or no allow rule did. Nothing was sent. The message and
    metadata name the rule, never the policy's content."""

    reason = "NOT_AUTHORIZED"
    outcome = Outcome.NOT_SENT

    def __init__(self, rule: str | None, explanation: str) -> None:
        super().__init__(f"not authorized: {explanation}")
        self.rule = rule

    def metadata(self) -> dict[str, str]:
        found = super().metadata()
        if self.rule:
            found["rule"] = self.rule
        return found


class AuthnReason(enum.StrEnum):
    """Why a caller's bearer token was refused: ``ErrorInfo.reason`` and the ``reason`` label of
    ``tiw_authn_failures_total`` (every one of them primed at start-up)."""

    MISSING_TOKEN = "MISSING_TOKEN"  # none sent where TIW_AUTH_REQUIRED asks for one
    MALFORMED_TOKEN = "MALFORMED_TOKEN"  # not a JWT, not `Bearer`, or claims of the wrong type
    UNSUPPORTED_ALGORITHM = "UNSUPPORTED_ALGORITHM"  # neither RS256 nor ES256 (`none`, HS256...)
    UNKNOWN_KEY = "UNKNOWN_KEY"  # its kid is not among the issuer's keys, even after a refresh
    BAD_SIGNATURE = "BAD_SIGNATURE"
    EXPIRED = "EXPIRED"
    NOT_YET_VALID = "NOT_YET_VALID"
    WRONG_AUDIENCE = "WRONG_AUDIENCE"
    WRONG_ISSUER = "WRONG_ISSUER"
    NOT_A_SERVICE_ACCOUNT = "NOT_A_SERVICE_ACCOUNT"  # sub is not system:serviceaccount:NS:NAME
    KEYS_UNAVAILABLE = "KEYS_UNAVAILABLE"  # the facade has no keys to check any token with


class AuthenticationFailed(FacadeError):
    """The caller's bearer token (a projected service-account token) is missing where one is
    required, or fails a check: ``reason`` (an ``AuthnReason``) says which. The message never holds
    the token, nor anything read from it. Nothing was sent."""

    outcome = Outcome.NOT_SENT

    def __init__(self, reason: AuthnReason, detail: str) -> None:
        super().__init__(f"authentication failed: {detail}")
        self.reason = reason.value


class KeysUnavailable(AuthenticationFailed):
    """No token can be checked: the facade never got its issuer's keys (the key source has failed
    since start-up). Not the caller's fault; another replica, or a retry later, may do."""

    def __init__(self) -> None:
        super().__init__(
            AuthnReason.KEYS_UNAVAILABLE, "the facade has no keys to verify tokens with yet; retry later"
        )


class _KeyFailure(FacadeError):
    """A failure about the request of one ``idempotency-key``: the caller gets the key's SHA-256 (never
    the key) in the metadata, and ``explanation`` (filled in with it) as the message."""

    explanation = "idempotency key {key_hash}"

    def __init__(self, key_hash: str) -> None:
        super().__init__(self.explanation.format(key_hash=key_hash))
        self.key_hash = key_hash

    def metadata(self) -> dict[str, str]:
        return {**super().metadata(), "idempotency_key_sha256": self.key_hash}


class IdempotencyKeyReused(_KeyFailure):
    """The ``idempotency-key`` was first used with another request (another fingerprint): a key
    names one request. Nothing was sent."""

    reason = "IDEMPOTENCY_KEY_REUSED"
    outcome = Outcome.NOT_SENT
    explanation = (
        "idempotency key {key_hash} was first used with a different request; "
        "a key names one request: use a new key for a new request"
    )


class IdempotencyInFlight(_KeyFailure):
    """The request with this ``idempotency-key`` was sent and TIW has not answered yet (this call's,
    or another's, on any replica): the deadline passed first. The facade keeps waiting for TIW and
    records the answer under the key; a retry with the same key gets it."""

    reason = "IDEMPOTENCY_IN_FLIGHT"
    outcome = Outcome.UNKNOWN
    explanation = (
        "the request with idempotency key {key_hash} is still in flight (TIW has not answered "
        "within the deadline); the facade keeps waiting and records TIW's answer: retry with the "
        "same key to get it"
    )


class OutcomeUnknown(_KeyFailure):
    """The first request with this ``idempotency-key`` was sent and its answer never arrived: TIW
    may have executed it. The facade never sends it again under this key."""

    reason = "OUTCOME_UNKNOWN"
    outcome = Outcome.UNKNOWN
    explanation = (
        "the first request with idempotency key {key_hash} was sent but TIW's answer never came: "
        "it may have created a task, so it is not sent again under this key. Wait for the task's "
        "callback or look for it (DescribeSnapshotTask, TIW's console); use a new key only if "
        "you know no task was created, since a new key may create a second one"
    )


class IdempotencyRecordsLost(_KeyFailure):
    """The key store (Redis) lost its records recently (it came back empty) and has none for this
    ``idempotency-key``: a request with it may have been sent before the loss, so the facade cannot
    promise at-most-once and does not send it. Retrying as is will not help: the caller must find
    out whether the task exists. Nothing was sent."""

    reason = "IDEMPOTENCY_RECORDS_LOST"
    outcome = Outcome.NOT_SENT
    explanation = (
        "the idempotency key store lost its records recently and has none for key {key_hash}: a "
        "request with this key may already have created a task, so it is not sent. Look for the "
        "task at TIW (DescribeSnapshotTask with a TaskID you recorded, your callbacks, TIW's "
        "console); to create one anew, send with a new key once the loss window has passed "
        "(TIW_IDEMPOTENCY_LOSS_WINDOW); this key stays refused"
    )

    def __init__(self, key_hash: str, lost_at: float = 0.0) -> None:
        super().__init__(key_hash)
        self.lost_at = lost_at

    def metadata(self) -> dict[str, str]:
        found = super().metadata()
        if self.lost_at:
            found["lost_at"] = f"{self.lost_at:.3f}"
        return found


class IdempotencyUnavailable(FacadeError):
    """The store of idempotency keys (Redis) cannot be read or written, so the facade cannot promise
    to send the request at most once: it does not send it. Retry (on another replica) later."""

    reason = "IDEMPOTENCY_UNAVAILABLE"
    outcome = Outcome.NOT_SENT

    def __init__(self, detail: str) -> None:
        super().__init__(f"the idempotency key store is unavailable ({detail}); nothing was sent, retry")


# --- not a call's failure: what the parts of the client raise among themselves -------------------


class NoSpareQuota(Exception):
    """A call that may use only spare quota (a refresh) found none: nothing was sent. Not a failure
    any caller sees: whoever asked for spare quota only asks again later."""


class CredentialsError(Exception):
    """No usable credentials (or a misconfigured source); the message never holds a secret. The
    client makes it UPSTREAM_UNREACHABLE for a call that found none."""


# The facade's own reasons, for documentation and tests: every concrete class but TiwError.
FACADE_FAILURES: tuple[type[FacadeError], ...] = (
    InvalidRequest,
    MalformedRequest,
    CallerMismatch,
    NotAuthorized,
    IdempotencyKeyReused,
    IdempotencyInFlight,
    OutcomeUnknown,
    IdempotencyRecordsLost,
    IdempotencyUnavailable,
    RateLimited,
    TooManyWatches,
    ShuttingDown,
    CursorExpired,
    EventsUnavailable,
    UpstreamUnreachable,
    UpstreamTimeout,
    UpstreamConnectionLost,
    UpstreamHttpError,
    UpstreamMalformed,
    Unexpected,
)
