"""The TIW client on its own, against the real emulator: tokens, signing per attempt, credentials.

A spy wraps the real in-process limiter to see what the client does with each lease.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import facade_environment, wait_until
from tiw_facade import settings as settings_module
from tiw_facade.emulator import Emulator, Fault, FaultKind
from tiw_facade.limiter import Lease, Limiter, create_limiter
from tiw_facade.metrics import Metrics
from tiw_facade.signing import Signer
from tiw_facade.upstream import UNANSWERED_HOLD, TiwClient, TransportError, UpstreamTimeout

PARAMS = {"SdkAppId": 1400000001, "TaskId": "ghucnligqtgtvk2624mb"}


@dataclasses.dataclass
class SpiedLease:
    lease: Lease
    hold: float
    released: int = 0

    def release(self) -> None:
        self.released += 1
        self.lease.release()


class SpyLimiter(Limiter):
    backend = "spy"

    def __init__(self, real: Limiter) -> None:
        self.real = real
        self.leases: list[SpiedLease] = []

    @property
    def degraded(self) -> bool:
        return False

    async def acquire(self, action: str, *, deadline: float | None, hold: float) -> Lease:
        spied = SpiedLease(await self.real.acquire(action, deadline=deadline, hold=hold), hold)
        self.leases.append(spied)
        return spied

    def pause(self, action: str, seconds: float = 1.0) -> None:
        self.real.pause(action, seconds)

    def health(self) -> dict[str, object]:
        return self.real.health()

    async def aclose(self) -> None:
        await self.real.aclose()


@pytest.fixture
async def client(emulator: Emulator) -> AsyncIterator[tuple[TiwClient, SpyLimiter]]:
    config = settings_module.load(
        facade_environment(emulator.url, TENCENTCLOUD_SESSION_TOKEN="temporary-token")
    )
    spy = SpyLimiter(create_limiter(config))
    instance = TiwClient(config, spy)
    await instance.start()
    yield instance, spy
    await instance.aclose()
    await spy.aclose()


async def test_an_answered_request_returns_its_token(client: tuple[TiwClient, SpyLimiter]) -> None:
    tiw, spy = client
    answer = await tiw.call("DescribeWhiteboardPush", PARAMS, deadline=time.monotonic() + 5)
    assert answer["TaskId"] == PARAMS["TaskId"]
    assert [lease.released for lease in spy.leases] == [1]


async def test_a_timed_out_request_keeps_its_token_past_the_window(
    client: tuple[TiwClient, SpyLimiter], emulator: Emulator
) -> None:
    tiw, spy = client
    emulator.add_fault(Fault(FaultKind.LATENCY, action="DescribeWhiteboardPush", delay=2.0))
    with pytest.raises(UpstreamTimeout):
        await tiw.call("DescribeWhiteboardPush", PARAMS, deadline=time.monotonic() + 0.3)
    # TIW may see it after we gave up: the token is held to its hold time, not given back at once.
    (lease,) = spy.leases
    assert lease.released == 0
    assert lease.hold >= 0.3 - 0.05 + UNANSWERED_HOLD - 0.01


async def test_a_request_never_sent_returns_its_token(emulator: Emulator, unused_tcp_port: int) -> None:
    config = settings_module.load(
        facade_environment(f"http://127.0.0.1:{unused_tcp_port}", TIW_MAX_ATTEMPTS="1")
    )
    spy = SpyLimiter(create_limiter(config))
    tiw = TiwClient(config, spy)
    await tiw.start()
    try:
        with pytest.raises(TransportError) as caught:
            await tiw.call("DescribeWhiteboardPush", PARAMS, deadline=time.monotonic() + 5)
        assert not caught.value.delivered
        assert [lease.released for lease in spy.leases] == [1]
    finally:
        await tiw.aclose()
        await spy.aclose()


async def test_every_attempt_takes_a_token_and_is_signed_afresh(
    client: tuple[TiwClient, SpyLimiter], emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiw, spy = client
    signed: list[dict[str, str]] = []
    original = Signer.headers

    def recording(self: Signer, action: str, body: bytes, timestamp: int) -> dict[str, str]:
        headers = original(self, action, body, timestamp)
        signed.append(headers)
        return headers

    monkeypatch.setattr(Signer, "headers", recording)
    emulator.add_fault(Fault(FaultKind.HTTP_STATUS, status=503, count=2))
    await tiw.call("DescribeWhiteboardPush", PARAMS, deadline=time.monotonic() + 5)
    assert len(signed) == len(spy.leases) == 3
    assert all(lease.released == 1 for lease in spy.leases)
    # Temporary credentials: the session token travels as X-TC-Token on every attempt.
    assert all(headers["X-TC-Token"] == "temporary-token" for headers in signed)


async def test_the_body_sent_is_the_body_signed(
    client: tuple[TiwClient, SpyLimiter], emulator: Emulator
) -> None:
    tiw, _ = client
    # Non-ASCII text and a large integer: the emulator verifies the signature over the bytes it got.
    params: dict[str, Any] = {
        "Whiteboard": {"InitParams": '{"标题":"白板"}', "Width": 1280},
        "SdkAppId": 2**40,
        "RoomId": 1,
    }
    answer = await tiw.call("CreateSnapshotTask", params, deadline=time.monotonic() + 5)
    assert answer["TaskID"]


async def test_an_attempt_cancelled_mid_flight_is_counted_as_cancelled(emulator: Emulator) -> None:
    config = settings_module.load(facade_environment(emulator.url))
    metrics = Metrics("test")
    limiter = create_limiter(config, metrics)
    tiw = TiwClient(config, limiter, metrics)
    await tiw.start()
    try:
        emulator.add_fault(Fault(FaultKind.LATENCY, action="DescribeWhiteboardPush", delay=2.0))
        call = asyncio.ensure_future(
            tiw.call("DescribeWhiteboardPush", PARAMS, deadline=time.monotonic() + 5)
        )
        await wait_until(lambda: emulator.stats()["DescribeWhiteboardPush"].accepted == 1)
        call.cancel()  # the caller went away
        with pytest.raises(asyncio.CancelledError):
            await call
        counted = metrics.registry.get_sample_value(
            "tiw_upstream_requests_total", {"action": "DescribeWhiteboardPush", "code": "Cancelled"}
        )
        assert counted == 1
        assert metrics.registry.get_sample_value(
            "tiw_upstream_requests_total", {"action": "DescribeWhiteboardPush", "code": "OK"}
        ) in (None, 0.0)
    finally:
        await tiw.aclose()
        await limiter.aclose()
