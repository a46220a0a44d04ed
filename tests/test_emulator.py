"""The emulator speaks TIW: Tencent's official SDK, over real HTTP, is the judge.

The SDK is synchronous (requests), so its calls run in threads while the emulator serves on the
test's event loop. A fake clock (starting at the real time, so the SDK's signatures are fresh)
moves task states, the signature window and the rate window together, deterministically.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
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
    Emulator,
    EmulatorConfig,
    Fault,
    FaultKind,
    max_in_any_window,
)
from tiw_facade.emulator.traffic import ActionTraffic
from tiw_facade.signing import Credentials, Signer

UNAUTHORIZED_APP = 1400999999
SNAPSHOT_SECONDS = 10.0
PREPARE_SECONDS = 5.0
QUEUE_SECONDS = 5.0
PROCESS_SECONDS = 20.0

# The seed documents' example inputs.
CREATE_SNAPSHOT = {
    "COS": {
        "TargetDir": "snapshot/",
        "Region": "ap-guangzhou",
        "Bucket": "test-123070000",
        "Domain": "xxx.file.com",
        "Uin": 130001358,
    },
    "Whiteboard": {"Width": 1280, "InitParams": '{"ratio":"16:9"}', "Height": 720},
    "RoomId": 12345,
    "SdkAppId": 1400123480,
    "CallbackURL": "http://xx/callback",
}
DESCRIBE_SNAPSHOT = {"SdkAppId": 1400127230, "TaskID": "f2e1728c-6e87-4481-abe1-cde8542a5a10"}
DESCRIBE_PUSH = {"SdkAppId": 1400000001, "TaskId": "ghucnligqtgtvk2624mb"}
STOP_PUSH = {"SdkAppId": 1400000001, "TaskId": "07b4c70bpafm1b4majmb"}
DESCRIBE_VIDEO = {"SdkAppId": 1400000001, "TaskId": "ghucnligqtgtvk2624mb"}


@pytest.fixture(autouse=True)
def _no_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    # The SDK and requests would send 127.0.0.1 through a proxy from the environment.
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock.at_wall_time()


@pytest.fixture
async def emulator(clock: VirtualClock) -> AsyncIterator[Emulator]:
    config = EmulatorConfig(
        clock=clock,
        snapshot_seconds=SNAPSHOT_SECONDS,
        push_prepare_seconds=PREPARE_SECONDS,
        video_queue_seconds=QUEUE_SECONDS,
        video_process_seconds=PROCESS_SECONDS,
        unauthorized_sdk_app_ids=frozenset({UNAUTHORIZED_APP}),
    )
    async with Emulator(config) as running:
        yield running


@pytest.fixture
def sdk(emulator: Emulator) -> TiwClient:
    return sdk_client(emulator)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def sdk_client(
    emulator: Emulator, secret_id: str = DEMO_SECRET_ID, secret_key: str = DEMO_SECRET_KEY, timeout: int = 10
) -> TiwClient:
    endpoint = emulator.url.removeprefix("http://")
    profile = ClientProfile(httpProfile=HttpProfile(endpoint=endpoint, protocol="http", reqTimeout=timeout))
    return TiwClient(Credential(secret_id, secret_key), "ap-guangzhou", profile)


async def call(client: TiwClient, action: str, params: dict[str, Any]) -> dict[str, Any]:
    """One SDK call, in a thread; the answer as the SDK's model serializes it."""
    request = getattr(models, f"{action}Request")()
    request.from_json_string(json.dumps(params))
    response = await asyncio.to_thread(getattr(client, action), request)
    document: dict[str, Any] = json.loads(response.to_json_string())
    return document


async def sdk_error(client: TiwClient, action: str, params: dict[str, Any]) -> TencentCloudSDKException:
    with pytest.raises(TencentCloudSDKException) as caught:
        await call(client, action, params)
    return caught.value


