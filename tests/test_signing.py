"""TC3-HMAC-SHA256 signing: published vectors, the official SDK as oracle, and verification."""

from __future__ import annotations

import hashlib
import json
import string
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict
from tencentcloud.common import abstract_client
from tencentcloud.common.credential import Credential
from tencentcloud.common.http.request import RequestInternal
from tencentcloud.common.profile.client_profile import ClientProfile
from tencentcloud.common.profile.http_profile import HttpProfile
from tencentcloud.tiw.v20190919.tiw_client import TiwClient
from tiw_facade import signing
from tiw_facade.signing import Credentials, Signer, Verifier

TIW_BODY = b'{"SdkAppId":1400127230,"TaskID":"f2e1728c-6e87-4481-abe1-cde8542a5a10"}'
TIW_HOST = "tiw.tencentcloudapi.com"
TS = 1700000000
SECRET_ID = "AKIDEXAMPLE"
SECRET_KEY = "secretEXAMPLE"
DAY = 86400


# --- published vectors ---


def test_tiw_vector_intermediate_values() -> None:
    assert (
        signing.payload_hash(TIW_BODY) == "71a9c57b74926d2100a7013bd2d71c9765948d4e594636df8eaa182dd77cf636"
    )
    canonical = signing.canonical_request(TIW_HOST, signing.payload_hash(TIW_BODY))
    assert hashlib.sha256(canonical.encode()).hexdigest() == (
        "6c5879a6bdb20e800267a56e30867b4a5c95252556ec8962a550e4728b6e6967"
    )
    assert signing.utc_date(TS) == "2023-11-14"


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        (TIW_HOST, "bad16a604d8ccce19d50495abbbcf984e289e6cadcbcfd8a3de0f6b906efadce"),
        ("tiw.intl.tencentcloudapi.com", "cd304d1c95ccd0ee53e3de53786d194b3ff46a51c1deb3d78f26c82b77dc16a3"),
    ],
)
def test_tiw_vectors(host: str, expected: str) -> None:
    assert signing.sign(SECRET_KEY, host=host, body=TIW_BODY, timestamp=TS) == expected
    headers = Signer(Credentials(SECRET_ID, SECRET_KEY), host).headers("DescribeSnapshotTask", TIW_BODY, TS)
    assert headers["Authorization"] == (
        f"TC3-HMAC-SHA256 Credential={SECRET_ID}/2023-11-14/tiw/tc3_request, "
        f"SignedHeaders=content-type;host, Signature={expected}"
    )


def test_tencent_published_cvm_vector() -> None:
    body = rb'{"Limit": 1, "Filters": [{"Values": ["\u672a\u547d\u540d"], "Name": "instance-name"}]}'
    got = signing.sign(
        "Gu5t9xGARNpq86cd98joQYCN3EXAMPLE",
        host="cvm.tencentcloudapi.com",
        body=body,
        timestamp=1551113065,
        service="cvm",
        content_type="application/json; charset=utf-8",
    )
    assert got == "72e494ea809ad7a8c8f7a4507b9bddcbaa8e581f516e8da2f66e2c5a96525168"


# --- the official SDK as oracle ---

_SDK_CLIENT = TiwClient(
    Credential("AKIDplaceholder", "placeholder"), "", ClientProfile(httpProfile=HttpProfile())
)

