"""Credentials beyond the environment, through the real facade (gRPC) and the real emulator (HTTP):
a profile file mounted from a Kubernetes Secret and swapped under running calls, and TKE pod
identity, whose temporary credentials come from the emulator's STS and expire in seconds.

The emulator counts the accepted requests per SecretId that signed them (``Emulator.signers``), so
a test sees which key the facade used; it refuses temporary credentials once they expire.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest
from support.clock import VirtualClock
from support.credentials import (
    FRESH,
    NEW,
    NEWER,
    OLD,
    REQUEST,
    TKE,
    WEB_IDENTITY_TOKEN,
    Running,
    SecretVolume,
    emulating,
    keyless_environment,
    profile,
    running_facade,
)
from support.facade import facade_environment
from support.tiw import SDK_APP_ID
from support.waiting import wait_until
from tiw_facade import credentials, pod_identity, settings
from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as pb
from tiw_facade.emulator import DEMO_SECRET_ID, DEMO_SECRET_KEY, Emulator, Fault, FaultKind
from tiw_facade.metrics import Metrics
from tiw_facade.server import FacadeServer
from tiw_facade.signing import Credentials, Signer

# --- the profile file format ----------------------------------------------------------------------


def test_profile_in_the_sdks_format_with_an_optional_token() -> None:
    assert credentials.parse_profile(profile(OLD)) == Credentials(*OLD)
    assert credentials.parse_profile(profile(OLD, token="tok")) == Credentials(*OLD, "tok")
    # The SDK's own reader takes `%` literally too only with interpolation off: a key may hold one.
    percent = "a%b" + "c" * 29
    text = f"[default]\nsecret_id=AKID1\nsecret_key={percent}\n"
    assert credentials.parse_profile(text).secret_key == percent
    # Written on Windows: the same credentials.
    assert credentials.parse_profile(profile(OLD).replace("\n", "\r\n")) == Credentials(*OLD)


def test_the_emulators_demo_credentials_and_tencents_shapes_are_whole() -> None:
    demo = (DEMO_SECRET_ID, DEMO_SECRET_KEY)
    assert credentials.parse_profile(profile(demo)) == Credentials(*demo)
    long_term = ("AKID" + "z8krbsJ5yKBZQpn74WFkmLPx3EXAMPLE", "Gu5t9xGARNpq86cd98joQYCN3EXAMPLE")
    assert credentials.parse_profile(profile(long_term)) == Credentials(*long_term)
    temporary = ("AKIDtmp" + "x" * 60, "ZgYqMX7BmQ0Zyzp9Y1ajwYzEmeBWqdsH4SdDDfrvYs8=", "token" * 200)
    assert credentials.parse_profile(profile(temporary[:2], temporary[2])) == Credentials(*temporary)


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "no [default] section"),
        ("[other]\nsecret_id = A\nsecret_key = B\n", "no [default] section"),
        ("[default]\nsecret_id = AKID\n", "has no secret_key"),
        ("[default]\nsecret_key = sk-very-secret\n", "has no secret_id"),
        ("[default]\nsecret_id = AKID\nsecret_key = sk-very-secret\nsecret_key = twice\n", "not an INI file"),
        ("secret_key = sk-very-secret\n", "not an INI file"),
        ("[default]\nsecret_id = AKID\nsecret_key = sk very secret\n", "secret_key holds spaces"),
        # Half written: the secret cut short, mid-line.
        ("[default]\nsecret_id = AKID\nsecret_key = sk-very-secret-of-which-all-was-not", "end in a newline"),
        ("[default]\nsecret_id = AKID\nsecret_key = sk-very-secret\n", "shorter than a SecretKey's 32"),
    ],
)
def test_an_invalid_profile_says_why_without_its_secret(text: str, complaint: str) -> None:
    with pytest.raises(credentials.CredentialsError) as caught:
        credentials.parse_profile(text)
    assert complaint in str(caught.value)
    assert "very" not in str(caught.value) and "sk-" not in str(caught.value)


# --- the chain ------------------------------------------------------------------------------------


def chain(environ: dict[str, str]) -> credentials.Source:
    """The source the facade would take in ``environ``."""
    config = credentials.CredentialsConfig.from_settings(settings.load(environ))
    return credentials.chain(config, Metrics.unobserved(), clock=time.time)


def test_the_environment_comes_first(tmp_path: Path) -> None:
    path = tmp_path / "credentials"
    path.write_text(profile(NEW))
    environ = facade_environment("http://127.0.0.1:1", TENCENTCLOUD_CREDENTIALS_FILE=str(path), **TKE)
    assert isinstance(chain(environ), credentials.Static)


def test_the_file_comes_before_pod_identity(tmp_path: Path) -> None:
    path = tmp_path / "credentials"
    path.write_text(profile(NEW))
    environ = keyless_environment(
        "http://127.0.0.1:1",
        TENCENTCLOUD_CREDENTIALS_FILE=str(path),
        TKE_WEB_IDENTITY_TOKEN_FILE=str(path),
        **TKE,
    )
    source = chain(environ)
    assert isinstance(source, credentials.ProfileFile) and source.path == str(path)


def test_the_sdks_default_profile_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".tencentcloud").mkdir()
    (tmp_path / ".tencentcloud" / "credentials").write_text(profile(NEW))
    source = chain(keyless_environment("http://127.0.0.1:1"))
    assert isinstance(source, credentials.ProfileFile)
    assert source.path == str(tmp_path / ".tencentcloud" / "credentials")


@pytest.mark.parametrize(
    ("environ", "complaint"),
    [
        ({}, "no credentials"),
        ({"TENCENTCLOUD_SECRET_ID": "AKIDonly"}, "TENCENTCLOUD_SECRET_KEY is not set"),
        ({"TKE_REGION": "ap-guangzhou", "TKE_ROLE_ARN": "r"}, "TKE_PROVIDER_ID, TKE_WEB_IDENTITY_TOKEN_FILE"),
        ({**TKE, "TKE_WEB_IDENTITY_TOKEN_FILE": "/t", "TIW_STS_DURATION": "43201"}, "at most 43200"),
    ],
)
def test_a_missing_or_half_configured_source_is_refused(
    environ: dict[str, str], complaint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.tencentcloud/credentials of the machine's
    if os.path.exists(credentials.DEFAULT_PROFILES[1]):
        pytest.skip("this machine has /etc/tencentcloud/credentials")
    with pytest.raises(credentials.CredentialsError) as caught:
        chain(keyless_environment("http://127.0.0.1:1", **environ))
    assert complaint in str(caught.value)


# --- the file, rotated under running calls --------------------------------------------------------


@pytest.fixture
def keys() -> dict[str, str]:
    """The emulator's accepted keys; a test revokes one by deleting it."""
    return dict([OLD, NEW, NEWER])


