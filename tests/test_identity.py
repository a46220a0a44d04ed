"""The caller's name from ``tiw-caller`` (no TLS), over real gRPC channels; TLS is in test_tls.py."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from support.facade import Facade, facade_environment
from support.rich_status import details, error_info
from support.tiw import PUSH_TASK, SDK_APP_ID
from tiw_facade import identity, settings
from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as pb
from tiw_facade.call_record import CURRENT_CALLER, CURRENT_SHARE, UNIDENTIFIED
from tiw_facade.failures import InvalidRequest
from tiw_facade.handler import SERVICE

ECHO = "test.Echo"


@pytest.fixture
async def echo() -> AsyncIterator[grpc.aio.Channel]:
    """A server whose methods answer the caller and the share CallerCheck left in CURRENT_CALLER and
    CURRENT_SHARE; ``billing`` is listed in TIW_CALLER_WEIGHTS."""

    async def caller(request: bytes, context: object) -> bytes:
        return CURRENT_CALLER.get().encode()

    async def share(request: bytes, context: object) -> bytes:
        return CURRENT_SHARE.get().encode()

    methods = {
        "Caller": grpc.unary_unary_rpc_method_handler(caller),
        "Share": grpc.unary_unary_rpc_method_handler(share),
    }
    check = identity.CallerCheck(frozenset({ECHO}), mutual=False, listed=["billing"])
    server = grpc.aio.server(interceptors=[check])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(ECHO, methods),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield channel
    await channel.close()
    await server.stop(0)


async def ask(channel: grpc.aio.Channel, *metadata: tuple[str, str], method: str = "Caller") -> str:
    answer: bytes = await channel.unary_unary(f"/{ECHO}/{method}")(b"", metadata=metadata, timeout=5)
    return answer.decode()


async def test_the_handler_sees_the_named_caller(echo: grpc.aio.Channel) -> None:
    assert await ask(echo, ("tiw-caller", "billing")) == "billing"
    assert await ask(echo, ("tiw-caller", "a.b_c-9" + "x" * 57)) == "a.b_c-9" + "x" * 57  # 64


async def test_calls_without_a_name_share_one_caller(echo: grpc.aio.Channel) -> None:
    assert await ask(echo) == UNIDENTIFIED
    assert await ask(echo, ("other-key", "billing")) == UNIDENTIFIED


async def test_only_listed_claimed_names_get_a_share_of_their_own(echo: grpc.aio.Channel) -> None:
    # The claimed name is kept as the caller; the share is the listed name's or the common one.
    assert await ask(echo, ("tiw-caller", "billing"), method="Share") == "billing"
    assert await ask(echo, ("tiw-caller", "invented-7")) == "invented-7"
    assert await ask(echo, ("tiw-caller", "invented-7"), method="Share") == UNIDENTIFIED
    assert await ask(echo, method="Share") == UNIDENTIFIED
    # Both are the call's alone: nothing is left behind for the next one.
    assert (CURRENT_CALLER.get(), CURRENT_SHARE.get()) == (UNIDENTIFIED,) * 2


@pytest.mark.parametrize(
    ("caller", "share"),
    [
        (
            identity.Caller("billing", identity.Proof.CLAIMED),
            "billing",
        ),  # listed: the operator vouches for it
        (identity.Caller("invented", identity.Proof.CLAIMED), UNIDENTIFIED),
        (identity.Caller(UNIDENTIFIED, identity.Proof.NONE), UNIDENTIFIED),
        (
            identity.Caller("spiffe://td/ns/a/sa/b", identity.Proof.CERTIFICATE),
            "spiffe://td/ns/a/sa/b",
        ),  # not listed
        (identity.Caller("billing", identity.Proof.CERTIFICATE), "billing"),
    ],
)
def test_a_share_is_a_proven_or_listed_name(caller: identity.Caller, share: str) -> None:
    assert identity.share_of(caller, frozenset({"billing"})) == share


@pytest.mark.parametrize(
    "metadata",
    [
        [("tiw-caller", "")],
        [("tiw-caller", "x" * 65)],
        [("tiw-caller", "bill ing")],
        [("tiw-caller", "billing/2")],
        [("tiw-caller", "spiffe://example.org/billing")],  # only an mTLS certificate's name may echo it
        [("tiw-caller", "bïlling")],
        [("tiw-caller", "billing"), ("tiw-caller", "billing")],
    ],
)
def test_malformed_names_are_invalid_requests_naming_the_key(metadata: list[tuple[str, str]]) -> None:
    with pytest.raises(InvalidRequest) as caught:
        identity.claimed_name([value for _, value in metadata])
    assert [field for field, _ in caught.value.violations] == ["tiw-caller"]


async def test_a_malformed_name_is_refused_before_anything_is_sent(facade: Facade) -> None:
    request = pb.DescribeWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=PUSH_TASK)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await facade.stub.DescribeWhiteboardPush(request, metadata=(("tiw-caller", "not ok"),), timeout=5)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    violations = details(caught.value)["BadRequest"].field_violations  # type: ignore[attr-defined]
    assert [v.field for v in violations] == ["tiw-caller"]
    assert error_info(caught.value).metadata["action"] == "DescribeWhiteboardPush"
    assert facade.emulator.stats()["DescribeWhiteboardPush"].accepted == 0
    # Counted and logged like any answer: the RpcObserver is outside the check.
    handled = facade.server.metrics.registry.get_sample_value(
        "grpc_server_handled_total",
        {
            "grpc_type": "unary",
            "grpc_service": SERVICE.full_name,
            "grpc_method": "DescribeWhiteboardPush",
            "grpc_code": "InvalidArgument",  # go-grpc-prometheus spells codes so
        },
    )
    assert handled == 1

    named = await facade.stub.DescribeWhiteboardPush(
        request, metadata=(("tiw-caller", "billing"),), timeout=5
    )
    assert named.task_id == PUSH_TASK


async def test_health_does_not_check_the_name(facade: Facade) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(facade.channel)
    answer = await stub.Check(health_pb2.HealthCheckRequest(), metadata=(("tiw-caller", "?"),), timeout=5)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


def load(**extra: str) -> settings.Settings:
    return settings.load(facade_environment("http://127.0.0.1:1", **extra))


def test_caller_weights() -> None:
    assert load().caller_weights == ()
    weights = load(TIW_CALLER_WEIGHTS=" billing=3, classroom=1,spiffe://td/ns/a/sa/b=2 ").caller_weights
    assert dict(weights) == {"billing": 3, "classroom": 1, "spiffe://td/ns/a/sa/b": 2}


@pytest.mark.parametrize(
    "raw", ["billing", "billing=0", "billing=-1", "billing=1.5", "a b=1", "=2", "x=1,x=2"]
)
def test_malformed_caller_weights_name_the_variable(raw: str) -> None:
    with pytest.raises(settings.SettingsError, match=r"^TIW_CALLER_WEIGHTS="):
        load(TIW_CALLER_WEIGHTS=raw)
