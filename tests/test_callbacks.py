"""callbacks.py: TIW's Sign (the documented example), what ``verify`` accepts and refuses and why,
and the keys: both sources, a rotation through the key file, a malformed version kept out."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
from support.callbacks import DROP, signed_body
from support.facade import facade_environment
from support.waiting import wait_until
from tiw_facade import logs, settings
from tiw_facade.callbacks import (
    CallbackKeys,
    KeyFileError,
    Refusal,
    Refused,
    sign,
    verify,
)
from tiw_facade.events import Event
from tiw_facade.metrics import CALLBACK_RESULTS, Metrics

APP = 1400000001
KEY = "Xz4ZgayTr7rMgWQrH"
NOW = 1_700_000_000.0
EXPIRY = int(NOW) + 300
MAX_AHEAD = 86400.0


def body(kind: str = "push", *, key: str = KEY, expire_time: int = EXPIRY, **overrides: Any) -> bytes:
    return signed_body(kind, sdk_app_id=APP, key=key, expire_time=expire_time, timestamp=1234, **overrides)


def check(data: bytes, keys: CallbackKeys | None = None, kind: str = "push", now: float = NOW) -> Event:
    return verify(
        data, kind, keys or CallbackKeys([(APP, KEY)]), now=now, max_ahead=MAX_AHEAD, received_at=now
    )


def refusal(data: bytes, keys: CallbackKeys | None = None, now: float = NOW) -> Refused:
    with pytest.raises(Refused) as caught:
        check(data, keys, now=now)
    assert KEY not in caught.value.detail and KEY not in str(caught.value)
    return caught.value


def test_the_documented_sign_example() -> None:
    assert sign("Xz4ZgayTr7rMgWQrH", "1588040109") == "a2dabb362a9b811c0e26953a6276a41c"
    data = signed_body("push", sdk_app_id=APP, key=KEY, expire_time=1588040109)
    assert json.loads(data)["Sign"] == "a2dabb362a9b811c0e26953a6276a41c"  # the tests' helper agrees
    assert check(data, now=1588040000.0)


def test_the_refusals_are_the_metric_results_but_accepted_and_replayed() -> None:
    assert sorted(Refusal) == sorted(set(CALLBACK_RESULTS) - {"accepted", "replayed"})


@pytest.mark.parametrize(("kind", "field"), [("push", "TaskId"), ("snapshot", "TaskID"), ("video", "TaskId")])
def test_a_signed_callback_is_its_event_with_the_body_as_received(kind: str, field: str) -> None:
    data = body(kind, task_id="t-9")
    assert field in json.loads(data)["EventData"]
    spaced = data.replace(b",", b" ,\n ")  # exactly as received, whitespace and all
    event = verify(
        spaced, kind, CallbackKeys([(APP, KEY)]), now=NOW, max_ahead=MAX_AHEAD, received_at=NOW + 1
    )
    assert (event.kind, event.sdk_app_id, event.task_id, event.timestamp, event.expire_time) == (
        kind,
        APP,
        "t-9",
        1234,
        EXPIRY,
    )
    assert event.event_type == json.loads(data)["EventType"]
    assert event.body == spaced and event.received_at == NOW + 1 and event.cursor == ""


def test_no_event_data_or_timestamp_is_an_event_without_them() -> None:
    event = check(body(EventData=DROP, Timestamp=DROP))
    assert event.task_id == "" and event.timestamp == 0


def test_an_expire_time_spelled_as_digits_is_signed_as_spelled() -> None:
    spelled = f"0{EXPIRY}"
    assert check(body(ExpireTime=spelled, Sign=sign(KEY, spelled)))
    assert refusal(body(ExpireTime=spelled)).reason is Refusal.BAD_SIGN  # signed over the number's digits


def test_an_uppercase_sign_is_the_same_sign() -> None:
    assert check(body(Sign=sign(KEY, str(EXPIRY)).upper()))


@pytest.mark.parametrize(
    "data",
    [b"", b"not json", b"\xff\xfe{}", b"[1, 2]", b'"text"', b"null", b"[" * 100_000, b'{"SdkAppId": NaN}'],
)
def test_what_is_not_a_json_object_is_bad_json(data: bytes) -> None:
    assert refusal(data).reason is Refusal.BAD_JSON


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"SdkAppId": DROP}, "SdkAppId"),
        ({"SdkAppId": str(APP)}, "SdkAppId"),
        ({"SdkAppId": True}, "SdkAppId"),
        ({"SdkAppId": float(APP)}, "SdkAppId"),
        ({"ExpireTime": DROP}, "ExpireTime"),
        ({"ExpireTime": float(EXPIRY)}, "ExpireTime"),
        ({"ExpireTime": "17e8"}, "ExpireTime"),
        ({"ExpireTime": "١٢٣"}, "ExpireTime"),  # digits, but not ASCII ones
        ({"ExpireTime": None}, "ExpireTime"),
        ({"Sign": DROP}, "Sign"),
        ({"Sign": 12}, "Sign"),
        ({"EventType": DROP}, "EventType"),
        ({"EventType": ""}, "EventType"),
        ({"EventType": ["WhiteboardPushStarted"]}, "EventType"),
        ({"Timestamp": "soon"}, "Timestamp"),
        ({"EventData": "TaskId=1"}, "EventData"),
        ({"EventData": {"TaskId": 7}}, "EventData.TaskId"),
    ],
)
def test_a_missing_or_ill_typed_field_is_bad_fields_naming_it(overrides: dict[str, Any], named: str) -> None:
    refused = refusal(body(**overrides))
    assert refused.reason is Refusal.BAD_FIELDS
    assert refused.detail.startswith(named + " ")


def test_a_sdk_app_id_without_a_key_is_unknown_app() -> None:
    refused = refusal(signed_body("push", sdk_app_id=APP + 1, key=KEY, expire_time=EXPIRY))
    assert (refused.reason, refused.sdk_app_id) == (Refusal.UNKNOWN_APP, APP + 1)


@pytest.mark.parametrize(
    "sign_value", ["0" * 32, sign("another-key", str(EXPIRY)), sign(KEY, str(EXPIRY + 1)), "", "签名" * 16]
)
def test_a_sign_of_no_key_is_bad_sign(sign_value: str) -> None:
    refused = refusal(body(Sign=sign_value))
    assert (refused.reason, refused.sdk_app_id) == (Refusal.BAD_SIGN, APP)
    assert sign_value not in refused.detail or not sign_value


def test_expiry_is_checked_after_the_sign() -> None:
    assert refusal(body(expire_time=int(NOW) - 1)).reason is Refusal.EXPIRED
    assert check(body(expire_time=int(NOW)))  # until its second has passed
    assert refusal(body(expire_time=int(NOW) - 1, key="forged")).reason is Refusal.BAD_SIGN


def test_an_expire_time_further_ahead_than_allowed_is_too_far_ahead() -> None:
    assert check(body(expire_time=int(NOW + MAX_AHEAD)))
    assert refusal(body(expire_time=int(NOW + MAX_AHEAD) + 1)).reason is Refusal.TOO_FAR_AHEAD
    assert refusal(body(expire_time=10**30)).reason is Refusal.TOO_FAR_AHEAD


def test_every_key_named_for_an_app_is_accepted() -> None:
    keys = CallbackKeys([(APP, KEY), (APP, "the-new-key"), (APP + 1, "other"), (APP, KEY)])
    assert keys.keys_for(APP) == (KEY, "the-new-key")
    assert keys.keys_for(APP + 2) == ()
    assert check(body(), keys) and check(body(key="the-new-key"), keys)
    assert refusal(body(key="other"), keys).reason is Refusal.BAD_SIGN


async def test_from_settings_takes_the_pairs_and_the_file(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"{APP}=from-the-file\n")
    config = settings.load(facade_environment("http://127.0.0.1:9", TIW_CALLBACK_KEYS=f"{APP}={KEY}"))
    assert CallbackKeys.from_settings(config).keys_for(APP) == (KEY,)
    config = settings.load(
        facade_environment(
            "http://127.0.0.1:9", TIW_CALLBACK_KEYS=f"{APP}={KEY}", TIW_CALLBACK_KEY_FILE=str(path)
        )
    )
    keys = CallbackKeys.from_settings(config)
    await keys.start()
    try:
        assert keys.keys_for(APP) == (KEY, "from-the-file")
    finally:
        await keys.aclose()


# --- the key file ---------------------------------------------------------------------------------------


def publish(path: Path, text: str) -> None:
    """A new version as a Secret volume makes one: a new file renamed over the old."""
    fresh = path.with_suffix(".new")
    fresh.write_text(text)
    os.replace(fresh, path)


async def started(path: Path, pairs: tuple[tuple[int, str], ...] = (), poll: float = 3600) -> CallbackKeys:
    keys = CallbackKeys(pairs, key_file=str(path), poll=poll)
    await keys.start()
    return keys


async def test_a_rotation_through_the_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# TIW's callback keys\n{APP}={KEY}\n")
    with caplog.at_level(logging.INFO, logger="tiw_facade.callbacks"):
        keys = await started(path, pairs=((APP + 1, "from-the-environment"),))
        try:
            assert check(body(), keys)
            publish(path, f"{APP}={KEY}\n{APP}=the-new-key\n")  # the new key added
            await keys.check_file()
            assert check(body(), keys) and check(body(key="the-new-key"), keys)
            publish(path, f"{APP}=the-new-key\n")  # the old one removed once TIW signs with the new
            await keys.check_file()
            assert refusal(body(), keys).reason is Refusal.BAD_SIGN
            assert check(body(key="the-new-key"), keys)
            assert keys.keys_for(APP + 1) == ("from-the-environment",)  # the other source stays
        finally:
            await keys.aclose()
    text = "\n".join(logs.JsonFormatter().format(record) for record in caplog.records)
    assert "callback key file changed" in text
    assert KEY not in text and "the-new-key" not in text and "from-the-environment" not in text


async def test_both_sources_name_one_app(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"{APP}=from-the-file, {APP}={KEY}")
    keys = await started(path, pairs=((APP, "from-the-environment"), (APP, KEY)))
    try:
        assert keys.keys_for(APP) == ("from-the-environment", KEY, "from-the-file")
    finally:
        await keys.aclose()


@pytest.mark.parametrize("broken", [f"{APP}:{KEY}-broken", f"{APP}=", "", "# nothing but a comment\n"])
async def test_a_malformed_version_keeps_the_last_good_keys_with_one_error_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, broken: str
) -> None:
    path = tmp_path / "keys"
    path.write_text(f"{APP}={KEY}\n")
    metrics = Metrics("test")
    keys = CallbackKeys(key_file=str(path), poll=3600.0, metrics=metrics)
    await keys.start()
    try:
        with caplog.at_level(logging.INFO, logger="tiw_facade.callbacks"):
            publish(path, broken)
            for _ in range(3):  # looked at again and again: one line, counted once
                await keys.check_file()
        assert keys.keys_for(APP) == (KEY,)
        assert metrics.registry.get_sample_value("tiw_callback_key_reload_failures_total") == 1
        (record,) = caplog.records
        assert record.levelno == logging.ERROR
        line = logs.JsonFormatter().format(record)
        assert str(path) in line and KEY not in line
        publish(path, f"{APP}=mended")
        await keys.check_file()
        assert keys.keys_for(APP) == ("mended",)
    finally:
        await keys.aclose()


async def test_a_key_file_unusable_at_start_is_fatal_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "absent"
    with pytest.raises(KeyFileError, match=str(missing)):
        await CallbackKeys(key_file=str(missing)).start()
    malformed = tmp_path / "malformed"
    malformed.write_text(f"{KEY}\n")
    with pytest.raises(KeyFileError, match=str(malformed)) as caught:
        await CallbackKeys(key_file=str(malformed)).start()
    assert KEY not in str(caught.value)


async def test_the_poll_finds_a_new_version_by_itself(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"{APP}={KEY}\n")
    keys = await started(path, poll=0.05)
    try:
        publish(path, f"{APP}=the-new-key\n")
        await wait_until(lambda: keys.keys_for(APP) == ("the-new-key",), within=5)
    finally:
        await keys.aclose()
