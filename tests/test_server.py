"""The server as callers and operators meet it: health, reflection, metrics, logs, configuration."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import pathlib
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from support.facade import Facade, StartFacade, facade_environment
from support.pages import samples, scrape
from support.tiw import ACTIONS, SERVICE
from tiw_facade import server as server_module
from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as pb
from tiw_facade.emulator import Emulator
from tiw_facade.limiter import Limiter, LimiterConfig, create_limiter
from tiw_facade.metrics import Metrics
from tiw_facade.server import BindError, FacadeServer
from tiw_facade.settings import Settings, load, variable
from tiw_facade.upstream import TiwClient

ROOT = pathlib.Path(__file__).resolve().parent.parent


async def test_health_is_serving(facade: Facade) -> None:
    stub = health_pb2_grpc.HealthStub(facade.channel)
    for service in ("", SERVICE):
        answer = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def list_services(channel: grpc.aio.Channel, version: str = "v1alpha") -> list[str]:
    # v1 and v1alpha messages are field-for-field identical, so v1alpha's classes speak both.
    info = channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    call = info(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=2)
    async for answer in call:
        return sorted(s.name for s in answer.list_services_response.service)
    return []


async def test_health_list_reports_every_service(facade: Facade) -> None:
    stub = health_pb2_grpc.HealthStub(facade.channel)
    answer = await stub.List(health_pb2.HealthListRequest(), timeout=2)
    statuses = {name: response.status for name, response in answer.statuses.items()}
    assert statuses == {
        "": health_pb2.HealthCheckResponse.SERVING,
        SERVICE: health_pb2.HealthCheckResponse.SERVING,
        "tiw.facade.v1.TaskWatcher": health_pb2.HealthCheckResponse.SERVING,
        "tiw.facade.v1.EventStream": health_pb2.HealthCheckResponse.SERVING,
    }


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
async def test_reflection_lists_the_service(facade: Facade, version: str) -> None:
    services = await list_services(facade.channel, version)
    assert SERVICE in services
    assert "grpc.health.v1.Health" in services
    assert {"grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"} <= set(
        services
    )


@pytest.mark.slow
async def test_buf_curl_reads_the_schema_over_reflection_v1(facade: Facade) -> None:
    buf = ROOT / "node_modules" / ".bin" / "buf"
    assert buf.exists(), "buf is installed by `make test` (scripts/install-tools)"
    command = [
        str(buf),
        "curl",
        "--protocol",
        "grpc",
        "--http2-prior-knowledge",
        "--reflect-protocol",
        "grpc-v1",
    ]
    url = f"http://{facade.target}"
    methods = await asyncio.to_thread(
        subprocess.run,
        [*command, "--list-methods", url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert methods.returncode == 0, methods.stderr
    assert f"{SERVICE}/DescribeWhiteboardPush" in methods.stdout.split()
    request = '{"SdkAppId": 1400000001, "TaskId": "ghucnligqtgtvk2624mb"}'
    call = await asyncio.to_thread(
        subprocess.run,
        [*command, "-d", request, f"{url}/{SERVICE}/DescribeWhiteboardPush"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert call.returncode == 0, call.stderr
    assert json.loads(call.stdout)["TaskId"] == "ghucnligqtgtvk2624mb"


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
async def test_reflection_can_be_turned_off(start_facade: StartFacade, version: str) -> None:
    facade = await start_facade(TIW_REFLECTION="false")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await list_services(facade.channel, version)
    assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED


async def test_metrics_follow_go_grpc_prometheus(facade: Facade) -> None:
    await facade.stub.DescribeWhiteboardPush(
        pb.DescribeWhiteboardPushRequest(sdk_app_id=1400000001, task_id="ghucnligqtgtvk2624mb"), timeout=5
    )
    with pytest.raises(grpc.aio.AioRpcError):
        await facade.stub.DescribeWhiteboardPush(pb.DescribeWhiteboardPushRequest(), timeout=5)
    text = await scrape(facade)
    base = (("grpc_method", "DescribeWhiteboardPush"), ("grpc_service", SERVICE), ("grpc_type", "unary"))
    handled = samples(text, "grpc_server_handled_total")
    assert handled[(("grpc_code", "OK"), *base)] == 1
    assert handled[(("grpc_code", "InvalidArgument"), *base)] == 1
    assert samples(text, "grpc_server_started_total")[base] == 2
    assert samples(text, "grpc_server_handling_seconds_count")[base] == 2
    assert (
        samples(text, "tiw_upstream_requests_total")[(("action", "DescribeWhiteboardPush"), ("code", "OK"))]
        == 1
    )
    # Every action's series exist from start-up, so dashboards and alerts have no gaps.
    started = samples(text, "grpc_server_started_total")
    for action in ACTIONS:
        assert (("grpc_method", action), ("grpc_service", SERVICE), ("grpc_type", "unary")) in started
        assert (("action", action), ("code", "OK")) in samples(text, "tiw_upstream_requests_total")
        assert (("action", action),) in samples(text, "tiw_limiter_limit")
    assert samples(text, "tiw_facade_build_info")


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool is installed by `make test` (scripts/install-tools)"
)
async def test_promtool_accepts_the_exposition(facade: Facade) -> None:
    with pytest.raises(grpc.aio.AioRpcError):  # an error code too, so every kind of series is exposed
        await facade.stub.DescribeWhiteboardPush(
            pb.DescribeWhiteboardPushRequest(sdk_app_id=1400000001, task_id="nope"), timeout=5
        )
    text = await scrape(facade)
    result = await asyncio.to_thread(
        subprocess.run,
        ["promtool", "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


async def test_healthz_reports_the_limiter(facade: Facade) -> None:
    url = f"http://127.0.0.1:{facade.server.http_port}/healthz"
    async with aiohttp.ClientSession() as session, session.get(url) as r:
        assert r.status == 200
        body = await r.json()
    assert body["status"] == "SERVING"
    assert body["limiter"]["backend"] == "memory"
    assert body["limiter"]["degraded"] is False


async def test_one_log_line_per_rpc(facade: Facade, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tiw_facade.rpc")
    answer = await facade.stub.DescribeWhiteboardPush(
        pb.DescribeWhiteboardPushRequest(sdk_app_id=1400000001, task_id="ghucnligqtgtvk2624mb"), timeout=5
    )
    lines = [r for r in caplog.records if r.name == "tiw_facade.rpc"]
    assert len(lines) == 1
    record = lines[0]
    assert record.grpc_method == f"/{SERVICE}/DescribeWhiteboardPush"  # type: ignore[attr-defined]
    assert record.grpc_code == "OK"  # type: ignore[attr-defined]
    assert record.tiw_action == "DescribeWhiteboardPush"  # type: ignore[attr-defined]
    assert record.tiw_request_id == answer.request_id  # type: ignore[attr-defined]
    assert record.duration_ms > 0  # type: ignore[attr-defined]


@pytest.mark.slow
def test_a_bad_setting_stops_the_process_before_it_listens() -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "TENCENTCLOUD_SECRET_ID": "AKIDx",
        "TENCENTCLOUD_SECRET_KEY": "k",
        "TENCENTCLOUD_REGION": "ap-guangzhou",
        "TIW_GRPC_PORT": "not-a-port",
    }
    result = subprocess.run(
        [sys.executable, "-m", "tiw_facade.cli", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "TIW_GRPC_PORT" in lines[0] and "not-a-port" in lines[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("env", "said"),
    [
        ({}, "TENCENTCLOUD_REGION is required"),
        # A region but no key from any source (environment, credentials file, pod identity).
        ({"TENCENTCLOUD_REGION": "ap-guangzhou", "HOME": "/nonexistent"}, "tiw-facade: credentials:"),
    ],
)
def test_real_mode_needs_credentials(env: dict[str, str], said: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tiw_facade.cli", "serve"],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert said in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # one readable line
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("offered", ["gzip", "deflate, gzip;q=1.0", "br, gzip"])
async def test_metrics_are_gzipped_when_asked(facade: Facade, offered: str) -> None:
    url = f"http://127.0.0.1:{facade.server.http_port}/metrics"
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.get(url, headers={"Accept-Encoding": offered}) as r,
    ):
        assert r.status == 200
        assert r.headers.get("Content-Encoding") == "gzip"
        body = await r.read()
    text = gzip.decompress(body).decode()
    assert samples(text, "tiw_facade_build_info")


async def test_metrics_are_plain_without_accept_encoding(facade: Facade) -> None:
    url = f"http://127.0.0.1:{facade.server.http_port}/metrics"
    async with (
        aiohttp.ClientSession(auto_decompress=False, skip_auto_headers=["Accept-Encoding"]) as session,
        session.get(url) as r,
    ):
        assert "Content-Encoding" not in r.headers
        assert samples(await r.text(), "tiw_facade_build_info")


# --- lifecycle: what a failed start leaves behind, and stop() -----------------------------------


async def refuses_connections(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    await writer.wait_closed()
    return False


def facade_settings(emulator: Emulator, grpc_port: int, http_port: int) -> Settings:
    return load(facade_environment(emulator.url, TIW_GRPC_PORT=str(grpc_port), TIW_HTTP_PORT=str(http_port)))


@pytest.mark.parametrize("busy", ["grpc_port", "http_port"])
async def test_a_failed_start_names_the_port_and_closes_what_it_opened(
    emulator: Emulator, unused_tcp_port_factory: Callable[[], int], busy: str
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        free = unused_tcp_port_factory()
        ports = {"grpc_port": free, "http_port": free, busy: taken}
        server = FacadeServer(facade_settings(emulator, ports["grpc_port"], ports["http_port"]))
        with pytest.raises(BindError) as caught:
            await server.start()
        assert str(caught.value).startswith(f"{variable(busy)}: cannot listen on 127.0.0.1:{taken}")
        assert await refuses_connections(free), "the other server was left listening"
        await server.stop()  # nothing left to close: returns quietly


async def test_two_facades_cannot_share_a_grpc_port(
    facade: Facade, unused_tcp_port: int, emulator: Emulator
) -> None:
    second = FacadeServer(facade_settings(emulator, facade.server.grpc_port, unused_tcp_port))
    with pytest.raises(BindError, match="TIW_GRPC_PORT"):
        await second.start()


async def test_stop_closes_everything_even_if_one_close_fails(
    emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed: list[str] = []

    class FailingClient(TiwClient):
        async def aclose(self) -> None:
            await super().aclose()
            raise RuntimeError("client close failed")

    def recording_limiter(config: LimiterConfig, metrics: Metrics, **options: Any) -> Limiter:
        limiter = create_limiter(config, metrics, **options)
        real_close = limiter.aclose

        async def aclose() -> None:
            closed.append("limiter")
            await real_close()

        limiter.aclose = aclose  # type: ignore[method-assign]
        return limiter

    monkeypatch.setattr(server_module, "TiwClient", FailingClient)
    monkeypatch.setattr(server_module, "create_limiter", recording_limiter)
    server = FacadeServer(facade_settings(emulator, 0, 0))
    await server.start()
    with pytest.raises(RuntimeError, match="client close failed"):
        await server.stop(0)
    assert closed == ["limiter"], "the limiter was closed after the client's close raised"
    assert await refuses_connections(server.grpc_port)
    assert await refuses_connections(server.http_port)
    await server.stop(0)  # idempotent: nothing is closed twice, nothing raises
    assert closed == ["limiter"]
