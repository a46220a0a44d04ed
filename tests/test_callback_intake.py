"""callback_intake.py over real HTTP: an intake on 127.0.0.1, posted to with aiohttp (and, where the
client must misbehave, a raw socket), its events handed to a small in-memory log. Every answer and
its count, the body never read past the cap, a key rotated through the file, and logs free of keys
and Signs."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.callbacks import DROP, post, sign, signed_body
from support.clock import VirtualClock
from support.waiting import wait_until
from tiw_facade import logs
from tiw_facade.callback_intake import CallbackIntake
from tiw_facade.callbacks import CallbackKeys
from tiw_facade.events import Event, EventLogUnavailable
from tiw_facade.metrics import Metrics

APP = 1400000001
KEY = "Xz4ZgayTr7rMgWQrH"
MAX_BYTES = 4096


class MemoryLog:
    """The event log's append, as small as can be: each identity taken once; ``failure`` raised
    instead when set, ``stalled`` never answering."""

    def __init__(self) -> None:
        self.events: dict[str, Event] = {}
        self.calls = 0
        self.failure: Exception | None = None
        self.stalled = False

    async def take(self, event: Event) -> Event | None:
        self.calls += 1
        if self.failure is not None:
            raise self.failure
        if self.stalled:
            await asyncio.Event().wait()
        if event.identity in self.events:
            return None
        taken = self.events[event.identity] = dataclasses.replace(event, cursor=str(len(self.events) + 1))
        return taken


@dataclasses.dataclass
class Running:
    intake: CallbackIntake
    keys: CallbackKeys
    url: str
    log: MemoryLog
    metrics: Metrics
    clock: VirtualClock

    def counted(self, kind: str, result: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "tiw_callbacks_total", {"kind": kind, "result": result}
        )
        return value or 0.0

    def body(self, kind: str = "push", *, key: str = KEY, **overrides: Any) -> bytes:
        expire_time = int(self.clock()) + 300
        return signed_body(kind, sdk_app_id=APP, key=key, expire_time=expire_time, **overrides)


StartIntake = Callable[..., Awaitable[Running]]


@pytest.fixture
async def start_intake() -> AsyncIterator[StartIntake]:
    """Start intakes (keys: APP's KEY unless given), each closed at the end with its keys."""
    started: list[tuple[CallbackIntake, CallbackKeys]] = []

    async def start(keys: CallbackKeys | None = None, **options: float) -> Running:
        keys = keys or CallbackKeys([(APP, KEY)])
        await keys.start()
        memory, metrics, clock = MemoryLog(), Metrics.unobserved(), VirtualClock.at_wall_time()
        intake = CallbackIntake(
            keys,
            memory.take,
            metrics=metrics,
            max_bytes=MAX_BYTES,
            max_ahead=3600.0,
            clock=clock,
            **options,
        )
        port = await intake.start("127.0.0.1", 0)
        started.append((intake, keys))
        return Running(intake, keys, f"http://127.0.0.1:{port}", memory, metrics, clock)

    yield start
    for intake, keys in started:
        await intake.aclose()
        await keys.aclose()


async def test_a_signed_callback_is_taken_and_answered_200(start_intake: StartIntake) -> None:
    running = await start_intake()
    for kind in ("push", "snapshot", "video"):
        data = running.body(kind, task_id=f"{kind}-task")
        assert await post(f"{running.url}/callbacks/{kind}", data) == (200, b'{"code":0}')
        (event,) = [event for event in running.log.events.values() if event.kind == kind]
        assert (event.sdk_app_id, event.task_id, event.body) == (APP, f"{kind}-task", data)
        assert event.received_at == running.clock()
        assert running.counted(kind, "accepted") == 1
        last = running.metrics.registry.get_sample_value(
            "tiw_callback_last_accepted_timestamp_seconds", {"kind": kind}
        )
        assert last == running.clock()


async def test_any_content_type_is_taken(start_intake: StartIntake) -> None:
    running = await start_intake()
    status, _ = await post(
        f"{running.url}/callbacks/push", running.body(), headers={"Content-Type": "text/plain"}
    )
    assert status == 200 and len(running.log.events) == 1


async def test_a_replay_is_acknowledged_and_not_taken_twice(start_intake: StartIntake) -> None:
    running = await start_intake()
    data = running.body()
    for _ in range(3):
        assert await post(f"{running.url}/callbacks/push", data) == (200, b'{"code":0}')
    assert running.log.calls == 3 and len(running.log.events) == 1
    assert (running.counted("push", "accepted"), running.counted("push", "replayed")) == (1, 2)


def answer(status: int, reason: str) -> tuple[int, bytes]:
    return status, json.dumps({"code": status, "reason": reason}, separators=(",", ":")).encode()


async def test_each_refusal_is_its_status_and_count(start_intake: StartIntake) -> None:
    running = await start_intake()
    now = int(running.clock())
    refused = {
        "bad_sign": running.body(key="forged"),
        "expired": running.body(ExpireTime=now - 1, Sign=sign(KEY, now - 1)),
        "too_far_ahead": running.body(ExpireTime=now + 3601, Sign=sign(KEY, now + 3601)),
        "unknown_app": signed_body("push", sdk_app_id=APP + 1, key=KEY, expire_time=now + 60),
        "bad_json": b'{"SdkAppId": 1400000001,',
        "bad_fields": running.body(EventType=DROP),
    }
    statuses = {"bad_json": 400, "bad_fields": 400}
    for reason, data in refused.items():
        assert await post(f"{running.url}/callbacks/snapshot", data) == answer(
            statuses.get(reason, 403), reason
        )
        assert running.counted("snapshot", reason) == 1
    assert await post(f"{running.url}/callbacks/snapshot", b"[]") == answer(400, "bad_json")
    assert running.counted("snapshot", "bad_json") == 2
    assert running.log.calls == 0 and running.counted("snapshot", "accepted") == 0


async def test_another_method_is_405_with_allow(start_intake: StartIntake) -> None:
    running = await start_intake()
    async with aiohttp.ClientSession() as session:
        for method in ("GET", "PUT", "DELETE", "HEAD"):
            async with session.request(method, f"{running.url}/callbacks/video") as response:
                assert response.status == 405 and response.headers["Allow"] == "POST"
                assert response.headers["Server"] == "tiw-facade"
    assert running.counted("video", "bad_method") == 4


@pytest.mark.parametrize(
    "path",
    ["/", "/callbacks", "/callbacks/", "/callbacks/push/", "/callbacks/audio", "/metrics", "/%2e%2e/x"],
)
async def test_another_path_is_404_counted_as_other(start_intake: StartIntake, path: str) -> None:
    running = await start_intake()
    assert await post(running.url + path, running.body()) == answer(404, "not_found")
    assert running.counted("other", "not_found") == 1 and running.log.calls == 0


async def test_a_body_declared_too_large_is_refused_unread(start_intake: StartIntake) -> None:
    running = await start_intake()
    port = int(running.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        # Headers only: were the body waited for, there would be no answer.
        writer.write(
            b"POST /callbacks/push HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000000\r\n\r\n"
        )
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 10)
        assert status_line.startswith(b"HTTP/1.1 413 ")
    finally:
        writer.close()
    assert running.counted("push", "too_large") == 1
    # And through an ordinary client sending the whole of it.
    too_large = running.body(Padding="x" * MAX_BYTES)
    assert await post(f"{running.url}/callbacks/push", too_large) == answer(413, "too_large")
    assert running.counted("push", "too_large") == 2 and running.log.calls == 0


async def test_a_chunked_body_is_refused_once_past_the_cap_without_reading_on(
    start_intake: StartIntake,
) -> None:
    running = await start_intake()
    sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal sent
        while sent <= MAX_BYTES:
            sent += 1000
            yield b" " * 1000
        await asyncio.Event().wait()  # never ends: answered only if the intake stops reading at the cap

    assert await asyncio.wait_for(post(f"{running.url}/callbacks/push", chunks()), 10) == answer(
        413, "too_large"
    )
    assert sent == 5000 and running.counted("push", "too_large") == 1


async def test_a_chunked_body_within_the_cap_is_taken(start_intake: StartIntake) -> None:
    running = await start_intake()
    data = running.body()

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(data), 7):
            yield data[start : start + 7]

    assert await post(f"{running.url}/callbacks/push", chunks()) == (200, b'{"code":0}')
    (event,) = running.log.events.values()
    assert event.body == data


