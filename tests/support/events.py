"""Events as the intake makes them, for the tests of the event logs and of WatchEvents."""

from __future__ import annotations

import json
import time
from typing import Any

from tiw_facade.events import Event

APP = 1400000001


def event(
    n: int, *, kind: str = "snapshot", task_id: str = "task-1", app: int = APP, **changes: Any
) -> Event:
    """The ``n``-th event (its Timestamp), valid for ten minutes; ``changes`` replace any field."""
    body = json.dumps({"SdkAppId": app, "Timestamp": n, "EventData": {"TaskId": task_id}}).encode()
    fields: dict[str, Any] = {
        "kind": kind,
        "sdk_app_id": app,
        "event_type": "TranscodeFinished",
        "task_id": task_id,
        "timestamp": n,
        "expire_time": int(time.time()) + 600,
        "body": body,
        "received_at": time.time(),
        **changes,
    }
    return Event(**fields)
