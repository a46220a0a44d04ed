"""Create a snapshot task with retries that can never make a second task: one idempotency key per
logical request, kept across its retries (docs/idempotency.md).

With the facade of `make serve` running, from the repository root:

    .venv/bin/python examples/python/retry_create.py
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as tiw
from tiw_facade._proto.tiw.v20190919 import tiw_pb2_grpc

SDK_APP_ID = 1400123480  # your TIW application; the emulator of `make serve` takes any
RETRY = {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}


def reason(error: grpc.RpcError) -> str:
    status = rpc_status.from_call(error)
    for detail in status.details if status else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return ""


def create_snapshot_task(
    stub: tiw_pb2_grpc.TiwServiceStub, request: tiw.CreateSnapshotTaskRequest, key: str, attempts: int = 5
) -> tuple[tiw.CreateSnapshotTaskResponse, bool]:
    """The answer, and whether it was replayed (the key had already created the task)."""
    for attempt in range(attempts):
        try:
            answer, call = stub.CreateSnapshotTask.with_call(
                request, metadata=[("idempotency-key", key)], timeout=15
            )
            return answer, dict(call.initial_metadata()).get("tiw-source") == "replay"
        except grpc.RpcError as error:
            # Retrying cannot change these two: the facade would answer them again.
            final = reason(error) in {"OUTCOME_UNKNOWN", "IDEMPOTENCY_KEY_REUSED"}
            if final or error.code() not in RETRY or attempt == attempts - 1:
                raise
            time.sleep(min(2**attempt * 0.2, 5))
    raise AssertionError("unreachable: the last attempt returns or raises")


def main() -> int:
    parser = argparse.ArgumentParser(description="Create a snapshot task, retrying safely.")
    parser.add_argument("--target", default="localhost:50051", help="the facade's gRPC address")
    target = parser.parse_args().target

    request = tiw.CreateSnapshotTaskRequest(
        sdk_app_id=SDK_APP_ID, room_id=12345, whiteboard=tiw.SnapshotWhiteboard(width=1280, height=720)
    )
    key = str(uuid.uuid4())  # one key per logical request, kept across its retries
    with grpc.insecure_channel(target) as channel:
        stub = tiw_pb2_grpc.TiwServiceStub(channel)
        try:
            created, _ = create_snapshot_task(stub, request, key)
            # What a retry after a lost answer gets: the same task, replayed, not a second one.
            again, replayed = create_snapshot_task(stub, request, key)
        except grpc.RpcError as error:
            print(f"failed: {error.code().name}: {error.details()} ({reason(error)})", file=sys.stderr)
            return 1
    print(f"created {created.task_id}")
    print(f"the same key again: {again.task_id}" + (" (replayed)" if replayed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
