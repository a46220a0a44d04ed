"""TIW as the tests ask it: the service's names, the emulator's seeded tasks, the seed's example
request, and what the emulator counted."""

from __future__ import annotations

import grpc
from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as pb
from tiw_facade.emulator import Emulator

SERVICE = "tiw.v20190919.TiwService"
ACTIONS = [
    "CreateSnapshotTask",
    "DescribeSnapshotTask",
    "DescribeVideoGenerationTask",
    "DescribeWhiteboardPush",
    "StopWhiteboardPush",
]

SDK_APP_ID = 1400000001  # the SdkAppId of the emulator's seeded (documented) tasks
PUSH_TASK = "ghucnligqtgtvk2624mb"
VIDEO_TASK = "00e1jv8ve0jcqk7da9lb"

# The metadata of a Describe that must reach TIW now: a cached answer (up to TIW_MAX_STALENESS
# old, docs/answers.md) would hide how TIW's tasks move.
FRESH = (("tiw-max-age-ms", "0"),)


def create_request() -> pb.CreateSnapshotTaskRequest:
    """The seed's example input."""
    return pb.CreateSnapshotTaskRequest(
        cos=pb.SnapshotCOS(
            target_dir="snapshot/",
            region="ap-guangzhou",
            bucket="test-123070000",
            domain="xxx.file.com",
            uin=130001358,
        ),
        whiteboard=pb.SnapshotWhiteboard(width=1280, init_params='{"ratio":"16:9"}', height=720),
        room_id=12345,
        sdk_app_id=1400123480,
        callback_url="http://xx/callback",
    )


def raw_method(
    channel: grpc.aio.Channel, method: str = f"/{SERVICE}/DescribeWhiteboardPush"
) -> grpc.aio.UnaryUnaryMultiCallable:
    """A method sending and receiving bytes as they are: no (de)serializer on the client's side."""
    return channel.unary_unary(method)


def upstream_requests(emulator: Emulator) -> int:
    """Every request the emulator received, whatever it answered."""
    return sum(s.accepted + s.throttled + s.rejected + s.faulted for s in emulator.stats().values())
