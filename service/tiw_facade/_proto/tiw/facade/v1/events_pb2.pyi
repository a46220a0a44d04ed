import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WatchEventsRequest(_message.Message):
    __slots__ = ("sdk_app_ids", "event_types", "kinds", "task_ids", "cursor")
    SDK_APP_IDS_FIELD_NUMBER: _ClassVar[int]
    EVENT_TYPES_FIELD_NUMBER: _ClassVar[int]
    KINDS_FIELD_NUMBER: _ClassVar[int]
    TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    sdk_app_ids: _containers.RepeatedScalarFieldContainer[int]
    event_types: _containers.RepeatedScalarFieldContainer[str]
    kinds: _containers.RepeatedScalarFieldContainer[str]
    task_ids: _containers.RepeatedScalarFieldContainer[str]
    cursor: str
    def __init__(self, sdk_app_ids: _Optional[_Iterable[int]] = ..., event_types: _Optional[_Iterable[str]] = ..., kinds: _Optional[_Iterable[str]] = ..., task_ids: _Optional[_Iterable[str]] = ..., cursor: _Optional[str] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("cursor", "kind", "sdk_app_id", "event_type", "task_id", "body", "received_at")
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SDK_APP_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_AT_FIELD_NUMBER: _ClassVar[int]
    cursor: str
    kind: str
    sdk_app_id: int
    event_type: str
    task_id: str
    body: bytes
    received_at: _timestamp_pb2.Timestamp
    def __init__(self, cursor: _Optional[str] = ..., kind: _Optional[str] = ..., sdk_app_id: _Optional[int] = ..., event_type: _Optional[str] = ..., task_id: _Optional[str] = ..., body: _Optional[bytes] = ..., received_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
