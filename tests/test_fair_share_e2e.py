"""Fair share through the whole facade: callers named by tiw-caller metadata take turns for the quota."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from prometheus_client import generate_latest
from support.facade import StartFacade
from support.tiw import PUSH_TASK, SDK_APP_ID
from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as pb

pytestmark = pytest.mark.slow

REQUEST = pb.DescribeWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=PUSH_TASK)


async def test_a_light_caller_is_served_while_another_floods(start_facade: StartFacade) -> None:
    # A small quota, so that a flood of 8 calls in flight at once saturates it many times over.
    facade = await start_facade(
        TIW_RATE_LIMIT="4", TIW_MAX_QUEUE_WAIT="2", TIW_CALLER_WEIGHTS="light=1,flood=1"
    )
    stub = facade.stub

    def request() -> pb.DescribeWhiteboardPushRequest:
        # A task of its own for every call: identical calls at once would share one request to TIW,
        # and later ones be answered from the cache (docs/answers.md); each is to wait for its slot.
        return pb.DescribeWhiteboardPushRequest(
            sdk_app_id=SDK_APP_ID, task_id=facade.emulator.add_push_task()
        )

    stop = time.monotonic() + 4.0
    flood_outcomes: list[grpc.StatusCode] = []

    async def flood() -> None:
        while time.monotonic() < stop:
            try:
                await stub.DescribeWhiteboardPush(request(), timeout=3, metadata=(("tiw-caller", "flood"),))
                flood_outcomes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as error:
                flood_outcomes.append(error.code())

    async def light() -> list[float]:
        waits = []
        await asyncio.sleep(1.0)  # the flood has filled the queue
        while time.monotonic() < stop - 0.5:
            started = time.monotonic()
            await stub.DescribeWhiteboardPush(request(), timeout=3, metadata=(("tiw-caller", "light"),))
            waits.append(time.monotonic() - started)
            await asyncio.sleep(0.5)  # 2 per second
        return waits

    flooders = [asyncio.create_task(flood()) for _ in range(8)]
    waits = await light()  # every light call answered OK: a refusal would raise here
    await asyncio.gather(*flooders)
    assert len(waits) >= 3
    assert max(waits) < 1.0, waits  # each within one window, behind at most one turn of the flood
    assert grpc.StatusCode.OK in flood_outcomes  # the flood got the rest
    exposition = generate_latest(facade.server.metrics.registry).decode()
    assert 'tiw_limiter_caller_admitted_total{action="DescribeWhiteboardPush",caller="light"}' in exposition
    assert 'tiw_limiter_caller_admitted_total{action="DescribeWhiteboardPush",caller="flood"}' in exposition


async def test_a_malformed_caller_name_is_refused_naming_the_key(start_facade: StartFacade) -> None:
    facade = await start_facade()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await facade.stub.DescribeWhiteboardPush(REQUEST, timeout=3, metadata=(("tiw-caller", "no spaces"),))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tiw-caller" in (caught.value.details() or "")
