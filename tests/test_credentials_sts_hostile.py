"""TKE pod identity's STS call against a hostile endpoint (tests/support/raw_upstream.py).

STS goes through the client TIW does (tencent_api.py over transport.py): the same size cap (64 KiB
for STS), no redirects, no decompression, the same checks of the JSON and of the envelope. Whatever
the endpoint answers, the refresh fails with a ``CredentialsError`` that names STS and says why,
counted once, logged without the web identity token; no exception of another kind escapes, which
would end the background refresh for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import time
import traceback
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from support.clock import VirtualClock
from support.credentials import TKE, keyless_environment
from support.raw_upstream import (
    Behaviour,
    RawUpstream,
    answer,
    envelope,
    http,
    ok,
    redirect,
    reset,
    stall,
    stream,
)
from support.waiting import wait_until
from tiw_facade import credentials, pod_identity, settings
from tiw_facade.failures import CredentialsError
from tiw_facade.metrics import Metrics

TOKEN = "eyJhbGciOiJSUzI1NiJ9.hostile-sts-test-web-identity-token.c2lnbmF0dXJl"
FAILURES = "tiw_credentials_refresh_failures_total"


def issued(lifetime: int = 7200, **extra: Any) -> dict[str, Any]:
    """The Response of a successful AssumeRoleWithWebIdentity."""
    return {
        "Credentials": {"TmpSecretId": "AKIDtmpHostileTest", "TmpSecretKey": "k" * 40, "Token": "t" * 200},
        "ExpiredTime": int(time.time()) + lifetime,
        "Expiration": "2030-01-01T00:00:00Z",
        "RequestId": "sts-req-1",
        **extra,
    }


def _head(extra: str = "Content-Length: 1000\r\n") -> bytes:
    return f"HTTP/1.1 200 OK\r\nConnection: close\r\n{extra}\r\n".encode()


@contextlib.asynccontextmanager
async def pod_identity_at(
    url: str, tmp_path: Path, clock: Callable[[], float] = time.time
) -> AsyncIterator[tuple[credentials.Source, Metrics]]:
    """The credentials source of a pod whose STS is at ``url`` (not started); ``clock``: Tencent's."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    environ = keyless_environment(
        "http://127.0.0.1:1", **TKE, TKE_WEB_IDENTITY_TOKEN_FILE=str(token_file), TIW_STS_ENDPOINT=url
    )
    metrics = Metrics("test")
    config = credentials.CredentialsConfig.from_settings(settings.load(environ))
    source = credentials.chain(config, metrics, clock=clock)
    assert isinstance(source, pod_identity.WebIdentity)
    try:
        yield source, metrics
    finally:
        await source.aclose()


