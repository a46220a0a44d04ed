"""Subscribe to TIW's events through the facade instead of exposing a callback endpoint: create a
snapshot task whose CallbackURL is the facade's intake, and wait for its event.

WatchEvents (tiw.facade.v1.EventStream) streams every callback the facade verified, at least once.
Keep the cursor of the last event handled and subscribe again with it after any failure: you get
what you missed. An event is a hint (TIW's Sign does not cover the body): confirm the state with a
Describe, as below, before acting on it.

With the facade of `make serve` running (its intake on port 8081), from the repository root:

    .venv/bin/python examples/python/watch_events.py
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import grpc
from tiw_facade._proto.tiw.facade.v1 import events_pb2, events_pb2_grpc
from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as tiw
from tiw_facade._proto.tiw.v20190919 import tiw_pb2_grpc

SDK_APP_ID = 1400123480  # your TIW application; `make serve` holds the emulator's key for it


def main() -> int:
    parser = argparse.ArgumentParser(description="Create a snapshot task, then wait for its event.")
    parser.add_argument("--target", default="localhost:50051", help="the facade's gRPC address")
    parser.add_argument(
        "--callback-url",
        default="http://localhost:8081/callbacks/snapshot",
        help="where TIW posts the task's callback: the facade's intake",
    )
    parser.add_argument(
        "--cursor-file", type=pathlib.Path, default=None, help="resume after the cursor kept here, if any"
    )
    args = parser.parse_args()
    cursor = args.cursor_file.read_text().strip() if args.cursor_file and args.cursor_file.exists() else ""

    with grpc.insecure_channel(args.target) as channel:
        tiw_stub = tiw_pb2_grpc.TiwServiceStub(channel)
        subscription = events_pb2.WatchEventsRequest(
            sdk_app_ids=[SDK_APP_ID], kinds=["snapshot"], cursor=cursor
        )
        try:
            # Subscribed first: the task's event, seconds after its create, finds the stream open.
            stream = events_pb2_grpc.EventStreamStub(channel).WatchEvents(subscription, timeout=60)
            whiteboard = tiw.SnapshotWhiteboard(width=1280, height=720)
            create = tiw.CreateSnapshotTaskRequest(
                sdk_app_id=SDK_APP_ID, room_id=12345, whiteboard=whiteboard, callback_url=args.callback_url
            )
            task_id = tiw_stub.CreateSnapshotTask(create, timeout=5).task_id
            for event in stream:
                if args.cursor_file:
                    args.cursor_file.write_text(event.cursor)  # handled: resume after it next time
                print(f"event {event.event_type} of {event.task_id or '(no task)'}", flush=True)
                if event.task_id == task_id:
                    break
            stream.cancel()
            # The event says the task changed; TIW's answer says how.
            describe = tiw.DescribeSnapshotTaskRequest(sdk_app_id=SDK_APP_ID, task_id=task_id)
            print(f"{task_id}: {tiw_stub.DescribeSnapshotTask(describe, timeout=5).status}")
        except grpc.RpcError as error:
            # UNAVAILABLE when the facade restarts (a deploy): subscribe again with the last cursor.
            print(f"failed: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
