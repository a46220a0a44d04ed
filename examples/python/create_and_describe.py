"""Create a snapshot task through the facade, then describe it.

With the facade of `make serve` running, from the repository root:

    .venv/bin/python examples/python/create_and_describe.py
"""

from __future__ import annotations

import argparse
import sys

import grpc
from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as tiw
from tiw_facade._proto.tiw.v20190919 import tiw_pb2_grpc

SDK_APP_ID = 1400123480  # your TIW application; the emulator of `make serve` takes any


def main() -> int:
    parser = argparse.ArgumentParser(description="Create a snapshot task, then describe it.")
    parser.add_argument("--target", default="localhost:50051", help="the facade's gRPC address")
    target = parser.parse_args().target

    with grpc.insecure_channel(target) as channel:
        stub = tiw_pb2_grpc.TiwServiceStub(channel)
        whiteboard = tiw.SnapshotWhiteboard(width=1280, height=720)
        request = tiw.CreateSnapshotTaskRequest(sdk_app_id=SDK_APP_ID, room_id=12345, whiteboard=whiteboard)
        try:
            # Always give a deadline: without one a call to an unreachable facade waits forever.
            task = stub.CreateSnapshotTask(request, timeout=5)
            query = tiw.DescribeSnapshotTaskRequest(sdk_app_id=SDK_APP_ID, task_id=task.task_id)
            answer = stub.DescribeSnapshotTask(query, timeout=5)
        except grpc.RpcError as error:  # the facade's status: a gRPC code and TIW's message
            print(f"failed: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    print(f"created {task.task_id}: {answer.status}")
    print(answer)  # the whole answer, TIW's fields under their proto names
    return 0


if __name__ == "__main__":
    sys.exit(main())
