"""Describe calls whose answers the facade may share, and what TIW (the emulator) was asked."""

from __future__ import annotations

from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as pb
from tiw_facade.emulator import Emulator

from support.facade import Facade
from support.tiw import SDK_APP_ID

DESCRIBE = "DescribeSnapshotTask"


def upstream(emulator: Emulator, action: str = DESCRIBE) -> int:
    """Requests of ``action`` TIW (the emulator) accepted so far."""
    return len(emulator.arrivals(action))


def snapshot_request(task_id: str) -> pb.DescribeSnapshotTaskRequest:
    return pb.DescribeSnapshotTaskRequest(task_id=task_id, sdk_app_id=SDK_APP_ID)


async def describe(
    facade: Facade, task_id: str, *, max_age_ms: int | None = None, deadline: float = 5.0
) -> tuple[pb.DescribeSnapshotTaskResponse, dict[str, str]]:
    """The answer and its initial metadata."""
    metadata = () if max_age_ms is None else (("tiw-max-age-ms", str(max_age_ms)),)
    call = facade.stub.DescribeSnapshotTask(snapshot_request(task_id), metadata=metadata, timeout=deadline)
    response = await call
    return response, {key: str(value) for key, value in await call.initial_metadata()}