async def post(
    http: aiohttp.ClientSession,
    emulator: Emulator,
    action: str,
    body: bytes | dict[str, Any],
    *,
    timestamp: int | None = None,
    sign_action: bool = False,
    overrides: dict[str, str] | None = None,
) -> tuple[int, str, Any]:
    """A request signed by our own signer, for what the SDK cannot send: status, content type, JSON."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    host = emulator.url.removeprefix("http://")
    signer = Signer(
        Credentials(DEMO_SECRET_ID, DEMO_SECRET_KEY), host, region="ap-guangzhou", sign_action=sign_action
    )
    headers = signer.headers(action, raw, int(emulator.config.clock()) if timestamp is None else timestamp)
    headers.update(overrides or {})
    async with http.post(emulator.url + "/", data=raw, headers=headers) as response:
        text = await response.text()
        return response.status, response.headers["Content-Type"], json.loads(text)


async def eventually(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, "the condition did not come true in time"
        await asyncio.sleep(0.01)


def error_code(document: Any) -> str:
    code: str = document["Response"]["Error"]["Code"]
    return code


# --- the five actions, as the official SDK sees them ---


async def test_sdk_succeeds_on_all_five_actions_with_the_seed_examples(sdk: TiwClient) -> None:
    created = await call(sdk, "CreateSnapshotTask", CREATE_SNAPSHOT)
    assert uuid.UUID(created["TaskID"]) and uuid.UUID(created["RequestId"])

    snapshot = await call(sdk, "DescribeSnapshotTask", DESCRIBE_SNAPSHOT)
    assert snapshot["Status"] == "Finished"
    assert (snapshot["CreateTime"], snapshot["FinishTime"]) == (1626249427, 1626250455)
    assert snapshot["Result"]["ErrorCode"] == "OK" and snapshot["Result"]["Total"] == 3
    assert len(snapshot["Result"]["Snapshots"]) == 3

    push = await call(sdk, "DescribeWhiteboardPush", DESCRIBE_PUSH)
    assert push["TaskId"] == "ghucnligqtgtvk2624mb" and push["Status"] == "PREPARED"

    stopped = await call(sdk, "StopWhiteboardPush", STOP_PUSH)
    assert json.loads(stopped["Backup"])["RequestId"]

    video = await call(sdk, "DescribeVideoGenerationTask", DESCRIBE_VIDEO)
    assert video["TaskId"] == "ghucnligqtgtvk2624mb" and video["Status"] == "QUEUED"


async def test_documented_stopped_push_is_answered_as_documented(sdk: TiwClient) -> None:
    push = await call(
        sdk, "DescribeWhiteboardPush", {"SdkAppId": 1400000001, "TaskId": "g42lfmu5uc3lpoqrqvvb"}
    )
    expected = {
        "ExceptionCnt": 0,
        "FinishReason": "USER_CALL",
        "GroupId": "880528",
        "IMSyncTime": 1610591726,
        "PushStartTime": 1610591726,
        "PushStopTime": 1610591759,
        "PushUserId": "tic_push_user_880528_test1",
        "RoomId": 880528,
        "Status": "STOPPED",
        "Backup": "",
        "TaskId": "g42lfmu5uc3lpoqrqvvb",
    }
    assert {key: push[key] for key in expected} == expected


async def test_snapshot_task_runs_then_finishes(sdk: TiwClient, clock: VirtualClock) -> None:
    created_at = int(clock())
    task_id = (await call(sdk, "CreateSnapshotTask", CREATE_SNAPSHOT))["TaskID"]
    query = {"SdkAppId": CREATE_SNAPSHOT["SdkAppId"], "TaskID": task_id}

    running = await call(sdk, "DescribeSnapshotTask", query)
    assert (running["Status"], running["CreateTime"], running["FinishTime"], running["Result"]) == (
        "Running",
        created_at,
        None,
        None,
    )

    clock.advance(SNAPSHOT_SECONDS)
    done = await call(sdk, "DescribeSnapshotTask", query)
    assert (done["Status"], done["CreateTime"], done["FinishTime"]) == (
        "Finished",
        created_at,
        created_at + int(SNAPSHOT_SECONDS),
    )
    result = done["Result"]
    assert (result["ErrorCode"], result["ErrorMessage"], result["Total"]) == ("OK", "", 3)
    # With COS given, the images are in the customer's bucket under TargetDir.
    assert result["Snapshots"][0] == f"https://xxx.file.com/snapshot/{task_id}/1.png"


async def test_snapshot_task_of_another_app_is_not_found(sdk: TiwClient) -> None:
    task_id = (await call(sdk, "CreateSnapshotTask", CREATE_SNAPSHOT))["TaskID"]
    error = await sdk_error(sdk, "DescribeSnapshotTask", {"SdkAppId": 1400000001, "TaskID": task_id})
    assert error.code == "InvalidParameter.TaskNotFound"


async def test_push_prepared_then_pushing_then_stopped_once(sdk: TiwClient, clock: VirtualClock) -> None:
    assert (await call(sdk, "DescribeWhiteboardPush", DESCRIBE_PUSH))["Status"] == "PREPARED"
    clock.advance(PREPARE_SECONDS)
    pushing = await call(sdk, "DescribeWhiteboardPush", DESCRIBE_PUSH)
    assert (pushing["Status"], pushing["PushStopTime"], pushing["FinishReason"]) == ("PUSHING", 0, "")
    assert pushing["PushStartTime"] == int(clock())

    clock.advance(3)
    await call(sdk, "StopWhiteboardPush", DESCRIBE_PUSH)
    stopped = await call(sdk, "DescribeWhiteboardPush", DESCRIBE_PUSH)
    assert (stopped["Status"], stopped["FinishReason"], stopped["PushStopTime"]) == (
        "STOPPED",
        "USER_CALL",
        int(clock()),
    )

    error = await sdk_error(sdk, "StopWhiteboardPush", DESCRIBE_PUSH)
    assert error.code == "UnsupportedOperation.TaskHasAlreadyStopped"
    assert error.requestId


async def test_video_queued_then_processing_then_finished(sdk: TiwClient, clock: VirtualClock) -> None:
    query = {"SdkAppId": 1400000001, "TaskId": "00e1jv8ve0jcqk7da9lb"}
    queued = await call(sdk, "DescribeVideoGenerationTask", query)
    assert (queued["Status"], queued["VideoInfoList"], queued["TotalTime"]) == ("QUEUED", [], 0)

    clock.advance(QUEUE_SECONDS)
    assert (await call(sdk, "DescribeVideoGenerationTask", query))["Status"] == "PROCESSING"

    clock.advance(PROCESS_SECONDS)
    done = await call(sdk, "DescribeVideoGenerationTask", query)
    assert (done["Status"], done["Progress"], done["TotalTime"], done["GroupId"], done["RoomId"]) == (
        "FINISHED",
        100,
        156750,
        "900822",
        900822,
    )
    [video] = done["VideoInfoList"]
    assert video["VideoId"] == "5285890792776509100" and video["VideoType"] == 2 and video["Width"] == 1024


async def test_added_tasks_follow_the_same_lifecycle(
    emulator: Emulator, sdk: TiwClient, clock: VirtualClock
) -> None:
    push_id = emulator.add_push_task(sdk_app_id=1400000002, room_id=42)
    video_id = emulator.add_video_task("my-video-task", sdk_app_id=1400000002)
    clock.advance(QUEUE_SECONDS + PROCESS_SECONDS)
    push = await call(sdk, "DescribeWhiteboardPush", {"SdkAppId": 1400000002, "TaskId": push_id})
    assert (push["Status"], push["RoomId"], len(push_id)) == ("PUSHING", 42, 20)
    video = await call(sdk, "DescribeVideoGenerationTask", {"SdkAppId": 1400000002, "TaskId": video_id})
    assert video["Status"] == "FINISHED" and len(video["VideoInfoList"]) == 1


# --- tasks with chosen times, and their record of changes ---

STATUS_PARAMS = {
    "snapshot": ("DescribeSnapshotTask", "TaskID"),
    "push": ("DescribeWhiteboardPush", "TaskId"),
    "video": ("DescribeVideoGenerationTask", "TaskId"),
}


async def status_of(sdk: TiwClient, kind: str, task_id: str, sdk_app_id: int = 1400000001) -> str:
    action, id_field = STATUS_PARAMS[kind]
    status: str = (await call(sdk, action, {"SdkAppId": sdk_app_id, id_field: task_id}))["Status"]
    return status


def changes_of(document: dict[str, Any], task_id: str) -> list[list[Any]]:
    [task] = [t for t in document["Tasks"] if t["TaskId"] == task_id]
    changes: list[list[Any]] = task["Changes"]
    return changes


async def test_tasks_with_chosen_times_change_state_when_their_record_says(
    emulator: Emulator, sdk: TiwClient, clock: VirtualClock, http: aiohttp.ClientSession
) -> None:
    """What a caller sees at each moment is the state the record says the task entered last."""
    t0 = clock()
    base = f"{emulator.url}/_emulator/tasks"
    bodies = {
        "snapshot": {"Kind": "snapshot", "SdkAppId": 1400000001, "RunSeconds": 2.5},
        "push": {"Kind": "push", "PrepareSeconds": 1, "PushSeconds": 3.5},
        "video": {"Kind": "video", "QueueSeconds": 0.5, "ProcessSeconds": 4},
    }
    ids = {}
    for kind, body in bodies.items():
        async with http.post(base, json=body) as response:
            assert response.status == 200
            ids[kind] = (await response.json())["TaskId"]
    async with http.get(base) as response:
        record = await response.json()
    assert record["Now"] == t0
    expected: dict[str, list[list[Any]]] = {
        "snapshot": [[t0, "Running"], [t0 + 2.5, "Finished"]],
        "push": [[t0, "PREPARED"], [t0 + 1, "PUSHING"], [t0 + 4.5, "STOPPED"]],
        "video": [[t0, "QUEUED"], [t0 + 0.5, "PROCESSING"], [t0 + 4.5, "FINISHED"]],
    }
    assert {kind: changes_of(record, ids[kind]) for kind in ids} == expected
    async with http.get(base, params={"kind": "video"}) as response:
        assert {t["Kind"] for t in (await response.json())["Tasks"]} == {"video"}

    # Just before and at every recorded change, the answer is the state before and the state after.
    for kind, changes in expected.items():
        for (at, state), (_, previous) in zip(changes[1:], changes, strict=False):
            clock.set(at - 0.01)
            assert await status_of(sdk, kind, ids[kind]) == previous, (kind, at)
            clock.set(at)
            assert await status_of(sdk, kind, ids[kind]) == state, (kind, at)
    # A push that stopped by itself is TIW's idle-room stop, and cannot be stopped again.
    query = {"SdkAppId": 1400000001, "TaskId": ids["push"]}
    clock.set(t0 + 10)
    stopped = await call(sdk, "DescribeWhiteboardPush", query)
    assert (stopped["FinishReason"], stopped["PushStopTime"]) == ("AUTO", int(t0 + 4.5))
    error = await sdk_error(sdk, "StopWhiteboardPush", query)
    assert error.code == "UnsupportedOperation.TaskHasAlreadyStopped"


async def test_a_stop_call_is_recorded_and_a_stop_before_pushing_skips_pushing(
    emulator: Emulator, sdk: TiwClient, clock: VirtualClock
) -> None:
    t0 = clock()
    early = emulator.add_push_task(prepare_seconds=5, push_seconds=10)
    late = emulator.add_push_task(prepare_seconds=1, push_seconds=10)
    clock.advance(2)
    for task_id in (early, late):
        await call(sdk, "StopWhiteboardPush", {"SdkAppId": 1400000001, "TaskId": task_id})
    records = {r.task_id: r.changes for r in emulator.task_records()}
    assert records[early] == [(t0, "PREPARED"), (t0 + 2, "STOPPED")]
    assert records[late] == [(t0, "PREPARED"), (t0 + 1, "PUSHING"), (t0 + 2, "STOPPED")]
    assert await status_of(sdk, "push", late) == "STOPPED"
    clock.advance(20)  # the scheduled stop, later than the call's, changes nothing
    described = await call(sdk, "DescribeWhiteboardPush", {"SdkAppId": 1400000001, "TaskId": late})
    assert (described["FinishReason"], described["PushStopTime"]) == ("USER_CALL", int(t0 + 2))


async def test_zero_durations_record_only_the_states_a_caller_can_see(emulator: Emulator) -> None:
    t0 = emulator.config.clock()
    snapshot = emulator.add_snapshot_task(run_seconds=0)
    video = emulator.add_video_task(queue_seconds=0, process_seconds=3)
    records = {r.task_id: (r.kind, r.changes) for r in emulator.task_records()}
    assert records[snapshot] == ("snapshot", [(t0, "Finished")])
    assert records[video] == ("video", [(t0, "PROCESSING"), (t0 + 3, "FINISHED")])
    # Seeded and created tasks are in the record too: the documented stopped push, as documented.
    assert records["g42lfmu5uc3lpoqrqvvb"] == (
        "push",
        [(1610591726, "PUSHING"), (1610591759, "STOPPED")],
    )


@pytest.mark.parametrize(
    "body",
    [
        {"Kind": "snapshot", "RunSeconds": -1},
        {"Kind": "snapshot", "RoomId": 7},  # a snapshot task has no room
        {"Kind": "push", "RunSeconds": 1},
        {"Kind": "push", "PushSeconds": True},
        {"Kind": "video", "QueueSeconds": "1"},
        {"Kind": "film"},
    ],
)
async def test_admin_task_fields_are_checked(
    emulator: Emulator, http: aiohttp.ClientSession, body: dict[str, Any]
) -> None:
    async with http.post(f"{emulator.url}/_emulator/tasks", json=body) as response:
        assert response.status == 400
        assert (await response.json())["error"]


# --- errors, as the official SDK sees them ---


@pytest.mark.parametrize(
    ("action", "params"),
    [
        ("DescribeSnapshotTask", {"SdkAppId": 1400127230, "TaskID": "no-such-task"}),
        ("DescribeWhiteboardPush", {"SdkAppId": 1400000001, "TaskId": "no-such-task"}),
        ("StopWhiteboardPush", {"SdkAppId": 1400000001, "TaskId": "no-such-task"}),
        ("DescribeVideoGenerationTask", {"SdkAppId": 1400000001, "TaskId": "no-such-task"}),
        ("DescribeWhiteboardPush", {"SdkAppId": 1400000002, "TaskId": "ghucnligqtgtvk2624mb"}),
    ],
)
async def test_unknown_task(sdk: TiwClient, action: str, params: dict[str, Any]) -> None:
    assert (await sdk_error(sdk, action, params)).code == "InvalidParameter.TaskNotFound"


async def test_bad_secret_key_and_unknown_secret_id(emulator: Emulator) -> None:
    wrong_key = sdk_client(emulator, secret_key="not-the-demo-key")
    assert (await sdk_error(wrong_key, "DescribeWhiteboardPush", DESCRIBE_PUSH)).code == (
        "AuthFailure.SignatureFailure"
    )
    unknown_id = sdk_client(emulator, secret_id="AKIDsomebodyElse")
    assert (await sdk_error(unknown_id, "DescribeWhiteboardPush", DESCRIBE_PUSH)).code == (
        "AuthFailure.SecretIdNotFound"
    )
    assert emulator.stats()["DescribeWhiteboardPush"].rejected == 2


@pytest.mark.parametrize("skew", [-301, 301])
async def test_clock_skew_beyond_five_minutes_expires_the_signature(
    sdk: TiwClient, clock: VirtualClock, skew: int
) -> None:
    clock.set(clock() + skew)  # the SDK signs with the real time; the emulator's clock is now 5 min off
    assert (
        await sdk_error(sdk, "DescribeWhiteboardPush", DESCRIBE_PUSH)
    ).code == "AuthFailure.SignatureExpire"


async def test_old_timestamp_signed_by_hand_expires(emulator: Emulator, http: aiohttp.ClientSession) -> None:
    old = int(emulator.config.clock()) - 600
    _, _, document = await post(http, emulator, "DescribeWhiteboardPush", DESCRIBE_PUSH, timestamp=old)
    assert error_code(document) == "AuthFailure.SignatureExpire"


async def test_wrong_types_missing_and_unknown_parameters_via_the_sdk(sdk: TiwClient) -> None:
    assert (
        await sdk_error(sdk, "DescribeWhiteboardPush", {**DESCRIBE_PUSH, "SdkAppId": "1400000001"})
    ).code == ("InvalidParameter.BodyParameterTypeUnmatched")
    assert (await sdk_error(sdk, "StopWhiteboardPush", {"SdkAppId": 1400000001})).code == "MissingParameter"
    request = models.DescribeVideoGenerationTaskRequest()
    request.from_json_string(json.dumps(DESCRIBE_VIDEO))
    request._Colour = "blue"  # the SDK serializes every attribute: a parameter TIW does not know
    with pytest.raises(TencentCloudSDKException) as caught:
        await asyncio.to_thread(sdk.DescribeVideoGenerationTask, request)
    assert caught.value.code == "UnknownParameter"


WHITEBOARD = {"Width": 1280, "Height": 720}
TYPE = "InvalidParameter.BodyParameterTypeUnmatched"


@pytest.mark.parametrize(
    ("action", "body", "code"),
    [
        ("DescribeWhiteboardPush", b'{"SdkAppId": 1400000001.0, "TaskId": "x"}', TYPE),
        ("DescribeWhiteboardPush", b'{"SdkAppId": true, "TaskId": "x"}', TYPE),
        ("DescribeWhiteboardPush", b'{"SdkAppId": 1400000001, "TaskId": 7}', TYPE),
        ("DescribeWhiteboardPush", b'{"SdkAppId": 1400000001, "TaskId": null}', TYPE),
        ("DescribeSnapshotTask", b'{"SdkAppId": -1, "TaskID": "x"}', TYPE),
        ("DescribeSnapshotTask", b'{"SdkAppId": 18446744073709551616, "TaskID": "x"}', TYPE),
        ("CreateSnapshotTask", {"SdkAppId": 1, "RoomId": 1, "Whiteboard": {"Width": "1280"}}, TYPE),
        ("CreateSnapshotTask", {"SdkAppId": 1, "RoomId": 1, "Whiteboard": []}, TYPE),
        (
            "CreateSnapshotTask",
            {
                "SdkAppId": 1,
                "RoomId": 1,
                "Whiteboard": WHITEBOARD,
                "COS": {"Uin": 1.5, "Region": "r", "Bucket": "b"},
            },
            TYPE,
        ),
        ("CreateSnapshotTask", {"SdkAppId": 1, "RoomId": 1}, "MissingParameter"),
        (
            "CreateSnapshotTask",
            {"SdkAppId": 1, "RoomId": 1, "Whiteboard": WHITEBOARD, "COS": {"Uin": 1, "Region": "r"}},
            "MissingParameter",
        ),
        ("CreateSnapshotTask", {"SdkAppId": 1, "RoomId": 1, "Whiteboard": {"Depth": 3}}, "UnknownParameter"),
        ("DescribeSnapshotTask", {"SdkAppId": 1, "TaskId": "x"}, "UnknownParameter"),  # it is `TaskID` here
        ("DescribeSnapshotTask", b"[1, 2]", "InvalidParameter"),
        ("DescribeSnapshotTask", b"{not json", "InvalidParameter"),
        (
            "CreateSnapshotTask",
            {"SdkAppId": UNAUTHORIZED_APP, "RoomId": 1, "Whiteboard": {}},
            "UnauthorizedOperation.SdkAppId",
        ),
    ],
)
async def test_parameter_checks(
    emulator: Emulator, http: aiohttp.ClientSession, action: str, body: bytes | dict[str, Any], code: str
) -> None:
    status, _, document = await post(http, emulator, action, body)
    assert status == 200
    assert error_code(document) == code
    assert emulator.stats()[action].tasks_created == 0


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"X-TC-Action": "DescribeEverything"}, "InvalidAction"),
        ({"X-TC-Action": ""}, "MissingParameter"),
        ({"X-TC-Version": "2020-01-01"}, "NoSuchVersion"),
        ({"X-TC-Region": ""}, "MissingParameter"),
        ({"Authorization": "TC3-HMAC-SHA256 nonsense"}, "AuthFailure.InvalidAuthorization"),
    ],
)
async def test_common_parameter_checks(
    emulator: Emulator, http: aiohttp.ClientSession, overrides: dict[str, str], code: str
) -> None:
    _, _, document = await post(http, emulator, "DescribeWhiteboardPush", DESCRIBE_PUSH, overrides=overrides)
    assert error_code(document) == code


async def test_envelopes_are_tiw_shaped(emulator: Emulator, http: aiohttp.ClientSession) -> None:
    status, content_type, ok = await post(http, emulator, "DescribeWhiteboardPush", DESCRIBE_PUSH)
    # Exactly application/json: the SDK skips error parsing for any other content type.
    assert (status, content_type) == (200, "application/json")
    assert set(ok) == {"Response"} and uuid.UUID(ok["Response"]["RequestId"])
    status, content_type, failed = await post(http, emulator, "DescribeWhiteboardPush", {"SdkAppId": 1})
    assert (status, content_type) == (200, "application/json")
    assert set(failed["Response"]) == {"Error", "RequestId"}
    assert set(failed["Response"]["Error"]) == {"Code", "Message"}


async def test_signed_action_form_is_accepted(emulator: Emulator, http: aiohttp.ClientSession) -> None:
    _, _, document = await post(http, emulator, "DescribeWhiteboardPush", DESCRIBE_PUSH, sign_action=True)
    assert document["Response"]["Status"] == "PREPARED"


# --- the rate limit ---


async def test_rate_limit_with_a_frozen_clock_is_exact(emulator: Emulator, sdk: TiwClient) -> None:
    codes = []
    for _ in range(21):
        try:
            await call(sdk, "DescribeWhiteboardPush", DESCRIBE_PUSH)
            codes.append("ok")
        except TencentCloudSDKException as error:
            codes.append(error.code)
    assert codes == ["ok"] * 20 + ["RequestLimitExceeded"]
    stats = emulator.stats()["DescribeWhiteboardPush"]
    assert (stats.accepted, stats.throttled, stats.max_in_window) == (20, 1, 20)
    # Per action: another action still has its whole budget.
    await call(sdk, "DescribeVideoGenerationTask", DESCRIBE_VIDEO)


async def test_rate_limit_in_real_time(http: aiohttp.ClientSession) -> None:
    async with Emulator(EmulatorConfig()) as emulator:
        client = sdk_client(emulator)
        results = await asyncio.gather(
            *(call(client, "DescribeWhiteboardPush", DESCRIBE_PUSH) for _ in range(21)),
            return_exceptions=True,
        )
        codes = [r.code for r in results if isinstance(r, TencentCloudSDKException)]
        assert "RequestLimitExceeded" in codes and set(codes) == {"RequestLimitExceeded"}
        stats = emulator.stats()["DescribeWhiteboardPush"]
        assert stats.accepted + stats.throttled == 21
        assert stats.max_in_window <= 20
        assert max_in_any_window(emulator.arrivals("DescribeWhiteboardPush")) <= 20
        async with http.get(f"{emulator.url}/_emulator/stats") as response:
            served = (await response.json())["actions"]["DescribeWhiteboardPush"]
        assert served["throttled"] == stats.throttled and served["max_in_window"] <= 20


async def test_window_slides(emulator: Emulator, sdk: TiwClient, clock: VirtualClock) -> None:
    for _ in range(20):
        await call(sdk, "DescribeWhiteboardPush", DESCRIBE_PUSH)
    clock.advance(0.75)  # binary fractions: the sums below are exact
    assert (await sdk_error(sdk, "DescribeWhiteboardPush", DESCRIBE_PUSH)).code == "RequestLimitExceeded"
    clock.advance(0.25)  # the first 20 are now exactly one second old: out of the window
    await call(sdk, "DescribeWhiteboardPush", DESCRIBE_PUSH)


@settings(max_examples=300, deadline=None)
@given(
    gaps=st.lists(st.sampled_from([0.0, 0.001, 0.01, 0.05, 0.25, 0.5, 0.999, 1.0, 1.5]), max_size=80),
    limit=st.integers(1, 6),
)
def test_limiter_never_exceeds_the_limit_and_throttles_only_when_full(gaps: list[float], limit: int) -> None:
    traffic = ActionTraffic(limit, 1.0, history=1000)
    now, accepted = 1_700_000_000.0, []
    for gap in gaps:
        now += gap
        if traffic.admit(now):
            accepted.append(now)
        else:  # throttled only when `limit` accepted arrivals are in (now - 1, now]
            assert sum(1 for t in accepted if now - 1.0 < t <= now) == limit
    assert max_in_any_window(accepted) <= limit
    assert traffic.max_in_window == max_in_any_window(accepted)
    assert (traffic.accepted, traffic.throttled) == (len(accepted), len(gaps) - len(accepted))


# --- faults ---


async def test_latency_delays_an_executed_answer(emulator: Emulator, sdk: TiwClient) -> None:
    emulator.add_fault(Fault(FaultKind.LATENCY, action="CreateSnapshotTask", delay=0.3, count=1))
    started = time.monotonic()
    await call(sdk, "CreateSnapshotTask", CREATE_SNAPSHOT)
    assert time.monotonic() - started >= 0.3
    assert emulator.faults() == []  # count=1: used up
    await call(sdk, "CreateSnapshotTask", CREATE_SNAPSHOT)
    assert emulator.stats()["CreateSnapshotTask"].tasks_created == 2


async def test_latency_past_the_client_timeout_is_a_read_timeout_after_execution(
    emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    emulator.add_fault(Fault(FaultKind.LATENCY, action="CreateSnapshotTask", delay=60))
    pending = asyncio.create_task(post(http, emulator, "CreateSnapshotTask", CREATE_SNAPSHOT))
    await eventually(lambda: emulator.stats()["CreateSnapshotTask"].tasks_created == 1)
    assert not pending.done()
    # The task exists, and the caller is still waiting for the answer: its timeout fires now.
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(pending, 0.1)


async def test_stop_cuts_injected_latency_short(clock: VirtualClock, http: aiohttp.ClientSession) -> None:
    emulator = Emulator(EmulatorConfig(clock=clock))
    await emulator.start()
    emulator.add_fault(Fault(FaultKind.LATENCY, delay=60))
    pending = asyncio.create_task(post(http, emulator, "DescribeWhiteboardPush", DESCRIBE_PUSH))
    await eventually(lambda: emulator.stats()["DescribeWhiteboardPush"].accepted == 1)
    async with asyncio.timeout(30):  # a hang guard, not a window: the injected latency is 60 s
        await emulator.stop()
    pending.cancel()
    with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
        await pending


async def test_drop_executes_then_loses_the_answer(emulator: Emulator, sdk: TiwClient) -> None:
    emulator.add_fault(Fault(FaultKind.DROP, action="StopWhiteboardPush", count=1))
    assert (await sdk_error(sdk, "StopWhiteboardPush", STOP_PUSH)).code == "ClientNetworkError"
    # It was executed: the retry meets a task that has already stopped.
    assert (await sdk_error(sdk, "StopWhiteboardPush", STOP_PUSH)).code == (
        "UnsupportedOperation.TaskHasAlreadyStopped"
    )


@pytest.mark.parametrize(
    ("fault", "sdk_code"),
    [
        (Fault(FaultKind.HTTP_STATUS, status=502), "ServerNetworkError"),
        (Fault(FaultKind.MALFORMED), "JSONDecodeError"),
        (Fault(FaultKind.ERROR_CODE, code="InternalError"), "InternalError"),
        (
            Fault(FaultKind.ERROR_CODE, code="ResourceUnavailable.ServiceExpired", message="expired"),
            "ResourceUnavailable.ServiceExpired",
        ),
    ],
)
async def test_answer_faults_are_not_executed(
    emulator: Emulator, sdk: TiwClient, fault: Fault, sdk_code: str
) -> None:
    emulator.add_fault(fault)  # every action, until cleared
    for _ in range(2):
        assert (await sdk_error(sdk, "CreateSnapshotTask", CREATE_SNAPSHOT)).code == sdk_code
    stats = emulator.stats()["CreateSnapshotTask"]
    assert (stats.tasks_created, stats.accepted, stats.faulted) == (0, 0, 2)
    emulator.clear_faults()
    await call(sdk, "CreateSnapshotTask", CREATE_SNAPSHOT)


async def test_http_status_fault_body_is_not_json(emulator: Emulator, http: aiohttp.ClientSession) -> None:
    emulator.add_fault(Fault(FaultKind.HTTP_STATUS, status=503, count=1))
    async with http.post(
        emulator.url + "/", data=b"{}", headers={"X-TC-Action": "DescribeWhiteboardPush"}
    ) as r:
        assert r.status == 503
        with pytest.raises(json.JSONDecodeError):
            json.loads(await r.text())


async def test_faults_apply_per_action_and_count_down(emulator: Emulator, sdk: TiwClient) -> None:
    emulator.add_fault(
        Fault(FaultKind.ERROR_CODE, action="DescribeWhiteboardPush", count=2, code="RequestLimitExceeded")
    )
    await call(sdk, "DescribeVideoGenerationTask", DESCRIBE_VIDEO)  # another action: unaffected
    for _ in range(2):
        assert (await sdk_error(sdk, "DescribeWhiteboardPush", DESCRIBE_PUSH)).code == "RequestLimitExceeded"
    await call(sdk, "DescribeWhiteboardPush", DESCRIBE_PUSH)


async def test_admin_endpoints(emulator: Emulator, sdk: TiwClient, http: aiohttp.ClientSession) -> None:
    base = f"{emulator.url}/_emulator"
    fault = {"kind": "error_code", "action": "DescribeWhiteboardPush", "count": 1, "code": "InternalError"}
    async with http.post(f"{base}/faults", json=fault) as response:
        assert response.status == 200
        assert (await response.json())["faults"][0]["code"] == "InternalError"
    assert (await sdk_error(sdk, "DescribeWhiteboardPush", DESCRIBE_PUSH)).code == "InternalError"

    async with http.post(f"{base}/faults", json={"kind": "latency", "delay": 5}) as response:
        assert response.status == 200
    async with http.delete(f"{base}/faults") as response:
        assert (await response.json()) == {"faults": []}
    for bad in ({"kind": "explode"}, {"kind": "latency", "count": 0}, {"kind": "drop", "colour": 1}, [1]):
        async with http.post(f"{base}/faults", json=bad) as response:
            assert response.status == 400

    async with http.post(
        f"{base}/tasks", json={"Kind": "push", "TaskId": "admin-push", "RoomId": 7}
    ) as response:
        assert (await response.json()) == {"TaskId": "admin-push"}
    push = await call(sdk, "DescribeWhiteboardPush", {"SdkAppId": 1400000001, "TaskId": "admin-push"})
    assert push["RoomId"] == 7
    async with http.post(f"{base}/tasks", json={"Kind": "video", "SdkAppId": "1"}) as response:
        assert response.status == 400

    # Unsigned and never rate limited: far more admin calls than the limit allows TIW calls.
    for _ in range(30):
        async with http.get(f"{base}/stats") as response:
            assert response.status == 200
            stats = (await response.json())["actions"]["DescribeWhiteboardPush"]
    assert (stats["faulted"], stats["accepted"], stats["throttled"]) == (1, 1, 0)

    async with http.post(f"{base}/reset") as response:
        assert response.status == 200
    assert emulator.stats()["DescribeWhiteboardPush"].accepted == 0
    assert (
        await sdk_error(sdk, "DescribeWhiteboardPush", {"SdkAppId": 1400000001, "TaskId": "admin-push"})
    ).code == "InvalidParameter.TaskNotFound"


async def test_reset_makes_a_second_run_of_a_client_pass(
    emulator: Emulator, sdk: TiwClient, http: aiohttp.ClientSession
) -> None:
    """What the example clients' recipe relies on: their run stops a seeded push and creates a task;
    after `POST /_emulator/reset` the push can be stopped again and the created task is gone."""
    created = await call(sdk, "CreateSnapshotTask", CREATE_SNAPSHOT)
    await call(sdk, "StopWhiteboardPush", STOP_PUSH)
    again = await sdk_error(sdk, "StopWhiteboardPush", STOP_PUSH)
    assert (again.code, again.message) == (
        "UnsupportedOperation.TaskHasAlreadyStopped",
        "The task `07b4c70bpafm1b4majmb` has already stopped.",
    )
    async with http.post(f"{emulator.url}/_emulator/reset") as response:
        assert (response.status, await response.json()) == (200, {"reset": True})

    await call(sdk, "StopWhiteboardPush", STOP_PUSH)  # seeded afresh: it stops once more
    gone = {"SdkAppId": CREATE_SNAPSHOT["SdkAppId"], "TaskID": created["TaskID"]}
    assert (await sdk_error(sdk, "DescribeSnapshotTask", gone)).code == "InvalidParameter.TaskNotFound"
    async with http.get(f"{emulator.url}/_emulator/tasks?kind=snapshot") as response:
        snapshots = [task["TaskId"] for task in (await response.json())["Tasks"]]
    assert snapshots == [DESCRIBE_SNAPSHOT["TaskID"]]  # the documented example alone
    assert emulator.stats()["CreateSnapshotTask"].tasks_created == 0


async def test_start_twice_is_refused_and_stop_is_idempotent(emulator: Emulator) -> None:
    with pytest.raises(RuntimeError):
        await emulator.start()
    await emulator.stop()
    await emulator.stop()


def test_config_repr_hides_secrets() -> None:
    assert DEMO_SECRET_KEY not in repr(EmulatorConfig())
