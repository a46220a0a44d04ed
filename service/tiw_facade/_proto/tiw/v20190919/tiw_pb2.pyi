from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SnapshotWhiteboard(_message.Message):
    __slots__ = ("width", "height", "init_params")
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    INIT_PARAMS_FIELD_NUMBER: _ClassVar[int]
    width: int
    height: int
    init_params: str
    def __init__(self, width: _Optional[int] = ..., height: _Optional[int] = ..., init_params: _Optional[str] = ...) -> None: ...

class SnapshotCOS(_message.Message):
    __slots__ = ("uin", "region", "bucket", "target_dir", "domain")
    UIN_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    TARGET_DIR_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    uin: int
    region: str
    bucket: str
    target_dir: str
    domain: str
    def __init__(self, uin: _Optional[int] = ..., region: _Optional[str] = ..., bucket: _Optional[str] = ..., target_dir: _Optional[str] = ..., domain: _Optional[str] = ...) -> None: ...

class SnapshotResult(_message.Message):
    __slots__ = ("error_code", "error_message", "total", "snapshots")
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    error_code: str
    error_message: str
    total: int
    snapshots: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, error_code: _Optional[str] = ..., error_message: _Optional[str] = ..., total: _Optional[int] = ..., snapshots: _Optional[_Iterable[str]] = ...) -> None: ...

