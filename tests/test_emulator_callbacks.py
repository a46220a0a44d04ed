"""The emulator sends TIW's callbacks: over real HTTP, to a real aiohttp receiver that records what
is posted, when its tasks change state by a virtual clock (moved by the test, then `wake()`), or
at once on StopWhiteboardPush; configured by the official SDK's Set…Callback calls.

The clock is frozen unless a test moves it, so every change due is decided in one pass of the
sender: a test that needs to know a callback was *not* sent adds a task that is, after, and waits
for that one (the sender handles changes in order of time, then of addition).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from support.clock import VirtualClock
from tencentcloud.common.credential import Credential
from tencentcloud.common.exception.tencent_cloud_sdk_exception import TencentCloudSDKException
from tencentcloud.common.profile.client_profile import ClientProfile
from tencentcloud.common.profile.http_profile import HttpProfile
from tencentcloud.tiw.v20190919 import models
from tencentcloud.tiw.v20190919.tiw_client import TiwClient
from tiw_facade.emulator import (
    DEMO_SECRET_ID,
    DEMO_SECRET_KEY,
    CallbackFault,
    CallbackFaultKind,
    Emulator,
    EmulatorConfig,
)
from tiw_facade.emulator.callbacks import sign

APP = 1400000001
OTHER_APP = 1400000002
KEY = "Xz4ZgayTr7rMgWQrH"
SNAPSHOT_SECONDS = 5.0


class Receiver:
    """An HTTP server recording every callback posted to it (path, JSON body); it answers the
    statuses queued in ``statuses`` first, then 200."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, Any]]] = []
        self.statuses: list[int] = []
        self.url = ""

    async def _handle(self, request: web.Request) -> web.Response:
        self.received.append((request.path, json.loads(await request.read())))
        return web.Response(status=self.statuses.pop(0) if self.statuses else 200)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/{path:.*}", self._handle)
        return app

    def of(self, task_id: str) -> list[dict[str, Any]]:
        """The bodies about one task, in the order received."""
        return [body for _, body in self.received if task_id_of(body) == task_id]


def task_id_of(body: dict[str, Any]) -> str:
    data: dict[str, Any] = body["EventData"]
    task_id: str = data.get("TaskId") or data["TaskID"]
    return task_id