def failures(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value(FAILURES) or 0.0


CASES: dict[str, tuple[Behaviour, str]] = {
    "not_http": (answer(b"SSH-2.0-OpenSSH_9.6\r\n\r\n"), "STS's answer is not valid HTTP"),
    "bad_header_line": (answer(_head("no colon in this header line\r\n")), "STS's answer is not valid HTTP"),
    "truncated_body": (answer(_head() + b'{"Response": {"Req'), "the connection to STS broke"),
    "closed_without_answer": (answer(b""), "the connection to STS broke"),
    "reset_mid_body": (reset(_head() + b'{"Response": '), "the connection to STS broke"),
    "http_503": (answer(http(b"<html>busy</html>", status=503)), "STS answered HTTP 503"),
    "redirect": (redirect("/", status=307), "STS answered HTTP 307"),
    "gzip": (
        answer(http(gzip.compress(envelope(issued())), headers={"Content-Encoding": "gzip"})),
        "STS's answer is not JSON",
    ),
    "oversized_announced": (
        answer(http(envelope(issued(Padding="x" * (64 << 10))))),
        "STS's answer is larger than 65536 bytes",
    ),
    "oversized_streamed": (stream(4 << 20), "STS's answer is larger than 65536 bytes"),
    "not_json": (answer(http(b"<html>Bad Gateway</html>")), "STS's answer is not JSON"),
    "nan": (answer(http(b'{"Response": {"ExpiredTime": NaN}}')), "STS's answer is not JSON"),
    "nested_deeply": (answer(http(b"[" * 30_000 + b"]" * 30_000)), "STS's answer is not JSON"),
    "integer_too_long": (
        answer(http(b'{"Response": {"ExpiredTime": ' + b"9" * 5000 + b"}}")),
        "STS's answer is not JSON",
    ),
    # Parsed, but no float holds it: subtracting the time from it raised OverflowError, which no
    # handler caught and which ended the background refresh.
    "expired_time_huge": (ok(issued() | {"ExpiredTime": 10**400}), "ExpiredTime is no time STS gives"),
    "expired_time_a_string": (ok(issued() | {"ExpiredTime": "soon"}), "lacks Credentials or ExpiredTime"),
    "expired_time_true": (ok(issued() | {"ExpiredTime": True}), "lacks Credentials or ExpiredTime"),
    "expired_already": (ok(issued(lifetime=-10)), "already expired"),
    "date_far_ahead": (
        answer(http(envelope(issued()), headers={"Date": "Fri, 31 Dec 9999 23:59:59 GMT"})),
        "already expired",
    ),
    "response_a_list": (answer(http(b'{"Response": ["RequestId", "r-1"]}')), "no Response object"),
    "not_an_envelope": (answer(http(b'["not", "an", "envelope"]')), "no Response object"),
    "error_a_string": (ok({"Error": "InternalError", "RequestId": "r-1"}), "an Error that is not an object"),
    "error_code_huge": (
        ok({"Error": {"Code": "A" * 10_000, "Message": "m"}, "RequestId": "r-1"}),
        "no error code of STS's shape (a string of 10000 characters)",
    ),
    "error_message_an_object": (
        ok({"Error": {"Code": "InternalError", "Message": {"a": 1}}, "RequestId": "r-1"}),
        "a Message that is not text",
    ),
    "credentials_a_string": (ok(issued() | {"Credentials": "AKID"}), "lacks Credentials or ExpiredTime"),
    "token_missing": (
        ok(issued() | {"Credentials": {"TmpSecretId": "AKIDtmp", "TmpSecretKey": "k" * 40}}),
        "Credentials are incomplete",
    ),
    "secret_with_spaces": (
        ok(issued() | {"Credentials": {"TmpSecretId": "AKID tmp", "TmpSecretKey": "k" * 40, "Token": "t"}}),
        "Credentials are incomplete",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
async def test_a_hostile_sts_answer_fails_the_refresh_saying_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    behaviour, complaint = CASES[name]
    async with (
        RawUpstream(behaviour) as upstream,
        pod_identity_at(upstream.url, tmp_path) as (source, metrics),
    ):
        with caplog.at_level(logging.INFO, logger="tiw_facade"), pytest.raises(CredentialsError) as caught:
            await source.start()
        assert len(upstream.requests) == 1, "sent once, never followed anywhere"
        assert TOKEN in upstream.requests[0].body.decode()  # what must not come back
    failure = caught.value
    assert complaint in str(failure), str(failure)
    shown = "".join(traceback.format_exception(failure))
    assert TOKEN not in shown and "the above exception" not in shown  # no chained exception's text
    assert failures(metrics) == 1
    logged = [record for record in caplog.records if record.name == "tiw_facade.credentials"]
    assert [record.levelno for record in logged] == [logging.ERROR]
    assert complaint in str(vars(logged[0])["error"])
    assert all(TOKEN not in str(vars(record)) for record in caplog.records)


async def test_a_refusal_is_sts_s_code_and_message(tmp_path: Path) -> None:
    refusal = {"Code": "InvalidParameter.WebIdentityTokenError", "Message": "bad token\ud800" + "m" * 1000}
    async with (
        RawUpstream(ok({"Error": refusal, "RequestId": "sts-req-9"})) as upstream,
        pod_identity_at(upstream.url, tmp_path) as (source, _),
    ):
        with pytest.raises(CredentialsError) as caught:
            await source.start()
    text = str(caught.value)
    assert text.startswith("STS refused: InvalidParameter.WebIdentityTokenError: bad token?mmm")
    assert text.endswith("m (RequestId sts-req-9)") and len(text) < 600  # the message cut at 512


async def test_a_silent_sts_times_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pod_identity, "STS_TIMEOUT", 0.3)
    async with RawUpstream(stall(30)) as upstream, pod_identity_at(upstream.url, tmp_path) as (source, _):
        with pytest.raises(CredentialsError, match=r"STS did not answer within 0\.300s"):
            await source.start()


async def test_an_unreachable_sts_says_where(tmp_path: Path, unused_tcp_port: int) -> None:
    url = f"http://127.0.0.1:{unused_tcp_port}"
    async with pod_identity_at(url, tmp_path) as (source, metrics):
        with pytest.raises(CredentialsError, match=f"cannot connect to STS at 127.0.0.1:{unused_tcp_port}"):
            await source.start()
    assert failures(metrics) == 1


async def test_sts_is_asked_unsigned_with_the_pods_token(tmp_path: Path) -> None:
    clock = VirtualClock.at_wall_time()  # Tencent's time as the client knows it: STS's stamp
    async with (
        RawUpstream(ok(issued())) as upstream,
        pod_identity_at(upstream.url, tmp_path, clock) as (source, metrics),
    ):
        await source.start()
        got = await source.get()
        (request,) = upstream.requests
    assert (got.secret_id, got.token) == ("AKIDtmpHostileTest", "t" * 200)
    headers = request.headers
    assert headers["authorization"] == "SKIP" and "x-tc-token" not in headers
    assert (headers["x-tc-action"], headers["x-tc-version"]) == ("AssumeRoleWithWebIdentity", "2018-08-13")
    assert (headers["x-tc-region"], headers["content-type"]) == ("ap-guangzhou", "application/json")
    assert headers["host"] == upstream.url.split("://")[1]
    assert headers["x-tc-timestamp"] == str(int(clock()))
    body = json.loads(request.body)
    assert body | {"RoleSessionName": ""} == {
        "ProviderId": TKE["TKE_PROVIDER_ID"],
        "WebIdentityToken": TOKEN,
        "RoleArn": TKE["TKE_ROLE_ARN"],
        "RoleSessionName": "",
        "DurationSeconds": 7200,
    }
    assert body["RoleSessionName"].startswith("tiw-facade-")
    assert metrics.registry.get_sample_value("tiw_credentials_refreshes_total") == 1


@pytest.mark.slow
async def test_a_hostile_answer_to_a_background_refresh_leaves_the_refreshes_running(tmp_path: Path) -> None:
    # Credentials for 2 s: the background refresh comes within a second, and meets a hostile STS.
    async with (
        RawUpstream(ok(issued(lifetime=2))) as upstream,
        pod_identity_at(upstream.url, tmp_path) as (
            source,
            metrics,
        ),
    ):
        await source.start()
        upstream.behaviour = ok(issued() | {"ExpiredTime": 10**400})
        await wait_until(lambda: failures(metrics) >= 1)
        upstream.behaviour = ok(issued())
        await wait_until(lambda: metrics.registry.get_sample_value("tiw_credentials_refreshes_total") == 2)
        assert (await source.get()).secret_id == "AKIDtmpHostileTest"
        await asyncio.sleep(0)
