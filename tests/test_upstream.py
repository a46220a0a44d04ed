"""The TIW client and its transport on their own, against the real emulator (tokens, signing per
attempt, credentials) and against a raw HTTP upstream for what the emulator cannot say (redirects,
compressed or oversized bodies, answers that are not HTTP).

A spy wraps the real in-process limiter to see what the client does with each lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gzip
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from support.raw_upstream import RawUpstream, answer, envelope, http
from support.tiw_client import tiw_client
from support.waiting import wait_until
from tiw_facade.emulator import Emulator, Fault, FaultKind
from tiw_facade.failures import (
    FacadeError,
    Outcome,
    TiwError,
    UpstreamHttpError,
    UpstreamMalformed,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from tiw_facade.limiter import UNIDENTIFIED, Lease, Limiter, LimiterConfig, create_limiter
from tiw_facade.metrics import Metrics
from tiw_facade.retries import RetryPolicy
from tiw_facade.signing import Signer
from tiw_facade.upstream import UNANSWERED_HOLD, Request, TiwClient

READ = RetryPolicy(resend_maybe_delivered=True)

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

    async def acquire(
        self,
        action: str,
        *,
        deadline: float | None,
        hold: float,
        caller: str = UNIDENTIFIED,
        weight: int = 1,
    ) -> Lease:
        granted = await self.real.acquire(action, deadline=deadline, hold=hold, caller=caller, weight=weight)
        spied = SpiedLease(granted, hold)
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
    spy = SpyLimiter(create_limiter(LimiterConfig()))
    async with tiw_client(emulator.url, spy, session_token="temporary-token") as instance:
        yield instance, spy


async def test_an_answered_request_returns_its_token(client: tuple[TiwClient, SpyLimiter]) -> None:
    tiw, spy = client
    answer: dict[str, Any] = await tiw.call(Request("DescribeWhiteboardPush", PARAMS), time.monotonic() + 5)
    assert answer["TaskId"] == PARAMS["TaskId"]
    assert [lease.released for lease in spy.leases] == [1]


async def test_a_timed_out_request_keeps_its_token_past_the_window(
    client: tuple[TiwClient, SpyLimiter], emulator: Emulator
) -> None:
    tiw, spy = client
    emulator.add_fault(Fault(FaultKind.LATENCY, action="DescribeWhiteboardPush", delay=2.0))
    with pytest.raises(UpstreamTimeout) as caught:
        await tiw.call(Request("DescribeWhiteboardPush", PARAMS), time.monotonic() + 0.3)
    assert caught.value.outcome is Outcome.UNKNOWN
    # TIW may see it after we gave up: the token is held to its hold time, not given back at once.
    (lease,) = spy.leases
    assert lease.released == 0
    assert lease.hold >= 0.3 - 0.05 + UNANSWERED_HOLD - 0.01


async def test_a_request_never_sent_returns_its_token(emulator: Emulator, unused_tcp_port: int) -> None:
    spy = SpyLimiter(create_limiter(LimiterConfig()))
    async with tiw_client(f"http://127.0.0.1:{unused_tcp_port}", spy, max_attempts=1) as tiw:
        with pytest.raises(UpstreamUnreachable) as caught:
            await tiw.call(Request("DescribeWhiteboardPush", PARAMS), time.monotonic() + 5)
        assert caught.value.outcome is Outcome.NOT_SENT
        assert [lease.released for lease in spy.leases] == [1]


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
    await tiw.call(Request("DescribeWhiteboardPush", PARAMS, READ), time.monotonic() + 5)
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
    answer: dict[str, Any] = await tiw.call(Request("CreateSnapshotTask", params), time.monotonic() + 5)
    assert answer["TaskID"]


async def test_an_attempt_cancelled_mid_flight_is_counted_as_cancelled(emulator: Emulator) -> None:
    metrics = Metrics("test")
    async with tiw_client(emulator.url, metrics=metrics) as tiw:
        emulator.add_fault(Fault(FaultKind.LATENCY, action="DescribeWhiteboardPush", delay=2.0))
        call: asyncio.Future[dict[str, Any]] = asyncio.ensure_future(
            tiw.call(Request("DescribeWhiteboardPush", PARAMS), time.monotonic() + 5)
        )
        await wait_until(lambda: emulator.stats()["DescribeWhiteboardPush"].accepted == 1)
        call.cancel()  # the caller went away
        with pytest.raises(asyncio.CancelledError):
            await call
        counted = metrics.registry.get_sample_value(
            "tiw_upstream_requests_total", {"action": "DescribeWhiteboardPush", "code": "CANCELLED"}
        )
        assert counted == 1
        assert metrics.registry.get_sample_value(
            "tiw_upstream_requests_total", {"action": "DescribeWhiteboardPush", "code": "OK"}
        ) in (None, 0.0)


async def test_without_a_policy_nothing_that_may_have_arrived_is_resent(
    client: tuple[TiwClient, SpyLimiter], emulator: Emulator
) -> None:
    # An action nobody declared safe gets the conservative default, even a read.
    tiw, spy = client
    emulator.add_fault(Fault(FaultKind.HTTP_STATUS, status=503, count=1))
    with pytest.raises(UpstreamHttpError) as caught:
        await tiw.call(Request("DescribeWhiteboardPush", PARAMS), time.monotonic() + 5)
    assert caught.value.status == 503 and caught.value.outcome is Outcome.UNKNOWN
    assert len(spy.leases) == 1


# --- a raw upstream: HTTP answers the emulator does not give ---------------------------------------


@pytest.fixture
async def raw_upstream() -> AsyncIterator[Callable[[bytes], Awaitable[tuple[RawUpstream, str]]]]:
    """Start raw upstreams that answer every request with the given bytes; all stopped at the end."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(raw: bytes) -> tuple[RawUpstream, str]:
            upstream = await stack.enter_async_context(RawUpstream(answer(raw)))
            return upstream, upstream.url

        yield start


