"""The audit trail: one JSON line for every change a caller asks of TIW, and every call refused by
the authorization policy (or that it would refuse, in audit mode).

The line says who (the principal, and how it was proven), what (the method, the SdkAppId, the task:
the one named, or the TaskID created), the idempotency key's SHA-256 (never the key: a caller may
keep it secret), how it ended (the gRPC code's name) and TIW's RequestId; for a refused call, the
decision and the rule. Never a token, a secret or a key: none is a field, and the lines go through
the same scrubbing formatter as every other (logs.py).

Its own logger, ``tiw_facade.audit``, at INFO whatever TIW_LOG_LEVEL says: raising the level to
quiet the access log must not silence the trail. A collector can route the lines by their
``"logger": "tiw_facade.audit"``.

    {"ts": "2026-12-07T02:50:01.123Z", "level": "INFO", "logger": "tiw_facade.audit", "msg": "audit",
     "principal": "system:serviceaccount:recording:push-operator", "proven_by": "token",
     "method": "/tiw.v20190919.TiwService/StopWhiteboardPush", "sdk_app_id": 1400000001,
     "task_id": "...", "outcome": "OK", "tiw_request_id": "..."}
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import Final, Literal

__all__ = ["PROOFS", "AuditEntry", "key_digest", "log", "record"]

log = logging.getLogger("tiw_facade.audit")
# Its own level: the root's (TIW_LOG_LEVEL) does not apply to a logger that has one, and the records
# still reach the root's handler, whose level is unset.
log.setLevel(logging.INFO)

# How the principal was established: a verified bearer token, a verified client certificate, a
# `tiw-caller` name the caller gave (unproven), or nothing at all.
Proof = Literal["token", "certificate", "claimed", "none"]
PROOFS: Final[tuple[Proof, ...]] = ("token", "certificate", "claimed", "none")
Decision = Literal["deny", "would_deny"]


def key_digest(key: str) -> str:
    """An idempotency key as the audit line (and the statuses, and Redis) show it: its SHA-256."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AuditEntry:
    """One audited call. Only what is known is written: a field left None is not in the line."""

    principal: str | None  # the proven identity, or the claimed name; None when there is neither
    proven_by: Proof
    method: str  # the full name: /tiw.v20190919.TiwService/StopWhiteboardPush
    outcome: str  # the gRPC code's name: OK, PERMISSION_DENIED, UNAVAILABLE...
    sdk_app_id: int | None = None
    task_id: str | None = None  # the task acted on, or the TaskID a create returned
    idempotency_key_sha256: str | None = None  # key_digest(key), never the key
    tiw_request_id: str | None = None  # TIW's RequestId, when TIW answered
    decision: Decision | None = None  # for a call the policy denied (or would deny, in audit mode)
    rule: str | None = None  # the deny rule's name; None with a decision: no allow rule matched

    def __post_init__(self) -> None:
        if self.proven_by not in PROOFS:
            raise ValueError(f"proven_by must be one of {', '.join(PROOFS)}, not {self.proven_by!r}")
        if self.proven_by == "none" and self.principal is not None:
            raise ValueError("a principal proven by nothing and not even claimed: proven_by 'none' has none")
        digest = self.idempotency_key_sha256
        if digest is not None and (len(digest) != 64 or digest.strip("0123456789abcdef")):
            # A raw key in this field would be written as it is: only a SHA-256 (key_digest) passes.
            raise ValueError("idempotency_key_sha256 must be key_digest(key), a SHA-256 in hex")

    def fields(self) -> dict[str, object]:
        """The line's fields after ``msg``, in order; None for one left out."""
        return {
            "principal": self.principal,
            "proven_by": self.proven_by,
            "method": self.method,
            "sdk_app_id": self.sdk_app_id,
            "task_id": self.task_id,
            "idempotency_key_sha256": self.idempotency_key_sha256,
            "outcome": self.outcome,
            "tiw_request_id": self.tiw_request_id,
            "decision": self.decision,
            "rule": self.rule,
        }


def record(entry: AuditEntry) -> None:
    """Write ``entry``'s line to the audit trail."""
    log.info("audit", extra=entry.fields())
