"""Ask for an answer no older than you need, and see where it came from.

The facade answers the Describe actions from TIW or from answers it keeps. The request metadata
`tiw-max-age-ms` bounds the age you accept (0: fresh from TIW); the answer's initial metadata says
where it came from (`tiw-source`: upstream, coalesced or cache) and how old it is (`tiw-age-ms`).

With the facade of `make serve` running, from the repository root:

    .venv/bin/python examples/python/answer_metadata.py
"""

from __future__ import annotations

import argparse
import sys

import grpc
from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as tiw
from tiw_facade._proto.tiw.v20190919 import tiw_pb2_grpc

SDK_APP_ID = 1400123480  # your TIW application; the emulator of `make serve` takes any


def main() -> int:
    parser = argparse.ArgumentParser(description="Describe a task twice; print each answer's source and age.")
    parser.add_argument("--target", default="localhost:50051", help="the facade's gRPC address")
    target = parser.parse_args().target

    with grpc.insecure_channel(target) as channel:
        stub = tiw_pb2_grpc.TiwServiceStub(channel)
        whiteboard = tiw.SnapshotWhiteboard(width=1280, height=720)
        create = tiw.CreateSnapshotTaskRequest(sdk_app_id=SDK_APP_ID, room_id=12345, whiteboard=whiteboard)
        try:
            task = stub.CreateSnapshotTask(create, timeout=5)
            query = tiw.DescribeSnapshotTaskRequest(sdk_app_id=SDK_APP_ID, task_id=task.task_id)
            # Fresh from TIW first, then anything under a minute old: the answer just kept.
            for max_age_ms in ("0", "60000"):
                # The sync API gives the initial metadata only through .with_call: (answer, call).
                answer, call = stub.DescribeSnapshotTask.with_call(
                    query, metadata=[("tiw-max-age-ms", max_age_ms)], timeout=5
                )
                metadata = dict(call.initial_metadata())
                print(
                    f"tiw-max-age-ms {max_age_ms}: {answer.status},"
                    f" tiw-source: {metadata.get('tiw-source')}, tiw-age-ms: {metadata.get('tiw-age-ms')}"
                )
        except grpc.RpcError as error:
            print(f"failed: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