# Clustered around UTC midnight, where the credential scope's date changes.
midnight_timestamps = st.builds(
    lambda day, offset: day * DAY + offset, st.integers(1, 60000), st.integers(-3, 3)
)
timestamps = st.one_of(midnight_timestamps, st.integers(1, 2**32))
secret_ids = st.text(string.ascii_letters + string.digits + "-_", min_size=1, max_size=40)
# The SDK refuses keys with surrounding whitespace; anything else, non-ASCII included, is fair.
secret_keys = st.text(min_size=1, max_size=64).filter(lambda key: key.strip() == key and key != "")
hosts = st.from_regex(
    r"[a-z0-9]([a-z0-9-]{0,15}[a-z0-9])?(\.[a-z0-9]{1,12}){0,3}(:[0-9]{1,5})?", fullmatch=True
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
params = st.dictionaries(st.text(min_size=1, max_size=12), json_values, max_size=5)
actions = st.sampled_from(
    [
        "CreateSnapshotTask",
        "DescribeSnapshotTask",
        "DescribeWhiteboardPush",
        "StopWhiteboardPush",
        "DescribeVideoGenerationTask",
    ]
)


def sdk_request(
    credential: Credential, host: str, *, region: str, language: str, action: str, body: Any, timestamp: int
) -> RequestInternal:
    """Let the SDK build and sign a whole request, as TiwClient.call would at ``timestamp``."""
    _SDK_CLIENT.credential = credential
    _SDK_CLIENT.region = region
    _SDK_CLIENT.profile.language = language
    _SDK_CLIENT.profile.httpProfile.endpoint = host
    request = RequestInternal(host, "POST", "/", header={})
    with mock.patch.object(abstract_client, "time", SimpleNamespace(time=lambda: timestamp)):
        _SDK_CLIENT._build_req_with_tc3_signature(action, body, request)
    return request


@pytest.mark.slow
@settings(max_examples=400, deadline=None)
@given(
    secret_id=secret_ids,
    secret_key=secret_keys,
    token=st.sampled_from(["", "a-session-token"]),
    host=hosts,
    region=st.sampled_from(["", "ap-guangzhou", "ap-singapore"]),
    language=st.sampled_from(["zh-CN", "en-US"]),
    action=actions,
    body=params,
    timestamp=timestamps,
)
def test_signer_matches_the_official_sdk_header_for_header(
    *,
    secret_id: str,
    secret_key: str,
    token: str,
    host: str,
    region: str,
    language: str,
    action: str,
    body: dict[str, Any],
    timestamp: int,
) -> None:
    request = sdk_request(
        Credential(secret_id, secret_key, token),
        host,
        region=region,
        language=language,
        action=action,
        body=body,
        timestamp=timestamp,
    )
    sent = request.data.encode("utf-8")  # the SDK's json.dumps (ASCII with \u escapes)
    signer = Signer(Credentials(secret_id, secret_key, token), host, region=region, language=language)

    ours = signer.headers(action, sent, timestamp)

    theirs = {name: value for name, value in request.header.items() if name != "X-TC-RequestClient"}
    assert ours == theirs
    assert Verifier({secret_id: secret_key}.get).verify(ours, sent, timestamp) is None


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(secret_key=secret_keys, host=hosts, text=st.text(), timestamp=timestamps)
def test_sign_matches_the_sdk_signature_of_raw_utf8_bodies(
    secret_key: str, host: str, text: str, timestamp: int
) -> None:
    # The SDK's signature function on a body that is not ASCII-escaped: its UTF-8 bytes are signed.
    body = json.dumps({"InitParams": text}, ensure_ascii=False)
    request = RequestInternal(
        host,
        "POST",
        "/",
        header={
            "Content-Type": "application/json",
            "Host": host,
            "X-TC-Timestamp": str(timestamp),
        },
        data=body,
    )
    date = signing.utc_date(timestamp)
    theirs = _SDK_CLIENT._get_tc3_signature({}, request, date, "tiw", secret_key)

    assert signing.sign(secret_key, host=host, body=body.encode("utf-8"), timestamp=timestamp) == theirs


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@given(st.lists(midnight_timestamps, min_size=2, max_size=8), secret_keys, st.binary(max_size=64))
def test_cached_day_key_never_outlives_its_day(ordered: list[int], secret_key: str, body: bytes) -> None:
    signer = Signer(Credentials(SECRET_ID, secret_key), TIW_HOST)
    for timestamp in ordered:  # back and forth across midnight with one signer
        expected = signing.sign(secret_key, host=TIW_HOST, body=body, timestamp=timestamp)
        assert signer.headers("DescribeSnapshotTask", body, timestamp)["Authorization"].endswith(expected)


# --- verification ---

LOOKUP = {SECRET_ID: SECRET_KEY}.get


def signed(timestamp: int = TS, *, sign_action: bool = False, **extra: str) -> dict[str, str]:
    signer = Signer(
        Credentials(SECRET_ID, SECRET_KEY), TIW_HOST, region="ap-guangzhou", sign_action=sign_action
    )
    headers = signer.headers("DescribeSnapshotTask", TIW_BODY, timestamp)
    headers.update(extra)
    return headers


@pytest.mark.parametrize("sign_action", [False, True])
def test_round_trip_is_valid_in_both_signed_header_forms(sign_action: bool) -> None:
    headers = signed(sign_action=sign_action)
    expected_form = "content-type;host;x-tc-action" if sign_action else "content-type;host"
    assert f"SignedHeaders={expected_form}," in headers["Authorization"]
    assert Verifier(LOOKUP).verify(headers, TIW_BODY, TS) is None


def test_verifier_accepts_the_sdk_request_through_a_case_insensitive_mapping() -> None:
    request = sdk_request(
        Credential(SECRET_ID, SECRET_KEY),
        TIW_HOST,
        region="ap-guangzhou",
        language="zh-CN",
        action="DescribeSnapshotTask",
        body={"SdkAppId": 1, "TaskID": "任务"},
        timestamp=TS,
    )
    lowered = CIMultiDict((name.lower(), value) for name, value in request.header.items())
    assert Verifier(LOOKUP).verify(lowered, request.data.encode(), TS + 12) is None


@pytest.mark.parametrize(
    ("tamper", "code"),
    [
        (lambda h, b: (h, b + b" "), signing.SIGNATURE_FAILURE),
        (lambda h, b: ({**h, "Host": "tiw.intl.tencentcloudapi.com"}, b), signing.SIGNATURE_FAILURE),
        (
            lambda h, b: ({**h, "Content-Type": "application/json; charset=utf-8"}, b),
            signing.SIGNATURE_FAILURE,
        ),
        (lambda h, b: ({**h, "X-TC-Timestamp": str(TS + 1)}, b), signing.SIGNATURE_FAILURE),
        (lambda h, b: ({**h, "X-TC-Timestamp": str(TS - 301)}, b), signing.SIGNATURE_EXPIRE),
        (lambda h, b: ({**h, "X-TC-Timestamp": "17e8"}, b), signing.INVALID_AUTHORIZATION),
        (
            lambda h, b: ({k: v for k, v in h.items() if k != "Authorization"}, b),
            signing.INVALID_AUTHORIZATION,
        ),
        (lambda h, b: ({**h, "Authorization": "Bearer abc"}, b), signing.INVALID_AUTHORIZATION),
        (
            lambda h, b: ({**h, "Authorization": h["Authorization"].replace("content-type;host", "host")}, b),
            signing.INVALID_AUTHORIZATION,
        ),
        (
            lambda h, b: ({**h, "Authorization": h["Authorization"].replace(SECRET_ID, "AKIDother")}, b),
            signing.SECRET_ID_NOT_FOUND,
        ),
        (
            lambda h, b: ({**h, "Authorization": h["Authorization"].replace("2023-11-14", "2023-11-15")}, b),
            signing.SIGNATURE_FAILURE,
        ),
        (
            lambda h, b: ({**h, "Authorization": h["Authorization"].replace("/tiw/", "/cvm/")}, b),
            signing.SIGNATURE_FAILURE,
        ),
    ],
)
def test_tampered_requests_are_rejected_with_tiw_codes(tamper: Any, code: str) -> None:
    headers, body = tamper(signed(), TIW_BODY)
    assert Verifier(LOOKUP).verify(headers, body, TS) == code


def test_wrong_secret_key_is_a_signature_failure() -> None:
    assert (
        Verifier({SECRET_ID: "not-the-key"}.get).verify(signed(), TIW_BODY, TS) == signing.SIGNATURE_FAILURE
    )


def test_signed_action_cannot_be_swapped_but_unsigned_can() -> None:
    verifier = Verifier(LOOKUP)
    assert verifier.verify(
        {**signed(sign_action=True), "X-TC-Action": "StopWhiteboardPush"}, TIW_BODY, TS
    ) == (signing.SIGNATURE_FAILURE)
    # Tencent's default form does not cover the action: that is why `sign_action` exists.
    assert verifier.verify({**signed(), "X-TC-Action": "StopWhiteboardPush"}, TIW_BODY, TS) is None


@pytest.mark.parametrize(("skew", "valid"), [(-300, True), (300, True), (-301, False), (301, False)])
def test_clock_skew_window_is_five_minutes_either_way(skew: int, valid: bool) -> None:
    code = Verifier(LOOKUP).verify(signed(), TIW_BODY, TS + skew)
    assert code == (None if valid else signing.SIGNATURE_EXPIRE)


def test_verifier_key_cache_is_per_secret_key_and_date() -> None:
    keys = {SECRET_ID: SECRET_KEY}
    verifier = Verifier(keys.get)
    assert verifier.verify(signed(), TIW_BODY, TS) is None
    keys[SECRET_ID] = "rotated"  # a rotated key must not be served from the cache
    assert verifier.verify(signed(), TIW_BODY, TS) == signing.SIGNATURE_FAILURE
    assert verifier.verify(signed(TS + DAY), TIW_BODY, TS + DAY) == signing.SIGNATURE_FAILURE


def test_parse_authorization_round_trip() -> None:
    parsed = signing.parse_authorization(signed()["Authorization"])
    assert parsed is not None
    assert (parsed.secret_id, parsed.date, parsed.service, parsed.signed_headers) == (
        SECRET_ID,
        "2023-11-14",
        "tiw",
        "content-type;host",
    )
    assert signing.parse_authorization("TC3-HMAC-SHA256 Credential=x") is None


def test_secrets_never_appear_in_reprs() -> None:
    secret, token = "s3cr3t-KEY-value", "t0ken-value"
    credentials = Credentials(SECRET_ID, secret, token)
    signer = Signer(credentials, TIW_HOST, region="ap-guangzhou")
    signer.headers("DescribeSnapshotTask", TIW_BODY, TS)
    verifier = Verifier({SECRET_ID: secret}.get)
    parsed = signing.parse_authorization(signed()["Authorization"])
    for text in (repr(credentials), str(credentials), repr(signer), repr(verifier), repr(parsed)):
        assert secret not in text
        assert token not in text
    assert SECRET_ID in repr(credentials)


def test_headers_carry_optional_common_parameters_only_when_set() -> None:
    bare = Signer(Credentials(SECRET_ID, SECRET_KEY), TIW_HOST).headers("StopWhiteboardPush", b"{}", TS)
    assert set(bare) == {
        "Host",
        "Content-Type",
        "X-TC-Version",
        "X-TC-Action",
        "X-TC-Timestamp",
        "Authorization",
    }
    full = Signer(
        Credentials(SECRET_ID, SECRET_KEY, "tok"), TIW_HOST, region="ap-singapore", language="en-US"
    ).headers("StopWhiteboardPush", b"{}", TS)
    assert (full["X-TC-Region"], full["X-TC-Token"], full["X-TC-Language"]) == (
        "ap-singapore",
        "tok",
        "en-US",
    )
    assert full["X-TC-Version"] == "2019-09-19"
    assert full["Content-Type"] == "application/json"
