"""Keyed CreateSnapshotTask calls, and what the facade and the emulator say of them."""

from __future__ import annotations

import logging

import grpc
import pytest
from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as pb
from tiw_facade.emulator import Emulator

from support.facade import Facade
from support.tiw import create_request

CREATE = "CreateSnapshotTask"


def keyed(key: str) -> tuple[tuple[str, str], ...]:
    """The metadata of a call with idempotency key ``key``."""
    return (("idempotency-key", key),)


async def create(
    facade: Facade,
    key: str | None,
    *,
    request: pb.CreateSnapshotTaskRequest | None = None,
    timeout: float = 5,  # noqa: ASYNC109 (the gRPC deadline, as stubs spell it)
) -> tuple[pb.CreateSnapshotTaskResponse, dict[str, str]]:
    """The answer and the initial metadata of one CreateSnapshotTask."""
    call = facade.stub.CreateSnapshotTask(
        request or create_request(), metadata=keyed(key) if key is not None else None, timeout=timeout
    )
    response = await call
    return response, dict(await call.initial_metadata())


async def refused(facade: Facade, key: str | None, **kwargs: object) -> grpc.aio.AioRpcError:
    """The error of a create that must fail."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await create(facade, key, **kwargs)  # type: ignore[arg-type]
    return caught.value


def creates(emulator: Emulator) -> int:
    """The tasks TIW (the emulator) created so far."""
    return emulator.stats()[CREATE].tasks_created


def lost_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The error lines saying the idempotency records were lost."""
    return [
        r
        for r in caplog.records
        if r.name == "tiw_facade.idempotency" and r.levelno == logging.ERROR and "were lost" in r.message
    ]


def lost_total(facade: Facade) -> float | None:
    return facade.server.metrics.registry.get_sample_value("tiw_idempotency_records_lost_total")