async def test_a_body_cut_short_is_bad_json(start_intake: StartIntake) -> None:
    running = await start_intake()
    port = int(running.url.rsplit(":", 1)[1])
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /callbacks/push HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    await writer.drain()
    writer.close()
    await wait_until(lambda: running.counted("push", "bad_json") == 1, within=5)


async def test_a_body_trickling_in_is_refused_at_its_time_out(start_intake: StartIntake) -> None:
    running = await start_intake(body_timeout=0.1)
    port = int(running.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /callbacks/push HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        await writer.drain()
        assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"HTTP/1.1 400 ")
    finally:
        writer.close()
    assert running.counted("push", "bad_json") == 1


async def test_an_unavailable_event_log_is_503(start_intake: StartIntake) -> None:
    running = await start_intake(take_timeout=0.1)
    running.log.failure = EventLogUnavailable("redis is down")
    assert await post(f"{running.url}/callbacks/push", running.body()) == answer(503, "unavailable")
    running.log.failure, running.log.stalled = None, True
    assert await post(f"{running.url}/callbacks/push", running.body()) == answer(503, "unavailable")
    assert running.counted("push", "unavailable") == 2 and not running.log.events
    running.log.stalled = False  # TIW's retry, once the log is back
    assert await post(f"{running.url}/callbacks/push", running.body()) == (200, b'{"code":0}')