async def call_continuously(
    running: Running, emulator: Emulator, total: int, workers: int = 4
) -> tuple[int, list[BaseException]]:
    """``total`` calls from ``workers`` callers at once; returns how many succeeded and the failures.

    Each caller asks about a push task of its own: identical calls at once would share one request
    to TIW (docs/answers.md), and each call is to be a request signed by the key of its moment."""
    failures: list[BaseException] = []
    done = 0
    remaining = iter(range(total))

    async def worker() -> None:
        nonlocal done
        request = pb.DescribeWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=emulator.add_push_task())
        for _ in remaining:
            try:
                await running.stub.DescribeWhiteboardPush(request, timeout=10, metadata=FRESH)
                done += 1
            except grpc.aio.AioRpcError as error:
                failures.append(error)
            await asyncio.sleep(0.005)  # calls spread over the swap, not all before it

    await asyncio.gather(*(worker() for _ in range(workers)))
    return done, failures


@pytest.mark.slow
async def test_a_rotated_secret_file_is_used_without_a_restart_or_a_failed_call(
    tmp_path: Path, keys: dict[str, str]
) -> None:
    volume = SecretVolume(tmp_path / "secret")
    volume.publish(profile(OLD))
    async with emulating(credentials=keys, rate_limit=10_000) as emulator:
        environ = keyless_environment(
            emulator.url,
            TENCENTCLOUD_CREDENTIALS_FILE=str(volume.path),
            TIW_CREDENTIALS_POLL="0.05",
            TIW_RATE_LIMIT="10000",
            TIW_RATE_LIMIT_ACCOUNT="test",
        )
        async with running_facade(environ) as running:
            calls = asyncio.create_task(call_continuously(running, emulator, 200))
            await wait_until(lambda: emulator.signers[OLD[0]] >= 50)
            volume.publish(profile(NEW))  # while calls run
            # Calls signed with the old key just before the swap may still be in flight: revoke it
            # once the new one has signed more calls than there are callers.
            await wait_until(lambda: emulator.signers[NEW[0]] >= 20)
            del keys[OLD[0]]  # the old key is revoked: only the new one can succeed from here on
            done, failures = await calls
            assert failures == [] and done == 200
            before = emulator.signers[NEW[0]]
            await running.stub.DescribeWhiteboardPush(REQUEST, timeout=5, metadata=FRESH)
            assert emulator.signers[NEW[0]] == before + 1
            assert emulator.signers[OLD[0]] >= 50 and emulator.signers[NEW[0]] >= 1
            assert running.metric("tiw_credentials_refreshes_total") == 1
            assert running.metric("tiw_credentials_refresh_failures_total") == 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "broken",
    [
        "[default]\nsecret_id = AKIDhalf",  # half written
        "[default]\nsecret_id = AKIDnokey\n",  # no key
        "not an ini file at all\n",
    ],
)
async def test_an_invalid_file_is_ignored_with_a_warning_and_the_next_valid_one_used(
    tmp_path: Path, keys: dict[str, str], caplog: pytest.LogCaptureFixture, broken: str
) -> None:
    volume = SecretVolume(tmp_path / "secret")
    volume.publish(profile(OLD))
    async with emulating(credentials=keys) as emulator:
        environ = keyless_environment(
            emulator.url, TENCENTCLOUD_CREDENTIALS_FILE=str(volume.path), TIW_CREDENTIALS_POLL="0.05"
        )
        async with running_facade(environ) as running:
            with caplog.at_level(logging.WARNING, logger="tiw_facade.credentials"):
                volume.publish(broken)
                await wait_until(lambda: running.metric("tiw_credentials_refresh_failures_total") >= 1)
                for _ in range(5):
                    await running.stub.DescribeWhiteboardPush(REQUEST, timeout=5, metadata=FRESH)
            assert emulator.signers[OLD[0]] == 5, "the old key still serves"
            (record,) = [
                r
                for r in caplog.records
                if r.name == "tiw_facade.credentials" and r.levelno >= logging.WARNING
            ]
            assert record.levelno == logging.WARNING and "ignored" in record.getMessage()
            assert "old-secret-key" not in caplog.text and "at all" not in caplog.text
            # Logged once, not at every poll of the same broken version.
            await asyncio.sleep(0.3)
            assert running.metric("tiw_credentials_refresh_failures_total") == 1

            volume.publish(profile(NEWER))
            await wait_until(lambda: running.metric("tiw_credentials_refreshes_total") >= 1)
            await running.stub.DescribeWhiteboardPush(REQUEST, timeout=5, metadata=FRESH)
            assert emulator.signers[NEWER[0]] == 1


