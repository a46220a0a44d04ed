"""Each component built alone, from its own small config and its collaborators, without a ``Settings``
(server.py is the one place that maps the settings to them), and one real call through each: the TIW
client over real HTTP to the real emulator, pod identity against the emulator's STS, the in-process
limiter and idempotency keys, and the handlers behind a real gRPC server.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import grpc
import pytest
from support.rich_status import error_info
from support.tiw import PUSH_TASK, SDK_APP_ID, create_request
from support.watching import ended, snapshot_watch
from tiw_facade import credentials
from tiw_facade._proto.tiw.facade.v1 import watcher_pb2 as wpb
from tiw_facade._proto.tiw.facade.v1 import watcher_pb2_grpc
from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as pb
from tiw_facade._proto.tiw.v20190919 import tiw_pb2_grpc
from tiw_facade.answers import Answers, Config
from tiw_facade.emulator import DEMO_REGION, DEMO_SECRET_ID, DEMO_SECRET_KEY, Emulator, EmulatorConfig
from tiw_facade.handler import REPLAY_METADATA, build_handler, fetcher
from tiw_facade.idempotency import Keys, KeysConfig, MemoryStore
from tiw_facade.limiter import LimiterConfig, QuotaExceeded, create_limiter
from tiw_facade.metrics import Metrics
from tiw_facade.pod_identity import WebIdentity, WebIdentityConfig
from tiw_facade.signing import Credentials
from tiw_facade.transport import AiohttpTransport
from tiw_facade.upstream import ClientConfig, Request, TiwClient
from tiw_facade.watcher import WatchSlots, build_watcher

DEMO_KEY = Credentials(DEMO_SECRET_ID, DEMO_SECRET_KEY)
DESCRIBE_PUSH: Request[dict[str, Any]] = Request(
    "DescribeWhiteboardPush", {"SdkAppId": SDK_APP_ID, "TaskId": PUSH_TASK}
)
WEB_IDENTITY_TOKEN = "eyJhbGciOiJSUzI1NiJ9.components-test-web-identity-token.signature"


@contextlib.asynccontextmanager
async def tiw_client(endpoint: str, source: credentials.Source) -> AsyncIterator[TiwClient]:
    """A TIW client and what it is handed, each closed after what uses it, as server.py does."""
    async with contextlib.AsyncExitStack() as resources:
        limiter = create_limiter(LimiterConfig())
        resources.push_async_callback(limiter.aclose)
        transport = AiohttpTransport(endpoint + "/")
        resources.push_async_callback(transport.aclose)
        await transport.start()
        resources.push_async_callback(source.aclose)
        await source.start()
        client = TiwClient(
            ClientConfig(endpoint, DEMO_REGION), limiter, transport=transport, credentials=source
        )
        resources.push_async_callback(client.aclose)
        yield client


@contextlib.asynccontextmanager
async def grpc_server(*handlers: grpc.GenericRpcHandler) -> AsyncIterator[grpc.aio.Channel]:
    """A bare gRPC server of ``handlers`` on loopback, and a channel to it."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(handlers)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(0)


async def test_the_tiw_client_calls_the_emulator_signed_by_a_static_key(emulator: Emulator) -> None:
    source = credentials.chain(
        credentials.CredentialsConfig(secret_id=DEMO_SECRET_ID, secret_key=DEMO_SECRET_KEY),
        Metrics.unobserved(),
        clock=time.time,
    )
    assert isinstance(source, credentials.Static)
    async with tiw_client(emulator.url, source) as client:
        answer: dict[str, Any] = await client.call(DESCRIBE_PUSH, time.monotonic() + 5)
    assert answer["TaskId"] == PUSH_TASK
    assert emulator.signers[DEMO_SECRET_ID] == 1


