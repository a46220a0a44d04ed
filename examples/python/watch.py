"""Create a snapshot task and watch it: each state as it changes, until it is Finished.

A watch (tiw.facade.v1.TaskWatcher) sends the task's current state at once, then each change, and
ends by itself after the final state. It costs none of your TIW quota, unlike polling Describe.

With the facade of `make serve` running, from the repository root:

    .venv/bin/python examples/python/watch.py
"""

from __future__ import annotations

import argparse
import sys

import grpc
from tiw_facade._proto.tiw.facade.v1 import watcher_pb2, watcher_pb2_grpc
from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as tiw
from tiw_facade._proto.tiw.v20190919 import tiw_pb2_grpc

SDK_APP_ID = 1400123480  # your TIW application; the emulator of `make serve` takes any


def main() -> int:
    parser = argparse.ArgumentParser(description="Create a snapshot task, then watch it until it ends.")
    parser.add_argument("--target", default="localhost:50051", help="the facade's gRPC address")
    target = parser.parse_args().target

    with grpc.insecure_channel(target) as channel:
        whiteboard = tiw.SnapshotWhiteboard(width=1280, height=720)
        create = tiw.CreateSnapshotTaskRequest(sdk_app_id=SDK_APP_ID, room_id=12345, whiteboard=whiteboard)
        watcher = watcher_pb2_grpc.TaskWatcherStub(channel)
        try:
            task = tiw_pb2_grpc.TiwServiceStub(channel).CreateSnapshotTask(create, timeout=5)
            describe = tiw.DescribeSnapshotTaskRequest(sdk_app_id=SDK_APP_ID, task_id=task.task_id)
            watch = watcher_pb2.WatchSnapshotTaskRequest(request=describe)
            # The deadline bounds the whole stream: give it longer than the task may take.
            stream = watcher.WatchSnapshotTask(watch, timeout=60)
            for answer in stream:  # each message is DescribeSnapshotTask's answer
                print(f"{answer.task_id}: {answer.status}", flush=True)
        except grpc.RpcError as error:
            # UNAVAILABLE when the facade restarts (a deploy): watch again, the current state comes first.
            print(f"failed: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    print("the task has ended")
    return 0


if __name__ == "__main__":
    sys.exit(main())
