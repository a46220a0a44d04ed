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


CURRENT_CALL: contextvars.ContextVar[CallRecord] = contextvars.ContextVar("tiw_facade_call")
