"""The facade as a process, as Kubernetes and a newcomer meet it: signals, drain, exit codes, logs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.facade import facade_environment
from support.redis_server import RedisServer
from support.tiw import PUSH_TASK, SDK_APP_ID
from support.waiting import wait_until
from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as pb
from tiw_facade._proto.tiw.v20190919 import tiw_pb2_grpc
from tiw_facade.emulator import DEMO_SECRET_KEY, Emulator, Fault, FaultKind

pytestmark = pytest.mark.slow  # the facade as a process of its own: started, signalled, drained


class FacadeProcess:
    def __init__(self, args: list[str], env: dict[str, str], grpc_port: int) -> None:
        self.grpc_port = grpc_port
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tiw_facade.cli", *args],
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}")
        self.stub = tiw_pb2_grpc.TiwServiceStub(self.channel)

    async def wait_serving(self, within: float = 20.0) -> None:
        health = health_pb2_grpc.HealthStub(self.channel)
        end = time.monotonic() + within
        while True:
            assert self.process.poll() is None, self.process.communicate()[1]
            try:
                answer = await health.Check(
                    health_pb2.HealthCheckRequest(service="tiw.v20190919.TiwService"), timeout=1
                )
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            assert time.monotonic() < end, "the facade did not become SERVING"
            await asyncio.sleep(0.1)

    def finish(self, timeout: float = 30.0) -> tuple[int, str]:
        _, stderr = self.process.communicate(timeout=timeout)
        return self.process.returncode, stderr

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


async def wait_until_degraded(http_port: int, within: float = 15.0) -> None:
    """Until /healthz says the limiter lost Redis (and so has logged it)."""
    url = f"http://127.0.0.1:{http_port}/healthz"
    end = time.monotonic() + within
    while True:
        with urllib.request.urlopen(url, timeout=2) as page:  # noqa: ASYNC210 (a test, a local page)
            if json.load(page)["limiter"]["degraded"]:
                return
        assert time.monotonic() < end, "the limiter did not notice Redis was gone"
        await asyncio.sleep(0.1)


@pytest.fixture
def free_ports(unused_tcp_port_factory: object) -> Iterator[tuple[int, int]]:
    factory = unused_tcp_port_factory
    yield factory(), factory()  # type: ignore[operator]


@pytest.fixture
async def process_factory() -> AsyncIterator[list[FacadeProcess]]:
    started: list[FacadeProcess] = []
    yield started
    for process in started:
        await process.channel.close()
        process.kill()


async def sigterm_during_a_call(
    emulator: Emulator, free_ports: tuple[int, int], process_factory: list[FacadeProcess]
) -> tuple[FacadeProcess, asyncio.Future[pb.DescribeWhiteboardPushResponse]]:
    """A serving facade process with one slow call in flight at TIW, just sent SIGTERM."""
    grpc_port, http_port = free_ports
    env = facade_environment(emulator.url, TIW_GRPC_PORT=str(grpc_port), TIW_HTTP_PORT=str(http_port))
    facade = FacadeProcess(["serve"], env, grpc_port)
    process_factory.append(facade)
    await facade.wait_serving()
    emulator.add_fault(Fault(FaultKind.LATENCY, action="DescribeWhiteboardPush", delay=1.5))
    in_flight = asyncio.ensure_future(
        facade.stub.DescribeWhiteboardPush(
            pb.DescribeWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=PUSH_TASK), timeout=10
        )
    )
    await wait_until(lambda: emulator.stats()["DescribeWhiteboardPush"].accepted > 0)  # it reached TIW
    facade.process.send_signal(signal.SIGTERM)
    return facade, in_flight


async def test_sigterm_drains_in_flight_calls_and_exits_0(
    emulator: Emulator, free_ports: tuple[int, int], process_factory: list[FacadeProcess]
) -> None:
    facade, in_flight = await sigterm_during_a_call(emulator, free_ports, process_factory)
    answer = await in_flight
    assert answer.task_id == PUSH_TASK, "the in-flight call was answered"
    code, stderr = await asyncio.to_thread(facade.finish)
    assert code == 0, stderr
    messages = [json.loads(line)["msg"] for line in stderr.splitlines()]
    assert (
        messages.index("signal received: stopping") < messages.index("draining") < messages.index("stopped")
    )


async def test_new_calls_are_refused_while_draining(
    emulator: Emulator, free_ports: tuple[int, int], process_factory: list[FacadeProcess]
) -> None:
    facade, in_flight = await sigterm_during_a_call(emulator, free_ports, process_factory)
    grpc_port = facade.grpc_port
    await asyncio.sleep(0.3)
    fresh = grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}")
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await tiw_pb2_grpc.TiwServiceStub(fresh).DescribeWhiteboardPush(
                pb.DescribeWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=PUSH_TASK), timeout=2
            )
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        await fresh.close()
    assert (await in_flight).task_id == PUSH_TASK
    assert (await asyncio.to_thread(facade.finish))[0] == 0


async def test_no_secret_in_any_log_line(
    emulator: Emulator,
    free_ports: tuple[int, int],
    process_factory: list[FacadeProcess],
) -> None:
    grpc_port, http_port = free_ports
    token = "session-token-that-must-never-be-logged"
    redis_password = "redis-password-that-must-never-be-logged"
    with RedisServer(password=redis_password) as redis:
        env = facade_environment(
            emulator.url,
            TIW_GRPC_PORT=str(grpc_port),
            TIW_HTTP_PORT=str(http_port),
            TIW_LOG_LEVEL="DEBUG",
            TENCENTCLOUD_SESSION_TOKEN=token,
            TIW_REDIS_URL=redis.url,
        )
        facade = FacadeProcess(["serve"], env, grpc_port)
        process_factory.append(facade)
        await facade.wait_serving()
        # Calls that reach TIW (with the token in their headers) and fail in its ways and ours.
        # tiw-max-age-ms 0: the second must reach TIW too, not the answer the first left in the cache.
        request = pb.DescribeWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=PUSH_TASK)
        fresh = (("tiw-max-age-ms", "0"),)
        await facade.stub.DescribeWhiteboardPush(request, timeout=5, metadata=fresh)
        emulator.add_fault(Fault(FaultKind.ERROR_CODE, code="AuthFailure.SignatureFailure", count=1))
        with pytest.raises(grpc.aio.AioRpcError):
            await facade.stub.DescribeWhiteboardPush(request, timeout=5, metadata=fresh)
        with pytest.raises(grpc.aio.AioRpcError):
            await facade.stub.DescribeWhiteboardPush(pb.DescribeWhiteboardPushRequest(), timeout=5)
        # Redis goes away: the degraded-mode log lines mention its URL.
        redis.kill()
        await wait_until_degraded(http_port)
    facade.process.send_signal(signal.SIGTERM)
    code, stderr = await asyncio.to_thread(facade.finish)
    assert code == 0
    lines = stderr.splitlines()
    assert any(json.loads(line).get("level") == "DEBUG" for line in lines), "DEBUG was on"
    assert any("unreachable" in line for line in lines), "the Redis URL went through the logs (degraded mode)"
    for secret in (DEMO_SECRET_KEY, token, redis_password):
        assert secret not in stderr
    for line in lines:
        json.loads(line)  # every line is one JSON object


async def test_serve_with_the_embedded_emulator(
    free_ports: tuple[int, int], process_factory: list[FacadeProcess]
) -> None:
    grpc_port, http_port = free_ports
    # What `make serve` runs, with no credentials in the environment at all.
    facade = FacadeProcess(
        ["serve", "--emulator", "--grpc-port", str(grpc_port), "--http-port", str(http_port)], {}, grpc_port
    )
    process_factory.append(facade)
    await facade.wait_serving()
    created = await facade.stub.CreateSnapshotTask(
        pb.CreateSnapshotTaskRequest(whiteboard=pb.SnapshotWhiteboard(), sdk_app_id=1400123480, room_id=1),
        timeout=5,
    )
    assert created.task_id
    facade.process.send_signal(signal.SIGINT)
    code, stderr = await asyncio.to_thread(facade.finish)
    assert code == 0, stderr


@pytest.mark.parametrize("shared", ["TIW_GRPC_PORT", "TIW_HTTP_PORT"])
async def test_a_second_facade_on_a_busy_port_exits_naming_it(
    emulator: Emulator,
    free_ports: tuple[int, int],
    process_factory: list[FacadeProcess],
    unused_tcp_port_factory: Callable[[], int],
    shared: str,
) -> None:
    grpc_port, http_port = free_ports
    ports = {"TIW_GRPC_PORT": str(grpc_port), "TIW_HTTP_PORT": str(http_port)}
    first = FacadeProcess(["serve"], facade_environment(emulator.url, **ports), grpc_port)
    process_factory.append(first)
    await first.wait_serving()
    # The second one shares one port with the first; its other port is free.
    other = next(name for name in ports if name != shared)
    second_ports = {**ports, other: str(unused_tcp_port_factory())}
    second = FacadeProcess(["serve"], facade_environment(emulator.url, **second_ports), grpc_port)
    process_factory.append(second)
    code, stderr = await asyncio.to_thread(second.finish, 20)
    assert code == 1, stderr
    assert "Traceback" not in stderr
    ours = [json.loads(line) for line in stderr.splitlines() if shared in line]
    assert len(ours) == 1, stderr
    assert ours[0]["level"] == "ERROR"
    assert f"127.0.0.1:{ports[shared]}" in ours[0]["error"]
    await first.wait_serving(within=2)  # the first one is undisturbed
