"""What the store keeps per account and key, and how a key and a request are named: the records
(``State``, ``Record``), the key's rules and hash, the request's fingerprint, and what a failed send
leaves under its key (``settled_by``). Pure: no store, no I/O.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib

from tiw_facade.failures import InvalidRequest, Outcome, TiwError

# TIW's codes that say it refused the request without executing it: the key is released.
NOT_EXECUTED = (
    "RequestLimitExceeded",
    "AuthFailure",
    "InvalidParameter",
    "MissingParameter",
    "UnknownParameter",
)
MAX_KEY_LENGTH = 255


class State(enum.StrEnum):
    IN_FLIGHT = "in_flight"  # claimed by a sender that has not settled it yet
    ANSWERED = "answered"  # TIW answered: ``answer`` is the response's bytes
    FAILED = "failed"  # TIW answered an error it executed (or may have): replayed as that error
    UNKNOWN = "unknown"  # sent, never answered: TIW may have executed it; never sent again
    # Unknown to the store soon after it lost its records (it may have been sent before): refused
    # for the rest of its TTL, so a retry after the loss window cannot send it either.
    LOST = "lost"


@dataclasses.dataclass(frozen=True, slots=True)
class Record:
    fingerprint: str
    state: State
    token: str = ""  # the claim's: only its owner settles it
    until: float = 0.0  # IN_FLIGHT: Unix time by which the owner settles it, unless it died
    answer: bytes = b""
    code: str = ""
    message: str = ""
    request_id: str = ""

    def fields(self) -> dict[str, str | bytes]:
        return {
            "fingerprint": self.fingerprint,
            "state": self.state.value,
            "token": self.token,
            "until": repr(self.until),
            "answer": self.answer,
            "code": self.code,
            "message": self.message,
            "request_id": self.request_id,
        }

    @classmethod
    def parse(cls, fields: dict[bytes, bytes]) -> Record:
        text = {name.decode(): value for name, value in fields.items()}
        return cls(
            fingerprint=text["fingerprint"].decode(),
            state=State(text["state"].decode()),
            token=text["token"].decode(),
            until=float(text["until"]),
            answer=text["answer"],
            code=text["code"].decode(),
            message=text["message"].decode(),
            request_id=text["request_id"].decode(),
        )


def key_violation(key: str) -> str | None:
    """Why ``key`` is not an idempotency key (1..255 printable ASCII characters), or None."""
    if not 1 <= len(key) <= MAX_KEY_LENGTH:
        return f"must be 1 to {MAX_KEY_LENGTH} characters long, not {len(key)}"
    if not all(" " <= c <= "~" for c in key):
        return "must be printable ASCII (space to ~)"
    return None


def key_hash(key: str) -> str:
    """How a key appears in Redis, logs and statuses: a key may be something the caller keeps secret."""
    return hashlib.sha256(key.encode()).hexdigest()


def fingerprint(action: str, request: bytes) -> str:
    """Of a request's canonical bytes (``SerializeToString(deterministic=True)``)."""
    return hashlib.sha256(action.encode() + b"\0" + request).hexdigest()


def settled_by(mine: Record, exc: BaseException) -> Record | None:
    """What a failed send leaves under its key: None (released) when it proves TIW did nothing."""
    if isinstance(exc, TiwError):
        if exc.code.startswith(NOT_EXECUTED):
            return None
        return dataclasses.replace(
            mine, state=State.FAILED, code=exc.code, message=exc.message, request_id=exc.request_id
        )
    if isinstance(exc, InvalidRequest) or getattr(exc, "outcome", None) is Outcome.NOT_SENT:
        return None
    return dataclasses.replace(mine, state=State.UNKNOWN)  # a time-out, a lost connection, a bug