class VideoInfo(_message.Message):
    __slots__ = ("video_play_time", "video_size", "video_format", "video_duration", "video_url", "video_id", "video_type", "user_id", "width", "height")
    VIDEO_PLAY_TIME_FIELD_NUMBER: _ClassVar[int]
    VIDEO_SIZE_FIELD_NUMBER: _ClassVar[int]
    VIDEO_FORMAT_FIELD_NUMBER: _ClassVar[int]
    VIDEO_DURATION_FIELD_NUMBER: _ClassVar[int]
    VIDEO_URL_FIELD_NUMBER: _ClassVar[int]
    VIDEO_ID_FIELD_NUMBER: _ClassVar[int]
    VIDEO_TYPE_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    video_play_time: int
    video_size: int
    video_format: str
    video_duration: int
    video_url: str
    video_id: str
    video_type: int
    user_id: str
    width: int
    height: int
    def __init__(self, video_play_time: _Optional[int] = ..., video_size: _Optional[int] = ..., video_format: _Optional[str] = ..., video_duration: _Optional[int] = ..., video_url: _Optional[str] = ..., video_id: _Optional[str] = ..., video_type: _Optional[int] = ..., user_id: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class CreateSnapshotTaskRequest(_message.Message):
    __slots__ = ("whiteboard", "sdk_app_id", "room_id", "callback_url", "cos", "snapshot_mode")
    WHITEBOARD_FIELD_NUMBER: _ClassVar[int]
    SDK_APP_ID_FIELD_NUMBER: _ClassVar[int]
    ROOM_ID_FIELD_NUMBER: _ClassVar[int]
    CALLBACK_URL_FIELD_NUMBER: _ClassVar[int]
    COS_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_MODE_FIELD_NUMBER: _ClassVar[int]
    whiteboard: SnapshotWhiteboard
    sdk_app_id: int
    room_id: int
    callback_url: str
    cos: SnapshotCOS
    snapshot_mode: str
    def __init__(self, whiteboard: _Optional[_Union[SnapshotWhiteboard, _Mapping]] = ..., sdk_app_id: _Optional[int] = ..., room_id: _Optional[int] = ..., callback_url: _Optional[str] = ..., cos: _Optional[_Union[SnapshotCOS, _Mapping]] = ..., snapshot_mode: _Optional[str] = ...) -> None: ...

class CreateSnapshotTaskResponse(_message.Message):
    __slots__ = ("task_id", "request_id")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    request_id: str
    def __init__(self, task_id: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class DescribeSnapshotTaskRequest(_message.Message):
    __slots__ = ("task_id", "sdk_app_id")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    SDK_APP_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    sdk_app_id: int
    def __init__(self, task_id: _Optional[str] = ..., sdk_app_id: _Optional[int] = ...) -> None: ...

class DescribeSnapshotTaskResponse(_message.Message):
    __slots__ = ("task_id", "status", "create_time", "finish_time", "result", "request_id")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    FINISH_TIME_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    status: str
    create_time: int
    finish_time: int
    result: SnapshotResult
    request_id: str
    def __init__(self, task_id: _Optional[str] = ..., status: _Optional[str] = ..., create_time: _Optional[int] = ..., finish_time: _Optional[int] = ..., result: _Optional[_Union[SnapshotResult, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class DescribeWhiteboardPushRequest(_message.Message):
    __slots__ = ("sdk_app_id", "task_id")
    SDK_APP_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    sdk_app_id: int
    task_id: str
    def __init__(self, sdk_app_id: _Optional[int] = ..., task_id: _Optional[str] = ...) -> None: ...

class DescribeWhiteboardPushResponse(_message.Message):
    __slots__ = ("finish_reason", "task_id", "status", "room_id", "group_id", "push_user_id", "push_start_time", "push_stop_time", "exception_cnt", "im_sync_time", "backup", "request_id")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ROOM_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    PUSH_USER_ID_FIELD_NUMBER: _ClassVar[int]
    PUSH_START_TIME_FIELD_NUMBER: _ClassVar[int]
    PUSH_STOP_TIME_FIELD_NUMBER: _ClassVar[int]
    EXCEPTION_CNT_FIELD_NUMBER: _ClassVar[int]
    IM_SYNC_TIME_FIELD_NUMBER: _ClassVar[int]
    BACKUP_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    finish_reason: str
    task_id: str
    status: str
    room_id: int
    group_id: str
    push_user_id: str
    push_start_time: int
    push_stop_time: int
    exception_cnt: int
    im_sync_time: int
    backup: str
    request_id: str
    def __init__(self, finish_reason: _Optional[str] = ..., task_id: _Optional[str] = ..., status: _Optional[str] = ..., room_id: _Optional[int] = ..., group_id: _Optional[str] = ..., push_user_id: _Optional[str] = ..., push_start_time: _Optional[int] = ..., push_stop_time: _Optional[int] = ..., exception_cnt: _Optional[int] = ..., im_sync_time: _Optional[int] = ..., backup: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class StopWhiteboardPushRequest(_message.Message):
    __slots__ = ("sdk_app_id", "task_id")
    SDK_APP_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    sdk_app_id: int
    task_id: str
    def __init__(self, sdk_app_id: _Optional[int] = ..., task_id: _Optional[str] = ...) -> None: ...

class StopWhiteboardPushResponse(_message.Message):
    __slots__ = ("backup", "request_id")
    BACKUP_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    backup: str
    request_id: str
    def __init__(self, backup: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class DescribeVideoGenerationTaskRequest(_message.Message):
    __slots__ = ("sdk_app_id", "task_id")
    SDK_APP_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    sdk_app_id: int
    task_id: str
    def __init__(self, sdk_app_id: _Optional[int] = ..., task_id: _Optional[str] = ...) -> None: ...

class DescribeVideoGenerationTaskResponse(_message.Message):
    __slots__ = ("group_id", "room_id", "task_id", "progress", "status", "total_time", "video_infos", "video_info_list", "request_id")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    ROOM_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TIME_FIELD_NUMBER: _ClassVar[int]
    VIDEO_INFOS_FIELD_NUMBER: _ClassVar[int]
    VIDEO_INFO_LIST_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    room_id: int
    task_id: str
    progress: int
    status: str
    total_time: int
    video_infos: VideoInfo
    video_info_list: _containers.RepeatedCompositeFieldContainer[VideoInfo]
    request_id: str
    def __init__(self, group_id: _Optional[str] = ..., room_id: _Optional[int] = ..., task_id: _Optional[str] = ..., progress: _Optional[int] = ..., status: _Optional[str] = ..., total_time: _Optional[int] = ..., video_infos: _Optional[_Union[VideoInfo, _Mapping]] = ..., video_info_list: _Optional[_Iterable[_Union[VideoInfo, _Mapping]]] = ..., request_id: _Optional[str] = ...) -> None: ...
