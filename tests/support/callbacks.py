"""TIW's callbacks as TIW posts them: signed bodies, and a POST to an intake.

The Sign is computed here from TIW's documented rule, not with tiw_facade.callbacks, so that a test
of the intake checks its rule against the documentation rather than against itself.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import AsyncIterable, Mapping
from typing import Final

import aiohttp

# The EventType a kind's body carries by default. Push's is documented; the snapshot's and the
# video's are not (docs/tiw-api.md, "Callbacks"): names of the tests' own.
EVENT_TYPES: Final = {
    "push": "WhiteboardPushStarted",
    "snapshot": "SnapshotTaskFinished",
    "video": "VideoGenerationTaskFinished",
}


class _Drop:
    def __repr__(self) -> str:
        return "DROP"


DROP: Final = _Drop()  # an override's value that leaves the field out


def sign(key: str, expire_time: int | str) -> str:
    """TIW's Sign: lowercase hex MD5 of the key followed by ExpireTime."""
    return hashlib.md5(f"{key}{expire_time}".encode(), usedforsecurity=False).hexdigest()


def signed_body(
    kind_or_event_type: str,
    *,
    sdk_app_id: int,
    key: str,
    expire_time: int | None = None,
    task_id: str = "task-1",
    timestamp: int | None = None,
    **overrides: object,
) -> bytes:
    """A callback's JSON body signed with ``key``. A kind (push, snapshot, video) gives its default
    EventType and task field (TaskID for a snapshot, else TaskId); anything else is the EventType.
    ``expire_time`` defaults to five minutes from now, ``timestamp`` to now. ``overrides`` replace
    top-level fields (``EventData`` too); ``DROP`` leaves one out."""
    event_type = EVENT_TYPES.get(kind_or_event_type, kind_or_event_type)
    expire_time = int(time.time()) + 300 if expire_time is None else expire_time
    fields: dict[str, object] = {
        "Timestamp": int(time.time()) if timestamp is None else timestamp,
        "SdkAppId": sdk_app_id,
        "ExpireTime": expire_time,
        "Sign": sign(key, expire_time),
        "EventType": event_type,
        "EventData": {"TaskID" if kind_or_event_type == "snapshot" else "TaskId": task_id},
    }
    fields.update(overrides)
    return json.dumps({name: value for name, value in fields.items() if value is not DROP}).encode()


async def post(
    url: str,
    body: bytes | AsyncIterable[bytes],
    method: str = "POST",
    headers: Mapping[str, str] | None = None,
) -> tuple[int, bytes]:
    """Send ``body`` (an async iterable: chunked) to ``url``; the answer's status and body."""
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, data=body, headers=headers) as response,
    ):
        return response.status, await response.read()