async def test_a_file_edited_in_place_is_noticed(tmp_path: Path, keys: dict[str, str]) -> None:
    # Not a Secret volume: a plain file rewritten (same inode), as an operator might do by hand.
    path = tmp_path / "credentials"
    path.write_text(profile(OLD))
    async with emulating(credentials=keys) as emulator:
        environ = keyless_environment(
            emulator.url, TENCENTCLOUD_CREDENTIALS_FILE=str(path), TIW_CREDENTIALS_POLL="0.05"
        )
        async with running_facade(environ) as running:
            await running.stub.DescribeWhiteboardPush(REQUEST, timeout=5, metadata=FRESH)
            path.write_text(profile(NEW) + "\n# rotated\n")  # another size, another mtime
            await wait_until(lambda: running.metric("tiw_credentials_refreshes_total") >= 1)
            await running.stub.DescribeWhiteboardPush(REQUEST, timeout=5, metadata=FRESH)
            assert (emulator.signers[OLD[0]], emulator.signers[NEW[0]]) == (1, 1)


async def test_an_unreadable_file_at_start_fails_the_start(tmp_path: Path) -> None:
    environ = keyless_environment("http://127.0.0.1:1", TENCENTCLOUD_CREDENTIALS_FILE=str(tmp_path / "none"))
    server = FacadeServer(settings.load(environ))
    with pytest.raises(credentials.CredentialsError, match="none: cannot read"):
        await server.start()
    await server.stop(0)


