from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as _tiw_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WatchSnapshotTaskRequest(_message.Message):
    __slots__ = ("request",)
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request: _tiw_pb2.DescribeSnapshotTaskRequest
    def __init__(self, request: _Optional[_Union[_tiw_pb2.DescribeSnapshotTaskRequest, _Mapping]] = ...) -> None: ...

class WatchWhiteboardPushRequest(_message.Message):
    __slots__ = ("request",)
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request: _tiw_pb2.DescribeWhiteboardPushRequest
    def __init__(self, request: _Optional[_Union[_tiw_pb2.DescribeWhiteboardPushRequest, _Mapping]] = ...) -> None: ...

class WatchVideoGenerationTaskRequest(_message.Message):
    __slots__ = ("request",)
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request: _tiw_pb2.DescribeVideoGenerationTaskRequest
    def __init__(self, request: _Optional[_Union[_tiw_pb2.DescribeVideoGenerationTaskRequest, _Mapping]] = ...) -> None: ...