async def call_raw(endpoint: str) -> FacadeError:
    """The failure of one DescribeWhiteboardPush, read-retry policy, against ``endpoint``."""
    async with tiw_client(endpoint, session_token="temporary-token", max_attempts=1) as tiw:
        with pytest.raises(FacadeError) as caught:
            await tiw.call(Request("DescribeWhiteboardPush", PARAMS, READ), time.monotonic() + 5)
        return caught.value


async def test_an_answer_that_is_not_http_never_shows_the_request_headers(raw_upstream: Any) -> None:
    # aiohttp's exception for a bad status line carries the request, Authorization and X-TC-Token
    # included; a failure's text reaches the caller.
    upstream, url = await raw_upstream(b"NOT HTTP AT ALL\r\n\r\n")
    failure = await call_raw(url)
    assert isinstance(failure, UpstreamMalformed)
    sent = (upstream.requests[0].head + upstream.requests[0].body).decode()
    assert "temporary-token" in sent and "TC3-HMAC-SHA256" in sent  # what must not come back
    # Its traceback too: a log line with exc_info would show the chained aiohttp exception.
    shown = (str(failure), repr(failure), "".join(traceback.format_exception(failure)))
    for text in (*shown, *failure.metadata().values()):
        assert "temporary-token" not in text and "TC3-HMAC-SHA256" not in text and "Authorization" not in text


async def test_a_redirect_is_an_upstream_failure_not_followed(raw_upstream: Any, emulator: Emulator) -> None:
    # A 307 keeps the method and the body: followed, it would reach the emulator and succeed.
    _, url = await raw_upstream(http(b"", status=307, headers={"Location": emulator.url + "/"}))
    failure = await call_raw(url)
    assert isinstance(failure, UpstreamHttpError)
    assert failure.status == 307 and failure.outcome is Outcome.UNKNOWN
    assert failure.metadata()["http_status"] == "307"
    assert emulator.stats()["DescribeWhiteboardPush"].accepted == 0


