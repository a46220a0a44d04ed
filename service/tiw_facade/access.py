"""What the gate writes down about a call: the audit trail's glue between the interceptor
(identity.CallerCheck) and audit.py, and what of a request an authorization policy looks at.

Audited: every CreateSnapshotTask and StopWhiteboardPush when it ends (who, how proven, which
SdkAppId and task, the idempotency key's SHA-256, the gRPC code, TIW's RequestId), every call the
policy denies, and every call it would deny in audit mode. Never a token, a secret or a key.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from google.protobuf.message import Message

from tiw_facade import audit
from tiw_facade.call_record import CURRENT_CALL

if TYPE_CHECKING:
    import grpc

    from tiw_facade.authz import Verdict
    from tiw_facade.identity import Caller

AUDITED = frozenset({"CreateSnapshotTask", "StopWhiteboardPush"})


@dataclasses.dataclass(frozen=True, slots=True)
class Call:
    """A call as the policy and the audit trail see it: its method's full name and its request."""

    method: str  # /tiw.v20190919.TiwService/StopWhiteboardPush
    request: Any  # the request message (a watch's wraps its Describe request), or what failed to decode

    def _field(self, name: str) -> Any:
        inner = getattr(self.request, "request", None)  # a watch's Describe request
        return getattr(inner if isinstance(inner, Message) else self.request, name, None)

    @property
    def sdk_app_id(self) -> int | None:
        value = self._field("sdk_app_id")
        if value is None:
            # WatchEvents filters on a set of SdkAppIds: one is judged as a call for it; several, or
            # none (every SdkAppId's events), as unknown, which only a rule for every SdkAppId allows.
            many = self._field("sdk_app_ids")
            value = many[0] if many is not None and len(many) == 1 else None
        return value if isinstance(value, int) and value else None

    @property
    def task_id(self) -> str | None:
        value = self._field("task_id")
        return value if isinstance(value, str) and value else None


def audit_refusal(caller: Caller, call: Call, verdict: Verdict) -> None:
    """The line of a call the policy denied: answered PERMISSION_DENIED, nothing sent."""
    _write(caller, call, "PERMISSION_DENIED", verdict=verdict)


def audit_end(
    caller: Caller, call: Call, context: grpc.aio.ServicerContext[Any, Any], verdict: Verdict | None
) -> None:
    """The line of a call that went through, once it is answered: ``verdict`` when the policy would
    have denied it (audit mode)."""
    record = CURRENT_CALL.get(None)
    code = context.code()  # None: nothing set, the call answered OK
    _write(
        caller,
        call,
        "OK" if code is None else code.name,
        verdict=verdict,
        task_id=(record.task_id if record else "") or call.task_id,
        key=record.key_sha256 if record else "",
        request_id=record.request_id if record else "",
    )


def _write(
    caller: Caller,
    call: Call,
    outcome: str,
    *,
    verdict: Verdict | None,
    task_id: str | None = None,
    key: str = "",
    request_id: str = "",
) -> None:
    audit.record(
        audit.AuditEntry(
            principal=caller.name if caller.proof != "none" else None,
            proven_by=caller.proof.value,
            method=call.method,
            outcome=outcome,
            sdk_app_id=call.sdk_app_id,
            task_id=task_id or call.task_id,
            idempotency_key_sha256=key or None,
            tiw_request_id=request_id or None,
            decision=verdict.outcome if verdict is not None else None,  # type: ignore[arg-type]
            rule=verdict.decision.rule if verdict is not None else None,
        )
    )
