"""What one RPC learned on its way, for the line the access log writes about it.

Neutral ground: the handler fills the record in, the interceptor reads it, and neither imports the
other (nor the metrics).
"""

from __future__ import annotations

import contextvars
import dataclasses


@dataclasses.dataclass(slots=True)
class CallRecord:
    """Set through ``CURRENT_CALL`` by the handler; read by the interceptor when the RPC ends."""

    action: str = ""
    request_id: str = ""  # TIW's RequestId of the answer (or of the error)
    tiw_code: str = ""  # TIW's error code, or the facade's own reason, of a failed call
    caller: str = ""  # who called: a proven identity, a claimed name, or unidentified (identity.py)
    task_id: str = ""  # the TaskID a create made (the audit trail's)
    key_sha256: str = ""  # the SHA-256 of the call's idempotency-key, if it had one (never the key)


CURRENT_CALL: contextvars.ContextVar[CallRecord] = contextvars.ContextVar("tiw_facade_call")


def record_for(action: str) -> CallRecord:
    """The current RPC's record, naming ``action``; a throwaway one for a call served without the
    interceptor (tests), which nobody reads."""
    record = CURRENT_CALL.get(None)
    if record is None:
        record = CallRecord()
    record.action = action
    return record


UNIDENTIFIED = "unidentified"  # the caller of a call that names none
# The caller of the current call as it names itself (or as its certificate names it), set by
# identity.CallerCheck (a gRPC interceptor): who the call is, not what share it gets (CURRENT_SHARE).
# Here, not in identity.py, so that neither the client nor the limiter imports anything of gRPC.
CURRENT_CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("tiw_caller", default=UNIDENTIFIED)
# The name a call's fair share and its per-caller bounds (the limiter's queue, watch slots) are kept
# under: a proven identity (a client certificate), a name the operator lists in TIW_CALLER_WEIGHTS,
# or UNIDENTIFIED for every other caller together (a name a caller merely claims costs it nothing to
# invent, so invented names must not each get a share). Set by identity.CallerCheck.
CURRENT_SHARE: contextvars.ContextVar[str] = contextvars.ContextVar("tiw_share", default=UNIDENTIFIED)
# The caller's proven identity (a service-account token's principal, a client certificate's name), or
# None: idempotency keys are scoped by it. Set by identity.CallerCheck.
CURRENT_PRINCIPAL: contextvars.ContextVar[str | None] = contextvars.ContextVar("tiw_principal", default=None)
