"""Every validation rule, one case each: the violation names the field by its TIW path."""

from __future__ import annotations

import pytest
from google.protobuf.message import Message
from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as pb
from tiw_facade.validate import MAX_JSON_DEPTH, MAX_TASK_ID_LENGTH, violations


def snapshot(**changes: object) -> pb.CreateSnapshotTaskRequest:
    request = pb.CreateSnapshotTaskRequest(
        whiteboard=pb.SnapshotWhiteboard(width=1280, height=720, init_params='{"ratio":"16:9"}'),
        sdk_app_id=1400123480,
        room_id=12345,
        callback_url="http://xx/callback",
        cos=pb.SnapshotCOS(
            uin=130001358, region="ap-guangzhou", bucket="test-123070000", target_dir="snapshot/"
        ),
        snapshot_mode="AllMarks",
    )
    for path, value in changes.items():
        target: Message = request
        *parents, name = path.split("__")
        for parent in parents:
            target = getattr(target, parent)
        if value is None:
            target.ClearField(name)
        else:
            setattr(target, name, value)
    return request


VALID = [
    snapshot(),
    pb.CreateSnapshotTaskRequest(
        whiteboard=pb.SnapshotWhiteboard(), sdk_app_id=1, room_id=1
    ),  # only required
    snapshot(whiteboard__width=0, whiteboard__height=2560),  # the bounds themselves
    snapshot(callback_url="https://example.com:8443/cb?x=1"),
    snapshot(snapshot_mode="LatestMarksOnly"),
    snapshot(whiteboard__init_params="[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH),  # the bound itself
    snapshot(whiteboard__init_params='{"a": {"b": [1, {"c": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}]}}'),
    pb.DescribeSnapshotTaskRequest(task_id="f2e1728c-6e87-4481-abe1-cde8542a5a10", sdk_app_id=1400127230),
    pb.DescribeWhiteboardPushRequest(sdk_app_id=1400000001, task_id="ghucnligqtgtvk2624mb"),
    pb.StopWhiteboardPushRequest(sdk_app_id=1400000001, task_id="x" * MAX_TASK_ID_LENGTH),
    pb.DescribeVideoGenerationTaskRequest(sdk_app_id=1, task_id="00e1jv8ve0jcqk7da9lb"),
]


@pytest.mark.parametrize("request_message", VALID, ids=lambda m: type(m).__name__)
def test_valid_requests_pass(request_message: Message) -> None:
    assert violations(request_message) == []


INVALID = [
    (snapshot(whiteboard=None), "Whiteboard", "is required"),
    (snapshot(sdk_app_id=None), "SdkAppId", "is required"),
    (snapshot(room_id=None), "RoomId", "is required"),
    (snapshot(whiteboard__width=2561), "Whiteboard.Width", "between 0 and 2560"),
    (snapshot(whiteboard__height=99999), "Whiteboard.Height", "between 0 and 2560"),
    (snapshot(whiteboard__init_params="{ratio:16:9}"), "Whiteboard.InitParams", "JSON text"),
    (snapshot(whiteboard__init_params=""), "Whiteboard.InitParams", "JSON text"),
    # Deeper than json's own stack (a RecursionError, once the status of a bug), and just too deep.
    (snapshot(whiteboard__init_params="[" * 1000 + "]" * 1000), "Whiteboard.InitParams", "at most 32 deep"),
    (snapshot(whiteboard__init_params="[" * 33 + "]" * 33), "Whiteboard.InitParams", "at most 32 deep"),
    (snapshot(whiteboard__init_params='{"a":' * 33 + "1" + "}" * 33), "Whiteboard.InitParams", "at most 32"),
    # Python's json reads these; they are not JSON, and TIW's parser would refuse them.
    (snapshot(whiteboard__init_params="NaN"), "Whiteboard.InitParams", "NaN is not JSON"),
    (snapshot(whiteboard__init_params='{"r": Infinity}'), "Whiteboard.InitParams", "Infinity is not JSON"),
    (snapshot(whiteboard__init_params="[-Infinity]"), "Whiteboard.InitParams", "-Infinity is not JSON"),
    (snapshot(whiteboard__init_params="9" * 5000), "Whiteboard.InitParams", "too many digits"),
    (snapshot(callback_url="xx/callback"), "CallbackURL", "absolute http or https URL"),
    (snapshot(callback_url="ftp://host/cb"), "CallbackURL", "absolute http or https URL"),
    (snapshot(callback_url=""), "CallbackURL", "absolute http or https URL"),
    (snapshot(cos__uin=None), "COS.Uin", "is required"),
    (snapshot(cos__region=None), "COS.Region", "is required"),
    (snapshot(cos__region="  "), "COS.Region", "must not be empty"),
    (snapshot(cos__bucket=None), "COS.Bucket", "is required"),
    (snapshot(snapshot_mode="allmarks"), "SnapshotMode", "one of AllMarks, LatestMarksOnly"),
    (pb.DescribeSnapshotTaskRequest(sdk_app_id=1), "TaskID", "is required"),
    (pb.DescribeSnapshotTaskRequest(task_id="t"), "SdkAppId", "is required"),
    (
        pb.DescribeSnapshotTaskRequest(task_id="x" * (MAX_TASK_ID_LENGTH + 1), sdk_app_id=1),
        "TaskID",
        "at most 128",
    ),
    (pb.DescribeSnapshotTaskRequest(task_id="a b", sdk_app_id=1), "TaskID", "spaces or control"),
    (pb.DescribeSnapshotTaskRequest(task_id="a\nb", sdk_app_id=1), "TaskID", "spaces or control"),
    (pb.DescribeWhiteboardPushRequest(sdk_app_id=-5, task_id="t"), "SdkAppId", "greater than 0"),
    (pb.DescribeWhiteboardPushRequest(sdk_app_id=1), "TaskId", "is required"),
    (pb.StopWhiteboardPushRequest(task_id="t"), "SdkAppId", "is required"),
    (pb.StopWhiteboardPushRequest(sdk_app_id=1, task_id=" "), "TaskId", "spaces or control"),
    (pb.DescribeVideoGenerationTaskRequest(sdk_app_id=-1, task_id="t"), "SdkAppId", "greater than 0"),
    (pb.DescribeVideoGenerationTaskRequest(sdk_app_id=1), "TaskId", "is required"),
]


@pytest.mark.parametrize(
    ("request_message", "field", "problem"), INVALID, ids=lambda v: v if isinstance(v, str) else ""
)
def test_each_rule_names_the_field(request_message: Message, field: str, problem: str) -> None:
    found = violations(request_message)
    assert [v.field for v in found] == [field]
    assert problem in found[0].description


def test_all_violations_are_reported_at_once() -> None:
    found = violations(
        pb.CreateSnapshotTaskRequest(whiteboard=pb.SnapshotWhiteboard(width=9999), cos=pb.SnapshotCOS())
    )
    assert [v.field for v in found] == [
        "Whiteboard.Width",
        "SdkAppId",
        "RoomId",
        "COS.Uin",
        "COS.Region",
        "COS.Bucket",
    ]
