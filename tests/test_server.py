"""The server as callers and operators meet it: health, reflection, metrics, logs, configuration."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import subprocess
import sys

import aiohttp
import grpc
import pytest
from conftest import Facade, StartFacade
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as pb

SERVICE = "tiw.v20190919.TiwService"
ACTIONS = [
    "CreateSnapshotTask",
    "DescribeSnapshotTask",
    "DescribeVideoGenerationTask",
    "DescribeWhiteboardPush",
    "StopWhiteboardPush",
]


async def test_health_is_serving(facade: Facade) -> None:
    stub = health_pb2_grpc.HealthStub(facade.channel)
    for service in ("", SERVICE):
        answer = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def list_services(channel: grpc.aio.Channel) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=2
    )
    async for answer in call:
        return sorted(s.name for s in answer.list_services_response.service)
    return []


async def test_reflection_lists_the_service(facade: Facade) -> None:
    assert SERVICE in await list_services(facade.channel)
    assert "grpc.health.v1.Health" in await list_services(facade.channel)


async def test_reflection_can_be_turned_off(start_facade: StartFacade) -> None:
    facade = await start_facade(TIW_REFLECTION="false")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await list_services(facade.channel)
    assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED


async def scrape(facade: Facade) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{facade.server.http_port}/metrics") as r,
    ):
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        return await r.text()


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


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


def test_real_mode_needs_credentials() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tiw_facade.cli", "serve"],
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "TENCENTCLOUD_SECRET_ID is required" in result.stderr
    json.dumps(result.stderr)  # one readable line, no traceback
    assert "Traceback" not in result.stderr