async def test_an_unexpected_failure_is_500_without_detail(
    start_intake: StartIntake, caplog: pytest.LogCaptureFixture
) -> None:
    running = await start_intake()
    running.log.failure = ZeroDivisionError("the log's own bug")
    with caplog.at_level(logging.INFO, logger="tiw_facade.callback_intake"):
        status, answered = await post(f"{running.url}/callbacks/push", running.body())
    assert (status, answered) == (500, b'{"code":500}')
    assert running.counted("push", "unavailable") == 1
    (record,) = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert record.exc_info is not None and isinstance(record.exc_info[1], ZeroDivisionError)


def publish(path: Path, text: str) -> None:
    fresh = path.with_suffix(".new")
    fresh.write_text(text)
    os.replace(fresh, path)


async def test_a_key_rotated_through_the_file(
    start_intake: StartIntake, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "keys"
    path.write_text(f"{APP}={KEY}\n")
    running = await start_intake(CallbackKeys(key_file=str(path), poll=0.05))

    async def status(key: str, task_id: str) -> int:
        found, _ = await post(f"{running.url}/callbacks/push", running.body(key=key, task_id=task_id))
        return found

    assert await status(KEY, "1") == 200
    assert await status("the-new-key", "2") == 403
    publish(path, f"{APP}={KEY}\n{APP}=the-new-key\n")
    await wait_until(lambda: len(running.keys.keys_for(APP)) == 2, within=5)
    assert (await status(KEY, "3"), await status("the-new-key", "4")) == (200, 200)
    with caplog.at_level(logging.INFO, logger="tiw_facade.callbacks"):
        publish(path, f"{APP}=the-new-key\n{APP}:half-written")  # malformed: the last good keys stay
        await wait_until(lambda: any(r.levelno == logging.ERROR for r in caplog.records), within=5)
    assert (await status(KEY, "5"), await status("the-new-key", "6")) == (200, 200)
    publish(path, f"{APP}=the-new-key\n")
    await wait_until(lambda: running.keys.keys_for(APP) == ("the-new-key",), within=5)
    assert (await status(KEY, "7"), await status("the-new-key", "8")) == (403, 200)
    assert {event.task_id for event in running.log.events.values()} == {"1", "3", "4", "5", "6", "8"}


async def test_refusals_are_logged_rate_limited_and_never_with_a_key_or_sign(
    start_intake: StartIntake, caplog: pytest.LogCaptureFixture
) -> None:
    running = await start_intake()
    forged = [running.body(key=f"forged-{n}", task_id=str(n)) for n in range(5)]
    signs = [json.loads(data)["Sign"] for data in forged]
    good = running.body()
    with caplog.at_level(logging.DEBUG):
        for data in forged:  # a flood: one line
            assert (await post(f"{running.url}/callbacks/push", data))[0] == 403
        assert (await post(f"{running.url}/callbacks/push", running.body(EventType=7)))[0] == 400
        running.clock.advance(11)
        assert (await post(f"{running.url}/callbacks/push", forged[0]))[0] == 403
        assert (await post(f"{running.url}/callbacks/push", good))[0] == 200
    refusals = [record for record in caplog.records if record.name == "tiw_facade.callback_intake"]
    lines = [
        json.loads(logs.JsonFormatter().format(record)) for record in refusals if "reason" in vars(record)
    ]
    assert [(line["reason"], line["left_out"]) for line in lines] == [
        ("bad_sign", 0),
        ("bad_fields", 0),
        ("bad_sign", 4),  # the four left out of the flood
    ]
    assert lines[0]["sdk_app_id"] == APP and lines[0]["kind"] == "push" and lines[0]["remote"] == "127.0.0.1"
    assert all(line["level"] == "WARNING" for line in lines)
    everything = "\n".join(logs.JsonFormatter().format(record) for record in caplog.records)
    assert KEY not in everything and not any(value in everything for value in signs)
    assert json.loads(good)["Sign"] not in everything
    assert running.counted("push", "bad_sign") == 6


async def test_a_stop_ends_listening(start_intake: StartIntake) -> None:
    running = await start_intake()
    await running.intake.aclose()
    with pytest.raises(aiohttp.ClientConnectionError):
        await post(f"{running.url}/callbacks/push", running.body())
    await running.intake.aclose()  # twice: nothing to do
