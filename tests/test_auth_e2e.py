"""Authentication, the authorization policy and the audit trail, end to end: a real facade over real
gRPC, a real local OIDC issuer (discovery and JWKS over HTTP, keys made here), the real emulator as
TIW. Every refused call is checked to have sent nothing upstream.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from support.facade import Facade, StartFacade
from support.oidc import OidcServer, service_account
from support.rich_status import error_info
from support.tiw import FRESH, PUSH_TASK, SDK_APP_ID, create_request
from support.waiting import wait_until
from tiw_facade._proto.tiw.facade.v1 import watcher_pb2, watcher_pb2_grpc
from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as pb
from tiw_facade.authn_keys import MIN_REFRESH_GAP
from tiw_facade.authz import PolicyError
from tiw_facade.logs import JsonFormatter

BILLING = service_account("billing", "invoice-renderer")
CLASSROOM = service_account("classroom", "lesson-service")
SERVICE = "/tiw.v20190919.TiwService"
DESCRIBE_PUSH = pb.DescribeWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=PUSH_TASK)
STOP_PUSH = pb.StopWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id="07b4c70bpafm1b4majmb")


@pytest.fixture
async def issuer() -> AsyncIterator[OidcServer]:
    async with OidcServer() as server:
        yield server


def bearer(token: str, *more: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"), *more)


def arrivals(facade: Facade) -> int:
    return sum(len(facade.emulator.arrivals(action)) for action in facade.emulator.stats())


def counted(facade: Facade, name: str, **labels: str) -> float:
    return facade.server.metrics.registry.get_sample_value(name, labels) or 0.0


def audit_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [
        {key: getattr(record, key) for key in vars(record) if key in AUDIT_FIELDS}
        for record in caplog.records
        if record.name == "tiw_facade.audit"
    ]


AUDIT_FIELDS = {
    "principal",
    "proven_by",
    "method",
    "sdk_app_id",
    "task_id",
    "idempotency_key_sha256",
    "outcome",
    "tiw_request_id",
    "decision",
    "rule",
}


async def refused(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value


# --- authentication -------------------------------------------------------------------------------


async def test_a_token_names_the_caller_and_a_create_is_audited_under_it(
    start_facade: StartFacade, issuer: OidcServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "tiw_facade.audit")
    caplog.set_level(logging.INFO, "tiw_facade.rpc")
    facade = await start_facade(TIW_AUTH_ISSUER=issuer.issuer, TIW_AUTH_REQUIRED="true")
    created = await facade.stub.CreateSnapshotTask(
        create_request(), metadata=bearer(issuer.mint(sub=BILLING), ("idempotency-key", "k-1")), timeout=5
    )
    (line,) = audit_lines(caplog)
    assert line["principal"] == BILLING and line["proven_by"] == "token"
    assert line["method"] == f"{SERVICE}/CreateSnapshotTask" and line["outcome"] == "OK"
    assert line["task_id"] == created.task_id and line["tiw_request_id"] == created.request_id
    assert line["sdk_app_id"] == create_request().sdk_app_id
    assert len(str(line["idempotency_key_sha256"])) == 64
    assert "k-1" not in caplog.text and "Bearer" not in caplog.text
    (access,) = [record for record in caplog.records if record.name == "tiw_facade.rpc"]
    assert json.loads(JsonFormatter().format(access))["caller"] == BILLING  # the access log names it too


@pytest.mark.parametrize(
    ("mint", "reason"),
    [
        ({"exp": 1_000_000}, "EXPIRED"),
        ({"aud": "someone-else"}, "WRONG_AUDIENCE"),
        ({"iss": "https://not-the-issuer.example"}, "WRONG_ISSUER"),
        ({"alg": "none"}, "UNSUPPORTED_ALGORITHM"),
        ({"alg": "HS256"}, "UNSUPPORTED_ALGORITHM"),
        ({"kid": "made-up"}, "UNKNOWN_KEY"),
        ({"sub": "alice"}, "NOT_A_SERVICE_ACCOUNT"),
    ],
    ids=["expired", "wrong-audience", "wrong-issuer", "none", "hs256", "unknown-kid", "not-a-sa"],
)
async def test_a_bad_token_is_unauthenticated_with_its_reason_and_sends_nothing(
    start_facade: StartFacade, issuer: OidcServer, mint: dict[str, Any], reason: str
) -> None:
    facade = await start_facade(TIW_AUTH_ISSUER=issuer.issuer)
    before = arrivals(facade)
    error = await refused(
        facade.stub.DescribeWhiteboardPush(
            DESCRIBE_PUSH, metadata=bearer(issuer.mint(**mint)) + FRESH, timeout=5
        )
    )
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    assert error_info(error).reason == reason
    assert arrivals(facade) == before
    assert counted(facade, "tiw_authn_failures_total", reason=reason) == 1


async def test_required_means_no_token_no_call_and_optional_means_as_before(
    start_facade: StartFacade, issuer: OidcServer
) -> None:
    required = await start_facade(TIW_AUTH_ISSUER=issuer.issuer, TIW_AUTH_REQUIRED="true")
    error = await refused(required.stub.DescribeWhiteboardPush(DESCRIBE_PUSH, metadata=FRESH, timeout=5))
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED and error_info(error).reason == "MISSING_TOKEN"
    assert arrivals(required) == 0
    optional = await start_facade(TIW_AUTH_ISSUER=issuer.issuer)
    answer = await optional.stub.DescribeWhiteboardPush(DESCRIBE_PUSH, metadata=FRESH, timeout=5)
    assert answer.task_id == PUSH_TASK


@pytest.mark.slow  # waits out the gap between on-demand key fetches (5 s)
async def test_a_new_signing_key_is_fetched_once_and_its_tokens_accepted(
    start_facade: StartFacade, issuer: OidcServer
) -> None:
    facade = await start_facade(TIW_AUTH_ISSUER=issuer.issuer, TIW_AUTH_REQUIRED="true")
    await facade.stub.DescribeWhiteboardPush(DESCRIBE_PUSH, metadata=bearer(issuer.mint()), timeout=5)
    fetched = issuer.jwks_fetches
    issuer.rotate(retire=True)
    token = issuer.mint()
    # Within the gap since the start's fetch, a new key's token is refused, not held (docs).
    error = await refused(
        facade.stub.DescribeWhiteboardPush(DESCRIBE_PUSH, metadata=bearer(token), timeout=5)
    )
    assert error_info(error).reason == "UNKNOWN_KEY" and issuer.jwks_fetches == fetched
    await asyncio.sleep(MIN_REFRESH_GAP)
    for _ in range(3):
        await facade.stub.DescribeWhiteboardPush(DESCRIBE_PUSH, metadata=bearer(token), timeout=5)
    assert issuer.jwks_fetches == fetched + 1


async def test_tiw_caller_must_agree_with_the_token(start_facade: StartFacade, issuer: OidcServer) -> None:
    facade = await start_facade(TIW_AUTH_ISSUER=issuer.issuer)
    token = issuer.mint(sub=CLASSROOM)
    agreed = bearer(token, ("tiw-caller", CLASSROOM))
    await facade.stub.DescribeWhiteboardPush(DESCRIBE_PUSH, metadata=agreed, timeout=5)
    error = await refused(
        facade.stub.DescribeWhiteboardPush(
            DESCRIBE_PUSH, metadata=bearer(token, ("tiw-caller", "billing")), timeout=5
        )
    )
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert error_info(error).reason == "CALLER_MISMATCH"


async def test_idempotency_keys_are_each_proven_callers_own(
    start_facade: StartFacade, issuer: OidcServer
) -> None:
    facade = await start_facade(TIW_AUTH_ISSUER=issuer.issuer)
    key = ("idempotency-key", "the-same-key")
    mine = await facade.stub.CreateSnapshotTask(
        create_request(), metadata=bearer(issuer.mint(sub=BILLING), key)
    )
    again = await facade.stub.CreateSnapshotTask(
        create_request(), metadata=bearer(issuer.mint(sub=BILLING), key)
    )
    theirs = await facade.stub.CreateSnapshotTask(
        create_request(), metadata=bearer(issuer.mint(sub=CLASSROOM), key)
    )
    assert again.task_id == mine.task_id  # the same caller's retry: replayed
    assert theirs.task_id != mine.task_id  # another caller's same key: its own task, not billing's
    other = create_request()
    other.room_id += 1
    # Nor does another caller's key block it: a different request under the same key is its own.
    await facade.stub.CreateSnapshotTask(
        other, metadata=bearer(issuer.mint(sub=service_account("x", "y")), key)
    )
    assert len(facade.emulator.arrivals("CreateSnapshotTask")) == 3


# --- the policy -----------------------------------------------------------------------------------

POLICY = {
    "name": "tiw-facade",
    "deny_rules": [
        {
            "name": "classroom-never-stops",
            "source": {"principals": ["system:serviceaccount:classroom:*"]},
            "request": {"paths": [f"{SERVICE}/StopWhiteboardPush"]},
        }
    ],
    "allow_rules": [
        {
            "name": "classroom-reads",
            "source": {"principals": ["system:serviceaccount:classroom:*"]},
            "request": {"paths": [f"{SERVICE}/Describe*", "/tiw.facade.v1.TaskWatcher/*"]},
        },
        {
            "name": "billing-creates-for-its-app",
            "source": {"principals": [BILLING]},
            "request": {
                "paths": [f"{SERVICE}/CreateSnapshotTask"],
                "sdk_app_ids": [create_request().sdk_app_id],
            },
        },
    ],
}


def write_policy(path: Path, policy: object) -> Path:
    path.write_text(json.dumps(policy))
    return path


async def policed(
    start_facade: StartFacade, issuer: OidcServer, tmp_path: Path, mode: str = "enforce"
) -> Facade:
    policy = write_policy(tmp_path / "policy.json", POLICY)
    return await start_facade(
        TIW_AUTH_ISSUER=issuer.issuer,
        TIW_AUTHZ_POLICY_FILE=str(policy),
        TIW_AUTHZ_MODE=mode,
        TIW_CREDENTIALS_POLL="0.05",
    )


async def test_deny_wins_allow_by_prefix_and_by_sdk_app_id_and_denials_send_nothing(
    start_facade: StartFacade, issuer: OidcServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "tiw_facade.audit")
    facade = await policed(start_facade, issuer, tmp_path)
    classroom, billing = bearer(issuer.mint(sub=CLASSROOM)), bearer(issuer.mint(sub=BILLING))
    await facade.stub.DescribeWhiteboardPush(DESCRIBE_PUSH, metadata=classroom, timeout=5)  # by prefix
    await facade.stub.CreateSnapshotTask(create_request(), metadata=billing, timeout=5)  # its SdkAppId
    before = arrivals(facade)
    stop = await refused(facade.stub.StopWhiteboardPush(STOP_PUSH, metadata=classroom, timeout=5))
    assert stop.code() is grpc.StatusCode.PERMISSION_DENIED
    info = error_info(stop)
    assert info.reason == "NOT_AUTHORIZED" and info.metadata["rule"] == "classroom-never-stops"
    other_app = create_request()
    other_app.sdk_app_id += 1
    create = await refused(facade.stub.CreateSnapshotTask(other_app, metadata=billing, timeout=5))
    assert error_info(create).reason == "NOT_AUTHORIZED" and "rule" not in error_info(create).metadata
    unauthenticated = await refused(facade.stub.DescribeWhiteboardPush(DESCRIBE_PUSH, timeout=5))
    assert unauthenticated.code() is grpc.StatusCode.PERMISSION_DENIED  # no rule allows nobody
    assert arrivals(facade) == before
    assert counted(facade, "tiw_authz_decisions_total", decision="deny", rule="classroom-never-stops") == 1
    assert counted(facade, "tiw_authz_decisions_total", decision="allow", rule="classroom-reads") == 1
    denied = [line for line in audit_lines(caplog) if line.get("decision") == "deny"]
    assert [(line["principal"], line["rule"]) for line in denied][:2] == [
        (CLASSROOM, "classroom-never-stops"),
        (BILLING, None),
    ]
    assert all(line["outcome"] == "PERMISSION_DENIED" for line in denied)


async def test_a_watch_is_policed_too(start_facade: StartFacade, issuer: OidcServer, tmp_path: Path) -> None:
    facade = await policed(start_facade, issuer, tmp_path)
    watcher = watcher_pb2_grpc.TaskWatcherStub(facade.channel)
    request = watcher_pb2.WatchWhiteboardPushRequest(request=DESCRIBE_PUSH)
    stream = watcher.WatchWhiteboardPush(request, metadata=bearer(issuer.mint(sub=BILLING)), timeout=5)
    error = await refused(stream.read())
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED and error_info(error).reason == "NOT_AUTHORIZED"
    allowed = watcher.WatchWhiteboardPush(request, metadata=bearer(issuer.mint(sub=CLASSROOM)), timeout=5)
    first = await allowed.read()
    assert isinstance(first, pb.DescribeWhiteboardPushResponse) and first.task_id == PUSH_TASK
    allowed.cancel()


async def test_audit_mode_serves_what_it_would_deny_and_says_so(
    start_facade: StartFacade, issuer: OidcServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "tiw_facade.audit")
    facade = await policed(start_facade, issuer, tmp_path, mode="audit")
    await facade.stub.StopWhiteboardPush(STOP_PUSH, metadata=bearer(issuer.mint(sub=CLASSROOM)), timeout=5)
    assert len(facade.emulator.arrivals("StopWhiteboardPush")) == 1
    assert (
        counted(facade, "tiw_authz_decisions_total", decision="would_deny", rule="classroom-never-stops") == 1
    )
    (line,) = audit_lines(caplog)
    assert (line["decision"], line["rule"], line["outcome"]) == ("would_deny", "classroom-never-stops", "OK")


async def test_a_policy_changed_while_calls_flow_fails_none_and_a_bad_change_keeps_the_last_good(
    start_facade: StartFacade, issuer: OidcServer, tmp_path: Path
) -> None:
    facade = await policed(start_facade, issuer, tmp_path)
    token = bearer(issuer.mint(sub=CLASSROOM))
    policy = tmp_path / "policy.json"
    stop = asyncio.Event()

    async def calling() -> int:
        calls = 0
        while not stop.is_set():
            await facade.stub.DescribeWhiteboardPush(DESCRIBE_PUSH, metadata=token, timeout=5)
            calls += 1
        return calls

    callers = [asyncio.create_task(calling()) for _ in range(4)]
    reloads = counted(facade, "tiw_authz_decisions_total", decision="allow", rule="classroom-reads-too")
    renamed = json.loads(json.dumps(POLICY))
    for generation in range(6):  # swap between two policies that both allow these calls
        renamed["allow_rules"][0]["name"] = (
            "classroom-reads-too" if generation % 2 == 0 else "classroom-reads"
        )
        write_policy(policy, renamed)
        await asyncio.sleep(0.15)  # a few polls (TIW_CREDENTIALS_POLL=0.05), calls running meanwhile
    policy.write_text('{"name": "broken", "allow_rules": [{"name": "x", "request": {"paths": 7}}]}')
    await wait_until(lambda: counted(facade, "tiw_authz_policy_reload_failures_total") == 1)
    stop.set()
    assert all(count > 0 for count in await asyncio.gather(*callers))  # none raised
    assert (
        counted(facade, "tiw_authz_decisions_total", decision="allow", rule="classroom-reads-too") > reloads
    )
    # The last good policy (generation 5: "classroom-reads") still decides.
    await facade.stub.DescribeWhiteboardPush(DESCRIBE_PUSH, metadata=token, timeout=5)
    error = await refused(facade.stub.StopWhiteboardPush(STOP_PUSH, metadata=token, timeout=5))
    assert error_info(error).reason == "NOT_AUTHORIZED"


async def test_a_malformed_policy_at_start_is_refused_naming_the_rule_and_field(
    start_facade: StartFacade, issuer: OidcServer, tmp_path: Path
) -> None:
    bad = json.loads(json.dumps(POLICY))
    bad["allow_rules"][1]["request"]["sdk_app_ids"] = ["abc"]
    policy = write_policy(tmp_path / "policy.json", bad)
    with pytest.raises(PolicyError, match=r"billing-creates-for-its-app.*request\.sdk_app_ids\[0\]"):
        await start_facade(TIW_AUTHZ_POLICY_FILE=str(policy))
