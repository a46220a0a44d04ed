"""The container image as Kubernetes runs it: built from the Dockerfile by scripts/build-image, run by
podman with the pod's restrictions, against the emulator on this host.

Skipped where the image was not built (a developer who never ran scripts/build-image); under CI=true
a missing image fails instead, so CI cannot pass without having tested the image. docs/image.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from support.facade import facade_environment
from support.tiw import PUSH_TASK, SDK_APP_ID
from tiw_facade import __version__
from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as pb
from tiw_facade._proto.tiw.v20190919 import tiw_pb2_grpc
from tiw_facade.emulator import Emulator

IMAGE = os.environ.get("TIW_IMAGE", "localhost/tiw-facade:local")
# The podman settings scripts/build-image found this machine needs (runtime, ulimits).
CONTAINERS_CONF = Path(__file__).resolve().parents[1] / "build" / "image" / "containers.conf"
SERVICE = "tiw.v20190919.TiwService"


def podman(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}
    return subprocess.run(
        ["podman", *args], check=False, env=env, capture_output=True, text=True, timeout=timeout
    )


def missing_image() -> str | None:
    """Why the image cannot be tested here, or None when it can."""
    if shutil.which("podman") is None:
        return "podman is not installed"
    if not CONTAINERS_CONF.is_file():
        return f"{CONTAINERS_CONF} is missing"
    if podman("image", "exists", IMAGE).returncode != 0:
        return f"podman has no image {IMAGE}"
    return None


@pytest.fixture(scope="module")
def image() -> str:
    reason = missing_image()
    if reason is not None:
        message = f"{reason}: run scripts/build-image (docs/image.md)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return IMAGE


@dataclass
class Container:
    name: str
    grpc_port: int
    http_port: int

    async def podman(self, *args: str) -> subprocess.CompletedProcess[str]:
        # In a thread: the emulator the container talks to runs on this test's event loop.
        return await asyncio.to_thread(podman, *args)

    async def state(self) -> dict[str, object]:
        inspected = await self.podman("inspect", "--format", "{{json .State}}", self.name)
        assert inspected.returncode == 0, inspected.stderr
        state: dict[str, object] = json.loads(inspected.stdout)
        return state

    async def logs(self) -> str:
        return (await self.podman("logs", self.name)).stderr

    async def wait_serving(self, channel: grpc.aio.Channel, within: float = 60.0) -> None:
        health = health_pb2_grpc.HealthStub(channel)
        end = time.monotonic() + within
        while True:
            assert (await self.state())["Running"], await self.logs()
            try:
                answer = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=1)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            assert time.monotonic() < end, f"the container did not become SERVING\n{await self.logs()}"
            await asyncio.sleep(0.2)


@pytest.fixture
def free_ports(unused_tcp_port_factory: object) -> Iterator[tuple[int, int]]:
    factory = unused_tcp_port_factory
    yield factory(), factory()  # type: ignore[operator]


@pytest.fixture
async def container(image: str, emulator: Emulator, free_ports: tuple[int, int]) -> AsyncIterator[Container]:
    grpc_port, http_port = free_ports
    env = facade_environment(emulator.url, TIW_GRPC_PORT=str(grpc_port), TIW_HTTP_PORT=str(http_port))
    started = Container(f"tiw-facade-test-{uuid.uuid4().hex[:12]}", grpc_port, http_port)
    # The host's network, so the facade reaches the emulator on 127.0.0.1 and we reach the facade;
    # the rest is the Deployment's securityContext (k8s/base/deployment.yaml).
    run = await started.podman(
        "run", "--detach", "--name", started.name, "--network", "host",
        "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
        *[arg for name, value in env.items() for arg in ("--env", f"{name}={value}")],
        image,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    try:
        yield started
    finally:
        await started.podman("rm", "--force", "--time", "0", started.name)


@pytest.mark.slow
async def test_the_image_serves_signed_calls_metrics_and_stops_cleanly_on_sigterm(
    container: Container,
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{container.grpc_port}") as channel:
        await container.wait_serving(channel)
        # One RPC through to TIW: signed inside the container, checked by the emulator outside it.
        answer = await tiw_pb2_grpc.TiwServiceStub(channel).DescribeWhiteboardPush(
            pb.DescribeWhiteboardPushRequest(sdk_app_id=SDK_APP_ID, task_id=PUSH_TASK), timeout=10
        )
        assert answer.task_id == PUSH_TASK

    url = f"http://127.0.0.1:{container.http_port}/metrics"
    metrics = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    handled = {
        (sample.labels["grpc_method"], sample.labels["grpc_code"]): sample.value
        for family in text_string_to_metric_families(metrics)
        if family.name == "grpc_server_handled"
        for sample in family.samples
        if sample.name == "grpc_server_handled_total"
    }
    # Every (method, code) series starts at 0, so the count, not the series, shows the call.
    assert handled[("DescribeWhiteboardPush", "OK")] == 1

    # The Dockerfile's HEALTHCHECK, as `docker run` (and podman) would run it.
    healthcheck = await container.podman("healthcheck", "run", container.name)
    assert healthcheck.returncode == 0, healthcheck.stdout + healthcheck.stderr

    # `podman stop` sends the image's STOPSIGNAL (SIGTERM) and SIGKILLs after --time: exit code 0
    # (not 137) proves the server itself handled SIGTERM, as PID 1, and exited on its own.
    stop = await container.podman("stop", "--time", "30", container.name)
    assert stop.returncode == 0, stop.stderr
    state = await container.state()
    logs = await container.logs()
    assert (state["Running"], state["ExitCode"]) == (False, 0), logs
    messages = [json.loads(line)["msg"] for line in logs.splitlines()]
    assert messages.index("signal received: stopping") < messages.index("stopped")


def test_the_image_metadata_matches_the_deployment(image: str) -> None:
    inspected = podman("image", "inspect", "--format", "{{json .Config}}", image)
    assert inspected.returncode == 0, inspected.stderr
    config = json.loads(inspected.stdout)
    # Numeric, for runAsNonRoot; equal to the Deployment's runAsUser/runAsGroup.
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["tiw-facade", "serve"]
    assert config["StopSignal"] == "SIGTERM"
    assert set(config["ExposedPorts"]) == {"50051/tcp", "8080/tcp"}
    assert config["Labels"]["org.opencontainers.image.version"] == __version__