# --- TKE pod identity -----------------------------------------------------------------------------


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(WEB_IDENTITY_TOKEN + "\n")
    return path


def tke_environment(emulator: Emulator, token_file: Path, **extra: str) -> dict[str, str]:
    return keyless_environment(
        emulator.url,
        **TKE,
        TKE_WEB_IDENTITY_TOKEN_FILE=str(token_file),
        TIW_STS_ENDPOINT=emulator.url,
        TIW_RATE_LIMIT_ACCOUNT="test",
        **extra,
    )


def temporary_signers(emulator: Emulator) -> set[str]:
    return {secret_id for secret_id in emulator.signers if secret_id.startswith("AKIDtmp")}


async def test_pod_identity_alone_gets_credentials_from_sts_and_calls_succeed(
    token_file: Path,
) -> None:
    async with (
        emulating(web_identity_tokens=frozenset({WEB_IDENTITY_TOKEN})) as emulator,
        running_facade(tke_environment(emulator, token_file)) as running,
    ):
        for _ in range(3):
            await running.stub.DescribeWhiteboardPush(REQUEST, timeout=5, metadata=FRESH)
        assert emulator.sts.calls == 1
        (secret_id,) = temporary_signers(emulator)
        assert emulator.signers[secret_id] == 3
        # The gauge holds STS's ExpiredTime: the default 7200 s from now.
        assert abs(running.metric("tiw_credentials_expiry_timestamp_seconds") - (time.time() + 7200)) < 5


@pytest.mark.slow
async def test_temporary_credentials_are_refreshed_before_they_expire_while_calls_run(
    token_file: Path,
) -> None:
    async with emulating(web_identity_tokens=frozenset({WEB_IDENTITY_TOKEN}), sts_max_seconds=3) as emulator:
        environ = tke_environment(emulator, token_file, TIW_CREDENTIALS_REFRESH_MARGIN="0.5")
        async with running_facade(environ) as running:
            failures: list[grpc.aio.AioRpcError] = []
            end = time.monotonic() + 7  # over two lifetimes of the credentials
            calls = 0
            while time.monotonic() < end:
                try:
                    await running.stub.DescribeWhiteboardPush(REQUEST, timeout=5, metadata=FRESH)
                except grpc.aio.AioRpcError as error:
                    failures.append(error)
                calls += 1
                await asyncio.sleep(0.02)
            assert failures == []
            assert emulator.sts.calls >= 3, "refreshed at least twice"
            assert len(temporary_signers(emulator)) >= 3, "each refresh brought new credentials into use"
            assert emulator.stats()["DescribeWhiteboardPush"].rejected == 0, "never an expired token sent"
            assert running.metric("tiw_credentials_refresh_failures_total") == 0


