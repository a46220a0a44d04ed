"""Which answers may be shared, which are final, and what a write changes: TIW's facts, in one place.

The shared actions are the methods the proto marks ``NO_SIDE_EFFECTS`` (the three Describe*): asking
twice is asking once. The creates and stops are never shared nor cached.
"""

from __future__ import annotations

from collections.abc import Mapping

from google.protobuf import descriptor_pb2, message_factory
from google.protobuf.message import Message

from tiw_facade._proto.tiw.v20190919 import tiw_pb2

_SERVICE = tiw_pb2.DESCRIPTOR.services_by_name["TiwService"]
_NO_SIDE_EFFECTS = descriptor_pb2.MethodOptions.IdempotencyLevel.NO_SIDE_EFFECTS

# The response class of every shared action (RPCs are named as TIW's actions).
RESPONSES: Mapping[str, type[Message]] = {
    method.name: message_factory.GetMessageClass(method.output_type)
    for method in _SERVICE.methods
    if method.GetOptions().idempotency_level == _NO_SIDE_EFFECTS
}
REQUESTS: Mapping[str, type[Message]] = {
    method.name: message_factory.GetMessageClass(method.input_type) for method in _SERVICE.methods
}

# The ``Status`` of a task that is over: TIW never changes it again (tiw-api.md, "Task states").
TERMINAL_STATUS: Mapping[str, str] = {
    "DescribeSnapshotTask": "Finished",
    "DescribeWhiteboardPush": "STOPPED",
    "DescribeVideoGenerationTask": "FINISHED",
}
# TIW's errors kept (briefly, TIW_CACHE_NOT_FOUND_TTL) like answers: the same question gets them again.
KEPT_ERRORS = frozenset({"InvalidParameter.TaskNotFound"})
# A write through the facade → the shared action whose answers about the same task it changes. The
# Describe request is made of the write's fields of the same names (SdkAppId, TaskId).
INVALIDATES: Mapping[str, str] = {"StopWhiteboardPush": "DescribeWhiteboardPush"}
# The shared actions some write makes stale: only their answers can be wrong after a lost stop.
INVALIDATED_ACTIONS = frozenset(INVALIDATES.values())

assert set(TERMINAL_STATUS) == set(RESPONSES), "every shared action needs its terminal state"


def is_terminal(action: str, response: Message) -> bool:
    return getattr(response, "status", None) == TERMINAL_STATUS[action]


def invalidated_request(action: str, request: Message) -> tuple[str, Message] | None:
    """The shared action and request whose answers ``request`` of ``action`` makes stale, or None."""
    target = INVALIDATES.get(action)
    if target is None:
        return None
    describe = REQUESTS[target]()
    for field in describe.DESCRIPTOR.fields:
        setattr(describe, field.name, getattr(request, field.name))
    return target, describe


def content(action: str, payload: bytes) -> bytes:
    """What a watcher compares: the answer without its RequestId (new for every request)."""
    return content_of(RESPONSES[action].FromString(payload))


def content_of(response: Message) -> bytes:
    """``content`` of an answer already decoded (which is left as it was)."""
    request_id = getattr(response, "request_id", "")
    response.ClearField("request_id")
    try:
        return response.SerializeToString(deterministic=True)
    finally:
        response.request_id = request_id  # type: ignore[attr-defined]