async def test_pod_identity_gets_credentials_from_the_emulators_sts_and_they_sign(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(WEB_IDENTITY_TOKEN + "\n")
    emulator = Emulator(EmulatorConfig(web_identity_tokens=frozenset({WEB_IDENTITY_TOKEN})))
    await emulator.start("127.0.0.1", 0)
    try:
        config = WebIdentityConfig(
            region=DEMO_REGION,
            provider_id="tke-cluster-oidc",
            token_file=str(token_file),
            role_arn="qcs::cam::uin/100000000001:roleName/tiw-facade",
            sts_endpoint=emulator.url,
        )
        source = WebIdentity(config, metrics=Metrics.unobserved(), clock=time.time)
        async with tiw_client(emulator.url, source) as client:
            key = await source.get()
            await client.call(DESCRIBE_PUSH, time.monotonic() + 5)
        assert emulator.sts.calls == 1
        assert key.secret_id.startswith("AKIDtmp") and emulator.signers[key.secret_id] == 1
    finally:
        await emulator.stop()


async def test_the_in_process_limiter_admits_its_rate_then_refuses() -> None:
    limiter = create_limiter(LimiterConfig(rate_limit=2, max_queue_wait=0.1))
    try:
        assert limiter.health()["detail"] == "in-process: 2 per 1s per action"
        for _ in range(2):
            (await limiter.acquire("DescribeSnapshotTask", deadline=None, hold=1)).release()
        with pytest.raises(QuotaExceeded):  # both tokens come back a window after their release
            await limiter.acquire("DescribeSnapshotTask", deadline=None, hold=1)
    finally:
        await limiter.aclose()


async def test_in_process_keys_send_once_and_replay() -> None:
    keys = Keys.from_config(KeysConfig(scope="test", max_keys=10))
    assert isinstance(keys.store, MemoryStore)
    sent: list[str] = []
    replays: list[str] = []

    async def send() -> str:
        sent.append("sent")
        return "task-1"

    async def see_through(work: Coroutine[Any, Any, str], deadline: float | None, overdue: Any) -> str:
        return await work

    async def replayed() -> None:
        replays.append("replayed")

    async def call() -> str:
        return await keys.call(
            "key-1",
            "fingerprint",
            deadline=time.monotonic() + 5,
            send=send,
            see_through=see_through,
            encode=lambda answer: (answer.encode(), ""),
            decode=bytes.decode,
            replayed=replayed,
        )

    try:
        assert [await call(), await call()] == ["task-1", "task-1"]
        assert (sent, replays) == (["sent"], ["replayed"])
    finally:
        await keys.aclose()


async def test_the_handler_with_its_keys_creates_once_per_idempotency_key(emulator: Emulator) -> None:
    keys = Keys.from_config(KeysConfig(scope="test"))
    try:
        async with (
            tiw_client(emulator.url, credentials.Static(DEMO_KEY, "the demo key")) as client,
            grpc_server(build_handler(client, keys)) as channel,
        ):
            stub = tiw_pb2_grpc.TiwServiceStub(channel)
            metadata = (("idempotency-key", "components-create-1"),)
            first = await stub.CreateSnapshotTask(create_request(), timeout=5, metadata=metadata)
            retry = stub.CreateSnapshotTask(create_request(), timeout=5, metadata=metadata)
            assert (await retry).task_id == first.task_id
            assert tuple(await retry.initial_metadata()) == REPLAY_METADATA
    finally:
        await keys.aclose()
    assert emulator.stats()["CreateSnapshotTask"].accepted == 1


async def test_the_watcher_streams_from_the_answers_within_its_cap(emulator: Emulator) -> None:
    finished = emulator.add_snapshot_task(sdk_app_id=SDK_APP_ID)
    emulator.tasks.snapshots[SDK_APP_ID, finished].finishes = time.time()
    pushing = pb.DescribeWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=emulator.add_push_task())
    async with tiw_client(emulator.url, credentials.Static(DEMO_KEY, "the demo key")) as client:
        answers = Answers(Config(), fetcher(client))
        await answers.start()
        try:
            watcher = build_watcher(answers, Metrics.unobserved(), slots=WatchSlots(1, 1))
            async with grpc_server(watcher) as channel:
                stub = watcher_pb2_grpc.TaskWatcherStub(channel)
                ended_at_final = [m.status async for m in stub.WatchSnapshotTask(snapshot_watch(finished))]
                assert ended_at_final == ["Finished"]
                # A push is never final: its stream stays open and holds the one slot.
                held = stub.WatchWhiteboardPush(wpb.WatchWhiteboardPushRequest(request=pushing), timeout=5)
                assert (await held.read()).task_id == pushing.task_id
                refused = await ended(stub.WatchSnapshotTask(snapshot_watch(finished), timeout=5))
                assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert error_info(refused).reason == "TOO_MANY_WATCHES"
                held.cancel()
        finally:
            await answers.aclose()
