"""Translation between proto messages and TIW JSON, on the seeds' own examples."""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any

import pytest
from google.protobuf import message_factory
from google.protobuf.message import Message
from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as pb
from tiw_facade.tencent_api import encode
from tiw_facade.translate import MalformedAnswer, from_tiw, to_tiw

EXAMPLES = json.loads((pathlib.Path(__file__).parent / "data" / "seed_examples.json").read_text())
METHODS = {m.name: m for m in pb.DESCRIPTOR.services_by_name["TiwService"].methods}


def message_class(action: str, side: str) -> type[Message]:
    method = METHODS[action]
    return message_factory.GetMessageClass(method.input_type if side == "requests" else method.output_type)


def without_zero_values(data: Any) -> Any:
    """TIW's examples spell out zero values that proto3 plain fields cannot tell from absent."""
    if isinstance(data, dict):
        return {k: without_zero_values(v) for k, v in data.items() if v not in (0, "", [], None) or k in KEEP}
    if isinstance(data, list):
        return [without_zero_values(v) for v in data]
    return data


KEEP = {"ErrorMessage", "Backup"}  # optional fields: an empty string is present, and must survive


@pytest.mark.parametrize("side", ["requests", "responses"])
@pytest.mark.parametrize("action", sorted(METHODS))
def test_seed_examples_round_trip(action: str, side: str) -> None:
    tiw_json = EXAMPLES[side][action]
    message = from_tiw(tiw_json, message_class(action, side))
    assert to_tiw(message) == without_zero_values(tiw_json)


def test_every_proto_field_is_named_as_tiw_names_it() -> None:
    # The snapshot actions spell TaskID, the others TaskId (mirror TIW exactly).
    assert pb.DescribeSnapshotTaskRequest.DESCRIPTOR.fields_by_name["task_id"].json_name == "TaskID"
    assert pb.CreateSnapshotTaskResponse.DESCRIPTOR.fields_by_name["task_id"].json_name == "TaskID"
    for message in (
        pb.DescribeWhiteboardPushRequest,
        pb.StopWhiteboardPushRequest,
        pb.DescribeVideoGenerationTaskRequest,
    ):
        assert message.DESCRIPTOR.fields_by_name["task_id"].json_name == "TaskId"
    # And every field has an explicit TIW (UpperCamel) name.
    for descriptor in pb.DESCRIPTOR.message_types_by_name.values():
        for field in descriptor.fields:
            assert field.json_name[0].isupper(), f"{descriptor.name}.{field.name}"


def test_integers_stay_integers_in_the_body() -> None:
    request = pb.DescribeSnapshotTaskRequest(
        sdk_app_id=1400127230, task_id="f2e1728c-6e87-4481-abe1-cde8542a5a10"
    )
    # Compact, in proto field order, the integer unquoted: these bytes are what is signed and sent.
    assert (
        encode(to_tiw(request)) == b'{"TaskID":"f2e1728c-6e87-4481-abe1-cde8542a5a10","SdkAppId":1400127230}'
    )
    big = encode(to_tiw(pb.CreateSnapshotTaskRequest(sdk_app_id=2**63 + 5, room_id=1)))
    assert json.loads(big)["SdkAppId"] == 2**63 + 5


def test_non_ascii_text_is_sent_as_utf8() -> None:
    body = encode(to_tiw(pb.SnapshotWhiteboard(init_params='{"标题":"白板"}')))
    assert "白板".encode() in body


def test_null_becomes_absent_and_zero_stays_present() -> None:
    answer = {
        "TaskID": None,
        "Status": None,
        "CreateTime": 0,
        "FinishTime": None,
        "Result": None,
        "RequestId": "r",
    }
    message = from_tiw(answer, pb.DescribeSnapshotTaskResponse)
    assert not message.HasField("task_id")
    assert not message.HasField("status")
    assert not message.HasField("finish_time")
    assert not message.HasField("result")
    assert message.HasField("create_time") and message.create_time == 0
    result = from_tiw(
        {"Result": {"ErrorCode": None, "Total": 0, "Snapshots": None}}, pb.DescribeSnapshotTaskResponse
    )
    assert result.HasField("result") and not result.result.HasField("error_code")
    assert result.result.HasField("total") and list(result.result.snapshots) == []


def test_empty_object_is_a_present_message() -> None:
    message = from_tiw({"Result": {}}, pb.DescribeSnapshotTaskResponse)
    assert message.HasField("result")


def test_unknown_fields_are_tolerated() -> None:
    answer = {"TaskID": "t", "RequestId": "r", "SomethingNew": {"Nested": [1, 2]}, "Extra": 7}
    message = from_tiw(answer, pb.CreateSnapshotTaskResponse)
    assert message.task_id == "t" and message.request_id == "r"


@pytest.mark.parametrize(
    ("answer", "field"),
    [
        ({"RoomId": "880528"}, "RoomId"),
        ({"RoomId": 1.5}, "RoomId"),
        ({"RoomId": True}, "RoomId"),
        ({"Status": 3}, "Status"),
        ({"VideoInfoList": {"Width": 1}}, "VideoInfoList"),
        ({"VideoInfoList": [{"Width": "1024"}]}, "VideoInfoList[0].Width"),
        ({"VideoInfos": "x"}, "VideoInfos"),
        ({"VideoInfos": [{"Width": 1}]}, "VideoInfos"),  # a list for an object
        ({"RoomId": 2**63}, "RoomId"),  # beyond int64
        ({"RoomId": [1]}, "RoomId"),
        ({"RoomId": {"value": 1}}, "RoomId"),
        ({"RequestId": 7}, "RequestId"),
        ({"RequestId": ["r"]}, "RequestId"),
        ({"TaskId": "\ud800"}, "TaskId"),  # a lone surrogate, as JSON's \ud800 makes: not UTF-8
        ({"VideoInfoList": [{"VideoSize": 2**64}]}, "VideoInfoList[0].VideoSize"),
    ],
)
def test_wrong_types_name_the_field(answer: dict[str, Any], field: str) -> None:
    target = (
        pb.DescribeVideoGenerationTaskResponse
        if field.startswith("Video")
        else pb.DescribeWhiteboardPushResponse
    )
    with pytest.raises(MalformedAnswer, match="^" + re.escape(field) + ":"):
        from_tiw(answer, target)


@pytest.mark.parametrize("value", [-1, 2**64, 10**30])
def test_out_of_range_integer_is_malformed_not_a_crash(value: int) -> None:
    with pytest.raises(MalformedAnswer, match=r"^CreateTime:"):
        from_tiw({"CreateTime": value}, pb.DescribeSnapshotTaskResponse)
    assert from_tiw({"CreateTime": 2**64 - 1}, pb.DescribeSnapshotTaskResponse).create_time == 2**64 - 1
