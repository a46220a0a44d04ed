"""TaskWatcher streams as a caller opens and reads them."""

from __future__ import annotations

import grpc
import pytest
from tiw_facade._proto.tiw.facade.v1 import watcher_pb2 as wpb
from tiw_facade._proto.tiw.facade.v1 import watcher_pb2_grpc
from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as pb

from support.facade import Facade
from support.tiw import SDK_APP_ID


def watcher(facade: Facade) -> watcher_pb2_grpc.TaskWatcherStub:
    return watcher_pb2_grpc.TaskWatcherStub(facade.channel)


def snapshot_watch(task_id: str, sdk_app_id: int = SDK_APP_ID) -> wpb.WatchSnapshotTaskRequest:
    return wpb.WatchSnapshotTaskRequest(
        request=pb.DescribeSnapshotTaskRequest(task_id=task_id, sdk_app_id=sdk_app_id)
    )


def active_watches(facade: Facade) -> float:
    """The facade's gauge of open watch streams, over every action."""
    return sum(
        sample.value for metric in facade.server.metrics.watches_active.collect() for sample in metric.samples
    )


async def ended(call: grpc.aio.UnaryStreamCall) -> grpc.aio.AioRpcError:
    """Read ``call`` to its end, which must be an error with no message first, and return the error."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        while (message := await call.read()) is not grpc.aio.EOF:
            raise AssertionError(f"a message came before the error: {message}")
    return raised.value
