"""A host clock minutes off Tencent's: TIW refuses the signature (AuthFailure.SignatureExpire), the
facade learns the offset from the answer's Date header, signs by Tencent's clock and sends the
refused (never executed) request again; later calls are signed right the first time.

The emulator runs with its clock ahead of or behind the facade's (``EmulatorConfig.clock``) and
stamps every answer's Date header with it, as Tencent's servers do with theirs.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from support.facade import Facade, StartFacade
from support.pages import retries
from support.tiw import FRESH, PUSH_TASK, SDK_APP_ID
from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as pb
from tiw_facade.emulator import Emulator, EmulatorConfig

REQUEST = pb.DescribeWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=PUSH_TASK)
ACTION = "DescribeWhiteboardPush"


def skewed(seconds: float) -> Callable[[], float]:
    return lambda: time.time() + seconds


@pytest.fixture(params=[600, -600], ids=["tencent-ahead", "tencent-behind"])
async def emulator(request: pytest.FixtureRequest) -> AsyncIterator[Emulator]:
    """Replaces conftest's emulator (start_facade uses it): one 10 minutes off this host."""
    instance = Emulator(EmulatorConfig(clock=skewed(request.param)))
    await instance.start("127.0.0.1", 0)
    yield instance
    await instance.stop()


def offset_gauge(facade: Facade) -> float:
    value = facade.server.metrics.registry.get_sample_value("tiw_upstream_clock_offset_seconds")
    assert value is not None
    return value


async def test_a_skewed_clock_costs_one_resent_attempt_then_none(
    start_facade: StartFacade, emulator: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    skew = emulator.config.clock() - time.time()
    facade = await start_facade()
    answer = await facade.stub.DescribeWhiteboardPush(REQUEST, timeout=5)
    assert answer.task_id == PUSH_TASK
    stats = emulator.stats()[ACTION]
    assert (stats.rejected, stats.accepted) == (1, 1), "refused once as expired, then executed once"
    assert await retries(facade, ACTION) == {"AuthFailure.SignatureExpire": 1}
    assert any("clock" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)

    for _ in range(5):  # each asks TIW (the cache would answer otherwise)
        await facade.stub.DescribeWhiteboardPush(REQUEST, timeout=5, metadata=FRESH)
    stats = emulator.stats()[ACTION]
    assert (stats.rejected, stats.accepted) == (1, 6), "the offset is kept: no more refusals"
    assert await retries(facade, ACTION) == {"AuthFailure.SignatureExpire": 1}
    assert abs(offset_gauge(facade) - skew) < 3


async def test_the_emulator_stamps_its_answers_with_its_own_clock(emulator: Emulator) -> None:
    async with aiohttp.ClientSession() as http, http.post(emulator.url + "/", data=b"{}") as response:
        date = email.utils.parsedate_to_datetime(response.headers["Date"]).timestamp()
    assert abs(date - emulator.config.clock()) < 3


@pytest.mark.parametrize("emulator", [0], indirect=True, ids=["in-sync"])
async def test_a_clock_in_sync_measures_about_zero_and_needs_no_retry(
    start_facade: StartFacade, emulator: Emulator
) -> None:
    facade = await start_facade()
    await facade.stub.DescribeWhiteboardPush(REQUEST, timeout=5)
    assert emulator.stats()[ACTION].rejected == 0
    assert await retries(facade, ACTION) == {}
    assert abs(offset_gauge(facade)) < 3