@pytest.mark.slow
async def test_a_failing_sts_leaves_valid_credentials_in_use_loudly(
    token_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with emulating(web_identity_tokens=frozenset({WEB_IDENTITY_TOKEN}), sts_max_seconds=8) as emulator:
        # A lead of 4 s (half the lifetime): the refresh fails with credentials valid for 3 s more.
        environ = tke_environment(emulator, token_file, TIW_CREDENTIALS_REFRESH_MARGIN="4")
        async with running_facade(environ) as running:
            emulator.add_fault(Fault(FaultKind.HTTP_STATUS, action="AssumeRoleWithWebIdentity", status=503))
            with caplog.at_level(logging.WARNING, logger="tiw_facade.credentials"):
                await wait_until(lambda: running.metric("tiw_credentials_refresh_failures_total") >= 1)
                for _ in range(3):
                    await running.stub.DescribeWhiteboardPush(REQUEST, timeout=5, metadata=FRESH)
            assert emulator.sts.calls == 1 and len(temporary_signers(emulator)) == 1
            warnings = [
                r
                for r in caplog.records
                if r.name == "tiw_facade.credentials" and r.levelno >= logging.WARNING
            ]
            assert warnings and warnings[0].levelno == logging.WARNING
            assert "STS refresh failed" in warnings[0].getMessage()
            assert "HTTP 503" in str(warnings[0].__dict__["error"])

            emulator.clear_faults()  # STS is back: the next retry succeeds, before expiry
            await wait_until(lambda: emulator.sts.calls == 2)
            await running.stub.DescribeWhiteboardPush(REQUEST, timeout=5, metadata=FRESH)
            assert len(temporary_signers(emulator)) == 2


@pytest.mark.slow
async def test_expired_credentials_and_a_failing_sts_fail_calls_as_unavailable(token_file: Path) -> None:
    async with (
        emulating(web_identity_tokens=frozenset({WEB_IDENTITY_TOKEN}), sts_max_seconds=2) as emulator,
        running_facade(tke_environment(emulator, token_file)) as running,
    ):
        emulator.add_fault(Fault(FaultKind.HTTP_STATUS, action="AssumeRoleWithWebIdentity", status=503))
        await asyncio.sleep(2.2)  # the credentials' whole life: expired, and STS refuses new ones
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await running.stub.DescribeWhiteboardPush(REQUEST, timeout=5, metadata=FRESH)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "credentials" in (caught.value.details() or "")
        assert emulator.stats()["DescribeWhiteboardPush"].accepted == 0


async def test_a_refused_web_identity_token_fails_the_start(tmp_path: Path) -> None:
    wrong = tmp_path / "token"
    wrong.write_text("a token the emulator does not accept")
    async with emulating(web_identity_tokens=frozenset({WEB_IDENTITY_TOKEN})) as emulator:
        server = FacadeServer(settings.load(tke_environment(emulator, wrong)))
        with pytest.raises(credentials.CredentialsError, match="WebIdentityTokenError"):
            await server.start()
        await server.stop(0)


# --- the emulator's STS and its temporary credentials --------------------------------------------


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock(1_760_000_000.0)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def assume_role(http: aiohttp.ClientSession, emulator: Emulator, token: str) -> dict[str, object]:
    body = {
        "ProviderId": "p",
        "WebIdentityToken": token,
        "RoleArn": "r",
        "RoleSessionName": "s",
        "DurationSeconds": 600,
    }
    headers = {
        "X-TC-Action": "AssumeRoleWithWebIdentity",
        "X-TC-Version": "2018-08-13",
        "X-TC-Region": "ap-guangzhou",
        "Authorization": "SKIP",
    }
    async with http.post(emulator.url + "/", json=body, headers=headers) as response:
        answer: dict[str, object] = (await response.json())["Response"]
        return answer


async def signed_call(http: aiohttp.ClientSession, emulator: Emulator, key: Credentials, now: float) -> str:
    host = emulator.url.split("://")[1]
    body = b'{"SdkAppId":1400000001,"TaskId":"ghucnligqtgtvk2624mb"}'
    headers = Signer(key, host, region="ap-guangzhou").headers("DescribeWhiteboardPush", body, int(now))
    async with http.post(emulator.url + "/", data=body, headers=headers) as response:
        error = (await response.json())["Response"].get("Error", {})
        return str(error.get("Code", "OK"))


async def test_the_emulators_temporary_credentials_work_until_they_expire(
    http: aiohttp.ClientSession, clock: VirtualClock
) -> None:
    async with emulating(
        web_identity_tokens=frozenset({"good"}), sts_max_seconds=60, clock=clock
    ) as emulator:
        assert (await assume_role(http, emulator, "bad"))["Error"] == {
            "Code": "InvalidParameter.WebIdentityTokenError",
            "Message": "The WebIdentityToken is not valid.",
        }
        answer = await assume_role(http, emulator, "good")
        issued = answer["Credentials"]
        assert isinstance(issued, dict) and answer["ExpiredTime"] == int(clock.now) + 60  # min(600, 60)
        key = Credentials(issued["TmpSecretId"], issued["TmpSecretKey"], issued["Token"])
        assert await signed_call(http, emulator, key, clock.now) == "OK"
        assert await signed_call(http, emulator, dataclasses.replace(key, token="forged"), clock.now) == (
            "AuthFailure.TokenFailure"
        )
        clock.now += 60
        assert await signed_call(http, emulator, key, clock.now) == "AuthFailure.TokenFailure"


def test_refresh_lead_is_the_margin_or_a_third_never_more_than_half() -> None:
    assert pod_identity.refresh_lead(7200, 300) == 2400
    assert pod_identity.refresh_lead(3600 * 12, 300) == 14400
    assert pod_identity.refresh_lead(600, 300) == 300
    assert pod_identity.refresh_lead(3, 300) == 1.5