@pytest.fixture(autouse=True)
def _no_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    # The SDK and requests would send 127.0.0.1 through a proxy from the environment.
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock.at_wall_time()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    runner = web.AppRunner(receiver.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    receiver.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield receiver
    await runner.cleanup()


StartEmulator = Callable[..., Awaitable[Emulator]]


@pytest.fixture
async def start_emulator(clock: VirtualClock) -> AsyncIterator[StartEmulator]:
    """Starts an emulator on the virtual clock, quick to retry and to notice the clock; stops it after."""
    started: list[Emulator] = []

    async def start(**options: Any) -> Emulator:
        settings: dict[str, Any] = {
            "clock": clock,
            "snapshot_seconds": SNAPSHOT_SECONDS,
            "callback_retry_seconds": 0.01,
            "callback_poll_seconds": 0.05,
            "callback_timeout": 5.0,
            **options,
        }
        emulator = Emulator(EmulatorConfig(**settings))
        await emulator.start()
        started.append(emulator)
        return emulator

    yield start
    for emulator in started:
        await emulator.stop()


def sdk_client(emulator: Emulator) -> TiwClient:
    endpoint = emulator.url.removeprefix("http://")
    profile = ClientProfile(httpProfile=HttpProfile(endpoint=endpoint, protocol="http", reqTimeout=10))
    return TiwClient(Credential(DEMO_SECRET_ID, DEMO_SECRET_KEY), "ap-guangzhou", profile)


async def call(client: TiwClient, action: str, params: dict[str, Any]) -> dict[str, Any]:
    """One SDK call, in a thread; the answer as the SDK's model serializes it."""
    request = getattr(models, f"{action}Request")()
    request.from_json_string(json.dumps(params))
    response = await asyncio.to_thread(getattr(client, action), request)
    document: dict[str, Any] = json.loads(response.to_json_string())
    return document


async def eventually(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10  # a hang guard, not a window
    while not condition():
        assert time.monotonic() < deadline, "the condition did not come true in time"
        await asyncio.sleep(0.01)


def md5_sign(key: str, expire_time: int) -> str:
    return hashlib.md5(f"{key}{expire_time}".encode()).hexdigest()


def test_sign_is_tiws_documented_example() -> None:
    assert sign(KEY, 1588040109) == "a2dabb362a9b811c0e26953a6276a41c"
    assert sign("", 1588040109) == ""  # no key: unsigned


# --- the events ---


async def test_snapshot_with_callback_url_posts_a_signed_finished_event(
    start_emulator: StartEmulator, receiver: Receiver, clock: VirtualClock
) -> None:
    emulator = await start_emulator(callback_key=KEY)
    sdk = sdk_client(emulator)
    created_at = int(clock())
    request = {
        "Whiteboard": {"Width": 1280, "Height": 720},
        "SdkAppId": APP,
        "RoomId": 12345,
        "CallbackURL": f"{receiver.url}/my/snapshots",
    }
    task_id = (await call(sdk, "CreateSnapshotTask", request))["TaskID"]
    clock.advance(SNAPSHOT_SECONDS)
    emulator.callbacks.wake()
    await eventually(lambda: len(receiver.received) == 1)

    [(path, body)] = receiver.received
    assert path == "/my/snapshots"  # the task's own URL, as given
    finished = created_at + int(SNAPSHOT_SECONDS)
    assert (body["EventType"], body["SdkAppId"], body["Timestamp"]) == ("SnapshotTaskFinished", APP, finished)
    assert body["ExpireTime"] == finished + 300
    assert body["Sign"] == md5_sign(KEY, body["ExpireTime"])
    data = body["EventData"]
    assert (data["TaskID"], data["Status"], data["FinishTime"]) == (task_id, "Finished", finished)
    assert data["Result"]["Total"] == 3
    # What DescribeSnapshotTask answers now is what the event said.
    described = await call(sdk, "DescribeSnapshotTask", {"SdkAppId": APP, "TaskID": task_id})
    assert (described["Status"], described["FinishTime"]) == ("Finished", finished)
    stats = emulator.callback_stats()
    assert (stats.sent, stats.attempts, stats.delivered, stats.failed, stats.in_flight) == (1, 1, 1, 0, 0)


async def test_push_started_then_stopped_at_once_by_a_stop_call(
    start_emulator: StartEmulator, receiver: Receiver, clock: VirtualClock
) -> None:
    emulator = await start_emulator(callback_url=receiver.url, callback_key=KEY)
    task_id = emulator.add_push_task(room_id=42, prepare_seconds=2)
    clock.advance(2)
    emulator.callbacks.wake()
    await eventually(lambda: len(receiver.of(task_id)) == 1)
    [started] = receiver.of(task_id)
    assert started["EventType"] == "WhiteboardPushStarted"
    assert started["EventData"] == {
        "TaskId": task_id,
        "RoomId": 42,
        "PushUserId": f"tic_push_user_42_{task_id[:5]}",
        "PushStartTime": int(clock()),
    }

    # Stopped at the very instant it started (the clock has not moved): sent at once, no wake().
    await call(sdk_client(emulator), "StopWhiteboardPush", {"SdkAppId": APP, "TaskId": task_id})
    await eventually(lambda: len(receiver.of(task_id)) == 2)
    stopped = receiver.of(task_id)[1]
    assert stopped["EventType"] == "WhiteboardPushStopped"
    assert stopped["Timestamp"] == int(clock()) and stopped["Sign"] == md5_sign(KEY, stopped["ExpireTime"])
    data = stopped["EventData"]
    assert (data["FinishReason"], data["PushStopTime"], data["GroupId"], data["ExceptionCnt"]) == (
        "USER_CALL",
        int(clock()),
        "42",
        0,
    )
    assert {path for path, body in receiver.received if task_id_of(body) == task_id} == {"/callbacks/push"}


async def test_push_stopped_before_it_started_sends_only_stopped(
    start_emulator: StartEmulator, receiver: Receiver, clock: VirtualClock
) -> None:
    emulator = await start_emulator(callback_url=receiver.url)
    task_id = emulator.add_push_task(prepare_seconds=10)
    clock.advance(1)
    await call(sdk_client(emulator), "StopWhiteboardPush", {"SdkAppId": APP, "TaskId": task_id})
    await eventually(lambda: len(receiver.of(task_id)) == 1)
    clock.advance(20)  # past the start it never made
    marker = emulator.add_snapshot_task(run_seconds=0)
    await eventually(lambda: len(receiver.of(marker)) == 1)
    [stopped] = receiver.of(task_id)
    assert (stopped["EventType"], stopped["EventData"]["PushStartTime"]) == ("WhiteboardPushStopped", 0)
    assert stopped["Sign"] == ""  # no key set anywhere: unsigned


async def test_video_changes_are_sent_in_order_to_the_base_url(
    start_emulator: StartEmulator, receiver: Receiver, clock: VirtualClock
) -> None:
    emulator = await start_emulator(callback_url=receiver.url + "/", callback_key=KEY)
    t0 = int(clock())
    task_id = emulator.add_video_task(queue_seconds=1, process_seconds=2)
    clock.advance(1)
    emulator.callbacks.wake()
    await eventually(lambda: len(receiver.of(task_id)) == 1)
    clock.advance(2)
    emulator.callbacks.wake()
    await eventually(lambda: len(receiver.of(task_id)) == 2)
    changed, finished = receiver.of(task_id)
    assert (changed["EventType"], changed["Timestamp"]) == ("VideoGenerationTaskChanged", t0 + 1)
    assert (changed["EventData"]["Status"], changed["EventData"]["Progress"]) == ("PROCESSING", 0)
    assert (finished["EventType"], finished["Timestamp"]) == ("VideoGenerationTaskFinished", t0 + 3)
    assert (finished["EventData"]["Status"], finished["EventData"]["Progress"]) == ("FINISHED", 100)
    assert len(finished["EventData"]["VideoInfoList"]) == 1
    # The base URL's trailing slash is not doubled.
    assert {path for path, body in receiver.received if task_id_of(body) == task_id} == {"/callbacks/video"}


async def test_the_real_clock_is_followed_without_a_wake(receiver: Receiver) -> None:
    """On the wall clock the sender sleeps until the change is due, then posts."""
    config = EmulatorConfig(callback_url=receiver.url, snapshot_seconds=0.2, callback_retry_seconds=0.01)
    async with Emulator(config) as emulator:
        task_id = emulator.add_snapshot_task()
        await eventually(lambda: len(receiver.of(task_id)) == 1)
    assert receiver.of(task_id)[0]["EventData"]["Status"] == "Finished"


async def test_changes_before_the_start_or_a_reset_are_never_sent(
    start_emulator: StartEmulator, receiver: Receiver, clock: VirtualClock
) -> None:
    emulator = await start_emulator(callback_url=receiver.url)
    # The seed's finished examples (2021) are not sent; nor a task added with a past creation time.
    past = emulator.add_snapshot_task(run_seconds=1, now=clock() - 60)
    marker = emulator.add_snapshot_task(run_seconds=0)
    await eventually(lambda: len(receiver.of(marker)) == 1)
    assert [task_id_of(body) for _, body in receiver.received] == [marker]
    assert past not in {task_id_of(body) for _, body in receiver.received}
    emulator.reset()
    assert emulator.callback_stats().sent == 0


# --- the Set… actions ---


async def test_set_actions_route_and_sign_each_kind_per_sdk_app_id(
    start_emulator: StartEmulator, receiver: Receiver
) -> None:
    emulator = await start_emulator()
    sdk = sdk_client(emulator)
    calls = {
        "SetWhiteboardPushCallback": {"SdkAppId": OTHER_APP, "Callback": f"{receiver.url}/push-hook"},
        "SetWhiteboardPushCallbackKey": {"SdkAppId": OTHER_APP, "CallbackKey": "push-key"},
        "SetVideoGenerationTaskCallback": {"SdkAppId": OTHER_APP, "Callback": f"{receiver.url}/video-hook"},
        "SetVideoGenerationTaskCallbackKey": {"SdkAppId": OTHER_APP, "CallbackKey": "video-key"},
    }
    for action, params in calls.items():
        answer = await call(sdk, action, params)
        assert set(answer) == {"RequestId"} and answer["RequestId"]
    assert emulator.stats()["SetWhiteboardPushCallback"].accepted == 1

    unrouted = emulator.add_push_task(sdk_app_id=APP, prepare_seconds=0)  # APP has no URL
    push = emulator.add_push_task(sdk_app_id=OTHER_APP, prepare_seconds=0)
    video = emulator.add_video_task(sdk_app_id=OTHER_APP, queue_seconds=0, process_seconds=0)
    # A snapshot goes to its own URL, signed with its app's push key (TIW does not say which).
    snapshot = emulator.add_snapshot_task(
        sdk_app_id=OTHER_APP, run_seconds=0, callback_url=f"{receiver.url}/snap-hook"
    )
    await eventually(lambda: len(receiver.received) == 3)
    by_task = {task_id_of(body): (path, body) for path, body in receiver.received}
    assert unrouted not in by_task and emulator.callback_stats().sent == 3
    expected = {push: ("/push-hook", "push-key"), video: ("/video-hook", "video-key")}
    expected[snapshot] = ("/snap-hook", "push-key")
    for task_id, (path, key) in expected.items():
        got_path, body = by_task[task_id]
        assert (got_path, body["SdkAppId"]) == (path, OTHER_APP)
        assert body["Sign"] == md5_sign(key, body["ExpireTime"]), task_id


async def test_an_empty_callback_deletes_the_route_and_bad_urls_are_refused(
    start_emulator: StartEmulator, receiver: Receiver
) -> None:
    emulator = await start_emulator(callback_url=receiver.url)
    sdk = sdk_client(emulator)
    with pytest.raises(TencentCloudSDKException) as caught:
        await call(sdk, "SetWhiteboardPushCallback", {"SdkAppId": APP, "Callback": "ftp://example.com/"})
    assert caught.value.code == "InvalidParameter"
    with pytest.raises(TencentCloudSDKException) as caught:
        await call(sdk, "SetVideoGenerationTaskCallbackKey", {"SdkAppId": APP})
    assert caught.value.code == "MissingParameter"
    with pytest.raises(TencentCloudSDKException) as caught:
        await call(sdk, "SetWhiteboardPushCallbackKey", {"SdkAppId": APP, "CallbackKey": "k" * 65})
    assert caught.value.code == "InvalidParameter"

    await call(sdk, "SetWhiteboardPushCallback", {"SdkAppId": APP, "Callback": ""})
    silent = emulator.add_push_task(prepare_seconds=0)  # APP's push callbacks are deleted
    marker = emulator.add_video_task(queue_seconds=0, process_seconds=0)  # video: still the base URL
    await eventually(lambda: len(receiver.of(marker)) == 1)
    assert receiver.of(silent) == []


# --- faults ---


def finished_snapshots(emulator: Emulator, count: int) -> list[str]:
    """``count`` snapshot tasks finished at once; their callbacks are decided in this order."""
    return [emulator.add_snapshot_task(run_seconds=0) for _ in range(count)]


async def test_drop_and_duplicate_for_the_next_n_callbacks(
    start_emulator: StartEmulator, receiver: Receiver
) -> None:
    emulator = await start_emulator(callback_url=receiver.url, callback_key=KEY)
    emulator.add_callback_fault(CallbackFault(CallbackFaultKind.DUPLICATE, count=1))
    emulator.add_callback_fault(CallbackFault(CallbackFaultKind.DROP, count=1))  # newest: applies first
    dropped, duplicated, plain = finished_snapshots(emulator, 3)
    await eventually(lambda: len(receiver.of(plain)) == 1)
    await eventually(lambda: len(receiver.of(duplicated)) == 2)
    assert receiver.of(dropped) == []
    first, second = receiver.of(duplicated)
    assert first == second  # the same body twice: the same Timestamp, ExpireTime and Sign
    stats = emulator.callback_stats()
    assert (stats.sent, stats.delivered, stats.dropped, stats.faulted, stats.in_flight) == (3, 3, 1, 2, 0)
    assert emulator.callback_faults() == []  # both used up


@pytest.mark.parametrize("kind", [CallbackFaultKind.BAD_SIGN, CallbackFaultKind.EXPIRED])
async def test_bad_sign_and_expired(
    start_emulator: StartEmulator, receiver: Receiver, clock: VirtualClock, kind: CallbackFaultKind
) -> None:
    emulator = await start_emulator(callback_url=receiver.url, callback_key=KEY)
    emulator.add_callback_fault(CallbackFault(kind, event_type="SnapshotTaskFinished", count=1))
    faulted, fine = finished_snapshots(emulator, 2)
    await eventually(lambda: len(receiver.of(fine)) == 1 and len(receiver.of(faulted)) == 1)
    [body] = receiver.of(faulted)
    if kind is CallbackFaultKind.BAD_SIGN:
        assert body["ExpireTime"] == body["Timestamp"] + 300
        assert body["Sign"] not in {md5_sign(KEY, body["ExpireTime"]), ""}
    else:
        assert body["ExpireTime"] < clock()
        assert body["Sign"] == md5_sign(KEY, body["ExpireTime"])  # rightly signed, only too late
    [good] = receiver.of(fine)
    assert good["Sign"] == md5_sign(KEY, good["ExpireTime"]) and good["ExpireTime"] > clock()


async def test_faults_of_one_event_type_and_probabilities(
    start_emulator: StartEmulator, receiver: Receiver
) -> None:
    emulator = await start_emulator(callback_url=receiver.url)
    emulator.add_callback_fault(CallbackFault(CallbackFaultKind.DROP, event_type="WhiteboardPushStarted"))
    emulator.add_callback_fault(CallbackFault(CallbackFaultKind.DUPLICATE, probability=0))  # never
    push = emulator.add_push_task(prepare_seconds=0)
    [snapshot] = finished_snapshots(emulator, 1)
    await eventually(lambda: len(receiver.of(snapshot)) == 1)
    assert receiver.of(push) == []
    assert len(emulator.callback_faults()) == 2  # until cleared

    emulator.reset()  # counters from zero (and no fault)
    emulator.add_callback_fault(CallbackFault(CallbackFaultKind.DROP, probability=0.5))
    tasks = finished_snapshots(emulator, 40)
    await eventually(lambda: (stats := emulator.callback_stats()).sent + stats.dropped == 40)
    await eventually(lambda: emulator.callback_stats().in_flight == 0)
    delivered = sum(1 for task_id in tasks if receiver.of(task_id))
    assert 0 < delivered < 40  # each one a coin toss: all 40 alike is a chance of 2**-39
    assert emulator.callback_stats().dropped == 40 - delivered


async def test_delay_holds_a_callback_and_stop_abandons_it_cleanly(
    start_emulator: StartEmulator, receiver: Receiver
) -> None:
    emulator = await start_emulator(callback_url=receiver.url)
    emulator.add_callback_fault(CallbackFault(CallbackFaultKind.DELAY, delay=60, count=1))
    delayed, prompt = finished_snapshots(emulator, 2)
    await eventually(lambda: len(receiver.of(prompt)) == 1)
    assert receiver.of(delayed) == []  # 60 s to go
    assert emulator.callback_stats().in_flight == 1

    async with asyncio.timeout(30):  # a hang guard, not a window: the delay is 60 s
        await emulator.stop()
    assert not emulator.callbacks.running
    left = [t for t in asyncio.all_tasks() if t.get_name().startswith("tiw-emulator-callback")]
    assert left == [], "the sender left tasks behind"
    await emulator.stop()  # idempotent


async def test_stop_right_after_a_change_ends_the_sender(
    start_emulator: StartEmulator, receiver: Receiver
) -> None:
    """A task added, then stop() at once, before the sender ever ran: it ends all the same."""
    emulator = await start_emulator(callback_url=receiver.url)
    emulator.add_snapshot_task(run_seconds=0)
    async with asyncio.timeout(30):  # a hang guard
        await emulator.stop()
    assert not emulator.callbacks.running


# --- retries ---


async def test_a_500_is_retried_until_200(start_emulator: StartEmulator, receiver: Receiver) -> None:
    emulator = await start_emulator(callback_url=receiver.url, callback_key=KEY)
    receiver.statuses = [500, 503]
    [task_id] = finished_snapshots(emulator, 1)
    await eventually(lambda: emulator.callback_stats().delivered == 1)
    first, second, third = receiver.of(task_id)
    assert first == second == third  # the same callback, posted again
    stats = emulator.callback_stats()
    assert (stats.sent, stats.attempts, stats.delivered, stats.failed) == (1, 3, 1, 0)


async def test_gives_up_after_its_attempts(start_emulator: StartEmulator, receiver: Receiver) -> None:
    with socket.socket() as unused:  # a port nobody listens on: connection refused
        unused.bind(("127.0.0.1", 0))
        closed_port = unused.getsockname()[1]
    emulator = await start_emulator(callback_url=f"http://127.0.0.1:{closed_port}", callback_attempts=2)
    emulator.add_snapshot_task(run_seconds=0)
    await eventually(lambda: emulator.callback_stats().failed == 1)
    stats = emulator.callback_stats()
    assert (stats.sent, stats.attempts, stats.delivered, stats.in_flight) == (1, 2, 0, 0)


# --- the admin endpoints and the config ---


async def test_admin_endpoints_for_callbacks(start_emulator: StartEmulator, receiver: Receiver) -> None:
    emulator = await start_emulator()
    base = f"{emulator.url}/_emulator"
    async with aiohttp.ClientSession() as http:
        fault = {"kind": "duplicate", "event_type": "SnapshotTaskFinished", "count": 1}
        async with http.post(f"{base}/callbacks/faults", json=fault) as response:
            assert response.status == 200
            [listed] = (await response.json())["faults"]
        assert (listed["kind"], listed["count"], listed["probability"]) == ("duplicate", 1, 1.0)
        bad_faults: list[Any] = [
            {"kind": "explode"},
            {"kind": "drop", "count": 0},
            {"kind": "drop", "probability": 2},
            {"kind": "delay", "delay": "1"},
            {"kind": "drop", "action": "X"},
            [1],
        ]
        for bad in bad_faults:
            async with http.post(f"{base}/callbacks/faults", json=bad) as response:
                assert response.status == 400, bad

        task = {"Kind": "snapshot", "RunSeconds": 0, "CallbackURL": f"{receiver.url}/admin"}
        async with http.post(f"{base}/tasks", json=task) as response:
            task_id = (await response.json())["TaskId"]
        await eventually(lambda: len(receiver.of(task_id)) == 2)  # duplicated
        assert {path for path, _ in receiver.received} == {"/admin"}
        await eventually(lambda: emulator.callback_stats().delivered == 2)
        async with http.get(f"{base}/callbacks/stats") as response:
            served = await response.json()
        assert served == {
            "sent": 2,
            "attempts": 2,
            "delivered": 2,
            "failed": 0,
            "dropped": 0,
            "faulted": 1,
            "in_flight": 0,
        }

        async with http.post(f"{base}/callbacks/faults", json={"kind": "drop"}) as response:
            assert response.status == 200
        async with http.delete(f"{base}/callbacks/faults") as response:
            assert (await response.json()) == {"faults": []}
        async with http.post(f"{base}/reset") as response:
            assert response.status == 200
        async with http.get(f"{base}/callbacks/stats") as response:
            assert (await response.json())["sent"] == 0


async def test_reset_forgets_the_routes_set_by_actions(
    start_emulator: StartEmulator, receiver: Receiver
) -> None:
    emulator = await start_emulator()
    sdk = sdk_client(emulator)
    await call(sdk, "SetVideoGenerationTaskCallback", {"SdkAppId": APP, "Callback": receiver.url})
    emulator.add_callback_fault(CallbackFault(CallbackFaultKind.DROP))
    emulator.reset()
    assert emulator.callbacks.routes.video_urls == {} and emulator.callback_faults() == []


def test_config_checks_and_hides_the_callback_key() -> None:
    assert "secret-callback-key" not in repr(EmulatorConfig(callback_key="secret-callback-key"))
    bad_configs: list[dict[str, Any]] = [
        {"callback_url": "ftp://example.com"},
        {"callback_attempts": 0},
        {"callback_timeout": 0},
        {"callback_poll_seconds": 0},
        {"callback_retry_seconds": -1},
    ]
    for bad in bad_configs:
        with pytest.raises(ValueError):
            EmulatorConfig(**bad)