async def test_a_compressed_answer_is_not_inflated(raw_upstream: Any) -> None:
    body = gzip.compress(envelope({"TaskId": "t", "RequestId": "r"}))
    _, url = await raw_upstream(http(body, headers={"Content-Encoding": "gzip"}))
    assert isinstance(await call_raw(url), UpstreamMalformed)


@pytest.mark.parametrize("announced", [True, False])
async def test_an_oversized_answer_is_refused(raw_upstream: Any, announced: bool) -> None:
    # A valid envelope, only too large: read without a cap, it would be a success.
    body = envelope({"TaskId": "t", "RequestId": "r", "Padding": "x" * (2 << 20)})
    raw = http(body) if announced else b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + body
    _, url = await raw_upstream(raw)
    failure = await call_raw(url)
    assert isinstance(failure, UpstreamMalformed) and "larger than" in str(failure)


@pytest.mark.parametrize(
    ("body", "request_id"),
    [
        (b"<html>not json</html>", ""),
        (b'["not", "an", "envelope"]', ""),
        (envelope({"Error": "not an object", "RequestId": "req-9"}), "req-9"),
    ],
)
async def test_a_malformed_answer_keeps_its_request_id(
    raw_upstream: Any, body: bytes, request_id: str
) -> None:
    _, url = await raw_upstream(http(body))
    failure = await call_raw(url)
    assert isinstance(failure, UpstreamMalformed) and failure.request_id == request_id


async def test_an_answer_that_does_not_decode_is_a_failed_upstream_request(raw_upstream: Any) -> None:
    _, url = await raw_upstream(http(envelope({"TaskId": 5, "RequestId": "req-7"})))
    metrics = Metrics("test")

    def decode(answer: dict[str, Any]) -> str:
        raise ValueError("TaskId: unexpected JSON value of type int")

    async with tiw_client(url, metrics=metrics) as tiw:
        with pytest.raises(UpstreamMalformed) as caught:
            await tiw.call(Request("DescribeWhiteboardPush", PARAMS, decode=decode), time.monotonic() + 5)
        assert caught.value.request_id == "req-7" and "TaskId" in str(caught.value)
        labels = {"action": "DescribeWhiteboardPush"}
        sample = metrics.registry.get_sample_value
        assert sample("tiw_upstream_requests_total", {**labels, "code": "UPSTREAM_MALFORMED"}) == 1
        assert sample("tiw_upstream_requests_total", {**labels, "code": "OK"}) in (None, 0.0)


@pytest.mark.parametrize(
    "code",
    ["InvalidParameter.TaskNotFound", "InternalError", "LimitExceeded.Qps2", "FailedOperation.Busy_Retry"],
)
async def test_a_code_of_tiw_s_shape_is_tiw_s_error(raw_upstream: Any, code: str) -> None:
    _, url = await raw_upstream(http(envelope({"Error": {"Code": code, "Message": "m"}, "RequestId": "r-5"})))
    failure = await call_raw(url)
    assert isinstance(failure, TiwError) and (failure.code, failure.request_id) == (code, "r-5")


@pytest.mark.parametrize(
    "code",
    ["", "Invalid Parameter", "A" * 129, "InvalidParameter.", ".Task", "错误", "X-Y", "A\nB", 4100, None],
    ids=repr,
)
async def test_a_code_of_another_shape_is_malformed(raw_upstream: Any, code: object) -> None:
    # TIW's code becomes a metric label and the status's reason: an arbitrary one must not.
    _, url = await raw_upstream(http(envelope({"Error": {"Code": code, "Message": "m"}, "RequestId": "r-6"})))
    failure = await call_raw(url)
    assert isinstance(failure, UpstreamMalformed) and failure.request_id == "r-6"
    assert not isinstance(code, str) or not code or code not in str(failure)
